"""The pending reservations, indexed for the questions decisions ask of them: each run's
newest, who holds which intended slice in activation order, and the order the promises were
made (backfill protection and the first-comer rule, DESIGN decision 5).

A mixin of ``FleetState`` (which declares the fields): the fold keeps the index current as
reservations come and go (``_add_pending``, ``_drop_pending``), so a deep queue is never
re-indexed per commit.  Views that read only the reservations are cached until they change
(``_reservations_cached``).
"""

from __future__ import annotations

import bisect
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import NamedTuple, TypeVar, cast

from gpu_fleet.core.ledger.events import Reservation
from gpu_fleet.core.model import Instant

_T = TypeVar("_T")
_START = operator.itemgetter(0)  # of an (earliest start, name) entry of ``_by_start``


class SliceEntry(NamedTuple):
    """One reservation waiting in an intended slice, as backfill protection reads it.

    Tuples sort in activation order (earliest start, then name).  ``line`` is the reservation's
    place in the order the promises were made (``FleetState.promise_order``): the first comer
    is first in line for room that frees there before anyone falls due (``gang.protects``).
    """

    earliest_start: Instant
    name: str
    run: str
    line: int


class ReservationLine:
    """The pending reservations' index (``FleetState`` declares and initialises the fields)."""

    pending_reservations: dict[str, Reservation]
    reservations_epoch: int
    _by_reservations: dict[str, tuple[int, object]]
    _promise: dict[str, int]
    _promise_counter: int
    _pending_of: dict[str, dict[str, Reservation]]
    _newest_pending: dict[str, Reservation]
    _slices: dict[tuple[str, ...], list[SliceEntry]]
    _slice_line: dict[tuple[str, ...], dict[str, SliceEntry]]
    _by_start: list[tuple[Instant, str]]

    def _reservations_cached(self, name: str, compute: Callable[[], _T]) -> _T:
        """Like ``cached``, but kept until the pending reservations change (not every fold):
        for views that read nothing else, so a deep queue does not re-index them per commit."""
        hit = self._by_reservations.get(name)
        if hit is not None and hit[0] == self.reservations_epoch:
            return cast(_T, hit[1])
        value = compute()
        self._by_reservations[name] = (self.reservations_epoch, value)
        return value

    def pending_reservation(self, run: str) -> Reservation | None:
        """The run's newest pending reservation (kept by the fold)."""
        return self._newest_pending.get(run)

    def pending_of(self, run: str) -> list[Reservation]:
        """Every pending reservation of ``run`` (usually one), in the order they were made."""
        mine = self._pending_of.get(run)
        return list(mine.values()) if mine else []

    def protected_slices(self) -> dict[tuple[str, ...], list[SliceEntry]]:
        """Intended slices of pending reservations that hold one (``Reservation.holds_slice``,
        DESIGN decision 5): slice nodes -> (earliest start, reservation name, run, place in
        line), in activation order, slices sorted.

        Reservations share whole domains, so there are few slices and many reservations: backfill
        protection asks per slice ("is some other run's bound in it too soon for me?").  The fold
        keeps the entries (a deep queue changes them at every admission); the lists are read-only
        for callers and valid until the next fold.
        """
        return self._reservations_cached(
            "protected_slices", lambda: dict(sorted((k, v) for k, v in self._slices.items()))
        )

    def slice_keys(self) -> tuple[tuple[str, ...], ...]:
        """The keys of ``protected_slices``, in its order (one tuple per reservation change)."""
        return self._reservations_cached("slice_keys", lambda: tuple(self.protected_slices()))

    def first_in_line(self, nodes: tuple[str, ...]) -> SliceEntry | None:
        """The entry of slice ``nodes`` promised first (lowest place in line)."""
        line = self._slice_line.get(nodes)
        return next(iter(line.values())) if line else None

    def firsts_in_line(self) -> list[SliceEntry]:
        """The entry first in line (``first_in_line``) of every protected slice: the runs a
        slice may be open to although they may backfill none (``gang.closed_slices``)."""
        return self._reservations_cached(
            "firsts_in_line",
            lambda: [next(iter(line.values())) for line in self._slice_line.values() if line],
        )

    def promise_order(self) -> dict[str, int]:
        """Pending reservations by the order they were made: ledger order, which the fold keeps
        as ``pending_reservations``' insertion order (a snapshot restores it the same way).
        Finer than ``created_at``: two runs reserving in the same second keep their order.

        The values only order the reservations (a counter the fold keeps, not positions);
        read-only for callers, valid until the next fold."""
        return self._promise

    def pending_by_name(self, run: str) -> list[Reservation]:
        """Every pending reservation of ``run``, by name: the order releases are written in
        (read from the per-run index, not by walking every pending reservation)."""
        return sorted(self.pending_of(run), key=lambda r: r.name)

    def next_reservation_start(self, after: Instant) -> Instant | None:
        """The earliest start of a pending reservation later than ``after``, if any."""
        i = bisect.bisect_right(self._by_start, after, key=_START)
        return self._by_start[i][0] if i < len(self._by_start) else None

    def due_reservations(self, now: Instant) -> list[Reservation]:
        """Pending reservations whose earliest start is ``now`` or before, in activation
        order (earliest start, then name).  Kept sorted by the fold: the reconcile loop asks at
        every instant, and a deep queue is mostly reservations not yet due."""
        ends = bisect.bisect_right(self._by_start, now, key=_START)
        return [self.pending_reservations[name] for _, name in self._by_start[:ends]]

    def _add_pending(self, res: Reservation) -> None:
        """Index a reservation that became pending (``pending_reservations`` already has it)."""
        seq = self._promise.get(res.name)
        if seq is None:
            seq = self._promise[res.name] = self._promise_counter
            self._promise_counter += 1
        bisect.insort(self._by_start, (res.earliest_start, res.name))
        self._pending_of[res.run][res.name] = res
        self._newest_pending[res.run] = max(
            self._pending_of[res.run].values(), key=lambda r: (r.created_at, r.name)
        )
        if res.holds_slice:
            nodes = tuple(res.nodes)
            entry = SliceEntry(res.earliest_start, res.name, res.run, seq)
            bisect.insort(self._slices.setdefault(nodes, []), entry)
            self._slice_line.setdefault(nodes, {})[res.name] = entry

    def _drop_pending(self, res: Reservation) -> None:
        """Un-index a reservation leaving ``pending_reservations``."""
        seq = self._promise.pop(res.name, None)
        starts = self._by_start
        i = bisect.bisect_left(starts, (res.earliest_start, res.name))
        if i < len(starts) and starts[i] == (res.earliest_start, res.name):
            del starts[i]
        mine = self._pending_of.get(res.run)
        if mine is not None:
            mine.pop(res.name, None)
            if mine:
                self._newest_pending[res.run] = max(
                    mine.values(), key=lambda r: (r.created_at, r.name)
                )
            else:
                del self._pending_of[res.run]
                self._newest_pending.pop(res.run, None)
        if res.holds_slice and seq is not None:
            nodes = tuple(res.nodes)
            entries = self._slices.get(nodes, [])
            entry = SliceEntry(res.earliest_start, res.name, res.run, seq)
            i = bisect.bisect_left(entries, entry)
            if i < len(entries) and entries[i] == entry:
                del entries[i]
            if not entries:
                self._slices.pop(nodes, None)
            line = self._slice_line.get(nodes)
            if line is not None:
                line.pop(res.name, None)
                if not line:
                    del self._slice_line[nodes]

    def _reindex_reservations(self) -> None:
        self._promise, self._promise_counter = {}, 0
        self._pending_of, self._newest_pending = defaultdict(dict), {}
        self._slices, self._slice_line, self._by_start = {}, {}, []
        for res in self.pending_reservations.values():
            self._add_pending(res)
        self.reservations_epoch += 1
