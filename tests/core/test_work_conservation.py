"""Work conservation (issue 9; DESIGN decisions 4 and 5).

When capacity frees by any path, the reservations waiting for it start at that same instant,
first comer first.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from builders import MINUTE, T0, budget, env, node, run

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.model import NodeHealth

FREED_AT = T0 + 5 * MINUTE
TEAMS = (budget("a", "org:a", [env("e", 32)]), budget("b", "org:b", [env("e", 32)]))


def fleet_with(*nodes: object, settings: Settings | None = None) -> Fleet:
    fleet = Fleet(settings)
    for n in nodes or (node("n1", 8),):
        fleet.register_node(n, T0)  # type: ignore[arg-type]
    for b in TEAMS:
        fleet.apply(b, T0)
    return fleet


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
