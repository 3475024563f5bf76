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
import itertools
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, location_of
from gpu_fleet.core.funding.family import Tier
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


@dataclass(frozen=True)
class Rejection:
    envelope: EnvelopeKey
    reason: str


@dataclass(frozen=True)
class Accepted:
    """One funded claim as an envelope sees it (for admission-side availability)."""

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


_WIDTH = operator.attrgetter("width")


@dataclass
class FillResult:
    payer: dict[str, EnvelopeKey | None]
    funding_class: dict[str, FundingClass]
    rejections: dict[str, list[Rejection]]
    accepted: dict[EnvelopeKey, list[Accepted]]  # sorted by rank
    trace: FillTrace | None = None
    # Are ``payer``, ``funding_class`` and ``rejections`` in lease-id order, as ``fill`` lists
    # them?  A matching extended by a newcomer that sorts inside is not (``classes_by_id``).
    ordered: bool = True
    _totals: dict[EnvelopeKey, list[int]] = field(default_factory=dict, repr=False, compare=False)
    # ``classes_by_id`` once computed; ``extend_fill`` hands it on with the newcomers inserted,
    # so a chain of admissions never sorts every open lease again (issue 11).
    _by_id: list[tuple[str, FundingClass]] | None = field(default=None, repr=False, compare=False)

    def classes_by_id(self) -> list[tuple[str, FundingClass]]:
        """(lease id, class) in lease-id order: the order the meter charges in, since float
        sums depend on it (a fresh ``fill`` and an extended one must charge alike).

        Computed once per matching (a matching is never changed after it is made); callers
        must not modify the list.
        """
        if self._by_id is None:
            items = list(self.funding_class.items())
            if not self.ordered:
                items.sort(key=operator.itemgetter(0))  # a C key: this runs per metered piece
            self._by_id = items
        return self._by_id

    def funded_width(self, env: EnvelopeKey) -> int:
        return sum(a.width for a in self.accepted.get(env, ()))

    def width_up_to(self, env: EnvelopeKey, rank: tuple[object, ...]) -> int:
        """Funded width on ``env`` ranked at or above ``rank`` (equal keys count as senior):
        a binary search on running totals built once per envelope of this matching."""
        rows = self.accepted.get(env, ())
        if not rows:
            return 0
        totals = self._totals.get(env)
        if totals is None:
            widths = map(_WIDTH, rows)  # C-level: rebuilt for every new matching
            totals = self._totals[env] = [0, *itertools.accumulate(widths)]
        return totals[bisect.bisect_right(rows, rank, key=lambda r: r.rank)]


@functools.lru_cache(maxsize=1 << 16)
def _first_slot(slots: tuple[str, ...]) -> tuple[str, int]:
    """The lease's first physical slot, as (node, ordinal); parsed once per slot tuple."""
    return min((_slot_key(s) for s in slots), default=("", -1))


def _slot_key(s: str) -> tuple[str, int]:
    node, _, ordinal = s.rpartition("#")
    return (node, int(ordinal) if ordinal.isdigit() else -1)


@dataclass
class _Claim:
    lease: Lease
    run_key: str
    owner: str
    admitted: Instant
    proposals: list[EnvelopeKey]
    next_index: int = 0
    holder: EnvelopeKey | None = None
    rejections: list[Rejection] = field(default_factory=list)
    borrow_cap: int | None = None
    _tail: tuple[object, ...] | None = None
    _ranks: dict[EnvelopeKey, tuple[object, ...]] = field(default_factory=dict)

    def rank_at(self, env: EnvelopeInfo, tier: Tier) -> tuple[object, ...]:
        hit = self._ranks.get(env.key)
        if hit is not None:
            return hit
        if tier is Tier.NONE:
            granted = self.lease.minted_payer is not None and self.lease.minted_payer.key == env.key
            cls = LOAN if granted else SPONSOR
        else:
            cls = int(tier)
        if self._tail is None:
            first = _first_slot(self.lease.slots)
            self._tail = (self.admitted, self.run_key, self.lease.group, first, self.lease.id)
        rank = (cls, *self._tail)
        self._ranks[env.key] = rank
        return rank

    def rank_on(self, index: EnvelopeIndex, env_key: EnvelopeKey) -> tuple[object, ...]:
        hit = self._ranks.get(env_key)
        if hit is not None:
            return hit
        env = index.envelopes[env_key]
        return self.rank_at(env, index.family.tier(env.owner, self.owner))


class Proposer:
    """Builds each claim's ordered list of envelopes; cached per (run, location)."""

    def __init__(self, index: EnvelopeIndex, t: float) -> None:
        self.index = index
        self.t = t
        self._cache: dict[tuple[object, ...], list[EnvelopeKey]] = {}
        self._owners: dict[str, list[str]] = {}
        self._sel_keys = tuple(sorted({k for e in index.envelopes.values() for k in e.selector}))

    def envelopes_for(
        self, run: Run, owner: str, location: Mapping[str, str] | None
    ) -> list[EnvelopeKey]:
        loc_key = None if location is None else tuple(location.get(k) for k in self._sel_keys)
        funding = run.spec.funding
        sponsors = funding.sponsors if funding is not None and funding.allow_borrow else ()
        cache_key = (owner, run.flavor, sponsors, loc_key)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        out = [e.key for e in self.ordered(run, owner, location, self.t, admitting=False)]
        self._cache[cache_key] = out
        return out

    def ordered(
        self,
        run: Run,
        owner: str,
        location: Mapping[str, str] | None,
        t: float,
        *,
        admitting: bool,
    ) -> list[EnvelopeInfo]:
        """Proximity order (SPEC §B.5) over envelopes usable at ``t``.

        ``admitting`` uses the cover window rule (allowAdmission opens pre-window planning);
        otherwise only envelopes whose window is active can fund.
        """
        index = self.index
        flavor = run.flavor
        out: list[EnvelopeInfo] = []
        if not owner:
            return out

        def usable(e: EnvelopeInfo) -> bool:
            return e.admits_at(t) if admitting else e.active_at(t)

        tiers: dict[Tier, list[str]] = defaultdict(list)
        owners = self._owners.get(flavor)
        if owners is None:
            owners = self._owners[flavor] = index.owners_with_flavor(flavor)
        for o in owners:
            tier = index.family.tier(o, owner)
            if tier is not Tier.NONE:
                tiers[tier].append(o)
        for tier in sorted(tiers):
            envs = [
                e
                for o in sorted(tiers[tier])
                for e in index.of_owner(o, flavor)
                if usable(e) and (tier is Tier.OWNER or e.family_sharing)
            ]
            out.extend(e for e in envs if e.matches_location(location))
            out.extend(e for e in envs if not e.matches_location(location))
        funding = run.spec.funding
        if funding is not None and funding.allow_borrow and funding.sponsors:
            seen: set[str] = set()
            for sponsor in funding.sponsors:
                if sponsor in seen or index.family.tier(sponsor, owner) is not Tier.NONE:
                    continue
                seen.add(sponsor)
                envs = [
                    e for e in index.of_owner(sponsor, flavor) if usable(e) and e.lends_to(owner)
                ]
                out.extend(e for e in envs if e.matches_location(location))
                out.extend(e for e in envs if not e.matches_location(location))
        return out


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
    claims: list[_Claim] = []
    payer: dict[str, EnvelopeKey | None] = {}
    cls: dict[str, FundingClass] = {}
    rejections: dict[str, list[Rejection]] = {}
    for lease in sorted(leases, key=lambda x: x.id):
        if not _live(lease, t):
            continue
        run = runs.get(lease.run)
        payer[lease.id] = None
        cls[lease.id] = FundingClass.UNFUNDED
        if run is None:
            rejections[lease.id] = []
            continue
        owner = index.family.owner_of(run.metadata.namespace)
        labels = node_labels.get(lease.node)
        location = location_of(labels) if labels is not None else None
        funding = run.spec.funding
        claims.append(
            _Claim(
                lease=lease,
                run_key=run.key,
                owner=owner,
                admitted=admitted.get(run.key, lease.start),
                proposals=proposer.envelopes_for(run, owner, location),
                borrow_cap=funding.max_borrow_gpus if funding is not None else None,
            )
        )

    held: dict[EnvelopeKey, list[_Claim]] = defaultdict(list)
    counters: dict[int, _Counters] = {}
    trace = FillTrace()
    # Borrowed width each run holds right now, kept current as acceptors decide one after
    # another, so a run's maxBorrowGPUs is enforced at acceptance: an envelope never takes a
    # loan it would have to give back (and so never turns anyone away for it).
    borrowed_by_run: dict[str, int] = defaultdict(int)
    pending = [c for c in claims if c.proposals]
    while pending:
        touched: set[int] = set()
        incoming: dict[EnvelopeKey, list[_Claim]] = defaultdict(list)
        for c in pending:
            if c.next_index >= len(c.proposals):
                continue
            env = c.proposals[c.next_index]
            c.next_index += 1
            incoming[env].append(c)
            touched.add(index.acceptor_of[env])
        pending = []
        for acceptor in sorted(touched):
            members = index.acceptors[acceptor]
            inc = [c for k in members for c in incoming.get(k, ())]
            st = counters.get(acceptor)
            if st is not None and (
                st.last is None
                or min(c.rank_on(index, c.proposals[c.next_index - 1]) for c in inc) > st.last
            ):
                # every newcomer is junior to everything held: resume the greedy scan
                accepted, rejected, st = _decide(index, inc, hours, st, borrowed_by_run, trace)
            else:
                candidates = [c for k in members for c in held[k]] + inc
                for k in members:
                    for c in held[k]:
                        if c.rank_on(index, k)[0] in (LOAN, SPONSOR):
                            borrowed_by_run[c.run_key] -= c.lease.width
                    held[k] = []
                accepted, rejected, st = _decide(
                    index, candidates, hours, None, borrowed_by_run, trace
                )
            counters[acceptor] = st
            for c, env in accepted:
                c.holder = env
                held[env].append(c)
            for c, env, why in rejected:
                c.holder = None
                c.rejections.append(Rejection(env, why))
                pending.append(c)

    accepted_view: dict[EnvelopeKey, list[Accepted]] = {}
    for env_key, holders in held.items():
        info = index.envelopes[env_key]
        rows = []
        for c in holders:
            tier = index.family.tier(info.owner, c.owner)
            rank = c.rank_at(info, tier)
            rows.append(Accepted(rank, c.lease.width, int(rank[0])))  # type: ignore[call-overload]
            payer[c.lease.id] = env_key
            cls[c.lease.id] = (
                FundingClass.OWNED
                if tier is Tier.OWNER
                else FundingClass.SHARED
                if tier is not Tier.NONE
                else FundingClass.BORROWED
            )
        rows.sort(key=lambda a: a.rank)
        accepted_view[env_key] = rows
    for c in claims:
        rejections[c.lease.id] = c.rejections
    return FillResult(payer, cls, rejections, accepted_view, trace)


def _live(lease: Lease, t: float) -> bool:
    if t < lease.start:
        return False
    end = lease.effective_end()
    return end is None or t < end


@dataclass
class _Counters:
    used: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    lent: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    cap_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last: tuple[object, ...] | None = None


def _decide(  # noqa: PLR0917 - one acceptor's decision and the state it shares with the run
    index: EnvelopeIndex,
    candidates: list[_Claim],
    hours: HoursView,
    st: _Counters | None,
    borrowed_by_run: dict[str, int],
    trace: FillTrace,
) -> tuple[list[tuple[_Claim, EnvelopeKey]], list[tuple[_Claim, EnvelopeKey, str]], _Counters]:
    """Greedy fill of one acceptor group in rank order, with skip semantics.

    ``st`` resumes a previous scan of the same group when every candidate is junior to all it
    holds (the counters then already describe what is held).  ``trace`` records the most junior
    candidate and the highest counters (see ``FillTrace``).
    """
    ranked = []
    for c in candidates:
        env_key = c.proposals[c.next_index - 1] if c.holder is None else c.holder
        ranked.append((c.rank_on(index, env_key), c, index.envelopes[env_key]))
    ranked.sort(key=lambda r: r[0])
    if ranked:
        acceptor = index.acceptor_of[ranked[0][2].key]
        last = trace.junior.get(acceptor)
        if last is None or ranked[-1][0] > last:
            trace.junior[acceptor] = ranked[-1][0]
    if st is None:
        st = _Counters()
    used, lent, cap_used = st.used, st.lent, st.cap_used
    period = hours.period_hours
    accepted: list[tuple[_Claim, EnvelopeKey]] = []
    rejected: list[tuple[_Claim, EnvelopeKey, str]] = []
    for rank, c, env in ranked:
        w = c.lease.width
        key = env.key
        why = ""
        is_sponsor = rank[0] in (LOAN, SPONSOR)
        already = (c.lease.id, key) in hours.previously_funded
        if used[key] + w > env.concurrency:
            why = f"concurrency {env.concurrency} full ({used[key]} funded ahead)"
        elif is_sponsor and env.lending_max is not None and lent[key] + w > env.lending_max:
            why = f"lending cap {env.lending_max} reached ({lent[key]} lent)"
        elif (
            is_sponsor
            and c.borrow_cap is not None
            and borrowed_by_run[c.run_key] + w > c.borrow_cap
        ):
            why = f"run borrow limit {c.borrow_cap} reached"
        else:
            for cap_id in env.caps:
                cap = index.caps[cap_id]
                if cap.max_concurrency is not None and cap_used[cap_id] + w > cap.max_concurrency:
                    why = f"aggregate cap {cap.name} {cap.max_concurrency} full"
                    break
                if cap.gpu_hours is not None and not _hours_ok(
                    hours.remaining_cap.get(cap_id, cap.gpu_hours),
                    period,
                    cap_used[cap_id],
                    w,
                    already,
                ):
                    why = f"aggregate cap {cap.name} GPU-hours exhausted"
                    break
            if not why and env.gpu_hours is not None:
                remaining = hours.remaining_envelope.get(key, env.gpu_hours)
                if not _hours_ok(remaining, period, used[key], w, already):
                    why = f"GPU-hours exhausted ({remaining:.2f} left)"
        if why:
            rejected.append((c, key, why))
            if not trace.rejected_any or index.acceptor_of[key] not in trace.rejected_at:
                trace.rejected_any = True
                trace.rejected_at = trace.rejected_at | {index.acceptor_of[key]}
            continue
        used[key] += w
        if is_sponsor:
            lent[key] += w
            borrowed_by_run[c.run_key] += w
        for cap_id in env.caps:
            cap_used[cap_id] += w
        accepted.append((c, key))
        st.last = rank
    _raise_peaks(trace.used, used)
    _raise_peaks(trace.lent, lent)
    _raise_peaks(trace.cap, cap_used)
    return accepted, rejected, st


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


def extend_fill(  # noqa: PLR0917 - fill's inputs, plus the matching they extend
    index: EnvelopeIndex,
    base: FillResult,
    new: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
    hours: HoursView | None = None,
    *,
    runs_alone: bool = True,
) -> FillResult | None:
    """``fill`` over the leases ``base`` matched plus ``new``, without running it again - or
    ``None`` when that cannot be proven equal, and the caller runs ``fill``.

    ``base`` must be ``fill`` of the other leases at the same ``t`` with the same ``runs``,
    ``admitted``, labels and hours (the caller guarantees it); ``runs_alone`` says that no lease
    in ``base`` belongs to a run of ``new``.

    Why the shortcut is exact.  Each new claim must fit - after the new claims ranked above it -
    on top of the highest counters any decision of its first envelope's acceptor group left in
    ``base``'s run (``FillTrace`` peaks), under every limit acceptance checks (concurrency,
    lending cap, the run's borrow limit, aggregate caps; each only gets harder as counters
    grow), and one of these holds there:

    * it is junior to every claim that ever proposed to that group (``FillTrace.junior``), and
      fits its GPU-hours too: then it is considered after every other candidate of each of the
      group's decisions, so it changes no decision about anyone else, and it fits every time;
    * the group never turned anyone away (``FillTrace.rejected_at``), so its peaks are what it
      holds at the end and everyone who ever proposed there is held, and no GPU-hours are set
      on it (those checks depend on rank order): then everything that can ever propose there,
      the newcomer included, fits together, every decision accepts every candidate, whatever
      their order, and nothing turned away elsewhere changes.

    Either way it is accepted in round 1 and never turned away: the matching is ``base`` plus
    each new claim held by its first envelope.  A loan's borrow limit counts the run's other
    loans, which live in other acceptors, so a new claim that borrows needs ``runs_alone``.
    """
    trace = base.trace
    if trace is None:
        return None
    hours = hours or HoursView()
    period = hours.period_hours
    proposer = Proposer(index, t)
    payer = dict(base.payer)
    cls = dict(base.funding_class)
    rejections = dict(base.rejections)
    claims: list[tuple[tuple[object, ...], _Claim, EnvelopeInfo, Tier]] = []
    for lease in sorted(new, key=lambda x: x.id):
        if not _live(lease, t):
            continue
        if lease.id in payer:
            return None  # not new: the caller's promise is broken, do it the long way
        run = runs.get(lease.run)
        payer[lease.id] = None
        cls[lease.id] = FundingClass.UNFUNDED
        rejections[lease.id] = []
        if run is None:
            continue
        owner = index.family.owner_of(run.metadata.namespace)
        labels = node_labels.get(lease.node)
        location = location_of(labels) if labels is not None else None
        funding = run.spec.funding
        claim = _Claim(
            lease=lease,
            run_key=run.key,
            owner=owner,
            admitted=admitted.get(run.key, lease.start),
            proposals=proposer.envelopes_for(run, owner, location),
            borrow_cap=funding.max_borrow_gpus if funding is not None else None,
        )
        if not claim.proposals:
            continue
        env = index.envelopes[claim.proposals[0]]
        tier = index.family.tier(env.owner, owner)
        claims.append((claim.rank_at(env, tier), claim, env, tier))
    claims.sort(key=lambda r: r[0])
    used: dict[EnvelopeKey, int] = defaultdict(int)
    lent: dict[EnvelopeKey, int] = defaultdict(int)
    cap_used: dict[str, int] = defaultdict(int)
    borrowed: dict[str, int] = defaultdict(int)
    junior = dict(trace.junior)
    for rank, c, env, _tier in claims:
        acceptor = index.acceptor_of[env.key]
        last = junior.get(acceptor)
        is_junior = last is None or rank > last
        if not is_junior and (
            acceptor in trace.rejected_at or _hours_in_group(index, index.acceptors[acceptor])
        ):
            return None
        junior[acceptor] = rank if last is None or rank > last else last
        w = c.lease.width
        key = env.key
        above = trace.used.get(key, 0) + used[key]
        if above + w > env.concurrency:
            return None
        already = (c.lease.id, key) in hours.previously_funded
        if rank[0] in (LOAN, SPONSOR):
            if not runs_alone:
                return None
            if env.lending_max is not None and (
                trace.lent.get(key, 0) + lent[key] + w > env.lending_max
            ):
                return None
            if c.borrow_cap is not None and borrowed[c.run_key] + w > c.borrow_cap:
                return None
            lent[key] += w
            borrowed[c.run_key] += w
        for cap_id in env.caps:
            cap = index.caps[cap_id]
            cap_above = trace.cap.get(cap_id, 0) + cap_used[cap_id]
            if cap.max_concurrency is not None and cap_above + w > cap.max_concurrency:
                return None
            if cap.gpu_hours is not None and not _hours_ok(
                hours.remaining_cap.get(cap_id, cap.gpu_hours), period, cap_above, w, already
            ):
                return None
            cap_used[cap_id] += w
        if env.gpu_hours is not None and not _hours_ok(
            hours.remaining_envelope.get(key, env.gpu_hours), period, above, w, already
        ):
            return None
        used[key] += w
    accepted = dict(base.accepted)
    copied: set[EnvelopeKey] = set()
    for rank, c, env, tier in claims:
        if env.key not in copied:
            copied.add(env.key)
            accepted[env.key] = list(accepted.get(env.key, ()))
        row = Accepted(rank, c.lease.width, int(rank[0]))  # type: ignore[call-overload]
        bisect.insort(accepted[env.key], row, key=lambda a: a.rank)
        payer[c.lease.id] = env.key
        cls[c.lease.id] = (
            FundingClass.OWNED
            if tier is Tier.OWNER
            else FundingClass.SHARED
            if tier is not Tier.NONE
            else FundingClass.BORROWED
        )
    new_trace = FillTrace(
        junior,
        _plus(trace.used, used),
        _plus(trace.lent, lent),
        _plus(trace.cap, cap_used),
        trace.rejected_any,
        trace.rejected_at,
    )
    ordered = base.ordered
    if ordered and base.payer:
        last_id = next(reversed(base.payer))
        ordered = not any(x.id < last_id for x in new if x.id in payer)
    out = FillResult(payer, cls, rejections, accepted, new_trace, ordered)
    _hand_on(base, out, new, claims)
    return out


def _hand_on(
    base: FillResult,
    out: FillResult,
    new: Sequence[Lease],
    claims: Sequence[tuple[tuple[object, ...], _Claim, EnvelopeInfo, Tier]],
) -> None:
    """Give ``out`` what ``base`` already computed, updated for the newcomers, instead of
    rebuilding it from every open lease: the lease-id order (each newcomer inserted where it
    sorts) and the running totals of each envelope whose newcomers all rank last (so its rows
    are ``base``'s followed by theirs; the usual case, newcomers being junior)."""
    if base._by_id is not None:
        by_id = list(base._by_id)
        for lease in new:
            if lease.id in out.funding_class:  # a lease not live at the instant is left out
                bisect.insort(by_id, (lease.id, out.funding_class[lease.id]))
        out._by_id = by_id
    ranks: dict[EnvelopeKey, list[tuple[object, ...]]] = defaultdict(list)
    for rank, _, env, _ in claims:
        ranks[env.key].append(rank)
    for key, totals in base._totals.items():
        if key not in ranks:
            out._totals[key] = totals  # the same rows (``accepted`` shares the list)
            continue
        held = base.accepted.get(key, ())
        if held and min(ranks[key]) < held[-1].rank:
            continue  # a newcomer sorts inside: ``width_up_to`` rebuilds on first use
        appended = out.accepted[key][len(held) :]
        more = itertools.accumulate(map(_WIDTH, appended), initial=totals[-1])
        next(more)  # the initial value: ``totals`` ends with it already
        out._totals[key] = [*totals, *more]


def _hours_in_group(index: EnvelopeIndex, members: Sequence[EnvelopeKey]) -> bool:
    """Does an envelope of the group, or a cap over it, set GPU-hours?"""
    for key in members:
        env = index.envelopes[key]
        if env.gpu_hours is not None:
            return True
        if any(index.caps[cap_id].gpu_hours is not None for cap_id in env.caps):
            return True
    return False


def _plus(base: Mapping[_K, int], extra: Mapping[_K, int]) -> dict[_K, int]:
    out = dict(base)
    for k, v in extra.items():
        if v:
            out[k] = out.get(k, 0) + v
    return out


def shrink_fill(base: FillResult, gone: Sequence[Lease]) -> FillResult | None:
    """``fill`` over the leases ``base`` matched minus ``gone``, without running it again - or
    ``None`` when that cannot be proven equal, and the caller runs ``fill``.

    ``base`` must be ``fill`` at some instant with the same other inputs.  Exact when no
    envelope turned anyone away in ``base``'s run (``FillTrace.rejected_any``): then every claim
    was held by its first envelope in round 1, every acceptance check passed, and with fewer
    claims every counter is lower, so every check passes again (each only gets easier as
    counters fall).  The matching is ``base`` without the leases gone; the trace's junior ranks
    and peaks stay valid as bounds.
    """
    trace = base.trace
    if trace is None or trace.rejected_any:
        return None
    ids = {x.id for x in gone if x.id in base.payer}
    if not ids:
        return base
    payer = {k: v for k, v in base.payer.items() if k not in ids}
    cls = {k: v for k, v in base.funding_class.items() if k not in ids}
    rejections = {k: v for k, v in base.rejections.items() if k not in ids}
    accepted = dict(base.accepted)
    for lid in ids:
        env = base.payer[lid]
        if env is None:
            continue
        rows = accepted[env]
        accepted[env] = [r for r in rows if r.rank[-1] != lid]
    return FillResult(payer, cls, rejections, accepted, trace, base.ordered)
