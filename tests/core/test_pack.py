"""Greedy pack (SPEC §B.3) on physical slots, including the shared pack-* scenario stories."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from pack_builders import H100, A, B, check_plan, fleets, node, req, requests, slots, topo

from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.core.placement import (
    NodeAllocation,
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    Topology,
    groups,
    pack_greedy,
    plan_cost,
)


def apply(t: Topology, plan: PackPlan, nodes: Sequence[Node], held: Sequence[str]) -> Topology:
    """The snapshot after the plan's leases exist."""
    return topo(nodes, [*held, *plan.slots()])


class TestGroups:
    @pytest.mark.parametrize(
        ("total", "g", "expected"),
        [
            (40, None, [40]),
            (64, 32, [32, 32]),
            (70, 32, [32, 32, 6]),
            (8, 32, [8]),
            (0, 8, []),
            (-4, None, []),
            (8, 0, []),
            (8, -1, []),
        ],
    )
    def test_groups(self, total: int, g: int | None, expected: list[int]) -> None:
        assert groups(total, g) == expected


class TestInvalidRequest:
    @pytest.mark.parametrize(
        ("request_", "message"),
        [
            (PackRequest(flavor="", total_gpus=4), "flavor is required"),
            (
                PackRequest(flavor="A100", total_gpus=4),
                "flavor mismatch: request asks for A100, topology is H100-80GB",
            ),
            (PackRequest(flavor=H100, total_gpus=0), "totalGPUs must be positive, got 0"),
            (PackRequest(flavor=H100, total_gpus=4, group_gpus=0), "groupGPUs must be positive"),
            (
                PackRequest(flavor=H100, total_gpus=4, spares_per_group=-1),
                "sparesPerGroup must not be negative",
            ),
            (
                PackRequest(flavor=H100, total_gpus=4, group_index_offset=-1),
                "group index offset must not be negative",
            ),
        ],
    )
    def test_invalid(self, request_: PackRequest, message: str) -> None:
        with pytest.raises(PackError, match=message) as err:
            pack_greedy(topo([node("a1", 8, "A")]), request_)
        assert err.value.kind is PackErrorKind.INVALID_REQUEST
        assert err.value.shortfall == {}
        assert err.value.deficit == 0


class TestSingleDomain:
    def test_first_sorted_domain_that_fits(self) -> None:
        t = topo([node("a1", 16, "A"), node("b1", 32, "B"), node("c1", 12, "C")])
        plan = pack_greedy(t, req(12, allow_cross_group_spread=False))
        assert [g.domain for g in plan.groups] == [B]  # greedy takes the largest (SPEC)
        assert plan.groups[0].allocations == (NodeAllocation("b1", slots("b1", 0, 12)),)

    def test_all_groups_in_one_domain(self) -> None:
        t = topo([node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 24, "B")])
        plan = pack_greedy(t, req(24, group_gpus=8, allow_cross_group_spread=False))
        assert [(g.index, g.domain, g.size) for g in plan.groups] == [
            (0, A, 8),
            (1, A, 8),
            (2, A, 8),
        ]

    def test_probe_waits_when_no_domain_fits(self) -> None:
        # pack-fill-domain-before-spilling, after big: A has 0 free, B has 8.
        nodes = [node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 16, "B")]
        t = topo(nodes, [*slots("a1", 0, 16), *slots("a2", 0, 16), *slots("b1", 0, 8)])
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(9, allow_cross_group_spread=False))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_TOPOLOGY
        assert err.value.message == (
            "no single domain has 9 free GPUs (closest: us-west/gpu-a/B with 8 free)"
        )
        assert err.value.shortfall == {B: 1}
        assert err.value.deficit == 1

    def test_closest_prefers_domains_big_enough(self) -> None:
        # A has more free GPUs but could never hold 20; B could once 6 are freed.
        t = topo([node("a1", 16, "A"), node("b1", 24, "B")], slots("b1", 0, 10))
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(20, allow_cross_group_spread=False))
        assert err.value.shortfall == {B: 6}

    def test_grow_stays_in_the_runs_domain(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 32, "B")])
        plan = pack_greedy(t, req(8, allow_cross_group_spread=False, preferred_domains=(A,)))
        assert plan.groups[0].domain == A
        with pytest.raises(PackError, match=r"no domain of the run \(us-west/gpu-a/A\)") as err:
            pack_greedy(t, req(9, allow_cross_group_spread=False, preferred_domains=(A,)))
        assert err.value.shortfall == {A: 1}

    def test_no_domain_at_all(self) -> None:
        with pytest.raises(PackError, match="flavor H100-80GB has no domain") as err:
            pack_greedy(topo([]), req(1, allow_cross_group_spread=False))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_TOPOLOGY
        assert err.value.shortfall == {}


class TestWithGroups:
    FLEET = (
        node("a1", 32, "A"),
        node("a2", 16, "A"),
        node("b1", 32, "B"),
        node("b2", 32, "B"),
    )

    def test_groups_prefer_used_domain(self) -> None:
        # pack-groups-prefer-used-domain: both groups in B; A stays whole for probe-48.
        t = topo(self.FLEET)
        plan = pack_greedy(t, req(64, group_gpus=32))
        assert [(g.index, g.domain) for g in plan.groups] == [(0, B), (1, B)]
        assert plan.groups[0].allocations == (NodeAllocation("b1", slots("b1", 0, 32)),)
        assert plan.groups[1].allocations == (NodeAllocation("b2", slots("b2", 0, 32)),)
        probe = pack_greedy(apply(t, plan, self.FLEET, ()), req(48, allow_cross_group_spread=False))
        assert probe.nodes() == ("a1", "a2")

    def test_three_groups_two_in_b_one_in_a(self) -> None:
        plan = pack_greedy(topo(self.FLEET), req(96, group_gpus=32))
        assert [g.domain for g in plan.groups] == [B, B, A]

    def test_no_fit_reports_whole_shortfall(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 8, "B")], ["a1#0", "b1#0", "b1#1"])
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(16, group_gpus=8))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_CAPACITY
        assert err.value.message == "group 0 (8 GPUs): no domain has 8 free GPUs"
        assert err.value.shortfall == {A: 1, B: 2}
        assert err.value.deficit == 3

    def test_group_larger_than_any_domain(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 4, "B")])
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(12, group_gpus=12))
        assert err.value.shortfall == {A: 4}

    def test_offset_and_preferred_domain_for_grow(self) -> None:
        # golden-elastic-base-gang-then-grow: base 96 held on node-0..2, grow 32 as group 3.
        nodes = [node(f"node-{i}", 32, "A") for i in range(5)] + [node("x1", 64, "B")]
        held = [s for i in range(3) for s in slots(f"node-{i}", 0, 32)]
        t = topo(nodes, held)
        plan = pack_greedy(t, req(32, group_gpus=32, group_index_offset=3, preferred_domains=(A,)))
        assert [(g.index, g.domain) for g in plan.groups] == [(3, A)]
        assert plan.groups[0].allocations == (NodeAllocation("node-3", slots("node-3", 0, 32)),)

    def test_one_group_per_node(self) -> None:
        # golden-borrow-sponsor-runs: four 32-GPU groups, one per node.
        t = topo([node(f"node-{i}", 32, "A") for i in range(4)])
        plan = pack_greedy(t, req(128, group_gpus=32))
        assert [g.allocations[0].node for g in plan.groups] == [f"node-{i}" for i in range(4)]
        assert all(len(g.allocations) == 1 for g in plan.groups)


class TestFillToEmpty:
    def test_fill_domain_before_spilling(self) -> None:
        # pack-fill-domain-before-spilling: group 0 = all of A, group 1 = 8 GPUs of b1.
        t = topo([node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 16, "B")])
        plan = pack_greedy(t, req(40))
        assert [(g.index, g.size, g.domain) for g in plan.groups] == [(0, 32, A), (1, 8, B)]
        assert plan.groups[0].allocations == (
            NodeAllocation("a1", slots("a1", 0, 16)),
            NodeAllocation("a2", slots("a2", 0, 16)),
        )
        assert plan.groups[1].allocations == (NodeAllocation("b1", slots("b1", 0, 8)),)

    def test_capacity_missing(self) -> None:
        # golden-capacity-missing-reservation: 8 GPUs asked, the fleet has 4.
        with pytest.raises(PackError) as err:
            pack_greedy(topo([node("node-a", 4, "island-a")]), req(8))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_CAPACITY
        assert err.value.message == "8 GPUs requested, 4 free in flavor H100-80GB"
        assert err.value.shortfall == {"us-west/gpu-a/island-a": 4}

    def test_shortfall_charged_to_busy_domains(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 8, "B")], [*slots("a1", 0, 2), *slots("b1", 0, 6)])
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(12))
        # 8 free, 4 missing: A (6 free) has 2 busy, B has 6 busy.
        assert err.value.shortfall == {A: 2, B: 2}

    def test_preferred_domains_first(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 16, "B")])
        plan = pack_greedy(t, req(12, preferred_domains=(A,)))
        assert [(g.size, g.domain) for g in plan.groups] == [(8, A), (4, B)]


class TestNodeAllocation:
    def test_largest_nodes_first_then_name(self) -> None:
        held = [*slots("a1", 0, 6), *slots("a3", 0, 4)]
        t = topo([node("a1", 8, "A"), node("a2", 8, "A"), node("a3", 8, "A")], held)
        plan = pack_greedy(t, req(13))
        # free: a1 2, a2 8, a3 4 -> a2 (8), a3 (4), a1 (1)
        assert plan.groups[0].allocations == (
            NodeAllocation("a2", slots("a2", 0, 8)),
            NodeAllocation("a3", ("a3#4", "a3#5", "a3#6", "a3#7")),
            NodeAllocation("a1", ("a1#6",)),
        )

    def test_held_and_excluded_slots_never_reused(self) -> None:
        t = topo([node("a1", 8, "A")], ["a1#0", "a1#3"])
        r = req(4, excluded_slots=frozenset({"a1#1", "a1#7", "zz#1"}))
        plan = pack_greedy(t, r)
        assert plan.slots() == ("a1#2", "a1#4", "a1#5", "a1#6")
        with pytest.raises(PackError):
            pack_greedy(t, req(5, excluded_slots=frozenset({"a1#1", "a1#7"})))

    def test_cordoned_and_fenced_nodes_get_nothing(self) -> None:
        nodes = [
            node("a1", 8, "A", NodeHealth.CORDONED),
            node("a2", 8, "A", NodeHealth.FENCED),
            node("a3", 8, "A"),
        ]
        t = topo(nodes)
        assert pack_greedy(t, req(8)).nodes() == ("a3",)
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(9))
        assert err.value.shortfall == {A: 1}


class TestSpares:
    def test_spares_same_domain_then_spill(self) -> None:
        # pack-spares-same-domain-then-spill.
        nodes = [node("a1", 32, "A"), node("a2", 6, "A"), node("b1", 8, "B")]
        t = topo(nodes)
        anchor = pack_greedy(t, req(32, group_gpus=32, spares_per_group=4))
        assert anchor.groups[0].allocations == (NodeAllocation("a1", slots("a1", 0, 32)),)
        assert anchor.groups[0].spare_allocations == (NodeAllocation("a2", slots("a2", 0, 4)),)
        assert anchor.total_spares == 4
        t2 = apply(t, anchor, nodes, ())
        spill = pack_greedy(t2, req(8, group_gpus=8, spares_per_group=2))
        assert spill.groups[0].allocations == (NodeAllocation("b1", slots("b1", 0, 8)),)
        assert spill.groups[0].spare_allocations == (NodeAllocation("a2", ("a2#4", "a2#5")),)
        assert apply(t2, spill, nodes, anchor.slots()).total_free() == 0

    def test_spares_held_beside_run(self) -> None:
        # controller-spares-held-beside-run: 4 actives + 2 spares on one 8-GPU node.
        t = topo([node("node-a", 8, "island-a")])
        plan = pack_greedy(t, req(4, spares_per_group=2))
        assert plan.groups[0].allocations == (NodeAllocation("node-a", slots("node-a", 0, 4)),)
        assert plan.groups[0].spare_allocations == (
            NodeAllocation("node-a", ("node-a#4", "node-a#5")),
        )

    def test_spares_spill_to_other_island(self) -> None:
        # golden-node-failure-swap-to-spare.
        t = topo([node("a1", 2, "island-a"), node("a2", 2, "island-a"), node("s1", 2, "island-b")])
        plan = pack_greedy(t, req(4, group_gpus=4, spares_per_group=2))
        assert plan.groups[0].allocations == (
            NodeAllocation("a1", ("a1#0", "a1#1")),
            NodeAllocation("a2", ("a2#0", "a2#1")),
        )
        assert plan.groups[0].spare_allocations == (NodeAllocation("s1", ("s1#0", "s1#1")),)

    def test_spares_short_is_all_or_nothing(self) -> None:
        t = topo([node("a1", 8, "A")])
        with pytest.raises(PackError) as err:
            pack_greedy(t, req(4, group_gpus=2, spares_per_group=3))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_CAPACITY
        assert err.value.message == (
            "spares: 6 spare GPUs needed (3 per group), 4 free after placing the groups"
        )
        assert err.value.deficit == 2


class TestCost:
    def test_plan_cost(self) -> None:
        t = topo([node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 16, "B")])
        plan = pack_greedy(t, req(40))
        cost = plan_cost(t, req(40), plan)
        assert (cost.span, cost.stranded, cost.nodes) == (2, 8, 3)
        assert plan_cost(t, req(40, preferred_domains=(A,)), plan).span == 1


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), requests())
def test_greedy_plan_is_valid_or_all_or_nothing(
    fleet: tuple[list[Node], list[str]], request: PackRequest
) -> None:
    nodes, held = fleet
    t = topo(nodes, held)
    outcome = _attempt(t, request)
    if isinstance(outcome, PackError):
        assert outcome.kind is not PackErrorKind.INVALID_REQUEST
        assert outcome.deficit > 0 or t.total_free() == 0 or outcome.shortfall == {}
        free = t.total_free() - len(request.excluded_slots & set(_all_free(t)))
        if not outcome.message.startswith("spares"):
            if request.group_gpus is None and request.allow_cross_group_spread:
                assert request.total_gpus > free  # fill-to-empty fails only on capacity
        else:  # spares fail only when the whole flavor is short
            assert outcome.kind is PackErrorKind.INSUFFICIENT_CAPACITY
        return
    plan = outcome
    check_plan(t, request, plan)
    assert pack_greedy(t, request) == plan  # deterministic


def _all_free(t: Topology) -> list[str]:
    return [s for d in t.domains() for n in d.nodes for s in t.free_slots(n)]


def _attempt(t: Topology, request: PackRequest) -> PackPlan | PackError:
    try:
        return pack_greedy(t, request)
    except PackError as err:
        return err
