"""Who pays for every open lease at an instant: the stable matching of DESIGN decision 9.

Every live lease is a *claim*.  It proposes to the envelopes it may use in proximity order (own,
parents, siblings, cousins - same location first within each tier - then the sponsors its run
opted into).  Each envelope keeps the highest-ranked claims that fit its concurrency, its lending
cap, its aggregate caps and its GPU-hours, and turns the rest away to propose further (deferred
acceptance).  Envelopes tied by an aggregate cap decide jointly, because the cap binds them all.

Ranking on an envelope, most senior first:

0. loans the envelope granted (the lease was minted on it as a borrow): a loan is a contract and
   is never recalled;
1-4. owner, child, sibling, cousin claims (family sharing is recallable, so the owner wins);
5. sponsor claims the envelope never granted: they only ever take free headroom.

Inside a rank: admission time, run key, group index (numeric), then the lease's first slot.
So the lowest groups of a malleable run fund first, and a senior claim too big to fit never
blocks a smaller junior one (skip semantics).  A claim is funded whole or not at all.

GPU-hours (DESIGN decision 1) use hysteresis over the accounting period P: a *new* claim needs
the remaining hours to cover one period of its width plus the funded widths above it; a claim
*already funded* keeps its payer while the remaining hours still exceed one period of the widths
above it.  The top claim therefore spends the envelope to zero and lower claims demote first.

The result is a pure function of its inputs; nothing here is stored on a lease.
"""

from __future__ import annotations

import bisect
import functools
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar, cast

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, Place, place_of
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import (
    Accepted,
    FillResult,
    FillTrace,
    Rejection,
    RejectionLog,
)
from gpu_fleet.core.funding.proposals import Offer, Proposals, Proposer, RunLists
from gpu_fleet.core.funding.ranked_rows import RankedRows
from gpu_fleet.core.gcpause import paused_gc
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Instant, Lease, Run

_K = TypeVar("_K")

HOURS_EPSILON = 1e-6
"""GPU-hours below which two amounts are equal (keeps float crossings from flapping)."""

LOAN = 0
SPONSOR = 5


@dataclass(frozen=True)
class HoursView:
    """The GPU-hour state the fill needs: what is left, and who was funded just before."""

    period_hours: float = 24.0
    remaining_envelope: Mapping[EnvelopeKey, float] = field(default_factory=dict)
    remaining_cap: Mapping[str, float] = field(default_factory=dict)
    previously_funded: frozenset[tuple[str, EnvelopeKey]] = frozenset()


@functools.lru_cache(maxsize=1 << 18)
def _first_slot(slots: tuple[str, ...]) -> tuple[str, int]:
    """The lease's first physical slot, as (node, ordinal); parsed once per slot tuple (the
    cache holds a 100k-lease fleet's: every evaluation meets the same leases again)."""
    if len(slots) == 1:
        return _slot_key(slots[0])
    if not slots:  # the ledger refuses such a lease; the matching funds it as width 0
        return ("", -1)
    node, sep, _ = slots[0].rpartition("#")
    prefix = node + sep
    cut = len(prefix)
    if sep and all(s.startswith(prefix) and s[cut:].isdecimal() for s in slots):
        return node, min(int(s[cut:]) for s in slots)  # one node, plain ordinals: the usual
    return min(map(_slot_key, slots), default=("", -1))


def _slot_key(s: str) -> tuple[str, int]:
    node, _, ordinal = s.rpartition("#")
    return (node, int(ordinal) if ordinal.isdecimal() else -1)


@dataclass(slots=True)
class _Claim:
    """One lease's claim as an extension (``incremental.extend_fill``) ranks it; the matching
    itself keeps its claims as columns (``_ClaimTable``)."""

    lease: Lease
    run_key: str
    proposals: Sequence[EnvelopeKey]
    borrow_cap: int | None
    width: int
    # (admission, run, group, first slot, lease id): the rank on every envelope after its class
    tail: tuple[object, ...]

    def rank_at(self, env: EnvelopeInfo, tier: Tier) -> tuple[object, ...]:
        """The claim's rank on ``env``, whose owner is ``tier`` to the claim's owner."""
        return (_rank_class(int(tier), self.lease, env), *self.tail)


def _rank_class(tier: int, lease: Lease, env: EnvelopeInfo) -> int:
    """A rank's first element: the family tier, or for no family a loan the envelope granted
    (minted on it) or a sponsor claim that only takes free headroom."""
    if tier != _NO_TIER:
        return tier
    minted = lease.minted_payer
    return LOAN if minted is not None and minted.key == env.key else SPONSOR


_NO_TIER = int(Tier.NONE)
_UNSEEN: Place = ("",)  # a node not looked up yet (a place has one entry per location key)


_new_tuple = tuple.__new__
_ID = operator.attrgetter("id")
_FIRST = operator.itemgetter(0)

CLASS_OF_RANK = {
    LOAN: FundingClass.BORROWED,
    SPONSOR: FundingClass.BORROWED,
    int(Tier.OWNER): FundingClass.OWNED,
    int(Tier.CHILD): FundingClass.SHARED,
    int(Tier.SIBLING): FundingClass.SHARED,
    int(Tier.COUSIN): FundingClass.SHARED,
}


_Row = tuple[tuple[object, ...], Lease, str, int, "int | None", Sequence["Offer | None"]]
"""A claim as ``_claims`` lists it: tail, lease, run, width, borrow limit, offers."""


@dataclass(slots=True)
class _ClaimTable:
    """The claims of one matching as columns, indexed by *position*: the claim's place among
    all ``n`` claims sorted by tail (admission, run, group, first slot, lease id).

    Why columns and positions: a claim's rank on an envelope is ``(class, *tail)`` and tails
    are unique, so ``class * n + position`` orders exactly as that tuple does, and the rank
    alone then names the claim too (``position = rank % n``).  About a million proposals at
    100k open leases (issue 11) so build, sort, compare and bisect one small integer each -
    C-level, without key functions - instead of a tuple with an object per claim.  Only what
    leaves the matching (accepted rows, the trace) is turned back into tuples.
    """

    n: int
    tails: Sequence[tuple[object, ...]]
    leases: Sequence[Lease]
    run_keys: Sequence[str]
    widths: Sequence[int]
    borrow_caps: Sequence[int | None]
    offers: Sequence[Sequence[Offer | None]]
    # Per claim: the index of its next offer, and the envelope of its latest proposal (where
    # it is held, while it is held).  Only claims that proposed are ever read.
    next_offer: list[int]
    env_of: list[EnvelopeInfo]

    @classmethod
    def of(cls, rows: list[_Row]) -> _ClaimTable:
        """The table of ``rows`` (sorted here, by tail)."""
        n = len(rows)
        if not n:
            return cls(0, [], [], [], [], [], [], [], [])
        rows.sort(key=_FIRST)  # tails are unique: a total order, no tie left to chance
        tails, leases, run_keys, widths, caps, offers = zip(*rows, strict=True)
        return cls(
            n,
            tails,
            leases,
            run_keys,
            widths,
            caps,
            offers,
            [0] * n,
            cast("list[EnvelopeInfo]", [None] * n),
        )

    def rank_tuple(self, rank: int) -> tuple[object, ...]:
        """An integer rank as the tuple it stands for: ``(class, *tail)``."""
        rank_class, position = divmod(rank, self.n)
        return (rank_class, *self.tails[position])


@paused_gc()  # a million acyclic temporaries at 100k leases (core.gcpause)
def fill(  # noqa: PLR0917 - the matching's inputs are its whole signature, in one fixed order
    index: EnvelopeIndex,
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
    hours: HoursView | None = None,
) -> FillResult:
    """Run the matching over the leases live at ``t`` and classify each one."""
    hours = hours or HoursView()
    proposer = Proposer.at(index, t)
    table, live_ids = _claims(proposer, leases, runs, admitted, node_labels, t)
    payer: dict[str, EnvelopeKey | None] = dict.fromkeys(live_ids)
    cls = dict.fromkeys(live_ids, FundingClass.UNFUNDED)
    trace = FillTrace()
    log = RejectionLog(table.n, table.leases, live_ids)
    held = _match(index, table, hours, trace, log)
    n, tails, widths, env_of, claim_leases = (
        table.n,
        table.tails,
        table.widths,
        table.env_of,
        table.leases,
    )
    accepted_view: dict[EnvelopeKey, list[Accepted]] = {}
    for entries in held.values():
        for rank in entries:
            rank_class, position = divmod(rank, n)
            key = env_of[position].key
            rows = accepted_view.get(key)
            if rows is None:
                rows = accepted_view[key] = []
            # ``Accepted(...)`` through ``tuple.__new__``: the named tuple's own constructor
            # is a Python function, about half a microsecond per funded lease (issue 11).
            rows.append(
                _new_tuple(Accepted, ((rank_class, *tails[position]), widths[position], rank_class))
            )
            lease_id = claim_leases[position].id
            payer[lease_id] = key
            cls[lease_id] = CLASS_OF_RANK[rank_class]
    accepted = {key: RankedRows.adopt(rows) for key, rows in accepted_view.items()}
    out = FillResult(payer, cls, {}, accepted, trace)
    out._rejection_log = log
    out._proposer = proposer
    return out


def _claims(  # noqa: PLR0917 - fill's inputs
    proposer: Proposer,
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
) -> tuple[_ClaimTable, list[str]]:
    """One claim per lease live at ``t`` with the envelopes it proposes to, and the live lease
    ids in id order (every one starts unfunded, with no rejection).

    The walk is by lease id, so a run's leases come one after another (ids are ``run#n``):
    what depends on the run only - its owner, admission, funding, proposal lists per node - is
    looked up when the run changes, not per lease (issue 11: 100k open leases, ~20k runs).
    """
    owner_of = proposer.index.family.owner_of
    rows: list[_Row] = []
    live_ids: list[str] = []
    run_lists: RunLists | None = None
    places: dict[str, Place | None] = {}
    run_name: str | None = None
    run_key = ""
    since: Instant | None = None
    borrow_cap: int | None = None
    by_place: dict[Place | None, Proposals] = {}
    for lease in sorted(leases, key=_ID):
        if not lease.live_at(t):
            continue
        lease_id = lease.id
        live_ids.append(lease_id)
        if lease.run != run_name:
            run_name = lease.run
            run = runs.get(run_name)
            run_lists = None
            if run is not None:
                run_key = run.key
                owner = owner_of(run.metadata.namespace)
                since = admitted.get(run_key)
                funding = run.spec.funding
                borrow_cap = funding.max_borrow_gpus if funding is not None else None
                run_lists = proposer.lists_for(run, owner)
                by_place = run_lists.by_place
        if run_lists is None:  # no such run
            continue
        node = lease.node
        place = places.get(node, _UNSEEN)
        if place is _UNSEEN:
            labels = node_labels.get(node)
            place = places[node] = place_of(labels) if labels is not None else None
        proposals = by_place.get(place)  # ``RunLists.at_place``, inlined: once per lease
        if proposals is None:
            proposals = run_lists.at_place(place, proposer)
        slots = lease.slots
        rows.append(
            (
                (
                    lease.start if since is None else since,
                    run_key,
                    lease.group,
                    _first_slot(slots),
                    lease_id,
                ),
                lease,
                run_key,
                len(slots),
                borrow_cap,
                proposals.offers,
            )
        )
    return _ClaimTable.of(rows), live_ids


def _new_claim(
    lease: Lease,
    run: Run,
    run_key: str,
    admitted: Instant,
    proposals: Sequence[EnvelopeKey],
) -> _Claim:
    """The claim of one lease (``_claims`` lists the same, with what it looked up per run)."""
    funding = run.spec.funding
    slots = lease.slots
    return _Claim(
        lease,
        run_key,
        proposals,
        funding.max_borrow_gpus if funding is not None else None,
        len(slots),
        (admitted, run_key, lease.group, _first_slot(slots), lease.id),
    )


@dataclass(slots=True)
class _Counters:
    used: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    lent: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    cap_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _match(
    index: EnvelopeIndex,
    table: _ClaimTable,
    hours: HoursView,
    trace: FillTrace,
    log: RejectionLog,
) -> dict[int, list[int]]:
    """Deferred acceptance in rounds: every unmatched claim proposes to its next envelope, and
    each acceptor group, in id order, decides over what it holds plus its newcomers.

    An acceptor does not re-decide what it holds ranked above its most senior newcomer: a
    greedy scan in rank order meets exactly those claims first, with exactly the counters their
    own widths make (claims it turned away before are gone and added nothing), so it accepts
    them all again.  A loan under a run's borrow limit is re-decided from the most senior such
    claim held, because its check reads the run's loans held at other acceptors.  That is
    conservative: every loan accepted anywhere was checked against the run's whole borrowed
    width, so such a held loan passes again (a review found no case, and a mutant without the
    exception passed), but the exactness argument is simpler with it.
    ``tests/core/test_fill_equivalence.py`` checks the result against re-deciding everything
    (the matching as it was).

    Returns what each acceptor holds at the end, as integer ranks in rank order
    (``_ClaimTable``); the trace's junior ranks are tuples already.  Rejections go to ``log``
    as they happen (``RejectionLog``).  Claims waiting to propose are kept as the rank they
    were turned away at (``rank % n`` is the claim), so a batch turned away moves as is.
    """
    n = table.n
    sponsor_from = SPONSOR * n
    offers_of, next_offer, env_of, leases = (
        table.offers,
        table.next_offer,
        table.env_of,
        table.leases,
    )
    held: dict[int, list[int]] = {}
    counters: dict[int, _Counters] = {}
    junior: dict[int, int] = {}
    # Rank of the most senior held loan that is under a borrow limit, per acceptor.
    capped_from: dict[int, int] = {}
    # Borrowed width each run holds right now, kept current as acceptors decide one after
    # another, so a run's maxBorrowGPUs is enforced at acceptance: an envelope never takes a
    # loan it would have to give back (and so never turns anyone away for it).
    borrowed_by_run: dict[str, int] = defaultdict(int)
    decide = _Decider(index, table, hours, borrowed_by_run, log)
    # The envelopes of each acceptor group whose newcomers may be turned away at once
    # (``_turned_away_at_once``): one envelope without caps, or envelopes all under caps.
    # None for the others, and for all if some lease holds no slot (the ledger refuses those).
    at_once = [
        envs if (len(envs) == 1 and not envs[0].caps) or all(e.caps for e in envs) else None
        for envs in ([index.envelopes[k] for k in members] for members in index.acceptors)
    ]
    if n and min(table.widths) < 1:
        at_once = [None] * len(at_once)
    # Acceptors of one envelope without caps: once it is exactly full, the rest of a scan is
    # turned away for its concurrency, all alike (``_Decider.__call__``).
    solo = [m is not None and len(m) == 1 and not m[0].caps for m in at_once]
    borrow_caps = table.borrow_caps
    any_borrow_cap = any(cap is not None for cap in borrow_caps)
    pending = list(range(n))  # rank class 0 at first: the rank is the position
    while pending:
        incoming: defaultdict[int, list[int]] = defaultdict(list)
        for was in pending:
            position = was % n
            i = next_offer[position]
            offer = offers_of[position][i]
            if offer is None:  # the end of its list: unfunded
                continue
            next_offer[position] = i + 1
            acceptor, env, rank_class = offer
            if rank_class == _NO_TIER:
                minted = leases[position].minted_payer
                rank_class = LOAN if minted is not None and minted.key == env.key else SPONSOR
            env_of[position] = env
            incoming[acceptor].append(rank_class * n + position)
        pending = []
        for acceptor in sorted(incoming):
            inc = incoming[acceptor]
            entries = held.get(acceptor, [])
            st = counters.get(acceptor)
            if st is None:
                st = counters[acceptor] = _Counters()
            keep = len(entries)
            if entries and (members := at_once[acceptor]) is not None:
                last = _turned_away_at_once(inc, entries, st, members, decide, pending)
                if last is not None:
                    junior[acceptor] = max(junior[acceptor], last)
                    decide.turned_away(acceptor, trace)
                    continue
            inc.sort()
            if entries and inc[0] < entries[-1]:
                bound = inc[0]
                capped = capped_from.get(acceptor)
                if capped is not None and capped < bound:
                    bound = capped
                keep = bisect.bisect_left(entries, bound)
                _release(entries[keep:], st, borrowed_by_run, table)
                candidates = entries[keep:] + inc
                candidates.sort()  # two sorted runs: a merge
            else:
                candidates = inc
            last = junior.get(acceptor)
            if last is None or candidates[-1] > last:
                junior[acceptor] = candidates[-1]
            accepted = decide(acceptor, candidates, st, pending, trace, solo=solo[acceptor])
            if any_borrow_cap and (keep < len(entries) or acceptor not in capped_from):
                first = next(
                    (
                        rank
                        for rank in accepted
                        if (rank < n or rank >= sponsor_from) and borrow_caps[rank % n] is not None
                    ),
                    None,
                )
                if first is None:
                    capped_from.pop(acceptor, None)
                else:
                    capped_from[acceptor] = first
            held[acceptor] = entries[:keep] + accepted
    trace.junior = {acceptor: table.rank_tuple(rank) for acceptor, rank in junior.items()}
    return held


def _turned_away_at_once(  # noqa: PLR0917 - one acceptor's round, and where rejected claims go
    inc: list[int],
    entries: list[int],
    st: _Counters,
    members: list[EnvelopeInfo],
    decide: _Decider,
    pending: list[int],
) -> int | None:
    """Turn every newcomer away without the greedy scan when that scan provably would, and
    return the most junior newcomer's rank; ``None`` (nothing done) otherwise.

    Both cases need every newcomer to rank below everything the acceptor holds: the scan would
    keep all it holds, with the counters they make, and then meet the newcomers with counters
    that never change (every lease holds a slot, ``_match`` checks).  Then:

    * one envelope without caps, with less room than any newcomer needs: each fails its first
      check, concurrency, with the same numbers - one rejection for all, no sort, no scan.  Most
      proposals at fleet scale end this way (issue 11);
    * envelopes whose first aggregate cap is exactly full, and no newcomer borrows (a borrower
      would meet the lending checks in between): each fails at its envelope's concurrency or
      else at that cap.
    """
    most_senior, last = min(inc), max(inc)
    if most_senior < entries[-1]:
        return None
    table = decide.table
    n, widths, log = table.n, table.widths, decide.log
    used = st.used
    if len(members) == 1 and not members[0].caps:
        env = members[0]
        here = used[env.key]
        room = env.concurrency - here
        if room > 0 and any(widths[rank % n] <= room for rank in inc):
            return None
        log.ranks.append(inc)
        log.reasons.append(decide.full_rejection(env, here))
        pending += inc
        return last
    if most_senior < n or last >= SPONSOR * n:
        return None
    cap_used = st.cap_used
    caps = decide.index.caps
    for env in members:
        first = caps[env.caps[0]]
        if first.max_concurrency is None or cap_used[first.id] != first.max_concurrency:
            return None
    # Per envelope, with counters that do not move: the room left, and the two rejections.
    verdicts = {
        env.key: (
            env.concurrency - used[env.key],
            decide.full_rejection(env, used[env.key]),
            decide.first_cap_full(env),
        )
        for env in members
    }
    env_of = table.env_of
    log.ranks += inc
    reasons = log.reasons
    for rank in inc:
        position = rank % n
        room, full, cap_full = verdicts[env_of[position].key]
        reasons.append(full if widths[position] > room else cap_full)
    pending += inc
    return last


def _release(
    entries: Sequence[int],
    st: _Counters,
    borrowed_by_run: dict[str, int],
    table: _ClaimTable,
) -> None:
    """Take held claims back out of their acceptor's counters (they are decided again)."""
    used, lent, cap_used = st.used, st.lent, st.cap_used
    n, widths, env_of, run_keys = table.n, table.widths, table.env_of, table.run_keys
    sponsor_from = SPONSOR * n
    for rank in entries:
        position = rank % n
        w = widths[position]
        env = env_of[position]
        key = env.key
        used[key] -= w
        if rank < n or rank >= sponsor_from:
            lent[key] -= w
            borrowed_by_run[run_keys[position]] -= w
        for cap_id in env.caps:
            cap_used[cap_id] -= w


_FULL = "concurrency {} full ({} funded ahead)"
_LENT = "lending cap {} reached ({} lent)"
_BORROW_LIMIT = "run borrow limit {} reached"
_CAP_FULL = "aggregate cap {} {} full"
_CAP_HOURS = "aggregate cap {} GPU-hours exhausted"
_HOURS = "GPU-hours exhausted ({:.2f} left)"


_Limits = tuple[
    list[tuple[str, int | None, float | None, Rejection, Rejection]],
    tuple[float, Rejection] | None,
]
"""An envelope's limits past its own concurrency, looked up once per matching: per aggregate cap
(id, concurrency, GPU-hours left, and its two rejections), then the envelope's own GPU-hours
left and their rejection."""


class _Decider:
    """One acceptor group's greedy fill in rank order, with skip semantics, on top of the
    counters it holds.

    Turned-away claims get their ``Rejection`` and go back to ``pending``.  Equal rejections
    are one shared object (a rejection is an immutable value): at 100k open leases about
    900,000 proposals are turned away, most by an envelope that is exactly full, and one
    object each made up a fifth of the evaluation's allocations.
    """

    def __init__(
        self,
        index: EnvelopeIndex,
        table: _ClaimTable,
        hours: HoursView,
        borrowed_by_run: dict[str, int],
        log: RejectionLog,
    ) -> None:
        self.index = index
        self.table = table
        self.log = log
        self._hours = hours
        self._borrowed_by_run = borrowed_by_run
        self._full: dict[EnvelopeKey, Rejection] = {}
        self._fixed: dict[tuple[EnvelopeKey, str, object], Rejection] = {}
        self._limits: dict[EnvelopeKey, _Limits] = {}

    def full_rejection(self, env: EnvelopeInfo, used: int) -> Rejection:
        """The rejection for ``env`` full with ``used`` funded ahead (kept for the next)."""
        hit = self._full.get(env.key)
        if hit is None or hit.args[1] != used:
            hit = self._full[env.key] = Rejection(env.key, _FULL, (env.concurrency, used))
        return hit

    def first_cap_full(self, env: EnvelopeInfo) -> Rejection:
        """The rejection for ``env``'s first aggregate cap being full."""
        return self._limits_for(env)[0][0][3]

    @staticmethod
    def turned_away(acceptor: int, trace: FillTrace) -> None:
        if not trace.rejected_any or acceptor not in trace.rejected_at:
            trace.rejected_any = True
            trace.rejected_at = trace.rejected_at | {acceptor}

    def _same(self, key: EnvelopeKey, template: str, *args: object) -> Rejection:
        """The one rejection for (envelope, reason, what it names)."""
        k = (key, template, args)
        hit = self._fixed.get(k)
        if hit is None:
            hit = self._fixed[k] = Rejection(key, template, args)
        return hit

    def _limited(
        self, lease_id: str, env: EnvelopeInfo, u: int, w: int, cap_used: dict[str, int]
    ) -> Rejection | None:
        """The aggregate caps' and GPU-hours' checks for lease ``lease_id`` on ``env`` (``u``
        funded there), in their order; ``None`` if it passes."""
        caps, env_hours = self._limits_for(env)
        already: bool | None = None
        period = self._hours.period_hours
        for cap_id, most, hours, full, spent in caps:
            above = cap_used[cap_id]
            if most is not None and above + w > most:
                return full
            if hours is not None:
                if already is None:
                    already = (lease_id, env.key) in self._hours.previously_funded
                if not _hours_ok(hours, period, above, w, already):
                    return spent
        if env_hours is not None:
            remaining, spent = env_hours
            if already is None:
                already = (lease_id, env.key) in self._hours.previously_funded
            if not _hours_ok(remaining, period, u, w, already):
                return spent
        return None

    def _limits_for(self, env: EnvelopeInfo) -> _Limits:
        limits = self._limits.get(env.key)
        if limits is None:
            limits = self._limits[env.key] = self._limits_of(env)
        return limits

    def _limits_of(self, env: EnvelopeInfo) -> _Limits:
        hours = self._hours
        key = env.key
        caps = []
        for cap_id in env.caps:
            cap = self.index.caps[cap_id]
            remaining = (
                None if cap.gpu_hours is None else hours.remaining_cap.get(cap_id, cap.gpu_hours)
            )
            caps.append(
                (
                    cap_id,
                    cap.max_concurrency,
                    remaining,
                    Rejection(key, _CAP_FULL, (cap.name, cap.max_concurrency)),
                    Rejection(key, _CAP_HOURS, (cap.name,)),
                )
            )
        env_hours = None
        if env.gpu_hours is not None:
            remaining_here = hours.remaining_envelope.get(key, env.gpu_hours)
            env_hours = (remaining_here, Rejection(key, _HOURS, (remaining_here,)))
        return caps, env_hours

    def __call__(
        self,
        acceptor: int,
        ranked: list[int],
        st: _Counters,
        pending: list[int],
        trace: FillTrace,
        *,
        solo: bool,
    ) -> list[int]:
        """The claims of ``ranked`` (in rank order) the acceptor takes, in rank order.

        ``solo``: the acceptor is one envelope without caps and every claim holds a slot, so
        once it is exactly full every claim after is turned away for concurrency, with the
        same numbers, in one log entry (about a third of the candidates at fleet scale).
        """
        table = self.table
        n, widths, env_of, log = table.n, table.widths, table.env_of, self.log
        record, record_reason = log.ranks.append, log.reasons.append
        run_keys, borrow_caps, leases = table.run_keys, table.borrow_caps, table.leases
        sponsor_from = SPONSOR * n
        borrowed_by_run = self._borrowed_by_run
        full = self._full
        used, lent, cap_used = st.used, st.lent, st.cap_used
        accepted: list[int] = []
        turned_away = False
        for i, rank in enumerate(ranked):
            position = rank % n
            w = widths[position]
            env = env_of[position]
            key = env.key
            u = used[key]
            if u + w > env.concurrency:
                rejection = full.get(key)
                if rejection is None or rejection.args[1] != u:
                    rejection = self.full_rejection(env, u)
                record(rank)
                record_reason(rejection)
                pending.append(rank)
                turned_away = True
                continue
            rejection = None
            is_borrow = rank < n or rank >= sponsor_from
            if is_borrow and env.lending_max is not None and lent[key] + w > env.lending_max:
                rejection = Rejection(key, _LENT, (env.lending_max, lent[key]))
            elif (
                is_borrow
                and (borrow_cap := borrow_caps[position]) is not None
                and borrowed_by_run[run_keys[position]] + w > borrow_cap
            ):
                rejection = self._same(key, _BORROW_LIMIT, borrow_cap)
            elif env.caps or env.gpu_hours is not None:
                rejection = self._limited(leases[position].id, env, u, w, cap_used)
            if rejection is not None:
                record(rank)
                record_reason(rejection)
                pending.append(rank)
                turned_away = True
                continue
            used[key] = u = u + w
            if is_borrow:
                lent[key] += w
                borrowed_by_run[run_keys[position]] += w
            for cap_id in env.caps:
                cap_used[cap_id] += w
            accepted.append(rank)
            if solo and u == env.concurrency:
                rest = ranked[i + 1 :]
                if rest:
                    record(rest)
                    record_reason(self.full_rejection(env, u))
                    pending += rest
                    turned_away = True
                break
        if turned_away:
            self.turned_away(acceptor, trace)
        _raise_peaks(trace.used, used)
        _raise_peaks(trace.lent, lent)
        _raise_peaks(trace.cap, cap_used)
        return accepted


def _raise_peaks(peaks: dict[_K, int], counters: Mapping[_K, int]) -> None:
    for k, v in counters.items():
        if v > peaks.get(k, 0):
            peaks[k] = v


def _hours_ok(remaining: float, period: float, above: int, width: int, already: bool) -> bool:
    """DESIGN decision 1's hysteresis rule."""
    if already:
        return remaining > period * above + HOURS_EPSILON
    return remaining + HOURS_EPSILON >= period * (above + width) and remaining > HOURS_EPSILON


def senior_width(rows: Sequence[Accepted], rank: tuple[object, ...]) -> int:
    """Funded width on an envelope ranked at or above ``rank`` (equal keys count as senior)."""
    keys = [r.rank for r in rows]
    pos = bisect.bisect_right(keys, rank)
    return sum(r.width for r in rows[:pos])
