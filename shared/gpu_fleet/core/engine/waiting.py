"""The reconcile loop's offer to the waiting runs: each may start now, in a fixed order.

The order (``Fleet._admit_pending``, scenario-format.md): runs with a pending reservation in
the order their slices were promised (``FleetState.promise_order``), then the others by
admission time and run key, as it stood when the offers began.  Each run is offered a start
with the state its predecessors' decisions left; a run passed over is not offered again at
that instant.

Two ways to make the same offers (issue 11):

* ``offer_every_run`` walks every waiting run and asks ``certain_to_wait`` of each - the
  reference, used when the engine's shortcuts are off (``FleetState.incremental``) or when
  something is Unfunded (reclaim could then make room for anyone).
* ``offer_event_driven`` offers only the runs that might start: the waiting runs that are not
  parked (``FleetState.waiting_line``), the runs whose reservation is due, and the parked runs
  needing no more GPUs than their flavor has free.  After each decision it adds the runs that
  decision could affect - the runs its events name, the parked runs the GPUs it freed could
  fit, or, if it left something Unfunded, every run still ahead.  Every run it passes over is
  parked, not due, and needs more than is free with nothing Unfunded: ``certain_to_wait`` at
  its turn, so the reference would have skipped it too.  Its cost grows with what changed and
  what might start, not with the queue.  ``Fleet.check_shortcuts`` makes it prove that: every
  run passed over is asked ``certain_to_wait`` at its turn and then offered anyway.
"""

from __future__ import annotations

import bisect
import heapq
import operator
import sys
from typing import TYPE_CHECKING

from gpu_fleet.core.engine.admission import admit, certain_to_wait
from gpu_fleet.core.engine.gang import protected_free
from gpu_fleet.core.ledger.events import Event, RunStatusChanged
from gpu_fleet.core.ledger.fold import run_touched
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant
from gpu_fleet.core.placement.topology import TopologyError

if TYPE_CHECKING:
    from gpu_fleet.core.engine.fleet import Fleet

OrderKey = tuple[int, Instant, str]
_PLACE = operator.itemgetter(0)  # of a (place in line, run) entry of the waiting line
_LAST: OrderKey = (sys.maxsize, sys.maxsize, "")


def admit_waiting(fleet: Fleet, now: Instant) -> list[Event]:
    """Offer every waiting run a start at ``now`` (one pass, in order); the events committed."""
    state = fleet.state
    if not state.incremental:
        return offer_every_run(fleet, now)
    if not state.pending_reservations:
        # No run can be parked (parked runs hold a reservation): the same offers, and the
        # fold need not keep the line meanwhile (a burst into a fleet with room).
        state.drop_waiting_line()
        return offer_every_run(fleet, now)
    if not state.waiting_line().parked or state.has_unfunded_actives(now):
        # No run could be passed over, or reclaim could make room for any parked run.
        return offer_every_run(fleet, now)
    return offer_event_driven(fleet, now)


def order_key(state: FleetState, promise: dict[str, int], key: str) -> OrderKey:
    """Where run ``key`` comes in the offers (``promise``: ``FleetState.promise_order``)."""
    res = state.pending_reservation(key)
    if res is not None:
        return (0, promise[res.name], "")
    return (1, state.admitted.get(key, 0), key)


def offer_every_run(fleet: Fleet, now: Instant) -> list[Event]:
    """The reference: every waiting run, in order, each asked ``certain_to_wait`` first."""
    state = fleet.state
    promise = state.promise_order()
    done: list[Event] = []
    for key in sorted(state.waiting_runs, key=lambda k: order_key(state, promise, k)):
        done += fleet.commit(_attempt(fleet, key, now))
    return done


def offer_event_driven(fleet: Fleet, now: Instant) -> list[Event]:
    """The same offers as ``offer_every_run``, made only to the runs that might start.

    Two sources, merged in order: a heap of runs to offer whatever the fleet (not parked,
    due, or touched by a decision since the offers began) and the parked runs, read from the
    waiting line at each step - the first, past the last offer, of each list whose need the
    flavor's free GPUs cover now.
    """
    state = fleet.state
    promise = state.promise_order()
    # Order keys as they were when the offers began, for the runs a decision touched since
    # (the others' have not changed); None for a run that was not waiting then.
    before: dict[str, OrderKey | None] = {}

    def key_at_start(key: str) -> OrderKey | None:
        if key in before:
            return before[key]
        return order_key(state, promise, key) if key in state.waiting_runs else None

    line = state.waiting_line()
    first = set(line.unparked)
    first.update(res.run for res in state.due_reservations(now))
    heap = [(k, run) for run in first if (k := key_at_start(run)) is not None]
    heapq.heapify(heap)
    pushed = set(first)
    check = _PassedOver(fleet, now) if fleet.check_shortcuts else None
    everything = False  # every run still ahead is in the heap
    at: OrderKey = (-1, 0, "")
    done: list[Event] = []
    while True:
        nxt = heap[0] if heap else None
        if not everything:
            parked = _next_parked(state, before, at)
            if parked is not None and (nxt is None or parked < nxt):
                nxt = parked
        if nxt is None:
            break
        if heap and heap[0] == nxt:
            heapq.heappop(heap)
        at, key = nxt
        if check is not None:
            check.offer(at, key)
        events = _attempt(fleet, key, now)
        if not events:
            continue
        epoch = state.funding_epoch
        # (None for a lease or reservation the batch itself makes: its maker names the run)
        affected = {t for e in events if (t := run_touched(state, e)) is not None}
        for touched in affected - before.keys():
            before[touched] = key_at_start(touched)
        done += fleet.commit(events)
        if everything:
            continue
        if (
            state.funding_epoch != epoch  # who pays for what may have changed
            and state.waiting_line().parked
            and state.has_unfunded_actives(now)
        ):
            # Reclaim could now make room for any run: offer every one still ahead.  (Asked
            # only with parked runs about: the others are offered anyway, and the matching it
            # reads costs O(open leases) - per admission, when a burst fills an empty fleet.)
            affected = state.waiting_runs | before.keys()
            everything = True
        for run in affected - pushed:
            k = key_at_start(run)
            if k is not None and k > at:
                pushed.add(run)
                heapq.heappush(heap, (k, run))
    if check is not None:
        check.up_to(_LAST)
    return done


def _next_parked(
    state: FleetState, touched: dict[str, OrderKey | None], at: OrderKey
) -> tuple[OrderKey, str] | None:
    """The first parked run after ``at`` in line that might start now (runs in ``touched``
    excepted: the heap offers them, at their place when the offers began).

    Might start: its need is no more than the free GPUs of its flavor open to it.  A fenced run
    (no maxDuration) is kept out of every reserved slice, so its lists are read against the
    free GPUs outside them; the runs first in line in some slice, which that slice may be open
    to, are read against all the free GPUs.  The others (they may backfill) likewise.
    """
    if at[0] > 0:
        return None  # past the reservations: parked runs all hold one
    after = at[1] if at[0] == 0 else -1
    line = state.waiting_line()
    free: dict[str, tuple[int, int]] = {}  # flavor -> (free GPUs, of them outside every slice)
    best: tuple[int, str] | None = None
    for (flavor, fenced), needs in line.by_need.items():
        room = _room(state, flavor, free)[1 if fenced else 0]
        for need, entries in needs.items():
            if need > room:
                continue
            i = bisect.bisect_right(entries, after, key=_PLACE)
            while i < len(entries) and entries[i][1] in touched:
                i += 1
            if i < len(entries) and (best is None or entries[i] < best):
                best = entries[i]
    for entry in state.firsts_in_line():
        filed = line.parked.get(entry.run)
        if filed is None or not filed[1] or entry.run in touched:
            continue  # not parked, or not fenced (its lists were read against all free GPUs)
        flavor, _, need, place = filed
        fits = place > after and need <= _room(state, flavor, free)[0]
        if fits and (best is None or (place, entry.run) < best):
            best = (place, entry.run)
    return ((0, best[0], ""), best[1]) if best is not None else None


def _room(state: FleetState, flavor: str, seen: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """Free GPUs of ``flavor``, and how many of them are outside every protected slice; for a
    flavor without a topology, more than anyone needs (its runs are offered a start, which
    says why they cannot have one)."""
    hit = seen.get(flavor)
    if hit is None:
        try:
            topology = state.topology(flavor)
        except TopologyError:
            hit = (sys.maxsize, sys.maxsize)
        else:
            free = topology.total_free()
            hit = (free, free - protected_free(state, topology))
        seen[flavor] = hit
    return hit


def _attempt(fleet: Fleet, key: str, now: Instant) -> list[Event]:
    """Run ``key``'s offer: the events to commit (none if it is certain to wait)."""
    state = fleet.state
    if state.status[key].phase not in ("Pending", "Waiting"):
        return []
    run = state.runs[key]
    if state.incremental and certain_to_wait(state, run, now):
        _skipped(fleet, key, now)
        return []
    attempt = admit(state, run, now, fleet.planner, fleet.settings)
    return [e for e in attempt.events if not unchanged_status(state, e)]


def _skipped(fleet: Fleet, key: str, now: Instant) -> None:
    fleet.skipped_attempts += 1
    if fleet.check_shortcuts:
        state = fleet.state
        proof = admit(state, state.runs[key], now, fleet.planner, fleet.settings)
        left = [e for e in proof.events if not unchanged_status(state, e)]
        if left:
            raise AssertionError(f"skipped attempt of {key} would emit {left}")


class _PassedOver:
    """``Fleet.check_shortcuts`` for the event-driven offers: walks every waiting run in the
    reference's order alongside them, and proves each run they pass over certain to wait at
    its turn (then runs its offer anyway, which must emit nothing)."""

    def __init__(self, fleet: Fleet, now: Instant) -> None:
        self.fleet, self.now = fleet, now
        state = fleet.state
        promise = state.promise_order()
        keyed = sorted((order_key(state, promise, k), k) for k in state.waiting_runs)
        self.line = keyed
        self.start = {k: at for at, k in keyed}
        self.next = 0
        self.offered: set[str] = set()

    def offer(self, at: OrderKey, key: str) -> None:
        """``key`` is offered a start at ``at``: once, at its place in the reference's order."""
        if key in self.offered or self.start.get(key) != at:
            raise AssertionError(f"the event-driven reconcile offered {key} out of turn")
        self.up_to(at)
        self.offered.add(key)

    def up_to(self, at: OrderKey) -> None:
        state = self.fleet.state
        while self.next < len(self.line) and self.line[self.next][0] < at:
            key = self.line[self.next][1]
            self.next += 1
            if key in self.offered or state.status[key].phase not in ("Pending", "Waiting"):
                continue
            if not certain_to_wait(state, state.runs[key], self.now):
                raise AssertionError(f"the event-driven reconcile passed over {key}")
            _skipped(self.fleet, key, self.now)


def unchanged_status(state: FleetState, e: Event) -> bool:
    """Skip a status write that changes nothing (keeps the ledger free of no-op churn)."""
    if not isinstance(e, RunStatusChanged):
        return False
    cur = state.status.get(e.run)
    return cur is not None and (cur.phase, cur.reason, cur.message) == (
        e.phase,
        e.reason,
        e.message,
    )
