"""The binder's entry point: greedy improved by CP-SAT, never worse, deterministic, bounded."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pack_builders import A, B, C, check_plan, fleets, node, req, requests, slots, topo

from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.core.placement import (
    NodeAllocation,
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    PlannerSettings,
    cpsat,
    cpsat_model,
    model_size,
    pack_greedy,
    plan_batch,
    plan_cost,
    plan_placement,
    plan_without_search,
)
from gpu_fleet.core.placement.cpsat_model import DEFAULT_SETTINGS, PlacementModel
from gpu_fleet.core.placement.pack import Work, decide_greedy, validate
from gpu_fleet.core.placement.topology import Topology


def churned_fleet(
    n_domains: int, seed: int, fill: float = 0.7, holes: Sequence[int] = (2, 4, 6, 8)
) -> tuple[list[Node], set[str]]:
    """Domains of 4-8 eight-GPU nodes with gang-shaped holes (contiguous runs of slots)."""
    rng = random.Random(seed)
    nodes: list[Node] = []
    held: set[str] = set()
    for d in range(n_domains):
        for i in range(rng.randint(4, 8)):
            name = f"d{d:03}n{i}"
            nodes.append(node(name, 8, f"D{d:03}"))
            if rng.random() < fill:
                held.update(slots(name, 0, rng.choice(holes)))
    return nodes, held


# Shared invariants (kept in sync with test_pack.py; the test folder has no helper package).


class TestScenarioExpectations:
    """The shared scenarios were written against SPEC greedy; the optimiser must agree."""

    def test_fill_domain_before_spilling(self) -> None:
        t = topo([node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 16, "B")])
        plan = plan_placement(t, req(40))
        assert [(g.index, g.size, g.domain) for g in plan.groups] == [(0, 32, A), (1, 8, B)]
        assert plan.groups[1].allocations == (NodeAllocation("b1", slots("b1", 0, 8)),)
        after = topo([node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 16, "B")], plan.slots())
        with pytest.raises(PackError) as err:
            plan_placement(after, req(9, allow_cross_group_spread=False))
        assert err.value.kind is PackErrorKind.INSUFFICIENT_TOPOLOGY
        assert err.value.shortfall == {B: 1}

    @pytest.mark.parametrize(("total", "domains"), [(64, [B, B]), (96, [B, B, A])])
    def test_groups_prefer_used_domain(self, total: int, domains: list[str]) -> None:
        fleet = [node("a1", 32, "A"), node("a2", 16, "A"), node("b1", 32, "B"), node("b2", 32, "B")]
        plan = plan_placement(topo(fleet), req(total, group_gpus=32))
        assert [g.domain for g in plan.groups] == domains
        if total == 64:
            probe = plan_placement(
                topo(fleet, plan.slots()), req(48, allow_cross_group_spread=False)
            )
            assert probe.nodes() == ("a1", "a2")

    def test_spares_same_domain_then_spill(self) -> None:
        fleet = [node("a1", 32, "A"), node("a2", 6, "A"), node("b1", 8, "B")]
        anchor = plan_placement(topo(fleet), req(32, group_gpus=32, spares_per_group=4))
        assert anchor.groups[0].allocations == (NodeAllocation("a1", slots("a1", 0, 32)),)
        assert anchor.groups[0].spare_allocations == (NodeAllocation("a2", slots("a2", 0, 4)),)
        spill = plan_placement(
            topo(fleet, anchor.slots()), req(8, group_gpus=8, spares_per_group=2)
        )
        assert spill.slots() == (*slots("b1", 0, 8), "a2#4", "a2#5")

    def test_spares_held_beside_run(self) -> None:
        plan = plan_placement(topo([node("node-a", 8, "island-a")]), req(4, spares_per_group=2))
        assert plan.slots() == slots("node-a", 0, 6)
        assert plan.total_spares == 2

    def test_spares_spill_to_other_island(self) -> None:
        t = topo([node("a1", 2, "island-a"), node("a2", 2, "island-a"), node("s1", 2, "island-b")])
        plan = plan_placement(t, req(4, group_gpus=4, spares_per_group=2))
        assert plan.groups[0].spare_allocations == (NodeAllocation("s1", ("s1#0", "s1#1")),)

    def test_golden_borrow_one_group_per_node(self) -> None:
        t = topo([node(f"node-{i}", 32, "island-a") for i in range(4)])
        plan = plan_placement(t, req(128, group_gpus=32))
        assert [g.allocations for g in plan.groups] == [
            (NodeAllocation(f"node-{i}", slots(f"node-{i}", 0, 32)),) for i in range(4)
        ]

    def test_golden_capacity_missing(self) -> None:
        with pytest.raises(PackError) as err:
            plan_placement(topo([node("node-a", 4, "island-a")]), req(8))
        assert err.value.deficit == 4
        assert err.value.shortfall == {"us-west/gpu-a/island-a": 4}

    def test_golden_simple_fit(self) -> None:
        plan = plan_placement(topo([node("node-a", 4, "island-a")]), req(4))
        assert plan.slots() == slots("node-a", 0, 4)


class TestOptimiser:
    def test_single_domain_best_fit(self) -> None:
        # Greedy takes the largest domain (C); the optimiser keeps C whole and fills B exactly.
        t = topo([node("a1", 12, "A"), node("b1", 8, "B"), node("c1", 32, "C")])
        assert pack_greedy(t, req(8, allow_cross_group_spread=False)).groups[0].domain == C
        plan = plan_placement(t, req(8, allow_cross_group_spread=False))
        assert plan.solver == "cp-sat"
        assert [g.domain for g in plan.groups] == [B]

    def test_groups_best_fit_strands_less(self) -> None:
        fleet = [node("a1", 8, "A"), node("a2", 8, "A"), node("b1", 8, "B")]
        fleet += [node(f"c{i}", 8, "C") for i in range(3)]
        t = topo(fleet, ["c0#0", "c1#0"])
        r = req(24, group_gpus=8)
        greedy = pack_greedy(t, r)
        plan = plan_placement(t, r)
        assert [g.domain for g in greedy.groups] == [C, C, A]
        assert [g.domain for g in plan.groups] == [A, A, B]
        assert plan_cost(t, r, plan) < plan_cost(t, r, greedy)
        check_plan(t, r, plan)

    def test_fill_mode_drains_exact_domains(self) -> None:
        # 42 GPUs: greedy drains the 32-GPU domain and half-breaks the 30; the optimiser drains
        # 30 + 12 exactly and leaves the 32 whole.  Still fill-to-empty.
        fleet = [node("a1", 16, "A"), node("a2", 16, "A"), node("b1", 30, "B"), node("c1", 12, "C")]
        t = topo(fleet)
        plan = plan_placement(t, req(42))
        assert [(g.size, g.domain) for g in plan.groups] == [(30, B), (12, C)]
        assert plan_cost(t, req(42), plan).stranded == 0

    def test_ties_go_to_greedy(self) -> None:
        t = topo([node("a1", 16, "A"), node("b1", 16, "B")])
        plan = plan_placement(t, req(8, allow_cross_group_spread=False))
        assert plan == pack_greedy(t, req(8, allow_cross_group_spread=False))
        assert plan.solver == "greedy"

    def test_disabled_is_greedy(self) -> None:
        t = topo([node("a1", 12, "A"), node("b1", 8, "B"), node("c1", 32, "C")])
        r = req(8, allow_cross_group_spread=False)
        assert plan_placement(t, r, PlannerSettings(enabled=False)) == pack_greedy(t, r)

    def test_tiny_budget_never_worse_than_greedy(self) -> None:
        nodes, held = churned_fleet(30, seed=3)
        t = topo(nodes, sorted(held))
        r = req(64, group_gpus=8, spares_per_group=1)
        plan = plan_placement(t, r, PlannerSettings(deterministic_time=1e-6))
        assert plan_cost(t, r, plan) <= plan_cost(t, r, pack_greedy(t, r))

    def test_preferred_domain_is_free_to_use(self) -> None:
        # A grow prefers the run's domain even when another domain fits tighter.
        t = topo([node("a1", 32, "A"), node("b1", 8, "B")])
        plan = plan_placement(t, req(8, group_gpus=8, preferred_domains=(A,)))
        assert [g.domain for g in plan.groups] == [A]

    def test_excluded_and_held_slots_respected(self) -> None:
        nodes, held = churned_fleet(12, seed=5)
        excluded = frozenset(s for s in (f"d{d:03}n0#7" for d in range(12)) if s not in held)
        t = topo(nodes, sorted(held))
        r = req(40, group_gpus=8, spares_per_group=1, excluded_slots=excluded)
        plan = plan_placement(t, r)
        check_plan(t, r, plan)

    def test_cordoned_nodes_never_used(self) -> None:
        t = topo([node("a1", 8, "A", NodeHealth.CORDONED), node("a2", 8, "A"), node("b1", 4, "B")])
        plan = plan_placement(t, req(4, allow_cross_group_spread=False))
        assert plan.nodes() == ("b1",)
        with pytest.raises(PackError):
            plan_placement(t, req(9, allow_cross_group_spread=False))

    def test_invalid_request(self) -> None:
        with pytest.raises(PackError, match="totalGPUs must be positive") as err:
            plan_placement(topo([node("a1", 8, "A")]), req(0))
        assert err.value.kind is PackErrorKind.INVALID_REQUEST


class TestDeterminism:
    @pytest.mark.parametrize("seed", [1, 2])
    def test_same_input_same_plan(self, seed: int) -> None:
        nodes, held = churned_fleet(40, seed=seed)
        r = req(96, group_gpus=16, spares_per_group=2)
        first = plan_placement(topo(nodes, sorted(held)), r)
        # A snapshot built from the same inventory in another order is the same snapshot.
        second = plan_placement(topo(list(reversed(nodes)), sorted(held, reverse=True)), r)
        assert first == second

    def test_batch_is_deterministic(self) -> None:
        nodes, held = churned_fleet(20, seed=9)
        rs = [req(16, group_gpus=8), req(24), req(8, allow_cross_group_spread=False)] * 3
        t = topo(nodes, sorted(held))
        assert plan_batch(t, rs) == plan_batch(t, rs)


class TestModelSize:
    def test_bounded_for_a_10k_node_fleet(self) -> None:
        small_nodes, small_held = churned_fleet(150, seed=11)
        big_nodes, big_held = churned_fleet(1700, seed=11)
        assert len(big_nodes) >= 10_000
        for r in (req(256, group_gpus=8), req(200), req(24, allow_cross_group_spread=False)):
            small = model_size(topo(small_nodes, sorted(small_held)), r)
            big = model_size(topo(big_nodes, sorted(big_held)), r)
            # 48 candidate classes x (2 x 12 group-count patterns + a short group) at most.
            assert 0 < big <= 48 * 26
            assert big <= 2 * small + 48


class TestBatch:
    def test_later_requests_see_earlier_allocations(self) -> None:
        t = topo([node("a1", 8, "A"), node("b1", 8, "B")])
        out = plan_batch(t, [req(8), req(8), req(1)])
        first, second, third = out
        assert isinstance(first, PackPlan)
        assert isinstance(second, PackPlan)
        assert set(first.slots()).isdisjoint(second.slots())
        assert isinstance(third, PackError)
        assert third.kind is PackErrorKind.INSUFFICIENT_CAPACITY

    def test_failure_takes_nothing(self) -> None:
        t = topo([node("a1", 8, "A")])
        out = plan_batch(t, [req(9), req(0), req(8)])
        assert isinstance(out[0], PackError)
        assert isinstance(out[1], PackError)
        assert out[1].kind is PackErrorKind.INVALID_REQUEST
        assert isinstance(out[2], PackPlan)
        assert out[2].slots() == slots("a1", 0, 8)

    def test_excluded_slots_apply_to_their_request_only(self) -> None:
        t = topo([node("a1", 4, "A")])
        out = plan_batch(t, [req(2, excluded_slots=frozenset({"a1#0", "a1#1"})), req(2)])
        assert [p.slots() for p in out if isinstance(p, PackPlan)] == [
            ("a1#2", "a1#3"),
            ("a1#0", "a1#1"),
        ]

    def test_disabled_batch_equals_sequential_greedy(self) -> None:
        nodes, held = churned_fleet(15, seed=4)
        rs = [req(16, group_gpus=8, spares_per_group=1), req(20), req(12, group_gpus=4)]
        t = topo(nodes, sorted(held))
        out = plan_batch(t, rs, PlannerSettings(enabled=False))
        taken = set(held)
        for r, got in zip(rs, out, strict=True):
            expected = pack_greedy(topo(nodes, sorted(taken)), r)
            assert got == expected
            taken |= set(expected.slots())


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), requests())
def test_never_worse_than_greedy(fleet: tuple[list[Node], list[str]], request: PackRequest) -> None:
    nodes, held = fleet
    t = topo(nodes, held)
    greedy_error: PackError | None = None
    try:
        greedy = pack_greedy(t, request)
    except PackError as error:
        greedy_error = error
    if greedy_error is not None:
        with pytest.raises(PackError) as again:
            plan_placement(t, request)
        assert again.value.kind is greedy_error.kind
        return
    plan = plan_placement(t, request)
    check_plan(t, request, plan)
    assert plan_cost(t, request, plan) <= plan_cost(t, request, greedy)
    assert plan.solver == "greedy" or plan_cost(t, request, plan) < plan_cost(t, request, greedy)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.sampled_from([None, 4, 8, 16]), st.integers(8, 96))
def test_never_worse_on_fragmented_fleets(seed: int, group: int | None, total: int) -> None:
    nodes, held = churned_fleet(12, seed=seed)
    t = topo(nodes, sorted(held))
    r = req(total, group_gpus=group, spares_per_group=seed % 2)
    try:
        greedy = pack_greedy(t, r)
    except PackError:
        return
    plan = plan_placement(t, r)
    check_plan(t, r, plan)
    assert plan_cost(t, r, plan) <= plan_cost(t, r, greedy)
    assert plan_placement(t, r) == plan


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fleets(), requests(), st.integers(0, 10_000))
def test_planning_without_search_answers_what_planning_answers(
    fleet: tuple[list[Node], list[str]], request: PackRequest, seed: int
) -> None:
    """``plan_without_search`` (the manager's, before it would ask the binder) returns or raises
    exactly what ``plan_placement`` does whenever it answers; on churned fleets too."""
    nodes, held = fleet if seed % 2 else churned_fleet(6, seed=seed)
    t = topo(nodes, sorted(held))
    failed: PackError | None = None
    try:
        quick = plan_without_search(t, request)
    except PackError as error:
        failed, quick = error, None
    if failed is not None:
        with pytest.raises(PackError) as again:
            plan_placement(t, request)
        caught = again.value
        assert (caught.kind, caught.message, caught.shortfall) == (
            failed.kind,
            failed.message,
            failed.shortfall,
        )
        event("exact failure")
        return
    if quick is None:
        event("needs a search")
        return
    event(f"answered ({quick.solver})")
    assert quick == plan_placement(t, request)


class TestEvidentOptimum:
    """``evident_fill`` answers what the model's ``solve`` answers, without the solver."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.integers(0, 10_000), st.integers(1, 64), st.integers(2, 80), st.floats(0.0, 0.95))
    def test_evident_is_what_the_solver_finds(
        self, seed: int, total: int, n_domains: int, fill: float
    ) -> None:
        nodes, held = churned_fleet(n_domains, seed=seed, fill=fill)
        t = topo(nodes, sorted(held))
        r = req(total)
        work = Work(t, r.excluded_slots)
        frees = work.domain_frees()
        sizes = validate(t, r)
        try:
            greedy = decide_greedy(t, r, sizes, dict(frees))
        except PackError:
            greedy = None
        model = PlacementModel.build(
            work, r, sizes, frees=frees, greedy=greedy, settings=DEFAULT_SETTINGS
        )
        if model is None:
            return
        evident = cpsat_model.evident_fill(t, r, sizes, frees, DEFAULT_SETTINGS)
        event("evident" if evident is not None else "searched")
        if evident is not None:
            decision, _ = evident
            assert decision == model.solve(DEFAULT_SETTINGS, DEFAULT_SETTINGS.deterministic_time)

    def test_evident_only_where_it_is_certain(self) -> None:
        """Spares, groups, a single-domain request or the run's own domains: the solver runs."""
        nodes, held = churned_fleet(20, seed=3)
        t = topo(nodes, sorted(held))
        own = t.domain_keys()[0]
        for r in (
            req(8, spares_per_group=1),
            req(16, group_gpus=8),
            req(8, allow_cross_group_spread=False),
            req(8, preferred_domains=(own,)),
        ):
            frees = Work(t, r.excluded_slots).domain_frees()
            assert frees[own] > 0
            assert cpsat_model.evident_fill(t, r, validate(t, r), frees, DEFAULT_SETTINGS) is None
        # and the shortcut does fire on the same fleet for a plain fill
        r = req(8)
        frees = Work(t).domain_frees()
        assert cpsat_model.evident_fill(t, r, validate(t, r), frees, DEFAULT_SETTINGS) is not None


def plans_both_ways(
    t: Topology,
    r: PackRequest,
    monkeypatch: pytest.MonkeyPatch,
    knobs: PlannerSettings = DEFAULT_SETTINGS,
) -> tuple[PackPlan | str, PackPlan | str]:
    """(plan_placement, plan_placement the long way: greedy, then the model's CP-SAT search);
    a PackError as its kind and message."""

    def plan() -> PackPlan | str:
        try:
            return plan_placement(t, r, knobs)
        except PackError as error:
            return f"{error.kind}: {error.message}"

    quick = plan()
    with monkeypatch.context() as m:
        m.setattr(cpsat, "evident_fill", lambda *_args, **_kwargs: None)
        long_way = plan()
    return quick, long_way


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 10_000),
    st.integers(1, 80),
    st.floats(0.0, 0.95),
    st.integers(1, 40),
    st.lists(st.integers(0, 79), max_size=2),
    st.booleans(),
    st.sampled_from([48, 48, 1, 2, 3, 5]),
    st.sampled_from([True, True, False]),
)
def test_an_evident_fill_is_planned_as_the_long_way_plans_it(  # noqa: PLR0917 - drawn
    seed: int,
    n_domains: int,
    fill: float,
    total: int,
    own: list[int],
    excluded: bool,
    cap: int,
    enabled: bool,
) -> None:
    """``evident_fill`` (no greedy, no model) answers what greedy plus the model's search
    answer: the same plan, the same planner name - on fleets with more free-count
    classes than the model keeps, with and without the run's own domains and excluded slots,
    with a tight class cap, and with the optimiser off (pure greedy)."""
    # Odd holes too: up to 65 free counts, more classes than the model keeps (48).
    holes = range(1, 9) if seed % 2 else (2, 4, 6, 8)
    nodes, held = churned_fleet(n_domains, seed=seed, fill=fill, holes=holes)
    t = topo(nodes, sorted(held))
    r = req(
        total,
        preferred_domains=tuple(f"us-west/gpu-a/D{d:03}" for d in own),
        excluded_slots=frozenset(slots("d000n0", 0, 4)) if excluded else frozenset(),
    )
    knobs = PlannerSettings(max_candidate_domains=cap, enabled=enabled)
    with pytest.MonkeyPatch.context() as monkeypatch:
        quick, long_way = plans_both_ways(t, r, monkeypatch, knobs)
    taken = cpsat_model.evident_fill(
        t, r, validate(t, r), Work(t, r.excluded_slots).domain_frees(), knobs
    )
    if Work(t, r.excluded_slots).untouched():  # the snapshot's own order finds the same domain
        frees = Work(t).domain_frees()
        assert cpsat_model.evident_fill(t, r, validate(t, r), frees, knobs, as_snapshot=True) == (
            taken
        )
    event("shortcut" if taken is not None else "long way")
    classes = len({f for f in Work(t, r.excluded_slots).domain_frees().values() if f})
    event("more classes than the model keeps" if classes > 48 else "all classes kept")
    assert quick == long_way


def test_the_shortcut_is_taken_for_a_whole_node_on_a_busy_fleet() -> None:
    """The admission it is for: 8 GPUs on a fleet of many domains, some partly held."""
    nodes, held = churned_fleet(60, seed=7, fill=0.5)
    t = topo(nodes, sorted(held))
    r = req(8)
    frees = Work(t).domain_frees()
    taken = cpsat_model.evident_fill(t, r, validate(t, r), frees, DEFAULT_SETTINGS)
    assert taken is not None
    decision, greedy_s = taken
    assert not greedy_s  # the tightest domain that holds 8 GPUs, not the roomiest
    ((gpus, domain),) = decision.groups
    assert gpus == 8
    assert frees[domain] == min(f for f in frees.values() if f >= 8)
