"""What the meter charges each live lease of a matching to, as arrays (issue 11).

The meter charges a piece of time lease by lease in lease-id order, each addition onto the
running totals (``metering._accrue_walk``): float sums depend on their order, so that order is
the meter's definition.  Walking every open lease at every instant the clock moves cost
0.15-0.3 s at 100k open leases, with or without GPU-hours.  ``Charges`` holds what the walk
adds where, so a piece is charged by ``numpy.add.at`` - which adds each value in turn, in the
order given, onto the running total - with the very same additions in the very same order.

A matching derived from another (an extension by newly minted leases, a shrink by closed
ones; ``FillResult._derived``) has the other's charges with those leases inserted or removed
where they sort, worked out with array operations rather than a walk: so while admissions
flow, each admission's matching is charged without visiting every open lease.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gpu_fleet.core.funding.envelopes import EnvelopeInfo
from gpu_fleet.core.funding.fill_result import FillResult
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Lease

LENT_CLASSES = (FundingClass.SHARED, FundingClass.BORROWED)
"""The classes a lease is charged to its run's hours from a lender in."""

_K = TypeVar("_K")
_C = TypeVar("_C")


def _ints(values: Iterable[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Charges:
    """What each live lease of a matching is charged to, as the walk adds it: per lease in
    lease-id order its id, width and the number of its (run, class); per funded lease (in the
    same order) its payer's number and its (payer, class)'s; per (funded lease, cap of its
    payer) the cap's and the funded lease it comes from; per funded lease of a lender's class,
    its (run, lender)'s and where it comes from.  Keys are numbered as first met (a derived
    one's new keys after the others: ``add_flat`` creates missing totals in the walk's order
    whatever the numbering), and a key no lease refers to any more may stay numbered."""

    ids: list[str]
    widths: np.ndarray
    run_classes: dict[tuple[str, FundingClass], int]
    run_class_of: np.ndarray
    funded: np.ndarray
    envelopes: dict[EnvelopeKey, int]
    envelope_of: np.ndarray
    envelope_classes: dict[tuple[EnvelopeKey, FundingClass], int]
    envelope_class_of: np.ndarray
    caps: dict[str, int]
    cap_of: np.ndarray
    cap_source: np.ndarray
    lenders: dict[tuple[str, str], int]
    lender_of: np.ndarray
    lent_source: np.ndarray
    # Per numbering of runs' keys, the keys in number order as far as any numbering that
    # grew from the same one has numbered them (``_Builder``): numberings sharing one agree
    # on every number they have, so the meter can add pieces of a line onto one array.
    run_log: list[tuple[str, FundingClass]]
    lender_log: list[tuple[str, str]]

    @classmethod
    def of(
        cls,
        f: FillResult,
        leases: Sequence[Lease],
        envelopes: Mapping[EnvelopeKey, EnvelopeInfo],
    ) -> Charges:
        """The charges of ``f`` (whose leases are among ``leases``), by one walk over them."""
        by_id = {lease.id: lease for lease in leases}
        classes, payer = f.classes_by_id(), f.payer
        out = _Builder(cls.empty(), envelopes)  # its own logs: a new line of numberings
        out.add((by_id[lease_id], cls_, payer.get(lease_id)) for lease_id, cls_ in classes)
        return out.charges([lease_id for lease_id, _ in classes])

    @classmethod
    def empty(cls) -> Charges:
        none = np.zeros(0, dtype=np.int64)
        return cls(
            [], np.zeros(0), {}, none, none, {}, none, {}, none, {}, none, none, {}, none, none,
            [], [],
        )  # fmt: skip

    def derived(
        self,
        f: FillResult,
        added: Sequence[Lease],
        gone: frozenset[str],
        envelopes: Mapping[EnvelopeKey, EnvelopeInfo],
    ) -> Charges:
        """The charges of ``f``, which is this one's matching without the leases ``gone`` and
        with the live leases ``added`` (none of them here before), each decided as ``f`` says
        - an extension or a shrink keeps every other lease's payer and class."""
        out = self._without(gone) if gone else self
        if added:
            out = out._with(f, sorted(added, key=lambda x: x.id), envelopes)
        return out

    def _without(self, gone: frozenset[str]) -> Charges:
        ids = list(self.ids)
        at = sorted(bisect.bisect_left(self.ids, lease_id) for lease_id in gone)
        assert all(self.ids[i] in gone for i in at), "only live leases leave"
        for i in reversed(at):
            del ids[i]
        keep = np.ones(len(self.ids), dtype=bool)
        keep[at] = False
        funded_keep = keep[self.funded]
        kept = self.funded[funded_keep]
        removed_before = np.cumsum(~keep)  # at a kept lease: the leases removed before it
        funded_removed = np.cumsum(~funded_keep)
        run_class_of = self.run_class_of[keep]

        def sources(source: np.ndarray, of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            stays = funded_keep[source]
            left = source[stays]
            return of[stays], left - funded_removed[left]

        cap_of, cap_source = sources(self.cap_source, self.cap_of)
        lender_of, lent_source = sources(self.lent_source, self.lender_of)
        run_classes, run_class_of, run_log = _compact(self.run_classes, run_class_of, self.run_log)
        envelopes, envelope_of, _ = _compact(self.envelopes, self.envelope_of[funded_keep], [])
        envelope_classes, envelope_class_of, _ = _compact(
            self.envelope_classes, self.envelope_class_of[funded_keep], []
        )
        caps, cap_of, _ = _compact(self.caps, cap_of, [])
        lenders, lender_of, lender_log = _compact(self.lenders, lender_of, self.lender_log)
        return Charges(
            ids,
            self.widths[keep],
            run_classes,
            run_class_of,
            kept - removed_before[kept],
            envelopes,
            envelope_of,
            envelope_classes,
            envelope_class_of,
            caps,
            cap_of,
            cap_source,
            lenders,
            lender_of,
            lent_source,
            run_log,
            lender_log,
        )

    def _with(
        self,
        f: FillResult,
        added: Sequence[Lease],
        envelopes: Mapping[EnvelopeKey, EnvelopeInfo],
    ) -> Charges:
        at = [bisect.bisect_left(self.ids, x.id) for x in added]
        ids = list(self.ids)
        for i, x in zip(reversed(at), reversed(added), strict=True):
            ids.insert(i, x.id)
        new = _Builder(self, envelopes)
        new.add([(x, f.class_of(x.id) or FundingClass.UNFUNDED, f.payer_of(x.id)) for x in added])
        # Where each newcomer lands: the j-th inserted before old position at[j] ends at
        # at[j] + j; an old one at i moves up by the number inserted at or before i.
        lease_at = np.array(at, dtype=np.int64)
        funded = self.funded + np.searchsorted(lease_at, self.funded, side="right")
        new_funded = [at[j] + j for j in new.funded]
        fund_at = np.searchsorted(self.funded, [at[j] for j in new.funded], side="left")

        def pairs(
            source: np.ndarray, of: np.ndarray, new_of: list[int], new_source: list[int]
        ) -> tuple[np.ndarray, np.ndarray]:
            moved = source + np.searchsorted(fund_at, source, side="right")
            where = np.searchsorted(source, [fund_at[k] for k in new_source], side="left")
            landed = [int(fund_at[k]) + k for k in new_source]
            return np.insert(of, where, new_of), np.insert(moved, where, landed)

        cap_of, cap_source = pairs(self.cap_source, self.cap_of, new.cap_of, new.cap_source)
        lender_of, lent_source = pairs(
            self.lent_source, self.lender_of, new.lender_of, new.lent_source
        )
        return Charges(
            ids,
            np.insert(self.widths, lease_at, new.widths),
            new.run_classes,
            np.insert(self.run_class_of, lease_at, new.run_class_of),
            np.insert(funded, fund_at, new_funded),
            new.envelopes,
            np.insert(self.envelope_of, fund_at, new.envelope_of),
            new.envelope_classes,
            np.insert(self.envelope_class_of, fund_at, new.envelope_class_of),
            new.caps,
            cap_of,
            cap_source,
            new.lenders,
            lender_of,
            lent_source,
            new.logs["run_classes"],
            new.logs["lenders"],
        )


COMPACT_FROM = 64
"""Key numberings shorter than this keep the keys no lease refers to any more."""
COMPACT_SHARE = 0.5
"""The share of a numbering's keys no lease refers to any more past which it is compacted."""


def _compact(
    numbers: dict[_K, int], which: np.ndarray, log: list[_K]
) -> tuple[dict[_K, int], np.ndarray, list[_K]]:
    """``numbers`` without the keys ``which`` no longer refers to, once they are more than
    ``COMPACT_SHARE`` of them, and ``which`` renumbered to match (the keys kept in their
    order).  A line of derived charges otherwise numbers every run it ever met, and every
    charge reads and writes them all (a review: 5,200 keys after 5,000 admissions and closes
    over 200 runs)."""
    if len(numbers) < COMPACT_FROM:
        return numbers, which, log
    present = np.zeros(len(numbers), dtype=bool)
    present[which] = True
    unused = len(numbers) - int(present.sum())
    if unused <= COMPACT_SHARE * len(numbers):
        return numbers, which, log
    renumber = np.cumsum(present) - 1
    kept = [key for key, here in zip(numbers, present.tolist(), strict=True) if here]
    return {key: i for i, key in enumerate(kept)}, renumber[which], list(kept)  # a new log


class _Builder:
    """Charges of leases met one after another, numbering keys after those of ``base`` (whose
    numberings are copied when a key is added, never written)."""

    def __init__(self, base: Charges, envelopes: Mapping[EnvelopeKey, EnvelopeInfo]) -> None:
        self.envelopes_info = envelopes
        self.run_classes, self.envelopes = base.run_classes, base.envelopes
        self.envelope_classes, self.caps = base.envelope_classes, base.caps
        self.lenders = base.lenders
        self.logs: dict[str, list[Any]] = {"run_classes": base.run_log, "lenders": base.lender_log}
        self._copied: set[str] = set()
        self.widths: list[int] = []
        self.run_class_of: list[int] = []
        self.funded: list[int] = []  # the leases met that are funded, by their place here
        self.envelope_of: list[int] = []
        self.envelope_class_of: list[int] = []
        self.cap_of: list[int] = []
        self.cap_source: list[int] = []  # the funded lease met, by its place in ``funded``
        self.lender_of: list[int] = []
        self.lent_source: list[int] = []

    def _number(self, name: str, key: object) -> int:
        numbers: dict[object, int] = getattr(self, name)
        got = numbers.get(key)
        if got is None:
            if name not in self._copied:
                numbers = dict(numbers)
                setattr(self, name, numbers)
                self._copied.add(name)
            got = numbers[key] = len(numbers)
            log = self.logs.get(name)
            if log is not None:
                if len(log) == got:
                    log.append(key)  # the line's newest numbering: its log grows
                elif log[got] != key:  # another numbering from the same one took this number
                    log = self.logs[name] = [*log[:got], key]
        return got

    def add(self, leases: Iterable[tuple[Lease, FundingClass, EnvelopeKey | None]]) -> None:
        for lease, cls_, env_key in leases:
            run = lease.run
            self.widths.append(len(lease.slots))
            self.run_class_of.append(self._number("run_classes", (run, cls_)))
            if env_key is None:
                continue
            source = len(self.funded)
            self.funded.append(len(self.widths) - 1)
            env = self.envelopes_info[env_key]
            self.envelope_of.append(self._number("envelopes", env_key))
            self.envelope_class_of.append(self._number("envelope_classes", (env_key, cls_)))
            for cap_id in env.caps:
                self.cap_of.append(self._number("caps", cap_id))
                self.cap_source.append(source)
            if cls_ in LENT_CLASSES:
                self.lender_of.append(self._number("lenders", (run, env.owner)))
                self.lent_source.append(source)

    def charges(self, ids: list[str]) -> Charges:
        return Charges(
            ids,
            np.array(self.widths, dtype=np.float64),
            self.run_classes,
            _ints(self.run_class_of),
            _ints(self.funded),
            self.envelopes,
            _ints(self.envelope_of),
            self.envelope_classes,
            _ints(self.envelope_class_of),
            self.caps,
            _ints(self.cap_of),
            _ints(self.cap_source),
            self.lenders,
            _ints(self.lender_of),
            _ints(self.lent_source),
            self.logs["run_classes"],
            self.logs["lenders"],
        )


def add_flat(
    totals: dict[_K, float], keys: Mapping[_K, int], which: np.ndarray, values: np.ndarray
) -> None:
    """``totals[key numbered which[i]] += values[i]`` for each ``i`` in turn.  A key missing
    from ``totals`` joins it where the walk would add it: in the order ``which`` first refers
    to such keys (one it never refers to is left out)."""
    if not len(which):
        return
    names = list(keys)
    read: list[float | None] = list(map(totals.get, names))
    left_out = _create_missing(read, which, lambda k: totals.__setitem__(names[k], 0.0))
    running = np.array(read, dtype=np.float64)
    np.add.at(running, which, values)
    if left_out:
        for k, v in zip(names, running.tolist(), strict=True):
            if k in totals:
                totals[k] = v
        return
    for k, v in zip(names, running.tolist(), strict=True):
        totals[k] = v


def add_nested(
    totals: dict[_K, dict[_C, float]],
    keys: Mapping[tuple[_K, _C], int],
    which: np.ndarray,
    values: np.ndarray,
) -> None:
    """``add_flat`` for totals kept per outer, then inner key: one piece of ``add_pieces``
    (the keys in number order are its log)."""
    if len(which):
        _add_line(totals, [(keys, list(keys), which, values)], {})


def add_pieces(
    totals: dict[_K, dict[_C, float]],
    pieces: Sequence[
        tuple[Mapping[tuple[_K, _C], int], list[tuple[_K, _C]], np.ndarray, np.ndarray]
    ],
) -> list[_K]:
    """``add_nested`` for each piece in turn (its numbering, that numbering's log, which key
    each value goes to, the values) as if each were written before the next is read - so
    pieces whose numberings share a log are added onto one array, read and written once.
    Returns the outer keys any piece adds to, each once."""
    charged: dict[_K, None] = {}
    i = 0
    while i < len(pieces):
        log, j = pieces[i][1], i + 1
        while j < len(pieces) and pieces[j][1] is log:
            j += 1
        _add_line(totals, pieces[i:j], charged)
        i = j
    return list(charged)


def _add_line(
    totals: dict[_K, dict[_C, float]],
    pieces: Sequence[
        tuple[Mapping[tuple[_K, _C], int], list[tuple[_K, _C]], np.ndarray, np.ndarray]
    ],
    charged: dict[_K, None],
) -> None:
    size = max(len(numbers) for numbers, _, _, _ in pieces)
    names = pieces[0][1][:size]  # numberings sharing a log agree on every number they have
    read = [None if (inner := totals.get(a)) is None else inner.get(b) for a, b in names]
    missing = {i for i, v in enumerate(read) if v is None} if None in read else set()
    present = np.zeros(size, dtype=bool)
    for numbers, _, which, _ in pieces:
        if not len(which):
            continue
        if missing:  # created where the walk would: piece by piece, each in first-met order
            for number in _first_met(sorted(k for k in missing if k < len(numbers)), which):
                a, b = names[number]
                totals[a][b] = read[number] = 0.0
                missing.discard(number)
        present[which] = True
    running = np.array([0.0 if v is None else v for v in read], dtype=np.float64)
    for _, _, which, values in pieces:
        np.add.at(running, which, values)
    for (a, b), v, number in zip(names, running.tolist(), range(size), strict=True):
        if number not in missing:  # a key missing that no piece adds to stays missing
            totals[a][b] = v
    for number in np.flatnonzero(present).tolist():
        charged[names[number][0]] = None


def _create_missing(
    read: list[float | None], which: np.ndarray, create: Callable[[int], None]
) -> set[int]:
    """Create the totals ``read`` found missing (``None``) that ``which`` refers to, in the
    order it first does, reading them as 0.0 from then on; returns the numbers of the missing
    ones it never refers to (read as 0.0 too, to be left out of the write-back)."""
    if None not in read:
        return set()
    missing = [i for i, v in enumerate(read) if v is None]
    met = _first_met(missing, which)
    for number in met:
        create(number)
    for i in missing:
        read[i] = 0.0
    return set(missing).difference(met)


def _first_met(missing: list[int], which: np.ndarray) -> list[int]:
    """The key numbers of ``missing`` that ``which`` refers to, in the order it first does."""
    firsts = []
    if len(missing) <= 16:
        for k in missing:
            hits = np.flatnonzero(which == k)
            if len(hits):
                firsts.append((int(hits[0]), k))
    else:
        numbers, first = np.unique(which, return_index=True)
        at = dict(zip(numbers.tolist(), first.tolist(), strict=True))
        firsts = [(at[k], k) for k in missing if k in at]
    return [k for _, k in sorted(firsts)]
