"""What a matching answers: who pays for each live lease, its class, who turned it away, and
what each envelope funds (``FillResult``), with the trace an extension builds on (``FillTrace``).

Kept apart from the matching itself (``matching``) because its readers - the meter, cover, the
engine, views - need the answer, not how it is found, and because an extension's layered maps
make the answer a small structure of its own (issue 11).
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import numpy as np

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo
from gpu_fleet.core.funding.proposals import Proposer
from gpu_fleet.core.funding.ranked_rows import RankedRows
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Lease, LeaseRole


class Rejection(NamedTuple):
    """An envelope that turned a claim away, and why.

    The reason is kept as a template and its numbers and formatted only when read: a matching
    at fleet scale turns claims away about a million times (issue 11) and nothing reads most of
    them.
    """

    envelope: EnvelopeKey
    template: str
    args: tuple[object, ...] = ()

    @property
    def reason(self) -> str:
        return self.template.format(*self.args)


_REWRITING = threading.RLock()
"""Held while a matching's maps are rewritten (a rejection log settled, layers united): two
threads may read one matching (the manager decides in a worker thread, and reads on the loop).
One lock for every matching, module-level so a matching still copies (``copy.deepcopy``);
taken only when there is something to rewrite."""


class RejectionLog:
    """The rejections a matching recorded, turned into each lease's list when first read.

    Why: at 100k open leases a matching turns claims away about 900,000 times, mostly in
    batches - every newcomer of an envelope that is exactly full, for the same reason - and
    nothing that decides reads them (explanations and tests do).  Recording a batch as one
    entry and sorting it out per lease only when asked saved a tenth of a funding evaluation
    (issue 11).  The log is in the order the rejections happened, which for each claim is the
    order it proposed in, so each lease's list comes out as the matching met them.

    Two parallel lists, not a list of pairs: a pair per rejection would be 300k more objects
    for the cyclic collector to walk once the evaluation resumes it.  ``ranks[i]`` is the
    integer rank of the claim turned away, or the ranks of every claim one decision turned
    away alike; ``reasons[i]`` is why.

    ``FillResult`` settles it under ``_REWRITING``, so it is settled once even when two threads
    read matchings that share it (an extension hands its base's log on).
    """

    __slots__ = ("_leases", "_live", "_n", "_settled", "ranks", "reasons")

    def __init__(self, n: int, leases: Sequence[Lease], live: Sequence[str]) -> None:
        self._n = n  # ranks are ``class * n + position`` (``matching._ClaimTable``)
        self._leases = leases  # the lease per position
        self._live = live  # every lease the matching saw, in lease-id order
        self.ranks: list[int | list[int] | np.ndarray] = []
        self.reasons: list[Rejection] = []
        self._settled: dict[str, list[Rejection]] | None = None

    def settled(self) -> dict[str, list[Rejection]]:
        """Every live lease's rejections, in lease-id order (computed once)."""
        if self._settled is None:
            out: dict[str, list[Rejection]] = {lease_id: [] for lease_id in self._live}
            n, leases = self._n, self._leases
            for which, rejection in zip(self.ranks, self.reasons, strict=True):
                if isinstance(which, int):
                    out[leases[which % n].id].append(rejection)
                else:
                    for rank in which.tolist() if isinstance(which, np.ndarray) else which:
                        out[leases[rank % n].id].append(rejection)
            self._settled, self.ranks, self.reasons = out, [], []
        return self._settled


class RewordedLog(RejectionLog):
    """A matching's rejections with some reasons restated: those naming the GPU-hours left,
    for a matching reused after the meter moved on (``incremental.rebase_fill``).  Settled when
    first read, like the log it stands for."""

    __slots__ = ("reworded", "source")

    def __init__(self, source: FillResult, reworded: Mapping[Rejection, Rejection]) -> None:
        super().__init__(0, (), ())
        self.source: FillResult | None = source  # whose rejections these restate
        self.reworded = reworded  # reason as the source states it -> as it is stated now

    def settled(self) -> dict[str, list[Rejection]]:
        if self._settled is None:
            source = self.source
            assert source is not None
            source._settle()
            get = self.reworded.get
            self._settled = {
                lease_id: [get(r, r) for r in rejections]
                for lease_id, rejections in source._rejections.items()
            }
            self.source = None  # nothing to keep alive once settled
        return self._settled


class Accepted(NamedTuple):
    """One funded claim as an envelope sees it (for admission-side availability).

    A named tuple, not a frozen dataclass: a matching at 100k open leases makes one per funded
    lease, and a frozen dataclass sets each field through ``object.__setattr__`` (issue 11)."""

    rank: tuple[object, ...]
    width: int
    rank_class: int  # 0 loan, 1-4 family tier, 5 sponsor


@dataclass
class FillTrace:
    """What the deferred acceptance went through, kept so a junior newcomer can be matched
    without running it again (``extend_fill``).

    ``junior``: per acceptor group, the most junior rank of any claim that ever proposed to it
    (held at the end or turned away).  ``used``/``lent``/``cap``: the highest counters any
    decision of the run left behind (per envelope, per envelope's loans, per aggregate cap).
    Both are bounds over the whole run, not only its end, because a claim accepted in round 1
    must still fit after every later decision of its acceptor to stay where it is.
    """

    junior: dict[int, tuple[object, ...]] = field(default_factory=dict)
    used: dict[EnvelopeKey, int] = field(default_factory=dict)
    lent: dict[EnvelopeKey, int] = field(default_factory=dict)
    cap: dict[str, int] = field(default_factory=dict)
    # Did any envelope ever turn a claim away?  If not, every claim was held by the first
    # envelope it proposed to, and one leaving frees room nobody waits for (``shrink_fill``).
    rejected_any: bool = False
    # Acceptor groups that ever turned a claim away (the others held everyone who came).
    rejected_at: frozenset[int] = frozenset()
    # The GPU-hour checks of the run, where any envelope or cap sets GPU-hours
    # (``incremental.rebase_fill``); ``None`` where none does.
    hours: HoursChecks | None = None


@dataclass
class HoursChecks:
    """The GPU-hour checks a matching made, reduced to what decides whether each would come out
    the same under other hours left - so the matching can be shown to be what ``fill`` gives
    after the meter moved on (``incremental.rebase_fill``), instead of running it again.

    A check reads the hours left of an envelope or cap, the width funded ahead of the claim
    there, the claim's width, and whether the claim was funded there in the last piece
    (``previously_funded``); it passes more easily with more hours left.  Kept: the hours left
    the run read (``remaining_*``: a check that failed fails again with no more hours), per
    envelope and cap the bounds every passing check needs (``strict``: passes while the hours
    left exceed it; ``weak``: while the hours left plus ``HOURS_EPSILON`` reach it), the
    previously funded pairs it read, and those of them that passed as previously funded
    (``already``: such a check would be stricter for a claim no longer counted so).  The
    envelopes whose GPU-hours turned a claim away are kept too (``exhausted``): their reasons
    name the hours left, so they are restated when the matching is reused.  Filled while the
    matching runs; read-only once it is made (an extension or a reuse makes a new one).
    """

    period_hours: float
    remaining_envelope: Mapping[EnvelopeKey, float]
    remaining_cap: Mapping[str, float]
    previously_funded: frozenset[tuple[str, EnvelopeKey]]
    strict: dict[EnvelopeKey | str, float] = field(default_factory=dict)
    weak: dict[EnvelopeKey | str, float] = field(default_factory=dict)
    already: AbstractSet[tuple[str, EnvelopeKey]] = field(default_factory=set)
    exhausted: set[EnvelopeKey] = field(default_factory=set)
    # The hours left the reasons of ``exhausted`` state (``remaining_envelope`` unless reused).
    stated: Mapping[EnvelopeKey, float] | None = None
    # The narrowest width that passed as not funded before: counting such a pair as funded
    # before eases its check only while the period times that width exceeds twice
    # ``HOURS_EPSILON`` (``rebase_fill``).
    narrowest: float = math.inf
    # Per envelope and cap, the largest width a passing check counted: the width funded ahead
    # of the claim, plus its own where it was not funded before.  Each check still passes with
    # ``extra`` more width ahead of it while the hours left exceed ``period * (top + extra)``
    # plus ``HOURS_EPSILON`` (``incremental.extend_fill``, a newcomer ranked amid the others).
    top: dict[EnvelopeKey | str, int] = field(default_factory=dict)

    def passed(self, key: EnvelopeKey | str, strict: float, weak: float | None) -> None:
        """Note a passing check's bounds (``weak`` None: it had none)."""
        if strict > self.strict.get(key, -math.inf):
            self.strict[key] = strict
        if weak is not None and weak > self.weak.get(key, -math.inf):
            self.weak[key] = weak


Changes = tuple["Changes | None", tuple[Lease, ...], frozenset[str]]
"""Changes from one matching to the next, newest first: the ones before, leases added, ids gone."""

ROLE_CODES = {LeaseRole.ACTIVE: 0, LeaseRole.SPARE: 1}
"""A lease's role as ``ClaimColumns.roles`` holds it (2: any other role)."""


@dataclass(frozen=True, slots=True)
class ClaimColumns:
    """Per claim of one matching, by its position (``matching._ClaimTable``), what the funding
    summary adds up, as integer arrays.

    Why: the summary visits every open lease, and walking 100k of them by id through the
    per-lease maps was a fifth of a funding evaluation (issue 11).  With these it is a few array
    sums, and only the funded leases that name a lender and the unfunded ones (for a minted
    payer) are visited one by one.  ``fill`` keeps them for a large matching (``matching.
    ARRAYS_FROM``) whose claims are every live lease, each once (a lease of an unknown run is
    no claim), so summing the columns sums the maps.
    """

    leases: Sequence[Lease]
    widths: np.ndarray
    runs: np.ndarray  # the run's number: runs numbered in order of their first lease id
    run_names: Sequence[str]  # ``Lease.run`` by number
    roles: np.ndarray  # the lease's role (``ROLE_CODES``)
    id_order: np.ndarray  # the claim's place in lease-id order
    rank_class: np.ndarray  # the rank class it is funded at (``matching``), -1: unfunded
    payer: np.ndarray  # the number of the envelope that pays, or -1
    envelopes: Sequence[EnvelopeInfo]  # by number (``EnvelopeIndex.numbered``)


@dataclass
class FillResult:
    """The matching: who pays for each live lease (``payer``), its class (``funding_class``),
    the envelopes that turned it away (``rejections``), and what each envelope funds.

    An extension (``extend_fill``) does not copy its base's per-lease maps: it keeps them as
    they are and lays the newcomers over them (``_added``), so an admission costs what it adds,
    not every open lease (issue 11).  Reading a map whole unites the two once; lookups of one
    lease (``payer_of``, ``class_of``) read the layers as they are.
    """

    _payer: dict[str, EnvelopeKey | None]
    _funding_class: dict[str, FundingClass]
    _rejections: dict[str, list[Rejection]]
    # Each sorted by rank; a fresh matching's are made per acceptor group when first read.
    accepted: Mapping[EnvelopeKey, RankedRows]
    trace: FillTrace | None = None
    # Are ``payer``, ``funding_class`` and ``rejections`` in lease-id order, as ``fill`` lists
    # them?  A matching extended by a newcomer that sorts inside is not (``classes_by_id``).
    ordered: bool = True
    # ``classes_by_id`` once computed; ``extend_fill`` hands it on as the base's list and the
    # newcomers (sorted), merged when read, so a chain of admissions never sorts or copies
    # every open lease (issue 11).
    _by_id: list[tuple[str, FundingClass]] | None = field(default=None, repr=False, compare=False)
    _by_id_parts: tuple[list[tuple[str, FundingClass]], list[tuple[str, FundingClass]]] | None = (
        field(default=None, repr=False, compare=False)
    )
    # ``funded_pairs`` once computed; handed on the same way (a set copy keeps the hashes, a
    # rebuild hashes every (lease, envelope) tuple again: 4 ms at 5k open leases).
    _pairs: frozenset[tuple[str, EnvelopeKey]] | None = field(
        default=None, repr=False, compare=False
    )
    # Newcomers laid over the three maps above (none of their ids is in those): payer, class
    # and rejections of the leases extensions added since the maps were last united.
    _added: (
        tuple[dict[str, EnvelopeKey | None], dict[str, FundingClass], dict[str, list[Rejection]]]
        | None
    ) = field(default=None, repr=False, compare=False)

    # The matching's rejections while nobody has read them (``RejectionLog``); ``_rejections``
    # is empty until then.  An extension hands it on with the maps.
    _rejection_log: RejectionLog | None = field(default=None, repr=False, compare=False)
    # The matching's claims as columns, when ``fill`` made it large and every live lease is a
    # claim, each once (``ClaimColumns``); a small one and an extension have none.
    columns: ClaimColumns | None = field(default=None, repr=False, compare=False)
    # What the meter charges each live lease to (``charges.Charges``), once worked out, and
    # the index it was worked out for; ``(index, None)`` once charged by a walk only.
    _charges: tuple[EnvelopeIndex, object] | None = field(default=None, repr=False, compare=False)
    # What the funding summary adds up from the matching alone (``metering._Sums``), once
    # worked out, and the index it was worked out for.
    _sums: tuple[EnvelopeIndex, object] | None = field(default=None, repr=False, compare=False)
    # Until the meter has charged it: the nearest matching this one was derived from that the
    # meter has charged (or that was matched afresh), and the changes since, newest first -
    # the live leases added (an extension), the lease ids gone (a shrink).  Its charges are
    # then that one's with those changes (``charges.Charges.derived``), not a walk.  Only the
    # changes are kept between, not every matching of a burst at one instant.
    _derived: tuple[FillResult, Changes] | None = field(default=None, repr=False, compare=False)

    def derived(self, added: tuple[Lease, ...], gone: frozenset[str]) -> tuple[FillResult, Changes]:
        """What a matching derived from this one by ``added`` and ``gone`` notes."""
        if self._derived is not None and self._charges is None:
            root, before = self._derived
            return root, (before, added, gone)
        return self, (None, added, gone)

    @property
    def payer(self) -> dict[str, EnvelopeKey | None]:
        if self._added is not None:
            self._unite()
        return self._payer

    @property
    def funding_class(self) -> dict[str, FundingClass]:
        if self._added is not None:
            self._unite()
        return self._funding_class

    @property
    def rejections(self) -> dict[str, list[Rejection]]:
        self._settle()
        if self._added is not None:
            self._unite()
        return self._rejections

    def _settle(self) -> None:
        """The rejection log as the base map (once; ``_REWRITING`` keeps a concurrent union's
        newcomers from being overwritten by a settle that started before it)."""
        if self._rejection_log is None:
            return
        with _REWRITING:
            log = self._rejection_log
            if log is not None:
                self._rejections, self._rejection_log = log.settled(), None

    def _unite(self) -> None:
        """The maps with the newcomers in (new maps: a base shares the old ones); callers
        check ``_added`` first, so the lock is taken only when there is something to unite."""
        with _REWRITING:
            added = self._added
            if added is None:
                return
            self._settle()
            payer, cls, rejections = added
            self._payer = {**self._payer, **payer}
            self._funding_class = {**self._funding_class, **cls}
            self._rejections = {**self._rejections, **rejections}
            self._added = None

    def payer_of(self, lease_id: str) -> EnvelopeKey | None:
        """``payer.get(lease_id)`` without uniting the layers."""
        added = self._added
        if added is not None and lease_id in added[0]:
            return added[0][lease_id]
        return self._payer.get(lease_id)

    def class_of(self, lease_id: str) -> FundingClass | None:
        """``funding_class.get(lease_id)`` without uniting the layers."""
        added = self._added
        if added is not None and lease_id in added[1]:
            return added[1][lease_id]
        return self._funding_class.get(lease_id)

    def holds(self, lease_id: str) -> bool:
        """Is ``lease_id`` matched here (live at the instant, funded or not)?"""
        added = self._added
        return lease_id in self._payer or (added is not None and lease_id in added[0])

    def last_id(self) -> str | None:
        """The last lease id in ``payer``'s order, or None if it is empty."""
        added = self._added
        if added is not None and added[0]:
            return next(reversed(added[0]))
        return next(reversed(self._payer), None)

    # The proposer this matching used (its proposal lists are cached per owner, flavor,
    # sponsors and location); an extension at the same instant reuses it.
    _proposer: Proposer | None = field(default=None, repr=False, compare=False)

    def proposer(self, index: EnvelopeIndex, t: float) -> Proposer:
        """The proposer for ``index`` at ``t``: this matching's own, or the index's shared one."""
        mine = self._proposer
        if mine is not None and mine.index is index and mine.t == t:
            return mine
        return Proposer.at(index, t)

    # Or, handed on by extensions and not read yet: a matching's pairs and those added since
    # (the union is taken when first read - once per metered piece, not once per admission).
    _pairs_parts: (
        tuple[frozenset[tuple[str, EnvelopeKey]], frozenset[tuple[str, EnvelopeKey]]] | None
    ) = field(default=None, repr=False, compare=False)

    def funded_pairs(self) -> frozenset[tuple[str, EnvelopeKey]]:
        """(lease id, payer) of every funded lease: the next piece's ``previously_funded``."""
        if self._pairs is None and self._pairs_parts is not None:
            known, added = self._pairs_parts
            self._pairs, self._pairs_parts = known | added, None
        if self._pairs is None:
            payer = self.payer
            if None in payer.values():
                self._pairs = frozenset((lid, env) for lid, env in payer.items() if env is not None)
            else:
                self._pairs = cast("frozenset[tuple[str, EnvelopeKey]]", frozenset(payer.items()))
        return self._pairs

    def classes_by_id(self) -> list[tuple[str, FundingClass]]:
        """(lease id, class) in lease-id order: the order the meter charges in, since float
        sums depend on it (a fresh ``fill`` and an extended one must charge alike).

        Computed once per matching (a matching is never changed after it is made); callers
        must not modify the list.
        """
        if self._by_id is None and self._by_id_parts is not None:
            self._by_id, self._by_id_parts = merge_by_id(*self._by_id_parts), None
        if self._by_id is None:
            items = list(self.funding_class.items())
            if not self.ordered:
                items.sort(key=operator.itemgetter(0))  # a C key: this runs per metered piece
            self._by_id = items
        return self._by_id

    def funded_width(self, env: EnvelopeKey) -> int:
        rows = self.accepted.get(env)
        return rows.total_width() if rows is not None else 0

    def width_up_to(self, env: EnvelopeKey, rank: tuple[object, ...]) -> int:
        """Funded width on ``env`` ranked at or above ``rank`` (equal keys count as senior):
        a binary search over the rows' chunks and C-level sums (``RankedRows``)."""
        rows = self.accepted.get(env)
        return rows.width_up_to(rank) if rows is not None else 0


def merge_by_id(
    known: list[tuple[str, FundingClass]], added: list[tuple[str, FundingClass]]
) -> list[tuple[str, FundingClass]]:
    """Two lists in lease-id order as one (two sorted runs: timsort merges them linearly)."""
    merged = [*known, *added]
    merged.sort(key=operator.itemgetter(0))
    return merged
