"""One envelope's funded rows in rank order, kept so that a matching extended by a row or two
shares the rest with the matching it extends.

Why: an admission extends the current matching by its new leases (``extend_fill``), and each
lands near the end of its envelope's rows (a newcomer is junior, or ranks by run name among
the others admitted at the same instant).  A plain list had to be copied whole for every
admission - with its running totals, 8 % of the manager's CPU at 10k nodes and 5k open runs
(issue 11).  Here the rows are a long *head*, never changed once made and shared by every
version built from it, and a short sorted *tail* of the rows added since; the tail is folded
into a new head once it outgrows about the square root of twice the rows, so an insertion
costs O(sqrt n) amortised and the head's running totals are built once per head, not once per
matching.

A ``RankedRows`` is immutable: ``inserted`` and ``without`` return new versions.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from gpu_fleet.core.funding.fill_result import Accepted

_RANK = operator.attrgetter("rank")
_WIDTH = operator.attrgetter("width")


class _Head:
    """The shared part: rows in rank order and, once read, their running totals."""

    __slots__ = ("rows", "totals")

    def __init__(self, rows: list[Accepted]) -> None:
        self.rows = rows
        self.totals: list[int] | None = None  # totals[i]: the width of rows[:i]

    def totals_list(self) -> list[int]:
        if self.totals is None:
            self.totals = [0, *itertools.accumulate(map(_WIDTH, self.rows))]
        return self.totals


class RankedRows(Sequence["Accepted"]):
    """Rows sorted by rank (``Accepted.rank``), equal ranks in insertion order."""

    __slots__ = ("_head", "_tail", "_tail_totals")

    def __init__(self, rows: Iterable[Accepted] = (), *, _head: _Head | None = None) -> None:
        self._head = _head if _head is not None else _Head(list(rows))
        self._tail: list[Accepted] = []
        self._tail_totals: list[int] | None = None

    @classmethod
    def adopt(cls, rows: list[Accepted]) -> RankedRows:
        """``rows`` (in rank order) without a copy: the caller hands the list over."""
        return cls(_head=_Head(rows))

    @classmethod
    def _of(cls, head: _Head, tail: list[Accepted]) -> RankedRows:
        out = cls(_head=head)
        out._tail = tail
        return out

    # -- Sequence --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._head.rows) + len(self._tail)

    def __iter__(self) -> Iterator[Accepted]:
        if not self._tail:
            return iter(self._head.rows)
        return itertools.chain(self._head.rows, self._tail)

    @overload
    def __getitem__(self, i: int) -> Accepted: ...

    @overload
    def __getitem__(self, i: slice) -> list[Accepted]: ...

    def __getitem__(self, i: int | slice) -> Accepted | list[Accepted]:
        if isinstance(i, slice):
            return self.as_list()[i]
        head = self._head.rows
        n = len(head) + len(self._tail)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("RankedRows index out of range")
        return head[i] if i < len(head) else self._tail[i - len(head)]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankedRows | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, like the list it replaces

    def __repr__(self) -> str:
        return f"RankedRows({self.as_list()!r})"

    def as_list(self) -> list[Accepted]:
        """The rows as a new list."""
        return [*self._head.rows, *self._tail]

    # -- reading by rank -------------------------------------------------------------------

    def bisect_left(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go before any equal one (``bisect.bisect_left``)."""
        head = self._head.rows
        i = bisect.bisect_left(head, rank, key=_RANK)
        if i < len(head) or not self._tail:
            return i
        return i + bisect.bisect_left(self._tail, rank, key=_RANK)

    def bisect_right(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go after every equal one (``bisect.bisect_right``)."""
        head = self._head.rows
        i = bisect.bisect_right(head, rank, key=_RANK)
        if i < len(head) or not self._tail:
            return i
        return i + bisect.bisect_right(self._tail, rank, key=_RANK)

    def width_before(self, i: int) -> int:
        """The width of the first ``i`` rows (running totals, built once per head)."""
        head = self._head
        n = len(head.rows)
        if i <= n:
            return head.totals_list()[i]
        if self._tail_totals is None:
            self._tail_totals = [0, *itertools.accumulate(map(_WIDTH, self._tail))]
        return head.totals_list()[n] + self._tail_totals[i - n]

    def width_up_to(self, rank: tuple[object, ...]) -> int:
        """The width of the rows ranked at or above ``rank`` (equal ranks count as senior)."""
        return self.width_before(self.bisect_right(rank))

    def total_width(self) -> int:
        return self.width_before(len(self))

    # -- new versions ----------------------------------------------------------------------

    def inserted(self, row: Accepted) -> RankedRows:
        """These rows with ``row`` after every row of an equal rank (``bisect.insort``)."""
        head = self._head.rows
        at = bisect.bisect_right(head, row.rank, key=_RANK)
        if at < len(head):  # inside the head (rare: a newcomer senior to held rows)
            return RankedRows._of(_Head([*head[:at], row, *head[at:]]), self._tail)
        tail = list(self._tail)
        bisect.insort_right(tail, row, key=_RANK)
        if len(tail) > _tail_limit(len(head)):
            return RankedRows._of(_Head([*head, *tail]), [])
        return RankedRows._of(self._head, tail)

    def without(self, rank_keys: Collection[object]) -> RankedRows:
        """These rows less those whose rank ends in one of ``rank_keys`` (lease ids)."""
        return RankedRows(r for r in self if r.rank[-1] not in rank_keys)

    def shares_head_with(self, other: RankedRows) -> bool:
        """Do both versions read the same head (and its running totals)?"""
        return self._head is other._head


def _tail_limit(head: int) -> int:
    """Rows kept apart before the tail is folded into a new head: about sqrt(2n), which
    balances copying the tail at every insertion against copying the head at each fold."""
    return max(32, math.isqrt(2 * head))


EMPTY_ROWS = RankedRows()
"""No rows (shared: a ``RankedRows`` is never changed in place)."""
