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
from typing import TypeVar

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, location_of
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import (
    Accepted,
    FillResult,
    FillTrace,
    Rejection,
)
from gpu_fleet.core.funding.proposals import Proposer
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
    lease: Lease
    run_key: str
    owner: str
    admitted: Instant
    proposals: list[EnvelopeKey]
    next_index: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    borrow_cap: int | None = None
    width: int = 0
    # (admission, run, group, first slot, lease id): the rank on every envelope after its class
    tail: tuple[object, ...] = ()

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


_RANK = operator.itemgetter(0)
_ID = operator.attrgetter("id")

_Entry = tuple[tuple[object, ...], _Claim, EnvelopeInfo]
"""A claim before an envelope: its rank there, the claim, the envelope."""

CLASS_OF_RANK = {
    LOAN: FundingClass.BORROWED,
    SPONSOR: FundingClass.BORROWED,
    int(Tier.OWNER): FundingClass.OWNED,
    int(Tier.CHILD): FundingClass.SHARED,
    int(Tier.SIBLING): FundingClass.SHARED,
    int(Tier.COUSIN): FundingClass.SHARED,
}


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
    proposer = Proposer(index, t)
    claims, payer, cls, rejections = _claims(proposer, leases, runs, admitted, node_labels, t)
    trace = FillTrace()
    held = _match(index, claims, hours, trace)
    accepted_view: dict[EnvelopeKey, list[Accepted]] = {}
    for entries in held.values():
        for rank, c, info in entries:
            key = info.key
            rows = accepted_view.get(key)
            if rows is None:
                rows = accepted_view[key] = []
            rank_class: int = rank[0]  # type: ignore[assignment]
            rows.append(Accepted(rank, c.width, rank_class))
            lease_id = c.lease.id
            payer[lease_id] = key
            cls[lease_id] = CLASS_OF_RANK[rank_class]
    for c in claims:
        rejections[c.lease.id] = c.rejections
    out = FillResult(payer, cls, rejections, accepted_view, trace)
    out._proposer = proposer
    return out


def _claims(  # noqa: PLR0917 - fill's inputs
    proposer: Proposer,
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
) -> tuple[
    list[_Claim],
    dict[str, EnvelopeKey | None],
    dict[str, FundingClass],
    dict[str, list[Rejection]],
]:
    """One claim per lease live at ``t``, in lease-id order, with the envelopes it proposes to;
    every lease starts unfunded.  Proposal lists are looked up once per (run, node)."""
    owner_of = proposer.index.family.owner_of
    claims: list[_Claim] = []
    payer: dict[str, EnvelopeKey | None] = {}
    cls: dict[str, FundingClass] = {}
    rejections: dict[str, list[Rejection]] = {}
    proposals_at: dict[tuple[str, str], list[EnvelopeKey]] = {}
    owners: dict[str, str] = {}
    locations: dict[str, Mapping[str, str] | None] = {}
    unfunded = FundingClass.UNFUNDED
    for lease in sorted(leases, key=_ID):
        if not _live(lease, t):
            continue
        lease_id = lease.id
        run = runs.get(lease.run)
        payer[lease_id] = None
        cls[lease_id] = unfunded
        if run is None:
            rejections[lease_id] = []
            continue
        run_key = run.key
        owner = owners.get(run_key)
        if owner is None:
            owner = owners[run_key] = owner_of(run.metadata.namespace)
        where = (run_key, lease.node)
        proposals = proposals_at.get(where)
        if proposals is None:
            node = lease.node
            if node in locations:
                location = locations[node]
            else:
                labels = node_labels.get(node)
                location = locations[node] = location_of(labels) if labels is not None else None
            proposals = proposals_at[where] = proposer.envelopes_for(run, owner, location)
        claims.append(
            _new_claim(lease, run, run_key, owner, admitted.get(run_key, lease.start), proposals)
        )
    return claims, payer, cls, rejections


def _new_claim(  # noqa: PLR0917 - what a claim is made of
    lease: Lease,
    run: Run,
    run_key: str,
    owner: str,
    admitted: Instant,
    proposals: list[EnvelopeKey],
) -> _Claim:
    funding = run.spec.funding
    slots = lease.slots
    first = _slot_key(slots[0]) if len(slots) == 1 else _first_slot(slots)
    return _Claim(
        lease=lease,
        run_key=run_key,
        owner=owner,
        admitted=admitted,
        proposals=proposals,
        borrow_cap=funding.max_borrow_gpus if funding is not None else None,
        width=len(slots),
        tail=(admitted, run_key, lease.group, first, lease.id),
    )


def _live(lease: Lease, t: float) -> bool:
    if t < lease.start:
        return False
    end = lease.effective_end()
    return end is None or t < end


@dataclass(slots=True)
class _Counters:
    used: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    lent: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    cap_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _match(
    index: EnvelopeIndex, claims: list[_Claim], hours: HoursView, trace: FillTrace
) -> dict[int, list[_Entry]]:
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

    Returns what each acceptor holds at the end, in rank order.
    """
    held: dict[int, list[_Entry]] = {}
    counters: dict[int, _Counters] = {}
    # Rank of the most senior held loan that is under a borrow limit, per acceptor.
    capped_from: dict[int, tuple[object, ...]] = {}
    # Borrowed width each run holds right now, kept current as acceptors decide one after
    # another, so a run's maxBorrowGPUs is enforced at acceptance: an envelope never takes a
    # loan it would have to give back (and so never turns anyone away for it).
    borrowed_by_run: dict[str, int] = defaultdict(int)
    envelopes, acceptor_of = index.envelopes, index.acceptor_of
    rank_class = _RankClasses(index)
    pending = [c for c in claims if c.proposals]
    while pending:
        incoming: dict[int, list[_Entry]] = {}
        for c in pending:
            i = c.next_index
            if i >= len(c.proposals):
                continue
            key = c.proposals[i]
            c.next_index = i + 1
            acceptor = acceptor_of[key]
            env = envelopes[key]
            entry = ((rank_class.of(c, env), *c.tail), c, env)
            bucket = incoming.get(acceptor)
            if bucket is None:
                incoming[acceptor] = [entry]
            else:
                bucket.append(entry)
        pending = []
        for acceptor in sorted(incoming):
            inc = incoming[acceptor]
            inc.sort(key=_RANK)
            entries = held.get(acceptor, [])
            st = counters.get(acceptor)
            if st is None:
                st = counters[acceptor] = _Counters()
            keep = len(entries)
            if entries and inc[0][0] < entries[-1][0]:
                bound = inc[0][0]
                capped = capped_from.get(acceptor)
                if capped is not None and capped < bound:
                    bound = capped
                keep = bisect.bisect_left(entries, bound, key=_RANK)
                _release(entries[keep:], st, borrowed_by_run)
                candidates = entries[keep:] + inc
                candidates.sort(key=_RANK)  # two sorted runs: a merge
            else:
                candidates = inc
            accepted, rejected = _decide(index, candidates, hours, st, borrowed_by_run, trace)
            if keep < len(entries) or acceptor not in capped_from:
                first = next((e[0] for e in accepted if _capped_loan(e)), None)
                if first is None:
                    capped_from.pop(acceptor, None)
                else:
                    capped_from[acceptor] = first
            held[acceptor] = entries[:keep] + accepted
            for c, rejection in rejected:
                c.rejections.append(rejection)
                pending.append(c)
    return held


class _RankClasses:
    """The first element of a claim's rank on an envelope (``_Claim.rank_at``), with the family
    tier looked up once per (envelope owner, claim owner) pair instead of once per proposal."""

    def __init__(self, index: EnvelopeIndex) -> None:
        self._tier = index.family.tier
        self._tiers: dict[tuple[str, str], int] = {}

    def of(self, c: _Claim, env: EnvelopeInfo) -> int:
        pair = (env.owner, c.owner)
        tier = self._tiers.get(pair)
        if tier is None:
            tier = self._tiers[pair] = int(self._tier(*pair))
        return _rank_class(tier, c.lease, env)


def _capped_loan(entry: _Entry) -> bool:
    rank, c, _ = entry
    return rank[0] in (LOAN, SPONSOR) and c.borrow_cap is not None


def _release(entries: Sequence[_Entry], st: _Counters, borrowed_by_run: dict[str, int]) -> None:
    """Take held claims back out of their acceptor's counters (they are decided again)."""
    used, lent, cap_used = st.used, st.lent, st.cap_used
    for rank, c, env in entries:
        w = c.width
        key = env.key
        used[key] -= w
        if rank[0] in (LOAN, SPONSOR):
            lent[key] -= w
            borrowed_by_run[c.run_key] -= w
        for cap_id in env.caps:
            cap_used[cap_id] -= w


def _decide(  # noqa: PLR0917 - one acceptor's decision and the state it shares with the run
    index: EnvelopeIndex,
    ranked: list[_Entry],
    hours: HoursView,
    st: _Counters,
    borrowed_by_run: dict[str, int],
    trace: FillTrace,
) -> tuple[list[_Entry], list[tuple[_Claim, Rejection]]]:
    """Greedy fill of one acceptor group in rank order (``ranked`` is sorted), with skip
    semantics, on top of the counters ``st`` holds.  ``trace`` records the most junior
    candidate and the highest counters (see ``FillTrace``)."""
    if not ranked:
        return [], []
    acceptor = index.acceptor_of[ranked[0][2].key]
    last = trace.junior.get(acceptor)
    if last is None or ranked[-1][0] > last:
        trace.junior[acceptor] = ranked[-1][0]
    used, lent, cap_used = st.used, st.lent, st.cap_used
    period = hours.period_hours
    funded_before = hours.previously_funded
    caps = index.caps
    accepted: list[_Entry] = []
    rejected: list[tuple[_Claim, Rejection]] = []
    for entry in ranked:
        rank, c, env = entry
        w = c.width
        key = env.key
        why = ""
        args: tuple[object, ...] = ()
        is_sponsor = rank[0] in (LOAN, SPONSOR)
        if used[key] + w > env.concurrency:
            why, args = "concurrency {} full ({} funded ahead)", (env.concurrency, used[key])
        elif is_sponsor and env.lending_max is not None and lent[key] + w > env.lending_max:
            why, args = "lending cap {} reached ({} lent)", (env.lending_max, lent[key])
        elif (
            is_sponsor
            and c.borrow_cap is not None
            and borrowed_by_run[c.run_key] + w > c.borrow_cap
        ):
            why, args = "run borrow limit {} reached", (c.borrow_cap,)
        elif env.caps or env.gpu_hours is not None:
            already = (c.lease.id, key) in funded_before
            for cap_id in env.caps:
                cap = caps[cap_id]
                if cap.max_concurrency is not None and cap_used[cap_id] + w > cap.max_concurrency:
                    why, args = "aggregate cap {} {} full", (cap.name, cap.max_concurrency)
                    break
                if cap.gpu_hours is not None and not _hours_ok(
                    hours.remaining_cap.get(cap_id, cap.gpu_hours),
                    period,
                    cap_used[cap_id],
                    w,
                    already,
                ):
                    why, args = "aggregate cap {} GPU-hours exhausted", (cap.name,)
                    break
            if not why and env.gpu_hours is not None:
                remaining = hours.remaining_envelope.get(key, env.gpu_hours)
                if not _hours_ok(remaining, period, used[key], w, already):
                    why, args = "GPU-hours exhausted ({:.2f} left)", (remaining,)
        if why:
            rejected.append((c, Rejection(key, why, args)))
            if not trace.rejected_any or acceptor not in trace.rejected_at:
                trace.rejected_any = True
                trace.rejected_at = trace.rejected_at | {acceptor}
            continue
        used[key] += w
        if is_sponsor:
            lent[key] += w
            borrowed_by_run[c.run_key] += w
        for cap_id in env.caps:
            cap_used[cap_id] += w
        accepted.append(entry)
    _raise_peaks(trace.used, used)
    _raise_peaks(trace.lent, lent)
    _raise_peaks(trace.cap, cap_used)
    return accepted, rejected


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
