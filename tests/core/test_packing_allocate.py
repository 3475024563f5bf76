"""``Work.allocate`` takes a domain's nodes as SPEC §B.3.4 orders them (free GPUs descending,
then name; greedily from the first), on a snapshot and over a plan's own earlier takes."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.core.model import Node
from gpu_fleet.core.placement.pack import NodeAllocation, Work
from gpu_fleet.core.placement.topology import compile_nodes, topology_from


def reference(work: Work, domain: str, n: int) -> tuple[NodeAllocation, ...]:
    """SPEC §B.3.4 written out: sort by (free desc, name), take greedily, order the result."""
    nodes = sorted(
        ((work.node_free(name), name) for name in work.topology.domain(domain).nodes),
        key=lambda t: (-t[0], t[1]),
    )
    out = []
    for free, name in nodes:
        if n == 0 or free == 0:
            break
        k = min(free, n)
        out.append(NodeAllocation(name, work.take(name, k)))
        n -= k
    out.sort(key=lambda a: (-len(a.slots), a.node))
    return tuple(out)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sets(st.integers(0, 7), max_size=8), min_size=1, max_size=10),
    st.lists(st.integers(1, 20), min_size=1, max_size=4),
    st.permutations(range(10)),
)
def test_allocate_takes_nodes_in_spec_order(
    held: list[set[int]], asks: list[int], names: list[int]
) -> None:
    nodes = [
        msgspec.convert(
            {
                "name": f"n{names[i]:02d}",  # names not in list order: the order is by name
                "gpus": 8,
                "labels": {
                    "gpu.flavor": "H100",
                    "region": "r1",
                    "cluster": "c1",
                    "fabric.domain": "d0",
                },
            },
            Node,
        )
        for i in range(len(held))
    ]
    topology = topology_from(
        compile_nodes(nodes, "H100"), {n.name: h for n, h in zip(nodes, held, strict=True)}
    )
    (domain,) = topology.domain_keys()
    fast, slow = Work(topology), Work(topology)
    for ask in asks:  # later asks see the earlier takes (the plan's own overlay)
        if ask > fast.domain_free(domain):
            break
        assert fast.allocate(domain, ask) == reference(slow, domain, ask)
