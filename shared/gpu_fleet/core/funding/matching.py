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
    lease: Lease
    run_key: str
    owner: str
    proposals: Sequence[EnvelopeKey]
    borrow_cap: int | None
    width: int
    # (admission, run, group, first slot, lease id): the rank on every envelope after its class
    tail: tuple[object, ...]
    next_index: int = 0
    rejections: list[Rejection] = field(default_factory=list)
    # The proposals as the matching reads them (``Proposals.offers``).
    offers: Sequence[Offer | None] = ()
    # Set by ``_match``: the claim's place in tail order.
    position: int = 0

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
_new_tuple = tuple.__new__
_ID = operator.attrgetter("id")

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
    proposer = Proposer.at(index, t)
    claims, payer, cls, rejections = _claims(proposer, leases, runs, admitted, node_labels, t)
    trace = FillTrace()
    held, n = _match(index, claims, hours, trace)
    accepted_view: dict[EnvelopeKey, list[Accepted]] = {}
    for entries in held.values():
        for rank, c, info in entries:
            key = info.key
            rows = accepted_view.get(key)
            if rows is None:
                rows = accepted_view[key] = []
            rank_class = rank // n
            # ``Accepted(...)`` through ``tuple.__new__``: the named tuple's own constructor
            # is a Python function, about half a microsecond per funded lease (issue 11).
            rows.append(_new_tuple(Accepted, ((rank_class, *c.tail), c.width, rank_class)))
            lease_id = c.lease.id
            payer[lease_id] = key
            cls[lease_id] = CLASS_OF_RANK[rank_class]
    for c in claims:
        rejections[c.lease.id] = c.rejections
    accepted = {key: RankedRows.adopt(rows) for key, rows in accepted_view.items()}
    out = FillResult(payer, cls, rejections, accepted, trace)
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
    every lease starts unfunded.

    The walk is by lease id, so a run's leases come one after another (ids are ``run#n``):
    what depends on the run only - its owner, admission, funding, proposal lists per node - is
    looked up when the run changes, not per lease (issue 11: 100k open leases, ~20k runs).
    """
    owner_of = proposer.index.family.owner_of
    claims: list[_Claim] = []
    payer: dict[str, EnvelopeKey | None] = {}
    cls: dict[str, FundingClass] = {}
    rejections: dict[str, list[Rejection]] = {}
    proposals_of_run: dict[str, dict[str, Proposals]] = {}
    run_lists: RunLists | None = None
    locations: dict[str, Mapping[str, str] | None] = {}
    unfunded = FundingClass.UNFUNDED
    run_name: str | None = None
    run_key, owner = "", ""
    since: Instant | None = None
    borrow_cap: int | None = None
    at_node: dict[str, Proposals] = {}
    for lease in sorted(leases, key=_ID):
        if not _live(lease, t):
            continue
        lease_id = lease.id
        payer[lease_id] = None
        cls[lease_id] = unfunded
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
                at_node = proposals_of_run.setdefault(run_key, {})
                run_lists = proposer.lists_for(run, owner)
        if run_lists is None:  # no such run
            rejections[lease_id] = []
            continue
        node = lease.node
        proposals = at_node.get(node)
        if proposals is None:
            if node in locations:
                location = locations[node]
            else:
                labels = node_labels.get(node)
                location = locations[node] = location_of(labels) if labels is not None else None
            proposals = at_node[node] = run_lists.at(location, proposer)
        slots = lease.slots
        claims.append(
            _Claim(
                lease,
                run_key,
                owner,
                proposals.keys,
                borrow_cap,
                len(slots),
                (
                    lease.start if since is None else since,
                    run_key,
                    lease.group,
                    _first_slot(slots),
                    lease_id,
                ),
                offers=proposals.offers,
            )
        )
    return claims, payer, cls, rejections


def _new_claim(  # noqa: PLR0917 - what a claim is made of
    lease: Lease,
    run: Run,
    run_key: str,
    owner: str,
    admitted: Instant,
    proposals: Sequence[EnvelopeKey],
) -> _Claim:
    """The claim of one lease (``_claims`` builds the same, with what it looked up per run)."""
    funding = run.spec.funding
    slots = lease.slots
    return _Claim(
        lease,
        run_key,
        owner,
        proposals,
        funding.max_borrow_gpus if funding is not None else None,
        len(slots),
        (admitted, run_key, lease.group, _first_slot(slots), lease.id),
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


_TAIL = operator.attrgetter("tail")

_Entry = tuple[int, _Claim, EnvelopeInfo]
"""A claim before an envelope: its rank there (``_Ranks``), the claim, the envelope."""


@dataclass(frozen=True, slots=True)
class _Ranks:
    """Ranks as integers: ``class * n + position``, where position is the claim's place among
    all ``n`` claims sorted by ``_Claim.tail``.

    Why: a claim's rank on an envelope is ``(class, *tail)`` and tails are unique (they end in
    the lease id), so this integer orders exactly as that tuple does - and about a million
    proposals at 100k open leases (issue 11) then build, sort and compare one small integer
    each instead of a six-element tuple.  Only what leaves the matching (accepted rows, the
    trace) is turned back into tuples.
    """

    n: int
    by_position: list[_Claim]

    def as_tuple(self, rank: int) -> tuple[object, ...]:
        rank_class, position = divmod(rank, self.n)
        return (rank_class, *self.by_position[position].tail)


def _match(
    index: EnvelopeIndex, claims: list[_Claim], hours: HoursView, trace: FillTrace
) -> tuple[dict[int, list[_Entry]], int]:
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

    Returns what each acceptor holds at the end, in rank order, with integer ranks
    (``_Ranks``), and ``n`` to read them; the trace's junior ranks are tuples already.
    """
    by_position = sorted(claims, key=_TAIL)
    n = len(by_position)
    for position, c in enumerate(by_position):
        c.position = position
    ranks = _Ranks(n, by_position)
    sponsor_from = SPONSOR * n
    held: dict[int, list[_Entry]] = {}
    counters: dict[int, _Counters] = {}
    junior: dict[int, int] = {}
    # Rank of the most senior held loan that is under a borrow limit, per acceptor.
    capped_from: dict[int, int] = {}
    # Borrowed width each run holds right now, kept current as acceptors decide one after
    # another, so a run's maxBorrowGPUs is enforced at acceptance: an envelope never takes a
    # loan it would have to give back (and so never turns anyone away for it).
    borrowed_by_run: dict[str, int] = defaultdict(int)
    decide = _Decider(index, ranks, hours, borrowed_by_run)
    # The envelopes of each acceptor group whose newcomers may be turned away at once
    # (``_turned_away_at_once``): one envelope without caps, or envelopes all under caps.
    # None for the others, and for all if some lease holds no slot (the ledger refuses those).
    at_once = [
        envs if (len(envs) == 1 and not envs[0].caps) or all(e.caps for e in envs) else None
        for envs in ([index.envelopes[k] for k in members] for members in index.acceptors)
    ]
    if any(c.width < 1 for c in claims):
        at_once = [None] * len(at_once)
    borrow_caps = any(c.borrow_cap is not None for c in claims)
    pending = [c for c in claims if c.proposals]
    while pending:
        incoming: defaultdict[int, list[_Entry]] = defaultdict(list)
        for c in pending:
            i = c.next_index
            offer = c.offers[i]
            if offer is None:  # the end of its list: unfunded
                continue
            c.next_index = i + 1
            acceptor, env, rank_class = offer
            if rank_class == _NO_TIER:
                minted = c.lease.minted_payer
                rank_class = LOAN if minted is not None and minted.key == env.key else SPONSOR
            incoming[acceptor].append((rank_class * n + c.position, c, env))
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
            inc.sort(key=_RANK)
            if entries and inc[0][0] < entries[-1][0]:
                bound = inc[0][0]
                capped = capped_from.get(acceptor)
                if capped is not None and capped < bound:
                    bound = capped
                keep = bisect.bisect_left(entries, bound, key=_RANK)
                _release(entries[keep:], st, borrowed_by_run, n, sponsor_from)
                candidates = entries[keep:] + inc
                candidates.sort(key=_RANK)  # two sorted runs: a merge
            else:
                candidates = inc
            last = junior.get(acceptor)
            if last is None or candidates[-1][0] > last:
                junior[acceptor] = candidates[-1][0]
            accepted = decide(acceptor, candidates, st, pending, trace)
            if borrow_caps and (keep < len(entries) or acceptor not in capped_from):
                first = next((e[0] for e in accepted if _capped_loan(e, n, sponsor_from)), None)
                if first is None:
                    capped_from.pop(acceptor, None)
                else:
                    capped_from[acceptor] = first
            held[acceptor] = entries[:keep] + accepted
    trace.junior = {acceptor: ranks.as_tuple(rank) for acceptor, rank in junior.items()}
    return held, n


def _turned_away_at_once(  # noqa: PLR0917 - one acceptor's round, and where rejected claims go
    inc: list[_Entry],
    entries: list[_Entry],
    st: _Counters,
    members: list[EnvelopeInfo],
    decide: _Decider,
    pending: list[_Claim],
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
    most_senior, last = min(inc, key=_RANK)[0], max(inc, key=_RANK)[0]
    if most_senior < entries[-1][0]:
        return None
    used = st.used
    if len(members) == 1 and not members[0].caps:
        env = members[0]
        here = used[env.key]
        room = env.concurrency - here
        if room > 0 and any(c.width <= room for _, c, _ in inc):
            return None
        rejection = decide.full_rejection(env, here)
        for _, c, _ in inc:
            c.rejections.append(rejection)
            pending.append(c)
        return last
    n = decide.n
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
    for _, c, env in inc:
        room, full, cap_full = verdicts[env.key]
        c.rejections.append(full if c.width > room else cap_full)
        pending.append(c)
    return last


def _capped_loan(entry: _Entry, n: int, sponsor_from: int) -> bool:
    rank, c, _ = entry
    return (rank < n or rank >= sponsor_from) and c.borrow_cap is not None


def _release(
    entries: Sequence[_Entry],
    st: _Counters,
    borrowed_by_run: dict[str, int],
    n: int,
    sponsor_from: int,
) -> None:
    """Take held claims back out of their acceptor's counters (they are decided again)."""
    used, lent, cap_used = st.used, st.lent, st.cap_used
    for rank, c, env in entries:
        w = c.width
        key = env.key
        used[key] -= w
        if rank < n or rank >= sponsor_from:
            lent[key] -= w
            borrowed_by_run[c.run_key] -= w
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
        ranks: _Ranks,
        hours: HoursView,
        borrowed_by_run: dict[str, int],
    ) -> None:
        self.index = index
        self.n = ranks.n
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
        self, c: _Claim, env: EnvelopeInfo, u: int, w: int, cap_used: dict[str, int]
    ) -> Rejection | None:
        """The aggregate caps' and GPU-hours' checks for ``c`` on ``env`` (``u`` funded
        there), in their order; ``None`` if it passes."""
        caps, env_hours = self._limits_for(env)
        already: bool | None = None
        period = self._hours.period_hours
        for cap_id, most, hours, full, spent in caps:
            above = cap_used[cap_id]
            if most is not None and above + w > most:
                return full
            if hours is not None:
                if already is None:
                    already = (c.lease.id, env.key) in self._hours.previously_funded
                if not _hours_ok(hours, period, above, w, already):
                    return spent
        if env_hours is not None:
            remaining, spent = env_hours
            if already is None:
                already = (c.lease.id, env.key) in self._hours.previously_funded
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
        ranked: list[_Entry],
        st: _Counters,
        pending: list[_Claim],
        trace: FillTrace,
    ) -> list[_Entry]:
        n = self.n
        sponsor_from = SPONSOR * n
        borrowed_by_run = self._borrowed_by_run
        full = self._full
        used, lent, cap_used = st.used, st.lent, st.cap_used
        accepted: list[_Entry] = []
        turned_away = False
        for entry in ranked:
            rank, c, env = entry
            w = c.width
            key = env.key
            u = used[key]
            if u + w > env.concurrency:
                rejection = full.get(key)
                if rejection is None or rejection.args[1] != u:
                    rejection = self.full_rejection(env, u)
                c.rejections.append(rejection)
                pending.append(c)
                turned_away = True
                continue
            rejection = None
            is_borrow = rank < n or rank >= sponsor_from
            if is_borrow and env.lending_max is not None and lent[key] + w > env.lending_max:
                rejection = Rejection(key, _LENT, (env.lending_max, lent[key]))
            elif (
                is_borrow
                and c.borrow_cap is not None
                and borrowed_by_run[c.run_key] + w > c.borrow_cap
            ):
                rejection = self._same(key, _BORROW_LIMIT, c.borrow_cap)
            elif env.caps or env.gpu_hours is not None:
                rejection = self._limited(c, env, u, w, cap_used)
            if rejection is not None:
                c.rejections.append(rejection)
                pending.append(c)
                turned_away = True
                continue
            used[key] = u + w
            if is_borrow:
                lent[key] += w
                borrowed_by_run[c.run_key] += w
            for cap_id in env.caps:
                cap_used[cap_id] += w
            accepted.append(entry)
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
