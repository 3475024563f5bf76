"""Physical GPU slots for the baseline schedulers, placed with gpu-fleet's own greedy packer.

The baselines are other schedulers, but where they put a gang is not what they are compared on:
they all place with ``core.placement.pack_greedy`` on the same topology (fabric domains, nodes,
physical slots) that gpu-fleet's engine uses, so differences come from *when* and *whom* each
policy admits, never from a weaker packer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence

from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.core.placement import (
    PackError,
    PackPlan,
    PackRequest,
    Topology,
    compile_nodes,
    pack_greedy,
    parse_slot,
    topology_from,
)
from gpu_fleet.sim.jobs import Job


def min_nodes(node_sizes: Sequence[int], gpus: int) -> int:
    """Fewest nodes whose GPUs add up to ``gpus`` (largest nodes first)."""
    n = 0
    for size in sorted(node_sizes, reverse=True):
        if gpus <= 0:
            break
        gpus -= size
        n += 1
    return n if gpus <= 0 else n + 1


def plan_nodes(plan: PackPlan) -> int:
    return len({a.node for g in plan.groups for a in g.allocations})


class Cluster:
    """Held slots per node over a compiled skeleton of one flavor."""

    def __init__(self, nodes: Sequence[Node], flavor: str) -> None:
        self.flavor = flavor
        self.skeleton = compile_nodes(list(nodes), flavor)
        self.node_sizes = [
            n.gpus for n in nodes if n.flavor == flavor and n.health is NodeHealth.READY
        ]
        self.capacity = sum(self.node_sizes)
        self.held: dict[str, set[int]] = defaultdict(set)
        self.free = self.capacity
        self._topology: Topology | None = None
        self._failed: set[tuple[int, int | None, frozenset[str]]] = set()

    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = topology_from(self.skeleton, self.held)
        return self._topology

    def request(self, job: Job, excluded: Collection[str] = ()) -> PackRequest:
        return PackRequest(
            flavor=self.flavor,
            total_gpus=job.gpus,
            group_gpus=job.group_gpus,
            excluded_slots=frozenset(excluded),
        )

    def plan(self, job: Job, excluded: Collection[str] = ()) -> PackPlan | None:
        """Where ``job`` would go now (outside ``excluded``), or ``None``.  A shape that failed
        is not tried again until the cluster changes."""
        if job.gpus > self.free - len(excluded):
            return None
        shape = (job.gpus, job.group_gpus, frozenset(excluded))
        if shape in self._failed:
            return None
        try:
            return pack_greedy(self.topology(), self.request(job, excluded))
        except PackError:
            self._failed.add(shape)
            return None

    def take(self, plan: PackPlan) -> None:
        self._change(plan.slots(), +1)

    def release(self, plan: PackPlan) -> None:
        self._change(plan.slots(), -1)

    def _change(self, slots: Sequence[str], sign: int) -> None:
        for s in slots:
            parsed = parse_slot(s)
            assert parsed is not None
            node, ordinal = parsed
            if sign > 0:
                self.held[node].add(ordinal)
            else:
                self.held[node].discard(ordinal)
        self.free -= sign * len(slots)
        self._topology = None
        self._failed.clear()

    def fits_after(self, releases: Sequence[PackPlan], job: Job) -> PackPlan | None:
        """Where ``job`` would go once ``releases`` have freed their slots (nothing changes)."""
        held = {node: set(ords) for node, ords in self.held.items()}
        for plan in releases:
            for s in plan.slots():
                parsed = parse_slot(s)
                if parsed is not None:
                    held[parsed[0]].discard(parsed[1])
        try:
            return pack_greedy(topology_from(self.skeleton, held), self.request(job))
        except PackError:
            return None
