"""Work conservation and honest promises (issue 9; DESIGN decisions 4 and 5).

When capacity frees by any path, the reservations waiting for it start at that same instant,
first comer first; a reservation's earliest start is the sooner of its natural start (scheduled
lease ends) and its activation bound; and a wait for a budget window activates when the window
opens even when it also waits for GPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest
from builders import HOUR, MINUTE, T0, budget, env, node, run

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.forecast import forecast
from gpu_fleet.core.ledger import LeasePreemptionScheduled
from gpu_fleet.core.model import NodeHealth, Run, Runtime

FREED_AT = T0 + 5 * MINUTE
TEAMS = (budget("a", "org:a", [env("e", 32)]), budget("b", "org:b", [env("e", 32)]))


def fleet_with(*nodes: object, settings: Settings | None = None) -> Fleet:
    fleet = Fleet(settings)
    for n in nodes or (node("n1", 8),):
        fleet.register_node(n, T0)  # type: ignore[arg-type]
    for b in TEAMS:
        fleet.apply(b, T0)
    return fleet


def with_grace(r: Run, grace: str) -> Run:
    runtime = Runtime(preemption_grace=grace)
    return msgspec.structs.replace(r, spec=msgspec.structs.replace(r.spec, runtime=runtime))


def started_at(fleet: Fleet, key: str) -> int | None:
    starts = [x.start for x in fleet.state.leases_of(key, open_only=True)]
    return min(starts) if starts else None


def queue_two(fleet: Fleet, wide: int, later: int) -> None:
    """``wide`` reserves behind the holder, then ``later`` reserves behind it in one slice."""
    fleet.apply(run("a", "wide", wide), T0 + 1)
    fleet.apply(run("a", "later", later), T0 + MINUTE)
    assert fleet.state.status["a/wide"].reason == "Reserved"
    assert fleet.state.status["a/later"].reason == "Reserved"


# How each path frees the holder's GPUs at FREED_AT (or, for expiry, at its scheduled end).
Scenario = tuple[Callable[[], Fleet], Callable[[Fleet], object], int, int]


def _expire() -> Fleet:
    fleet = fleet_with()
    fleet.apply(run("b", "holder", 4, max_duration="5m"), T0)
    queue_two(fleet, 8, 4)
    return fleet


def _plain_holder() -> Fleet:
    fleet = fleet_with()
    fleet.apply(run("b", "holder", 4), T0)
    queue_two(fleet, 8, 4)
    return fleet


def _elastic_holder() -> Fleet:
    fleet = fleet_with()
    fleet.apply(run("b", "holder", 8, group_gpus=4, malleable=(4, 8, 4)), T0)
    queue_two(fleet, 4, 4)
    return fleet


def _gang_over_two_nodes() -> Fleet:
    fleet = fleet_with(node("n1", 8), node("n2", 8))
    fleet.apply(run("b", "holder", 16, group_gpus=8), T0)
    queue_two(fleet, 8, 8)
    return fleet


def _shrink(fleet: Fleet) -> object:
    holder = fleet.state.runs["b/holder"]
    assert holder.spec.malleable is not None
    return fleet.shrink("b/holder", 4, FREED_AT)


PATHS: dict[str, Scenario] = {
    "expiry": (_expire, lambda f: f.advance_to(FREED_AT), 8, 4),
    "completion": (_plain_holder, lambda f: f.complete("b/holder", FREED_AT), 8, 4),
    "deletion": (_plain_holder, lambda f: f.delete("Run", "b", "holder", FREED_AT), 8, 4),
    "shrink": (_elastic_holder, _shrink, 4, 4),
    "fence": (
        _gang_over_two_nodes,
        lambda f: f.set_node_health("n2", NodeHealth.FENCED, FREED_AT),
        8,
        8,
    ),
}


class TestCapacityFreedByAnyPath:
    @pytest.mark.parametrize("path", sorted(PATHS))
    def test_the_first_reservation_in_line_starts_at_that_instant(self, path: str) -> None:
        """The holder's GPUs free at +5m: the reservation promised the slice first starts then,
        not at its bound; the one behind it, which no longer fits, keeps waiting."""
        build, free, _, _ = PATHS[path]
        fleet = build()
        res = fleet.state.pending_reservation("a/wide")
        assert res is not None
        assert res.earliest_start >= FREED_AT
        free(fleet)
        fleet.advance_to(FREED_AT)
        assert fleet.state.status["a/wide"].phase == "Running"
        assert started_at(fleet, "a/wide") == FREED_AT
        assert fleet.state.reservations[res.name].state == "Released"
        assert fleet.state.status["a/later"].phase == "Pending"

    def test_every_reservation_that_fits_starts_in_line_order(self) -> None:
        """Room for both: the first in line and the one behind it start at the same instant,
        whatever order they were admitted in."""
        fleet = fleet_with()
        fleet.apply(run("b", "holder", 8), T0)
        fleet.apply(run("a", "x-first", 4), T0 + 1)
        fleet.apply(run("a", "a-second", 4), T0 + MINUTE)
        fleet.complete("b/holder", FREED_AT)
        assert started_at(fleet, "a/x-first") == FREED_AT
        assert started_at(fleet, "a/a-second") == FREED_AT

    def test_a_later_comer_with_a_sooner_bound_waits_its_turn_until_due(self) -> None:
        """A small run reserving after a big one gets a shorter lead, hence a sooner bound; it
        still may not take the room the big one was promised first before its bound (DESIGN
        decision 5).  When that room is enough for the big one, the big one starts."""
        fleet = fleet_with()
        fleet.apply(run("b", "holder", 6), T0)
        fleet.apply(run("a", "big", 8), T0 + 1)
        fleet.apply(run("a", "small", 2), T0 + MINUTE)
        big = fleet.state.pending_reservation("a/big")
        small = fleet.state.pending_reservation("a/small")
        assert big is not None
        assert small is not None
        assert small.earliest_start < big.earliest_start
        assert fleet.state.status["a/small"].phase == "Pending"  # 2 GPUs free, not for it
        fleet.complete("b/holder", FREED_AT)
        assert started_at(fleet, "a/big") == FREED_AT
        assert fleet.state.status["a/small"].phase == "Pending"

    def test_promises_made_in_the_same_second_keep_their_ledger_order(self) -> None:
        """waiter reserves before tick in the same second (behind a run since deleted, so its
        promise is the bound); tick's smaller deficit gives it the sooner bound, but not the
        first place in line: when the blocker ends, waiter takes the node and tick waits its
        turn (waiter is done before tick's bound anyway)."""
        fleet = fleet_with()
        fleet.apply(run("b", "blocker", 8, max_duration="10m"), T0)
        fleet.apply(run("a", "ahead", 8, max_duration="5m"), T0)
        fleet.apply(run("a", "waiter", 8, max_duration="5m"), T0)
        fleet.apply(run("b", "tick", 1), T0)
        fleet.delete("Run", "a", "ahead", T0)
        waiter = fleet.state.pending_reservation("a/waiter")
        tick = fleet.state.pending_reservation("b/tick")
        assert waiter is not None
        assert tick is not None
        assert tick.created_at == waiter.created_at
        assert tick.earliest_start < waiter.earliest_start
        fleet.advance_to(T0 + 10 * MINUTE)
        assert started_at(fleet, "a/waiter") == T0 + 10 * MINUTE
        assert fleet.state.status["b/tick"].phase == "Pending"
        fleet.advance_to(T0 + 15 * MINUTE)
        assert started_at(fleet, "b/tick") == T0 + 15 * MINUTE


class TestEarliestStart:
    def test_scheduled_ends_before_the_bound_set_the_promise(self) -> None:
        """The holder ends at +12m by maxDuration: the reservation says +12m, not the bound
        (+17m), and the run starts then."""
        fleet = fleet_with()
        fleet.apply(run("b", "holder", 4, max_duration="12m"), T0)
        fleet.apply(run("a", "wide", 8), T0)
        res = fleet.state.pending_reservation("a/wide")
        assert res is not None
        assert (res.earliest_start, res.confidence) == (T0 + 12 * MINUTE, "exact")
        assert "scheduled lease ends free it" in res.reason
        fleet.advance_to(T0 + 12 * MINUTE)
        assert started_at(fleet, "a/wide") == T0 + 12 * MINUTE

    def test_ends_after_the_bound_leave_the_bound(self) -> None:
        fleet = fleet_with()
        fleet.apply(run("b", "holder", 4, max_duration="1h"), T0)
        fleet.apply(run("a", "wide", 8), T0)
        res = fleet.state.pending_reservation("a/wide")
        assert res is not None
        assert res.earliest_start == T0 + 15 * MINUTE + 4 * 30
        assert res.confidence == "conservative"

    def test_room_promised_to_a_reservation_ahead_is_not_counted(self) -> None:
        """The slice's freed room goes to the reservation ahead: the one behind it keeps its
        bound, so the resolver is never sent to cut for a start that was never going to come."""
        fleet = fleet_with()
        fleet.apply(run("b", "holder", 8, max_duration="10m"), T0)
        fleet.apply(run("a", "first", 8), T0)
        fleet.apply(run("a", "second", 8), T0)
        first = fleet.state.pending_reservation("a/first")
        second = fleet.state.pending_reservation("a/second")
        assert first is not None
        assert second is not None
        assert first.earliest_start == T0 + 10 * MINUTE
        assert second.earliest_start == T0 + 15 * MINUTE + 8 * 30

    def test_only_the_intended_slice_counts(self) -> None:
        """A lease ending on another domain does not make a promise in this one."""
        fleet = fleet_with(node("n1", 8), node("n2", 4, fabric="f2"))
        fleet.apply(run("b", "holder", 8), T0)
        fleet.apply(run("b", "other", 4, max_duration="5m"), T0)
        fleet.apply(run("a", "wide", 8, cross_spread=False), T0)
        res = fleet.state.pending_reservation("a/wide")
        assert res is not None
        assert res.nodes == ("n1",)
        assert res.earliest_start == T0 + 15 * MINUTE + 8 * 30


class TestWindowAndCapacity:
    OPENS = T0 + HOUR

    def _fleet(self, holder: int = 8) -> Fleet:
        """The incumbent holds ``holder`` GPUs of the node with a 10 minute preemption grace;
        at 00:38 a run of a team whose envelope opens at 01:00 (reservations allowed,
        admission not) asks for the whole node."""
        fleet = fleet_with(settings=Settings(preemption_grace_max=HOUR))
        night = env("e", 8, start=self.OPENS, allow_admission=False, allow_reservations=True)
        fleet.apply(budget("night", "org:night", [night]), T0)
        fleet.apply(with_grace(run("b", "holder", holder), "10m"), T0)
        fleet.apply(run("night", "batch", 8), T0 + 38 * MINUTE)
        return fleet

    def test_the_wait_is_a_window_wait_with_a_deficit(self) -> None:
        fleet = self._fleet()
        res = fleet.state.pending_reservation("night/batch")
        assert res is not None
        assert (res.kind, res.deficit_gpus, res.confidence) == ("window", 8, "window-aligned")
        assert res.earliest_start == self.OPENS + Settings().window_activation_delay
        assert res.holds_slice
        assert "budget window opens" in res.reason

    def test_nobody_is_cut_before_the_window_and_the_room_is_made_when_it_opens(self) -> None:
        fleet = self._fleet()
        activation = self.OPENS + Settings().window_activation_delay
        before = fleet.advance_to(self.OPENS - 1)
        assert not [e for e in before if isinstance(e, LeasePreemptionScheduled)]
        at_open = fleet.advance_to(activation)
        notices = [e for e in at_open if isinstance(e, LeasePreemptionScheduled)]
        assert [(n.run, n.deadline) for n in notices] == [("b/holder", activation + 10 * MINUTE)]
        fleet.advance_to(activation + 10 * MINUTE)
        assert started_at(fleet, "night/batch") == activation + 10 * MINUTE
        # and no second reservation with a fresh lead was ever written
        made = {r.name for r in fleet.state.reservations.values() if r.run == "night/batch"}
        assert len(made) == 1

    def test_the_forecast_is_the_window_opening(self) -> None:
        """The holder has no end, but the resolver makes room when the window opens."""
        fleet = self._fleet()
        got = forecast(fleet.state, "night/batch", T0 + 39 * MINUTE)
        activation = self.OPENS + Settings().window_activation_delay
        assert (got.earliest_start, got.p50, got.p90) == (activation, activation, activation)
        assert (got.confidence, got.deficit_gpus) == ("window-aligned", 8)
        assert "resolver makes room" in got.basis

    def test_the_window_wait_keeps_backfill_out_of_its_slice(self) -> None:
        """Two GPUs are free but the window wait needs them when it opens: a run without
        maxDuration may not take them meanwhile (decision 5)."""
        fleet = self._fleet(holder=6)
        res = fleet.state.pending_reservation("night/batch")
        assert res is not None
        assert (res.kind, res.deficit_gpus) == ("window", 6)
        fleet.apply(run("b", "squatter", 2), T0 + 40 * MINUTE)
        assert fleet.state.status["b/squatter"].phase == "Pending"
