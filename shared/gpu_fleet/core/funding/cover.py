"""Cover: who pays for a new claim, decided at admission (SPEC §B.5, §B.4.7).

Cover walks the envelopes a run may use in proximity order (own, parents, siblings, cousins;
same location before other locations; then the sponsors the run opted into) and takes from each
what the ranking leaves for the prospective claim:

* owner/family: the envelope's concurrency minus its granted loans and the funded width of every
  claim ranked at or above the newcomer.  Junior family width is *recallable* and not counted -
  that is owner recall.
* sponsor: only free headroom (``concurrency - funded``), within the lending cap and the run's
  ``maxBorrowGPUs``.  Admission never displaces anyone to grant a loan.

Aggregate caps and GPU-hours bound both.  Cover is all-or-nothing: it either returns segments
covering the whole quantity or a failure with a machine-readable reason and every envelope it
tried with why it said no, so ``explain`` can print the walk.
"""

from __future__ import annotations

import enum
import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import FillResult
from gpu_fleet.core.funding.matching import LOAN, SPONSOR
from gpu_fleet.core.funding.metering import Evaluation
from gpu_fleet.core.funding.proposals import Proposer
from gpu_fleet.core.funding.ranked_rows import EMPTY_ROWS
from gpu_fleet.core.model import EnvelopeKey, Instant, Payer, Run, run_key

_CONSERVATIVE = "\U0010ffff"  # sorts after every run key: same-tier, same-time peers are senior


class CoverReason(enum.StrEnum):
    INVALID_REQUEST = "InvalidRequest"
    NO_ENVELOPE = "NoEnvelope"
    WINDOW_CLOSED = "WindowClosed"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"
    ACL_DENIED = "ACLDenied"
    BORROW_LIMIT = "BorrowLimit"
    HOURS_EXHAUSTED = "HoursExhausted"


@dataclass(frozen=True)
class Segment:
    payer: Payer
    quantity: int
    borrowed: bool


@dataclass(frozen=True)
class Attempt:
    """One envelope cover looked at, in order, and what it could give."""

    envelope: EnvelopeKey
    owner: str
    relation: str  # own | child | sibling | cousin | sponsor
    available: int
    taken: int
    note: str = ""

    def describe(self) -> str:
        extra = f" ({self.note})" if self.note else ""
        return f"{self.relation} {self.envelope}: {self.available} available{extra}"


@dataclass(frozen=True)
class CoverPlan:
    segments: tuple[Segment, ...]
    attempts: tuple[Attempt, ...]

    @property
    def quantity(self) -> int:
        return sum(s.quantity for s in self.segments)

    @property
    def borrowed(self) -> int:
        return sum(s.quantity for s in self.segments if s.borrowed)


@dataclass(frozen=True)
class CoverFailure:
    reason: CoverReason
    message: str
    quantity: int
    coverable: int
    attempts: tuple[Attempt, ...] = ()
    window_opens: Instant | None = None

    @property
    def shortfall(self) -> int:
        return max(0, self.quantity - self.coverable)


@dataclass(frozen=True)
class CoverRequest:
    run: Run
    quantity: int
    location: Mapping[str, str] | None
    now: Instant
    admitted: Instant
    conservative: bool = True  # ordinary admission: equal-rank peers count as senior
    already_borrowed: int = 0  # the run's current Borrowed width (for maxBorrowGPUs)


_RELATION = {
    Tier.OWNER: "own",
    Tier.CHILD: "child",
    Tier.SIBLING: "sibling",
    Tier.COUSIN: "cousin",
    Tier.NONE: "sponsor",
}


@dataclass
class _Taken:
    envelope: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    cap: dict[str, int] = field(default_factory=lambda: defaultdict(int))


def _prospective_rank(tier: Tier, req: CoverRequest) -> tuple[object, ...]:
    key = _CONSERVATIVE if req.conservative else req.run.key
    return (int(tier), req.admitted, key, math.inf)


def available_width(
    index: EnvelopeIndex,
    fill: FillResult,
    env: EnvelopeInfo,
    owner: str,
    req: CoverRequest,
    *,
    remaining_hours: Mapping[EnvelopeKey, float],
    remaining_cap_hours: Mapping[str, float],
    period_hours: float,
    taken: _Taken,
) -> tuple[int, str]:
    """How much more this envelope could fund for the prospective claim, and the binding limit."""
    tier = index.family.tier(env.owner, owner)
    rows = fill.accepted.get(env.key, EMPTY_ROWS)
    limits: list[tuple[int, str]] = []
    if tier is Tier.NONE:
        if not env.lends_to(owner):
            return 0, "lending policy does not admit this owner"
        total = rows.total_width()
        limits.append((env.concurrency - total, "free headroom"))
        if env.lending_max is not None:
            lent = sum(r.width for r in rows if r.rank_class in (LOAN, SPONSOR))
            limits.append((env.lending_max - lent - taken.envelope[env.key], "lending cap"))
        senior = total
    else:
        if tier is not Tier.OWNER and not env.family_sharing:
            return 0, "sharing: none"
        rank = _prospective_rank(tier, req)
        # What stands ahead of the newcomer: every loan (rank class 0, always ahead), no sponsor
        # claim (class 5, always behind), and the family claims ranked at or above it.
        senior = fill.width_up_to(env.key, rank)
        limits.append((env.concurrency - senior, "concurrency"))
    limits[0] = (limits[0][0] - taken.envelope[env.key], limits[0][1])
    for cap_id in env.caps:
        cap = index.caps[cap_id]
        member_rows = [r for m in cap.members for r in fill.accepted.get(m, [])]
        if tier is Tier.NONE:
            cap_senior = sum(r.width for r in member_rows)
        else:
            rank = _prospective_rank(tier, req)
            cap_senior = sum(
                r.width
                for r in member_rows
                if r.rank_class == LOAN or (r.rank_class != SPONSOR and r.rank <= rank)
            )
        if cap.max_concurrency is not None:
            limits.append(
                (cap.max_concurrency - cap_senior - taken.cap[cap_id], f"aggregate cap {cap.name}")
            )
        if cap.gpu_hours is not None:
            rem = remaining_cap_hours.get(cap_id, cap.gpu_hours)
            limits.append(
                (
                    math.floor(rem / period_hours + 1e-9) - cap_senior - taken.cap[cap_id],
                    f"aggregate cap {cap.name} GPU-hours",
                )
            )
    if env.gpu_hours is not None:
        rem = remaining_hours.get(env.key, env.gpu_hours)
        limits.append(
            (
                math.floor(rem / period_hours + 1e-9) - senior - taken.envelope[env.key],
                "GPU-hours",
            )
        )
    value, why = min(limits, key=lambda x: x[0])
    return max(0, value), why


def cover(
    index: EnvelopeIndex,
    evaluation: Evaluation | FillResult,
    req: CoverRequest,
    *,
    remaining_hours: Mapping[EnvelopeKey, float] | None = None,
    remaining_cap_hours: Mapping[str, float] | None = None,
    period_hours: float = 24.0,
) -> CoverPlan | CoverFailure:
    """Plan who pays for ``req.quantity`` GPUs of ``req.run``, or say precisely why not.

    Only the evaluation's matching is read; a bare ``FillResult`` will do."""
    run = req.run
    owner = index.family.owner_of(run.metadata.namespace)
    if req.quantity <= 0 or not run.flavor:
        return CoverFailure(CoverReason.INVALID_REQUEST, "quantity must be > 0", req.quantity, 0)
    if not owner:
        conflict = index.family.conflicts.get(run.metadata.namespace or "default")
        why = (
            conflict.describe()
            if conflict is not None
            else f"namespace {run.metadata.namespace} has no Budget, so the run has no owner"
        )
        return CoverFailure(
            CoverReason.INVALID_REQUEST, f"no funding principal: {why}", req.quantity, 0
        )
    rem_env = remaining_hours if remaining_hours is not None else {}
    rem_cap = remaining_cap_hours if remaining_cap_hours is not None else {}
    funding = run.spec.funding
    borrow_budget: int | None = None
    if funding is not None and funding.max_borrow_gpus is not None:
        borrow_budget = max(0, funding.max_borrow_gpus - req.already_borrowed)

    proposer = Proposer(index, req.now)
    ordered = proposer.ordered(run, owner, req.location, req.now, admitting=True)
    taken = _Taken()
    remaining = req.quantity
    segments: list[Segment] = []
    attempts: list[Attempt] = []
    borrow_limited = False
    hours_limited = False
    for env in ordered:
        if remaining <= 0:
            break
        tier = index.family.tier(env.owner, owner)
        avail, why = available_width(
            index,
            evaluation.fill if isinstance(evaluation, Evaluation) else evaluation,
            env,
            owner,
            req,
            remaining_hours=rem_env,
            remaining_cap_hours=rem_cap,
            period_hours=period_hours,
            taken=taken,
        )
        take = min(avail, remaining)
        note = "" if avail >= remaining else f"limited by {why}"
        if tier is Tier.NONE and borrow_budget is not None:
            if take > borrow_budget:
                borrow_limited = True
                note = f"limited by maxBorrowGPUs ({borrow_budget} left)"
            take = min(take, borrow_budget)
        if avail < remaining and "GPU-hours" in why:
            hours_limited = True
        attempts.append(Attempt(env.key, env.owner, _RELATION[tier], avail, take, note))
        if take <= 0:
            continue
        segments.append(Segment(env.payer, take, tier is Tier.NONE))
        taken.envelope[env.key] += take
        for cap_id in env.caps:
            taken.cap[cap_id] += take
        if tier is Tier.NONE and borrow_budget is not None:
            borrow_budget -= take
        remaining -= take
    if remaining <= 0:
        return CoverPlan(tuple(segments), tuple(attempts))

    coverable = req.quantity - remaining
    if not ordered:
        return _no_envelope(index, run, owner, req, coverable)
    if borrow_limited:
        reason = CoverReason.BORROW_LIMIT
        msg = f"borrow limit exhausted: {coverable} of {req.quantity} GPUs coverable"
    elif hours_limited:
        reason = CoverReason.HOURS_EXHAUSTED
        msg = f"GPU-hours short: {coverable} of {req.quantity} GPUs coverable"
    else:
        reason = CoverReason.INSUFFICIENT_CAPACITY
        msg = f"budget headroom short by {remaining} GPUs"
    return CoverFailure(reason, msg, req.quantity, coverable, tuple(attempts))


def _no_envelope(
    index: EnvelopeIndex, run: Run, owner: str, req: CoverRequest, coverable: int
) -> CoverFailure:
    """Tell apart 'nothing exists', 'a window opens later' and 'a sponsor said no'."""
    own = index.of_owner(owner, run.flavor)
    future = sorted(
        e.start for e in own if e.start is not None and e.end is not None and e.start > req.now
    )
    if future:
        return CoverFailure(
            CoverReason.WINDOW_CLOSED,
            "budget window opens later",
            req.quantity,
            coverable,
            window_opens=future[0],
        )
    funding = run.spec.funding
    if funding is not None and funding.allow_borrow:
        for sponsor in funding.sponsors:
            if any(not e.lends_to(owner) for e in index.of_owner(sponsor, run.flavor)):
                return CoverFailure(
                    CoverReason.ACL_DENIED,
                    "borrowing policy rejected request",
                    req.quantity,
                    coverable,
                )
    return CoverFailure(
        CoverReason.NO_ENVELOPE,
        f"no eligible envelope of flavor {run.flavor} for owner {owner}",
        req.quantity,
        coverable,
    )


def owner_of_run(index: EnvelopeIndex, namespace: str, name: str) -> tuple[str, str]:
    """Convenience for callers that only hold a key: (run key, derived owner)."""
    return run_key(namespace, name), index.family.owner_of(namespace)
