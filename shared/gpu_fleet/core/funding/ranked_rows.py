"""One envelope's funded rows in rank order, kept so that a matching extended by a row or two
shares the rest with the matching it extends.

Why: an admission extends the current matching by its new leases (``extend_fill``).  A plain
list had to be copied whole for every admission, with its running totals: 8 % of the manager's
CPU at 10k nodes and 5k open runs (issue 11), and more when a burst's runs rank before rows
already held (runs admitted in the same second rank by name, so a newcomer often lands a
thousand rows before the end).

Here the rows are cut into chunks of ``CHUNK`` to ``2 * CHUNK`` rows.  A chunk never changes
once made and is shared by every version that holds it; inserting a row copies its one chunk
(split in two when it grows past ``2 * CHUNK``) and the version's short per-chunk lists (last
rank, width, size), wherever the row lands: O(CHUNK + n / CHUNK), at C speed.

A ``RankedRows`` never changes once made; ``inserted`` and ``without`` return new versions.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from gpu_fleet.core.funding.fill_result import Accepted

CHUNK = 128
"""Rows per chunk as cut from a list (a chunk splits in two past twice this)."""

_RANK: Callable[[Accepted], tuple[object, ...]] = operator.attrgetter("rank")
_WIDTH: Callable[[Accepted], int] = operator.attrgetter("width")


def _chunked(rows: list[Accepted]) -> list[list[Accepted]]:
    return [rows[i : i + CHUNK] for i in range(0, len(rows), CHUNK)]


class RankedRows(Sequence["Accepted"]):
    """Rows sorted by rank (``Accepted.rank``), equal ranks in insertion order.

    Per chunk, a version keeps the chunk (a list nobody changes), its last rank (bisected to
    find a rank's chunk), its width and its number of rows: four short lists, copied at C
    speed by each insertion, and summed at C speed up to a chunk to read a position or a
    running total there.
    """

    __slots__ = ("_chunks", "_lasts", "_len", "_sizes", "_total", "_widths")

    def __init__(self, rows: Iterable[Accepted] = ()) -> None:
        self._set(_chunked(list(rows)))

    @classmethod
    def adopt(cls, rows: list[Accepted]) -> RankedRows:
        """``rows`` (in rank order) as chunks; the caller hands the list over."""
        out = cls.__new__(cls)
        out._set(_chunked(rows))
        return out

    def _set(self, chunks: list[list[Accepted]]) -> None:
        self._chunks = chunks
        self._lasts = [c[-1].rank for c in chunks]
        self._widths = [sum(map(_WIDTH, c)) for c in chunks]
        self._sizes = [len(c) for c in chunks]
        self._len = sum(self._sizes)
        self._total = sum(self._widths)

    # -- Sequence --------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Accepted]:
        return itertools.chain.from_iterable(self._chunks)

    @overload
    def __getitem__(self, i: int) -> Accepted: ...

    @overload
    def __getitem__(self, i: slice) -> list[Accepted]: ...

    def __getitem__(self, i: int | slice) -> Accepted | list[Accepted]:
        if isinstance(i, slice):
            return self.as_list()[i]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("RankedRows index out of range")
        for chunk in self._chunks if i < self._len // 2 else ():
            if i < len(chunk):
                return chunk[i]
            i -= len(chunk)
        i -= self._len  # from the end: ``rows[-1]`` and its neighbours are read most
        for chunk in reversed(self._chunks):
            if i >= -len(chunk):
                return chunk[i]
            i += len(chunk)
        raise AssertionError("unreachable: the index was checked")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RankedRows | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, like the list it replaces

    def __repr__(self) -> str:
        return f"RankedRows({self.as_list()!r})"

    def as_list(self) -> list[Accepted]:
        """The rows as a new list."""
        return list(self)

    # -- reading by rank -------------------------------------------------------------------

    def bisect_left(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go before any equal one (``bisect.bisect_left``)."""
        k = bisect.bisect_left(self._lasts, rank)  # the first chunk ending at or after rank
        if k == len(self._chunks):
            return self._len
        return sum(self._sizes[:k]) + bisect.bisect_left(self._chunks[k], rank, key=_RANK)

    def bisect_right(self, rank: tuple[object, ...]) -> int:
        """Where a row of ``rank`` would go after every equal one (``bisect.bisect_right``)."""
        k = bisect.bisect_right(self._lasts, rank)  # the first chunk ending after rank
        if k == len(self._chunks):
            return self._len
        return sum(self._sizes[:k]) + bisect.bisect_right(self._chunks[k], rank, key=_RANK)

    def width_up_to(self, rank: tuple[object, ...]) -> int:
        """The width of the rows ranked at or above ``rank`` (equal ranks count as senior)."""
        k = bisect.bisect_right(self._lasts, rank)
        if k == len(self._chunks):
            return self._total
        chunk = self._chunks[k]
        at = bisect.bisect_right(chunk, rank, key=_RANK)
        return sum(self._widths[:k]) + sum(map(_WIDTH, chunk[:at]))

    def total_width(self) -> int:
        return self._total

    def last_start(self, holds: Callable[[int], bool]) -> int | None:
        """The largest width ahead of a row - the width of the rows before it - for which
        ``holds``, which must hold up to some width and not beyond; ``None`` if it holds for
        none.  Chunk by chunk, then row by row in one chunk: O(n / CHUNK + CHUNK)."""
        start, k = 0, -1
        for i, width in enumerate(self._widths):
            if not holds(start):
                break
            k, start = i, start + width
        if k < 0:
            return None
        above = start - self._widths[k]
        found = None
        for row in self._chunks[k]:
            if not holds(above):
                break
            found = above
            above += row.width
        return found

    # -- new versions ----------------------------------------------------------------------

    def inserted(self, row: Accepted) -> RankedRows:
        """These rows with ``row`` after every row of an equal rank (``bisect.insort``)."""
        chunks = self._chunks
        if not chunks:
            return RankedRows.adopt([row])
        k = min(bisect.bisect_right(self._lasts, row.rank), len(chunks) - 1)
        rows = list(chunks[k])
        bisect.insort_right(rows, row, key=_RANK)
        out = RankedRows.__new__(RankedRows)
        out._len, out._total = self._len + 1, self._total + row.width
        if len(rows) > 2 * CHUNK:  # split: the chunk's place takes two
            one, two = rows[:CHUNK], rows[CHUNK:]
            after = k + 1
            out._chunks = [*chunks[:k], one, two, *chunks[after:]]
            out._lasts = [*self._lasts[:k], one[-1].rank, two[-1].rank, *self._lasts[after:]]
            widths = [sum(map(_WIDTH, one)), sum(map(_WIDTH, two))]
            out._widths = [*self._widths[:k], *widths, *self._widths[after:]]
            out._sizes = [*self._sizes[:k], len(one), len(two), *self._sizes[after:]]
            return out
        out._chunks = chunks.copy()
        out._chunks[k] = rows
        out._lasts = self._lasts
        if rows[-1] is row:  # the chunk's last rank changed
            out._lasts = self._lasts.copy()
            out._lasts[k] = row.rank
        out._widths = self._widths.copy()
        out._widths[k] += row.width
        out._sizes = self._sizes.copy()
        out._sizes[k] += 1
        return out

    def without(self, rank_keys: Collection[object]) -> RankedRows:
        """These rows less those whose rank ends in one of ``rank_keys`` (lease ids)."""
        return RankedRows(r for r in self if r.rank[-1] not in rank_keys)

    def chunks_shared_with(self, other: RankedRows) -> int:
        """How many chunks both versions hold (the rest each made or copied)."""
        mine = {id(c) for c in self._chunks}
        return sum(id(c) in mine for c in other._chunks)


EMPTY_ROWS = RankedRows()
"""No rows (shared: a ``RankedRows`` is never changed in place)."""
