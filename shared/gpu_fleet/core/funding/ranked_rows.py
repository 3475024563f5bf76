"""One envelope's funded rows in rank order, kept so that a matching extended by a row or two
shares the rest with the matching it extends.

Why: an admission extends the current matching by its new leases (``extend_fill``), and each
lands near the end of its envelope's rows (a newcomer is junior, or ranks by run name among
the others admitted at the same instant).  A plain list had to be copied whole for every
admission - with its running totals, 8 % of the manager's CPU at 10k nodes and 5k open runs
(issue 11).

Here a version is a *prefix* of a shared, append-only list (its first ``n`` rows) and a short
sorted *tail* of its own:

* a newcomer ranked after the prefix goes into a copy of the tail;
* one ranked inside the prefix but near its end shortens the prefix instead: the rows after it
  move into the new version's tail, and nothing is copied but them;
* a tail longer than about the square root of twice the rows is folded into the shared list -
  appended in place when this version's prefix is the whole (non-empty) list - other versions
  read only their own prefixes - else copied.

The running totals of the shared list are append-only too and built as far as they are read,
so an insertion costs O(sqrt n) amortised and no version ever sums rows another already summed.
A ``RankedRows`` never changes once made; ``inserted`` and ``without`` return new versions.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from gpu_fleet.core.funding.fill_result import Accepted

_RANK = operator.attrgetter("rank")
_WIDTH = operator.attrgetter("width")

_GROW = threading.Lock()
"""Held while a shared list or its totals grow: the manager decides in a worker thread while
its loop may read (and so total) the same matchings; check-then-append must not interleave."""


class _Shared:
    """Rows in rank order that versions read prefixes of, and their running totals."""

    __slots__ = ("rows", "totals")

    def __init__(self, rows: list[Accepted], totals: list[int] | None = None) -> None:
        self.rows = rows  # append-only
        self.totals = totals or [0]  # totals[i]: the width of rows[:i]; append-only, as read

    def changed_after(self, same: int, rows: list[Accepted]) -> _Shared:
        """A new list ``rows`` whose first ``same`` rows are this list's: their totals, as far
        as they are built, are copied rather than summed again."""
        return _Shared(rows, self.totals[: same + 1])

    def total_before(self, i: int) -> int:
        totals = self.totals
        if i >= len(totals):
            with _GROW:
                done = len(totals) - 1
                if i > done:
                    more = map(_WIDTH, itertools.islice(self.rows, done, i))
                    sums = itertools.accumulate(more, initial=totals[done])
                    next(sums)  # ``initial``: the total there already
                    totals.extend(sums)
        return totals[i]


class RankedRows(Sequence["Accepted"]):
    """Rows sorted by rank (``Accepted.rank``), equal ranks in insertion order."""

    __slots__ = ("_n", "_shared", "_tail", "_tail_totals")

    def __init__(self, rows: Iterable[Accepted] = ()) -> None:
        self._shared = _Shared(list(rows))
        self._n = len(self._shared.rows)
        self._tail: list[Accepted] = []
        self._tail_totals: list[int] | None = None

    @classmethod
    def adopt(cls, rows: list[Accepted]) -> RankedRows:
        """``rows`` (in rank order) without a copy: the caller hands the list over."""
        return cls._of(_Shared(rows), len(rows), [])

    @classmethod
    def _of(cls, shared: _Shared, n: int, tail: list[Accepted]) -> RankedRows:
        out = cls.__new__(cls)
        out._shared, out._n, out._tail, out._tail_totals = shared, n, tail, None
        return out

    # -- Sequence --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n + len(self._tail)

    def __iter__(self) -> Iterator[Accepted]:
        head = itertools.islice(self._shared.rows, self._n)
        return itertools.chain(head, self._tail) if self._tail else head

    @overload
    def __getitem__(self, i: int) -> Accepted: ...

    @overload
    def __getitem__(self, i: slice) -> list[Accepted]: ...

    def __getitem__(self, i: int | slice) -> Accepted | list[Accepted]:
        if isinstance(i, slice):
            return self.as_list()[i]
        n = self._n
        size = n + len(self._tail)
        if i < 0:
            i += size
        if not 0 <= i < size:
            raise IndexError("RankedRows index out of range")
        return self._shared.rows[i] if i < n else self._tail[i - n]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankedRows | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, like the list it replaces

    def __repr__(self) -> str:
        return f"RankedRows({self.as_list()!r})"

    def as_list(self) -> list[Accepted]:
        """The rows as a new list."""
        return [*self._shared.rows[: self._n], *self._tail]

    # -- reading by rank -------------------------------------------------------------------

    def bisect_left(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go before any equal one (``bisect.bisect_left``)."""
        n = self._n
        i = bisect.bisect_left(self._shared.rows, rank, 0, n, key=_RANK)
        if i < n or not self._tail:
            return i
        return n + bisect.bisect_left(self._tail, rank, key=_RANK)

    def bisect_right(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go after every equal one (``bisect.bisect_right``)."""
        n = self._n
        i = bisect.bisect_right(self._shared.rows, rank, 0, n, key=_RANK)
        if i < n or not self._tail:
            return i
        return n + bisect.bisect_right(self._tail, rank, key=_RANK)

    def width_before(self, i: int) -> int:
        """The width of the first ``i`` rows."""
        n = self._n
        if i <= n:
            return self._shared.total_before(i)
        if self._tail_totals is None:
            self._tail_totals = [0, *itertools.accumulate(map(_WIDTH, self._tail))]
        return self._shared.total_before(n) + self._tail_totals[i - n]

    def width_up_to(self, rank: tuple[object, ...]) -> int:
        """The width of the rows ranked at or above ``rank`` (equal ranks count as senior)."""
        return self.width_before(self.bisect_right(rank))

    def total_width(self) -> int:
        return self.width_before(len(self))

    # -- new versions ----------------------------------------------------------------------

    def inserted(self, row: Accepted) -> RankedRows:
        """These rows with ``row`` after every row of an equal rank (``bisect.insort``)."""
        shared, n = self._shared, self._n
        at = bisect.bisect_right(shared.rows, row.rank, 0, n, key=_RANK)
        limit = _tail_limit(n)
        if at == n:  # after the prefix (the usual newcomer): into a copy of the tail
            tail = list(self._tail)
            bisect.insort_right(tail, row, key=_RANK)
        elif n - at + len(self._tail) < limit:  # near the prefix's end: shorten it
            tail = [row, *shared.rows[at:n], *self._tail]
            n = at
        else:  # far inside: a new list
            rows = [*shared.rows[:at], row, *shared.rows[at:n], *self._tail]
            return RankedRows._of(shared.changed_after(at, rows), len(rows), [])
        if len(tail) <= limit:
            return RankedRows._of(shared, n, tail)
        end = n + len(tail)
        with _GROW:
            if n and len(shared.rows) == n:  # this prefix is the whole list: append in place
                shared.rows.extend(tail)
                return RankedRows._of(shared, end, [])
        if shared.rows[n:end] == tail:  # a sibling appended these very rows (the same
            return RankedRows._of(shared, end, [])  # extension twice: check, then fold)
        rows = [*shared.rows[:n], *tail]
        return RankedRows._of(shared.changed_after(n, rows), end, [])

    def without(self, rank_keys: Collection[object]) -> RankedRows:
        """These rows less those whose rank ends in one of ``rank_keys`` (lease ids)."""
        return RankedRows(r for r in self if r.rank[-1] not in rank_keys)

    def shares_rows_with(self, other: RankedRows) -> bool:
        """Do both versions read the same shared list (and its running totals)?"""
        return self._shared is other._shared


def _tail_limit(head: int) -> int:
    """Rows kept apart before the tail is folded into the shared list: about sqrt(2n), which
    balances copying the tail at every insertion against copying the list at each fold."""
    return max(32, math.isqrt(2 * head))


EMPTY_ROWS = RankedRows()
"""No rows (shared: a ``RankedRows`` is never changed in place)."""
