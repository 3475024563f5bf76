"""The forecasting maths (``gpu_fleet.core.forecast``): pure, synchronous, on engine-made state.

States are built by the in-memory ``Fleet`` (the same decisions the manager commits), so every
forecast here is checked against reservations the engine really writes.  Where the engine does
not yet write an event (a preemption notice), it is folded by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from builders import HOUR, MINUTE, T0, budget, env, node, run

from gpu_fleet.core.engine import CommandError, Fleet
from gpu_fleet.core.forecast import (
    ForecastError,
    build_timeline,
    earliest_fit,
    forecast,
    queue_outcome,
)
from gpu_fleet.core.forecast.queue_play import pack_request
from gpu_fleet.core.ledger import LeasePreemptionScheduled, fold
from gpu_fleet.core.model import Node, Run

TEAM = budget("t", "org:t", [env("e", 16)])
BOUND = T0 + 15 * MINUTE + 2 * 30  # activation lead + 30 s per GPU of a deficit of 2


def fleet_with(nodes: Sequence[Node] = (), *budgets: object) -> Fleet:
    fleet = Fleet()
    for n in nodes or [node("n1", 8)]:
        fleet.register_node(n, T0)
    for b in budgets or (TEAM,):
        fleet.apply(b, T0)  # type: ignore[arg-type]
    return fleet


def waiting_behind(blocker: Run, waiter: Run, fleet: Fleet | None = None) -> Fleet:
    fleet = fleet or fleet_with()
    fleet.apply(blocker, T0)
    fleet.apply(waiter, T0)
    return fleet


class TestTimeline:
    def test_releases_are_ordered_by_scheduled_end_and_unknown_ends_are_listed(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "late", 2, max_duration="2h"), T0)
        fleet.apply(run("t", "soon", 2, max_duration="10m"), T0)
        fleet.apply(run("t", "forever", 2), T0)
        tl = build_timeline(fleet.state, "H100", "t/new", T0)
        assert [(r.at, r.lease.split("@")[0]) for r in tl.releases] == [
            (T0 + 10 * MINUTE, "t/soon"),
            (T0 + 2 * HOUR, "t/late"),
        ]
        assert [x.split("@")[0] for x in tl.unknown] == ["t/forever"]
        assert tl.instants(T0) == [T0, T0 + 10 * MINUTE, T0 + 2 * HOUR]

    def test_other_flavors_do_not_free_this_flavor(self) -> None:
        fleet = fleet_with([node("n1", 8), node("a1", 8, flavor="A100")])
        fleet.apply(budget("t", "org:t", [env("e", 16), env("a", 16, flavor="A100")]), T0)
        fleet.apply(run("t", "other", 4, flavor="A100", max_duration="1h"), T0)
        assert build_timeline(fleet.state, "H100", "t/new", T0).releases == ()

    def test_an_end_already_past_frees_now(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "old", 8, max_duration="10m"), T0)
        later = T0 + HOUR  # the manager has not reconciled the expiry yet
        (release,) = build_timeline(fleet.state, "H100", "t/new", later).releases
        assert release.at == later

    def test_fit_follows_placement_rules_not_a_gpu_count(self) -> None:
        """4 GPUs free in two domains do not host a 4-GPU single-domain run until one frees 4."""
        fleet = fleet_with([node("n1", 4), node("n2", 4, fabric="f2")])
        fleet.apply(run("t", "a", 2, max_duration="10m"), T0)
        fleet.apply(run("t", "b", 2, max_duration="20m"), T0)
        together = run("t", "new", 4, cross_spread=False)
        spread = run("t", "new", 4)
        tl = build_timeline(fleet.state, "H100", "t/new", T0)
        assert earliest_fit(fleet.state, "t/new", pack_request(spread), tl, T0).at == T0
        fit = earliest_fit(fleet.state, "t/new", pack_request(together), tl, T0)
        assert fit.at == T0 + 10 * MINUTE
        assert fit.now_error is not None


class TestCapacityWait:
    def test_a_bounded_blocker_gives_an_exact_start_at_its_end(self) -> None:
        fleet = waiting_behind(run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4))
        res = fleet.state.pending_reservation("t/w")
        assert res is not None
        # The promise is the sooner of the natural start and the bound (DESIGN decision 4).
        assert (res.kind, res.earliest_start, res.confidence) == (
            "capacity",
            T0 + 10 * MINUTE,
            "exact",
        )

        got = forecast(fleet.state, "t/w", T0)

        assert got.earliest_start == T0 + 10 * MINUTE
        assert got.p50 == got.p90 == got.earliest_start
        assert got.confidence == "exact"
        assert got.deficit_gpus == 2
        assert "t/blocker" in got.basis
        assert got.earliest_start <= res.earliest_start

    def test_the_exact_start_is_when_the_engine_starts_the_run(self) -> None:
        fleet = waiting_behind(run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4))
        predicted = forecast(fleet.state, "t/w", T0).earliest_start
        assert predicted is not None
        fleet.advance_to(predicted)
        assert fleet.state.status["t/w"].phase == "Running"
        assert min(x.start for x in fleet.state.leases_of("t/w")) == predicted

    def test_a_blocker_ending_after_the_bound_leaves_the_bound(self) -> None:
        fleet = waiting_behind(run("t", "blocker", 6, max_duration="2h"), run("t", "w", 4))
        got = forecast(fleet.state, "t/w", T0)
        assert (got.earliest_start, got.p50, got.p90) == (BOUND, BOUND, BOUND)
        assert got.confidence == "bounded"
        assert "resolver makes room" in got.basis

    def test_a_blocker_without_max_duration_is_unknown_and_the_bound_is_the_forecast(self) -> None:
        """Nothing says when the blocker ends, but the reservation activates at its bound and
        the resolver makes room then: that is the start, P50 and P90 alike."""
        fleet = waiting_behind(run("t", "blocker", 6), run("t", "w", 4))
        got = forecast(fleet.state, "t/w", T0)
        assert (got.earliest_start, got.p50, got.p90) == (BOUND, BOUND, BOUND)
        assert got.confidence == "bounded"
        assert got.basis.startswith("unknown: blocking leases have no scheduled end")

    def test_now_is_never_in_the_past_of_the_answer(self) -> None:
        fleet = waiting_behind(run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4))
        got = forecast(fleet.state, "t/w", T0 + 12 * MINUTE)  # expiry not reconciled yet
        assert got.earliest_start == T0 + 12 * MINUTE

    @pytest.mark.parametrize(
        ("beneficiary", "start"),
        [("t/w", T0 + 2 * MINUTE), ("t/else", T0 + 10 * MINUTE)],
        ids=["for-this-run-brings-the-start-forward", "for-someone-else-does-not"],
    )
    def test_a_preemption_notice(self, beneficiary: str, start: int) -> None:
        """A notice ends its lease at the deadline for the run it cuts for; a notice whose
        beneficiary does not wait (here: no such run) is cancelled by the engine, so the
        lease keeps its scheduled end."""
        fleet = waiting_behind(run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4))
        (lease, *_) = fleet.state.leases_of("t/blocker", open_only=True)
        notice = LeasePreemptionScheduled(
            at=T0,
            lease=lease.id,
            run="t/blocker",
            deadline=T0 + 2 * MINUTE,
            reason="RandomPreempt(0x1)",
            kind="Lottery",
            seed="0x1",
            beneficiary=beneficiary,
        )
        fold(fleet.state, notice)
        assert forecast(fleet.state, "t/w", T0).earliest_start == start


class TestRemedies:
    def test_shrinking_to_the_malleable_minimum_is_ranked_by_its_start(self) -> None:
        fleet = waiting_behind(
            run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4, malleable=(2, 4, 1))
        )
        got = forecast(fleet.state, "t/w", T0)
        assert [(r.action, r.start) for r in got.remedies] == [("shrink", T0)]
        assert "shrink to 2 GPUs" in got.remedies[0].detail

    def test_dropping_spares_is_offered_when_the_spares_are_what_does_not_fit(self) -> None:
        fleet = waiting_behind(
            run("t", "blocker", 5, max_duration="1h"), run("t", "w", 2, spares=2)
        )
        got = forecast(fleet.state, "t/w", T0)
        assert [(r.action, r.start) for r in got.remedies] == [("drop-spares", T0)]

    def test_remedies_that_would_not_help_are_not_offered(self) -> None:
        fleet = waiting_behind(
            run("t", "blocker", 8, max_duration="10m"), run("t", "w", 4, malleable=(3, 4, 1))
        )
        assert forecast(fleet.state, "t/w", T0).remedies == ()

    def test_another_flavor_with_room_and_a_budget_is_offered(self) -> None:
        fleet = fleet_with(
            [node("n1", 8), node("a1", 8, flavor="A100")],
            budget("t", "org:t", [env("e", 16), env("a", 16, flavor="A100")]),
        )
        waiting_behind(run("t", "blocker", 6, max_duration="10m"), run("t", "w", 4), fleet)
        got = forecast(fleet.state, "t/w", T0)
        assert [(r.action, r.start) for r in got.remedies] == [("flavor", T0)]
        assert "A100" in got.remedies[0].detail

    def test_a_budget_wait_is_bounded_and_a_lending_sponsor_is_offered(self) -> None:
        sponsor = budget("s", "org:s", [env("e", 8, lend=True, lend_to=["org:t"])])
        fleet = fleet_with([node("n1", 8)], budget("t", "org:t", [env("e", 2)]), sponsor)
        fleet.apply(run("t", "first", 2), T0)
        fleet.apply(run("t", "w", 4), T0)
        res = fleet.state.pending_reservation("t/w")
        assert res is not None
        assert res.kind == "budget"

        got = forecast(fleet.state, "t/w", T0)

        assert (got.earliest_start, got.confidence, got.deficit_gpus) == (
            res.earliest_start,
            "bounded",
            0,
        )
        assert [(r.action, r.start) for r in got.remedies] == [("borrow", T0)]
        assert "org:s" in got.remedies[0].detail


class TestOtherStates:
    def test_a_window_wait_activates_just_after_the_window_opens(self) -> None:
        opens = T0 + 2 * HOUR
        fleet = fleet_with([], budget("t", "org:t", [env("e", 8, start=opens, end=opens + HOUR)]))
        fleet.apply(run("t", "w", 4), T0)
        got = forecast(fleet.state, "t/w", T0)
        assert (got.earliest_start, got.p90, got.confidence) == (
            opens + 10,
            opens + 10,
            "window-aligned",
        )

    def test_a_running_run_answers_with_its_start(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "r", 2), T0 + MINUTE)
        got = forecast(fleet.state, "t/r", T0 + HOUR)
        assert (got.earliest_start, got.confidence) == (T0 + MINUTE, "exact")

    def test_a_pending_run_without_a_reservation_has_no_promised_start(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("nobody", "r", 2), T0)
        got = forecast(fleet.state, "nobody/r", T0)
        assert (got.earliest_start, got.p50, got.p90) == (None, None, None)
        assert got.confidence == "conservative"
        assert "Unfunded" in got.basis
        assert "is free now" in got.basis

    def test_unknown_and_finished_runs_are_errors(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "r", 2), T0)
        fleet.complete("t/r", T0 + MINUTE)
        with pytest.raises(ForecastError) as missing:
            forecast(fleet.state, "t/ghost", T0)
        with pytest.raises(ForecastError) as done:
            forecast(fleet.state, "t/r", T0 + MINUTE)
        assert (missing.value.kind, done.value.kind) == ("not_found", "terminal")
        assert str(done.value) == "run t/r is Completed; there is nothing to forecast"

    def test_a_node_without_location_labels_is_a_topology_error(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "w", 16), T0)  # keeps waiting: the fleet has 8 GPUs
        fleet.state.nodes["bad"] = Node(name="bad", gpus=8, labels={"gpu.flavor": "H100"})
        with pytest.raises(ForecastError) as err:
            forecast(fleet.state, "t/w", T0)
        assert err.value.kind == "topology"
        assert "missing label" in err.value.message


class TestReportedEta:
    def test_a_reported_eta_gives_an_estimated_p50_and_the_bound_as_p90(self) -> None:
        """``kubectl runs eta``: the blocker's reported completion becomes the P50; the
        reservation bound stays the P90 (an ETA is an expectation, not a promise)."""
        fleet = waiting_behind(run("t", "blocker", 8), run("t", "waiter", 2))
        unknown = forecast(fleet.state, "t/waiter", T0)
        assert unknown.confidence == "bounded"  # no end known for the blocker yet
        fleet.report_eta("t/blocker", T0 + 5 * MINUTE, T0)
        result = forecast(fleet.state, "t/waiter", T0)
        assert result.confidence == "estimated"
        assert result.p50 == T0 + 5 * MINUTE
        assert result.earliest_start == T0 + 5 * MINUTE
        res = fleet.state.pending_reservation("t/waiter")
        assert res is not None
        assert result.p90 == res.earliest_start

    def test_an_eta_in_the_past_is_refused(self) -> None:
        """An ETA before now is a usage error; nothing is recorded."""
        fleet = waiting_behind(run("t", "blocker", 8), run("t", "waiter", 2))
        with pytest.raises(CommandError, match="in the past"):
            fleet.report_eta("t/blocker", T0 - 1, T0)
        assert fleet.state.etas == {}


HISTORY_START = T0 + 4 * HOUR  # the blocker starts after three completed runs of 5, 10, 15 min


def waiter_behind_history(age: int) -> tuple[Fleet, int]:
    """Three completed 8-GPU runs (5, 10, 15 min), then a blocker without maxDuration that has
    run ``age`` seconds when a 2-GPU waiter arrives.  Returns the fleet and "now"."""
    fleet = fleet_with()
    for i, minutes in enumerate((5, 10, 15)):
        fleet.apply(run("t", f"past{i}", 8), T0 + i * HOUR)
        fleet.complete(f"t/past{i}", T0 + i * HOUR + minutes * MINUTE)
    fleet.apply(run("t", "blocker", 8), HISTORY_START)
    now = HISTORY_START + age
    fleet.apply(run("t", "waiter", 2), now)
    return fleet, now


class TestHistoryOfSimilarRuns:
    def test_completed_runs_of_the_team_estimate_a_blockers_end(self) -> None:
        """With no maxDuration and no ETA, the median time of the team's completed runs on the
        flavor estimates when a blocker ends (P50), and the bound stays the P90."""
        fleet, now = waiter_behind_history(0)
        result = forecast(fleet.state, "t/waiter", now)
        assert result.confidence == "estimated"
        assert result.p50 == now + 10 * MINUTE  # the median of 5, 10 and 15 minutes
        res = fleet.state.pending_reservation("t/waiter")
        assert res is not None
        assert result.p90 == res.earliest_start

    def test_without_history_the_end_stays_unknown(self) -> None:
        """No similar completed run: nothing is invented; the bound is the forecast."""
        fleet = waiting_behind(run("t", "blocker", 8), run("t", "waiter", 2))
        result = forecast(fleet.state, "t/waiter", T0)
        res = fleet.state.pending_reservation("t/waiter")
        assert res is not None
        assert result.p50 == result.p90 == res.earliest_start
        assert result.confidence == "bounded"
        assert result.basis.startswith("unknown:")

    def test_a_blocker_older_than_every_past_run_has_an_unknown_end(self) -> None:
        """Conditioning on age: a blocker that has already outlived every completed run is not
        "due at the median" (that would promise the room now); its end is unknown."""
        fleet, now = waiter_behind_history(20 * MINUTE)
        result = forecast(fleet.state, "t/waiter", now)
        assert result.confidence == "bounded"
        assert result.basis.startswith("unknown:")

    def test_the_remaining_life_is_the_median_of_runs_that_lived_as_long(self) -> None:
        """A blocker 11 minutes old among past runs of 5, 10 and 15 minutes is expected to end
        at 15 (the only past run that lived that long), not at the overall median of 10."""
        fleet, now = waiter_behind_history(11 * MINUTE)
        result = forecast(fleet.state, "t/waiter", now)
        assert result.confidence == "estimated"
        assert result.p50 == HISTORY_START + 15 * MINUTE


class TestQueueAhead:
    def test_every_queued_run_is_forecast_as_the_engine_then_starts_it(self) -> None:
        """Four 8-GPU runs queue behind a blocker on one node.  a's reservation is set at the
        blocker's scheduled end (5 min, its natural start); b, c and d reserve the node with one
        bound (19 min).  a, b and c each start as the run before them ends (exact: 5, 10 and 15
        min): the node's room goes to the reservation promised it first, at once (work
        conservation).  d, last in line, starts at its bound, when the resolver makes room
        (bounded).  Then the engine does exactly that."""
        fleet = fleet_with()
        fleet.apply(run("t", "blocker", 8, max_duration="5m"), T0)
        for name in ("a", "b", "c", "d"):
            fleet.apply(run("t", name, 8, max_duration="5m"), T0 + 1)
        got = {k: forecast(fleet.state, f"t/{k}", T0 + 1) for k in ("a", "b", "c", "d")}
        res = fleet.state.pending_reservation("t/d")
        assert res is not None
        bound = res.earliest_start
        assert [(got[k].confidence, got[k].p50) for k in "abcd"] == [
            ("exact", T0 + 5 * MINUTE),
            ("exact", T0 + 10 * MINUTE),
            ("exact", T0 + 15 * MINUTE),
            ("bounded", bound),
        ]
        fleet.advance_to(T0 + HOUR)
        for k in "abcd":
            first = min(x.start for x in fleet.state.leases_of(f"t/{k}"))
            assert first == got[k].p50, k

    def test_forecasts_at_one_instant_share_one_play_of_the_queue(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("t", "blocker", 8, max_duration="5m"), T0)
        fleet.apply(run("t", "a", 8, max_duration="5m"), T0 + 1)
        fleet.apply(run("t", "b", 8, max_duration="5m"), T0 + 1)
        first = queue_outcome(fleet.state, "H100", T0 + 1)
        assert first.queued == {"t/a", "t/b"}
        assert queue_outcome(fleet.state, "H100", T0 + 1) is first
        assert queue_outcome(fleet.state, "H100", T0 + 2) is not first  # another instant
        fleet.apply(run("t", "c", 8), T0 + 2)
        assert "t/c" in queue_outcome(fleet.state, "H100", T0 + 2).queued  # another version

    def test_runs_queued_ahead_take_freed_capacity_first(self) -> None:
        """B waits behind A, which waits behind the blocker: B's forecast is when A is done,
        not when the blocker is (the runs ahead are played forward on the timeline)."""
        fleet = fleet_with()
        fleet.apply(run("t", "blocker", 8, max_duration="5m"), T0)
        fleet.apply(run("t", "a", 8, max_duration="5m"), T0)
        fleet.apply(run("t", "b", 8, max_duration="5m"), T0 + 1)
        result = forecast(fleet.state, "t/b", T0 + 1)
        assert result.confidence == "exact"
        assert result.p50 == T0 + 10 * MINUTE
        assert forecast(fleet.state, "t/a", T0 + 1).p50 == T0 + 5 * MINUTE
        fleet.advance_to(T0 + 10 * MINUTE)  # and that is what really happens
        assert fleet.state.status["t/b"].phase == "Running"
        starts = [x.start for x in fleet.state.leases_of("t/b")]
        assert starts == [T0 + 10 * MINUTE]
