"""What each envelope funds, in rank order (``FillResult.accepted``), each acceptor group's rows
made when one of its envelopes is first read.

Why: at 100k open leases a matching funds about 80,000 leases, and making a row for each - its
rank as a tuple, a named tuple around it - was 7 % of a full funding evaluation (issue 11).
Nearly every reader reads a few envelopes: an admission decision (``cover``) the envelopes on
the requesting run's list, the GPU-hour crossing the envelopes that set GPU-hours, an extension
the envelopes its newcomers land on.  Iterating reads them all (and makes them all once).

The rows come out exactly as the matching held them: the same rows, in the same order, under the
same keys, and an envelope that funds nothing has no key.  An ``AcceptedRows`` never changes
what it answers once made; ``replaced`` returns a new one.  Two threads may read one (the
manager decides in a worker thread and reads on the loop): each would make the same rows, and a
group is marked made only after its rows are in.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gpu_fleet.core.funding.ranked_rows import RankedRows
from gpu_fleet.core.model import EnvelopeKey, Instant, Lease

if TYPE_CHECKING:
    from gpu_fleet.core.funding.envelopes import EnvelopeIndex
    from gpu_fleet.core.funding.fill_result import Accepted

_new_tuple = tuple.__new__


@dataclass(slots=True, eq=False)  # holds arrays: compared by identity
class Tails:
    """Each claim's tail - (admission, run, group, first slot, lease id), the rank after its
    class - worked out from its lease and its run when asked, not kept per claim.

    Why: a matching's readers ask for few of them (the rows of the envelopes they read, each
    group's most junior rank), and a tuple per claim kept for them was 100k more objects the
    cyclic collector walked after every evaluation at 100k open leases (issue 11).  Per claim
    this keeps only its lease and its run's number (an array in a large matching); per run its
    key and admission (``None``: not admitted, so a lease ranks by its own start).
    """

    leases: Sequence[Lease]
    # per claim its run's number; ``fill`` makes it an array for a large matching
    run_numbers: Sequence[int] | np.ndarray
    run_since: Sequence[Instant | None]
    run_key_of: Sequence[str]
    first_slot: Callable[[tuple[str, ...]], tuple[str, int]]  # ``matching._first_slot``

    def of(self, positions: list[int]) -> list[tuple[object, ...]]:
        """The tails of the claims at ``positions``."""
        numbers = self.run_numbers
        runs = (
            numbers[positions].tolist()
            if isinstance(numbers, np.ndarray)
            else [numbers[p] for p in positions]
        )
        leases, since_of, key_of, first_slot = (
            self.leases,
            self.run_since,
            self.run_key_of,
            self.first_slot,
        )
        out: list[tuple[object, ...]] = []
        for p, r in zip(positions, runs, strict=True):
            lease = leases[p]
            since = since_of[r]
            out.append(
                (
                    lease.start if since is None else since,
                    key_of[r],
                    lease.group,
                    first_slot(lease.slots),
                    lease.id,
                )
            )
        return out


@dataclass(frozen=True, slots=True, eq=False)  # holds arrays: compared by identity
class HeldRanks:
    """What the matching held, to make rows from: per acceptor group its integer ranks in rank
    order (``class * n + position``, as ``matching._ClaimTable`` numbers claims), the claims'
    tails (``Tails``), and per claim the number of the envelope it is held by (as
    ``EnvelopeIndex.numbered`` numbers them).  Shared, never changed, by every
    ``AcceptedRows`` made from one matching."""

    index: EnvelopeIndex
    held: Mapping[int, list[int]]
    n: int
    tails: Tails
    envelope_of: Sequence[int] | np.ndarray

    def rows_of(self, acceptor: int) -> dict[EnvelopeKey, RankedRows]:
        """The rows of one acceptor group, per envelope that funds any."""
        from gpu_fleet.core.funding.fill_result import Accepted  # noqa: PLC0415 - a cycle

        entries = self.held.get(acceptor)
        if not entries:
            return {}
        classes, positions = zip(*map(divmod, entries, itertools.repeat(self.n)), strict=True)
        where = list(positions)
        leases = self.tails.leases
        # ``Accepted(...)`` through ``tuple.__new__``: the named tuple's own constructor is a
        # Python function, about half a microsecond per funded lease.
        rows = [
            _new_tuple(Accepted, ((rank_class, *tail), len(leases[p].slots), rank_class))
            for rank_class, tail, p in zip(classes, self.tails.of(where), where, strict=True)
        ]
        members = self.index.acceptors[acceptor]
        if len(members) == 1:  # most groups: every row is the one envelope's
            return {members[0]: RankedRows.adopt(rows)}
        envelope_of, numbered = self.envelope_of, self.index.numbered[1]
        numbers = (
            envelope_of[where].tolist()
            if isinstance(envelope_of, np.ndarray)
            else [envelope_of[p] for p in where]
        )
        by_key: dict[EnvelopeKey, list[Accepted]] = {}
        for row, number in zip(rows, numbers, strict=True):
            key = numbered[number].key
            got = by_key.get(key)
            if got is None:
                got = by_key[key] = []
            got.append(row)
        return {key: RankedRows.adopt(got) for key, got in by_key.items()}


class AcceptedRows(Mapping[EnvelopeKey, RankedRows]):
    """Per envelope, the rows it funds (``RankedRows``, in rank order); only envelopes that
    fund something are keys.  Rows made so far are in ``_rows``; the groups still to make are
    ``_pending`` (acceptor group numbers), made from ``_source``."""

    __slots__ = ("_pending", "_rows", "_source")

    def __init__(
        self,
        rows: dict[EnvelopeKey, RankedRows] | None = None,
        source: HeldRanks | None = None,
    ) -> None:
        self._rows: dict[EnvelopeKey, RankedRows] = {} if rows is None else rows
        self._source = source
        self._pending: set[int] = (
            set() if source is None else {a for a, entries in source.held.items() if entries}
        )

    def _make(self, acceptor: int) -> None:
        source = self._source
        if source is None or acceptor not in self._pending:
            return
        self._rows.update(source.rows_of(acceptor))
        self._pending.discard(acceptor)  # after the rows are in: a reader between finds both

    def _make_all(self) -> None:
        for acceptor in sorted(self._pending):
            self._make(acceptor)
        self._source = None  # nothing left to make: the claims' columns may go

    def _make_for(self, key: EnvelopeKey) -> None:
        source = self._source  # once: another reader's ``_make_all`` may clear it
        if self._pending and source is not None:
            acceptor = source.index.acceptor_of.get(key)
            if acceptor is not None:
                self._make(acceptor)

    def __getitem__(self, key: EnvelopeKey) -> RankedRows:
        rows = self.get(key)
        if rows is None:
            raise KeyError(key)
        return rows

    def get(self, key: EnvelopeKey, default: RankedRows | None = None) -> RankedRows | None:  # type: ignore[override]
        rows = self._rows.get(key)
        if rows is None:
            self._make_for(key)
            return self._rows.get(key, default)
        return rows

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[EnvelopeKey]:
        self._make_all()
        return iter(self._rows)

    def __len__(self) -> int:
        self._make_all()
        return len(self._rows)

    def __repr__(self) -> str:
        return f"AcceptedRows({dict(self)!r})"

    def replaced(self, changes: Mapping[EnvelopeKey, RankedRows]) -> AcceptedRows:
        """These rows with ``changes`` laid over them (an empty ``RankedRows`` stays a key, as a
        dict would keep it): a new mapping that makes the groups still pending as this one
        does, and leaves this one as it was."""
        for key in changes:  # a group's other envelopes must not be made over a change
            self._make_for(key)
        out = AcceptedRows.__new__(AcceptedRows)
        # In this order: a group another reader makes in between is then both pending and in
        # the rows (made again if read: the same rows), never in neither.
        out._pending = set(self._pending)
        out._source = self._source
        out._rows = {**self._rows, **changes}
        return out


def with_changes(
    accepted: Mapping[EnvelopeKey, RankedRows], changes: Mapping[EnvelopeKey, RankedRows]
) -> Mapping[EnvelopeKey, RankedRows]:
    """``accepted`` with ``changes`` laid over it, as a new mapping (``accepted`` unchanged)."""
    if isinstance(accepted, AcceptedRows):
        return accepted.replaced(changes)
    return {**accepted, **changes}
