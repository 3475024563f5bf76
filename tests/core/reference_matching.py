"""The funding matching as it was before issue 11's faster ``fill``: the reference.

A verbatim copy of ``gpu_fleet.core.funding.matching.fill`` (and the helpers it used) at commit
9e5fa46 - deferred acceptance in rounds, every acceptor re-deciding everything it holds whenever
a newcomer is not junior to all of it.  ``test_fill_equivalence.py`` checks that the production
``fill`` gives exactly this result (payers, classes, rejections, accepted rows and the trace
``extend_fill`` relies on) over generated worlds.  Kept out of the package: it is the slow path.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, location_of
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import Accepted, FillResult, FillTrace, Rejection
from gpu_fleet.core.funding.matching import LOAN, SPONSOR, HoursView
from gpu_fleet.core.funding.proposals import Proposer
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Instant, Lease, Run

_K = TypeVar("_K")

HOURS_EPSILON = 1e-6


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


def reference_fill(  # noqa: PLR0917 - the matching's inputs are its whole signature, in one fixed order
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
