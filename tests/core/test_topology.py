"""Topology index (SPEC §B.1 with physical slots, DESIGN decision 6)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.core.placement import (
    Domain,
    TopologyError,
    build_topology,
    node_location,
    parse_slot,
)
from gpu_fleet.core.placement import topology as topology_module
from gpu_fleet.core.placement.topology import compile_nodes, topology_from

H100 = "H100-80GB"


def node(
    name: str,
    gpus: int,
    fabric: str,
    *,
    flavor: str = H100,
    health: NodeHealth = NodeHealth.READY,
    region: str = "us-west",
    cluster: str = "gpu-a",
) -> Node:
    labels = {"region": region, "cluster": cluster, "fabric.domain": fabric, "gpu.flavor": flavor}
    return Node(name=name, gpus=gpus, labels=labels, health=health)


class TestBuild:
    def test_keeps_only_flavor_nodes_with_gpus(self) -> None:
        topo = build_topology(
            [node("a1", 8, "A"), node("x1", 8, "A", flavor="A100"), node("z", 0, "A")], (), H100
        )
        assert topo.flavor == H100
        assert [d.nodes for d in topo.domains()] == [("a1",)]
        assert not topo.has_node("x1")
        assert not topo.has_node("z")

    def test_domain_key_and_labels(self) -> None:
        topo = build_topology([node("b2", 4, "B"), node("b1", 4, "B")], (), H100)
        assert topo.domains() == [
            Domain(
                key="us-west/gpu-a/B",
                labels={"region": "us-west", "cluster": "gpu-a", "fabric.domain": "B"},
                nodes=("b1", "b2"),
            )
        ]
        assert topo.domain_of("b2") == "us-west/gpu-a/B"
        assert topo.node_labels("b1")["gpu.flavor"] == H100

    @pytest.mark.parametrize("label", ["region", "cluster", "fabric.domain"])
    def test_missing_location_label_names_node_and_label(self, label: str) -> None:
        bad = node("a1", 8, "A")
        labels = {k: v for k, v in bad.labels.items() if k != label}
        with pytest.raises(TopologyError, match=rf"^node a1: missing label {label}$"):
            build_topology([Node(name="a1", gpus=8, labels=labels)], (), H100)

    def test_missing_label_on_other_flavor_is_ignored(self) -> None:
        other = Node(name="x", gpus=8, labels={"gpu.flavor": "A100"})
        topo = build_topology([other, node("a1", 8, "A")], (), H100)
        assert topo.total_free() == 8

    def test_domain_order_free_desc_then_key(self) -> None:
        topo = build_topology(
            [node("c1", 8, "C"), node("a1", 4, "A"), node("b1", 8, "B")], (), H100
        )
        assert [d.key for d in topo.domains()] == [
            "us-west/gpu-a/B",
            "us-west/gpu-a/C",
            "us-west/gpu-a/A",
        ]

    def test_empty_fleet(self) -> None:
        topo = build_topology([], (), H100)
        assert topo.domains() == []
        assert topo.total_free() == 0


class TestSlots:
    def test_free_slots_skip_held_ordinals(self) -> None:
        topo = build_topology([node("a1", 4, "A")], {"a1#0", "a1#1"}, H100)
        assert topo.free_slots("a1") == ("a1#2", "a1#3")
        assert topo.free_gpus("a1") == 2
        assert topo.domain_free("us-west/gpu-a/A") == 2
        assert topo.total_free() == 2

    def test_held_slots_reorder_domains(self) -> None:
        held = {f"b1#{i}" for i in range(6)}
        topo = build_topology([node("a1", 4, "A"), node("b1", 8, "B")], held, H100)
        assert [d.key for d in topo.domains()] == ["us-west/gpu-a/A", "us-west/gpu-a/B"]

    def test_stale_slots_do_not_crash(self) -> None:
        held = ["a1#9", "ghost#0", "garbage", "a1#", "#3", "a1#x", "a1#1"]
        topo = build_topology([node("a1", 4, "A")], held, H100)
        assert topo.free_slots("a1") == ("a1#0", "a1#2", "a1#3")

    def test_node_name_with_hash(self) -> None:
        topo = build_topology([node("rack#1", 2, "A")], {"rack#1#0"}, H100)
        assert topo.free_slots("rack#1") == ("rack#1#1",)

    @pytest.mark.parametrize("health", [NodeHealth.CORDONED, NodeHealth.FENCED])
    def test_unschedulable_nodes_exist_but_offer_nothing(self, health: NodeHealth) -> None:
        topo = build_topology([node("a1", 8, "A", health=health), node("a2", 8, "A")], (), H100)
        assert topo.domains()[0].nodes == ("a1", "a2")
        assert topo.free_gpus("a1") == 0
        assert topo.free_slots("a1") == ()
        assert topo.domain_free("us-west/gpu-a/A") == 8
        assert topo.domain_capacity("us-west/gpu-a/A") == 8

    def test_duplicate_inventory_row_first_wins(self) -> None:
        topo = build_topology([node("a1", 8, "A"), node("a1", 4, "A")], (), H100)
        assert topo.free_gpus("a1") == 8
        assert topo.domains()[0].nodes == ("a1",)


def test_node_location() -> None:
    labels = {"region": "r", "cluster": "c", "fabric.domain": "f", "gpu.flavor": H100, "x": "y"}
    assert node_location(labels) == {"region": "r", "cluster": "c", "fabric.domain": "f"}
    assert node_location({"region": "r"}) == {"region": "r"}


def test_parse_slot() -> None:
    assert parse_slot("a1#3") == ("a1", 3)
    assert parse_slot("a#b#12") == ("a#b", 12)
    assert parse_slot("a1") is None
    assert parse_slot("a1#-1") is None


# ------------------------------------------------------------------------------------------
# Incremental snapshots (issue 11): ``with_nodes`` is ``topology_from`` of the new holdings
# ------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(st.tuples(st.integers(0, 11), st.sets(st.integers(0, 7), max_size=8)), max_size=12),
    st.sampled_from([0, 2, topology_module.MERGE_FLOOR]),
)
def test_with_nodes_is_a_fresh_snapshot(
    domains: int, changes: list[tuple[int, set[int]]], merge_floor: int
) -> None:
    """Chained updates - each naming the nodes whose held ordinals changed - give the same
    domains (in SPEC order), free counts and free ordinals as building from scratch, whether
    the moved nodes lie over the shared node map or were merged in (a low floor merges)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(topology_module, "MERGE_FLOOR", merge_floor)
        chain_against_fresh(domains, changes)


def chain_against_fresh(domains: int, changes: list[tuple[int, set[int]]]) -> None:
    nodes = [
        msgspec.convert(
            {
                "name": f"n{i:02d}",
                "gpus": 8,
                "labels": {
                    "gpu.flavor": "H100",
                    "region": "r1",
                    "cluster": "c1",
                    "fabric.domain": f"d{i % domains}",
                },
            },
            Node,
        )
        for i in range(12)
    ]
    skeleton = compile_nodes(nodes, "H100")
    held: dict[str, set[int]] = {}
    current = topology_from(skeleton, held)
    for index, ordinals in changes:
        name = f"n{index:02d}"
        held[name] = set(ordinals)
        current = current.with_nodes(skeleton, held, [name])
        fresh = topology_from(skeleton, held)
        assert current.domain_keys() == fresh.domain_keys()
        assert current.domain_frees() == fresh.domain_frees()
        assert list(current.domain_frees()) == list(fresh.domain_frees())
        assert current.total_free() == fresh.total_free()
        frees = fresh.domain_frees()
        for free in range(8 * 12 + 1):  # the least key with each count (evident_fill's pick)
            least = min((d for d, f in frees.items() if f == free), default=None)
            assert current.least_key_with(free) == least
        for node in nodes:
            assert current.free_ordinals(node.name) == fresh.free_ordinals(node.name)
            assert current.free_slots(node.name) == fresh.free_slots(node.name)
            assert current.free_gpus(node.name) == fresh.free_gpus(node.name)
