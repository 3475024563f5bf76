"""Shared builders for the packing tests (greedy and CP-SAT): one H100 flavor in three fabric
domains of one cluster, requests, the invariants every plan must satisfy, and the
hypothesis strategies both property tests draw from."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.core.placement import PackPlan, PackRequest, Topology, build_topology

H100 = "H100-80GB"
A = "us-west/gpu-a/A"
B = "us-west/gpu-a/B"
C = "us-west/gpu-a/C"


def node(name: str, gpus: int, fabric: str, health: NodeHealth = NodeHealth.READY) -> Node:
    labels = {"region": "us-west", "cluster": "gpu-a", "fabric.domain": fabric, "gpu.flavor": H100}
    return Node(name=name, gpus=gpus, labels=labels, health=health)


def topo(nodes: Sequence[Node], held: Sequence[str] = ()) -> Topology:
    return build_topology(nodes, set(held), H100)


def req(total: int, **kw: object) -> PackRequest:
    return PackRequest(flavor=H100, total_gpus=total, **kw)  # type: ignore[arg-type]


def slots(node_name: str, lo: int, hi: int) -> tuple[str, ...]:
    return tuple(f"{node_name}#{i}" for i in range(lo, hi))


def check_plan(t: Topology, request: PackRequest, plan: PackPlan) -> None:
    """Invariants every successful plan must satisfy."""
    all_slots = plan.slots()
    assert len(all_slots) == len(set(all_slots)), "a slot is allocated twice"
    for s in all_slots:
        node_name = s.rpartition("#")[0]
        assert s in t.free_slots(node_name), f"{s} was not free"
        assert s not in request.excluded_slots
    assert sum(g.size for g in plan.groups) == request.total_gpus == plan.total_gpus
    for g in plan.groups:
        assert sum(len(a.slots) for a in g.allocations) == g.size
        assert {t.domain_of(a.node) for a in g.allocations} == {g.domain}
        assert sum(len(a.slots) for a in g.spare_allocations) == request.spares_per_group
    assert plan.total_spares == request.spares_per_group * len(plan.groups)
    assert [g.index for g in plan.groups] == list(
        range(request.group_index_offset, request.group_index_offset + len(plan.groups))
    )
    if not request.allow_cross_group_spread:
        assert len({g.domain for g in plan.groups}) == 1


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[Node], list[str]]:
    n_domains = draw(st.integers(1, 4))
    nodes: list[Node] = []
    held: list[str] = []
    for d in range(n_domains):
        for i in range(draw(st.integers(1, 4))):
            name = f"d{d}n{i}"
            gpus = draw(st.sampled_from([2, 4, 8]))
            health = draw(
                st.sampled_from([NodeHealth.READY] * 6 + [NodeHealth.CORDONED, NodeHealth.FENCED])
            )
            nodes.append(node(name, gpus, f"D{d}", health))
            used = draw(st.lists(st.integers(0, gpus), max_size=gpus, unique=True))
            held.extend(f"{name}#{o}" for o in used)
    return nodes, held


@st.composite
def requests(draw: st.DrawFn) -> PackRequest:
    g = draw(st.one_of(st.none(), st.integers(1, 12)))
    return req(
        draw(st.integers(1, 40)),
        group_gpus=g,
        allow_cross_group_spread=draw(st.booleans()),
        spares_per_group=draw(st.integers(0, 2)),
        group_index_offset=draw(st.integers(0, 3)),
        excluded_slots=frozenset(draw(st.lists(st.sampled_from(["d0n0#0", "d1n0#1", "x#0"])))),
    )
