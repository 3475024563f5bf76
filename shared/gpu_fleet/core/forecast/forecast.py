"""Forecast: when will a waiting run start, and what would make it sooner (DESIGN decision 4).

Leases without a scheduled end are placed on the timeline at their run's reported ETA, else at
the median duration of completed runs of the same team and flavor; such estimates set the P50
only (confidence ``estimated``), and the reservation bound stays the P90.  Everything
here is a pure function of the folded ledger and an instant, so the forecaster service, a test and
a replay all compute the same answer.

**Capacity timeline.**  For the run's flavor, the GPUs free now plus the GPUs each open lease
gives back at its scheduled end (``Lease.end``, from ``spec.runtime.maxDuration``; a pending
preemption notice for this run brings the end forward to its deadline).  We do not count GPUs: at
every instant the timeline changes we ask the same greedy packer admission uses whether the run
*fits* (its width, groups, single-domain rule, spares, and the backfill protection of other
runs' reservations).  A count would call a run of 8 startable when two domains each free 4.

**Natural start** is the first such instant.  Scheduled ends are hard bounds (the manager closes
the lease with ``Expired`` then), and a lease that finishes earlier only makes the start sooner,
so a natural start decided by scheduled ends is an upper bound we can state exactly.

**The reservation is a promise with a bound.**  A capacity wait activates at the reservation's
``earliest_start`` and the resolver makes room then, so the forecast is ``min(natural, bound)``.

**Confidence labels:**

* ``exact`` - scheduled lease ends free the capacity before the bound (P50 = P90 = that instant);
* ``bounded`` - the reservation's activation bound decides (capacity that frees later or never
  by itself, or a budget-only wait that starts unfunded at the bound).  When the blockers have no
  scheduled end their end is *unknown*: P90 is the bound and P50 is not estimated (``None``);
* ``window-aligned`` - the run waits for a budget window to open; it activates just after;
* ``conservative`` - no promise exists (no pending reservation): the answer is informational.

**Remedies** are what the run's owner could change, each with the start it would give from the
same timeline; only those that beat the forecast are returned, ranked by that start.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import msgspec

from gpu_fleet.core.engine.gang import TERMINAL
from gpu_fleet.core.forecast.queue_play import (
    pack_request,
)
from gpu_fleet.core.forecast.timeline import (
    Fit,
    ForecastError,
    Timeline,
    _queued_fit,
    build_timeline,
    earliest_fit,
    fits_when_empty,
)
from gpu_fleet.core.funding.envelopes import EnvelopeInfo
from gpu_fleet.core.ledger.events import Reservation
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant, Run
from gpu_fleet.core.placement.pack import PackRequest
from gpu_fleet.core.timeutil import format_instant

Confidence = Literal["exact", "estimated", "bounded", "conservative", "window-aligned"]


@dataclass(frozen=True)
class RemedyOption:
    action: Literal["shrink", "drop-spares", "borrow", "flavor"]
    detail: str
    start: Instant | None


@dataclass(frozen=True)
class ForecastResult:
    run: str
    earliest_start: Instant | None
    p50: Instant | None
    p90: Instant | None
    confidence: Confidence
    deficit_gpus: int
    basis: str
    remedies: tuple[RemedyOption, ...] = ()


# ------------------------------------------------------------------------------------------
# The forecast
# ------------------------------------------------------------------------------------------


def forecast(state: FleetState, key: str, now: Instant, *, remedies: bool = True) -> ForecastResult:
    """Forecast run ``key`` at ``now``; raise ``ForecastError`` when there is nothing to say.

    ``remedies=False`` skips the what-ifs (each is a play of its own): for callers that only
    need the start, like the notifier's forecast events.

    A running run gets a "runs now" answer (its start, exact); a pending run without a
    reservation gets an informational answer without an earliest start (no promise exists).
    """
    run = state.runs.get(key)
    if run is None:
        raise ForecastError("not_found", f"run {key} not found")
    status = state.status.get(key)
    phase = status.phase if status is not None else "Pending"
    if phase in TERMINAL:
        raise ForecastError("terminal", f"run {key} is {phase}; there is nothing to forecast")
    if phase == "Running":
        starts = [x.start for x in state.leases_of(key, open_only=True)]
        started = min(starts) if starts else now
        return ForecastResult(
            run=key,
            earliest_start=started,
            p50=started,
            p90=started,
            confidence="exact",
            deficit_gpus=0,
            basis=f"running since {format_instant(started)}",
        )
    timeline = build_timeline(state, run.flavor, key, now)
    request = pack_request(run)
    fit = _queued_fit(state, run, request, now) or earliest_fit(state, key, request, timeline, now)
    deficit = _deficit(run, fit)
    res = state.pending_reservation(key)
    if res is None:
        reason = status.reason if status is not None and status.reason else "not yet reconciled"
        message = f": {status.message}" if status is not None and status.message else ""
        return ForecastResult(
            run=key,
            earliest_start=None,
            p50=None,
            p90=None,
            confidence="conservative",
            deficit_gpus=deficit,
            basis=f"no reservation ({phase}, {reason}{message}); no start is promised. "
            + _capacity_note(run, fit, timeline, now),
        )
    if res.kind == "window":
        result = _window_wait(run, res, fit, timeline, now)
    elif res.kind == "budget":
        result = _budget_wait(run, res, fit, timeline, now)
    else:
        result = _capacity_wait(
            state, run, res, fit, timeline, request=request, now=now, deficit=deficit
        )
    if not remedies:
        return result
    return dataclasses.replace(
        result, remedies=_remedies(state, run, res, result, timeline=timeline, now=now)
    )


def _deficit(run: Run, fit: Fit) -> int:
    """GPUs still to free for the run to fit now, as admission reports it (0 if it fits)."""
    if fit.now_error is None:
        return 0
    if fit.now_error.deficit:
        return max(1, fit.now_error.deficit)
    return run.spec.resources.total_gpus


def _capacity_note(run: Run, fit: Fit, timeline: Timeline, now: Instant) -> str:
    width = run.spec.resources.total_gpus
    if fit.at is None:
        if timeline.unknown:
            return f"capacity for {width} GPUs of {run.flavor} waits on leases with no end"
        return f"capacity for {width} GPUs of {run.flavor} does not free by scheduled lease ends"
    if fit.at <= now:
        return f"capacity for {width} GPUs of {run.flavor} is free now"
    return f"capacity for {width} GPUs of {run.flavor} frees at {format_instant(fit.at)}"


def _at_least(t: Instant, now: Instant) -> Instant:
    return max(t, now)


def _capacity_wait(
    state: FleetState,
    run: Run,
    res: Reservation,
    fit: Fit,
    timeline: Timeline,
    *,
    request: PackRequest,
    now: Instant,
    deficit: int,
) -> ForecastResult:
    """Scheduled ends before the bound decide exactly; otherwise the bound is the promise."""
    bound = _at_least(res.earliest_start, now)
    bound_text = f"reservation {res.name} activates at {format_instant(bound)}"
    if fit.by_activation and res.confidence == "exact" and not fit.uncertain:
        # The engine set the reservation at the natural start: scheduled lease ends free its
        # slice then (DESIGN decision 4), and nothing estimated came before.
        waits = _last_releases(timeline, fit)
        why = f" ({', '.join(waits)})" if waits else ""
        basis = (
            f"capacity: scheduled lease ends{why} free its slice at {format_instant(bound)}, "
            f"sooner than the activation bound: the {bound_text}"
        )
        return ForecastResult(run.key, bound, bound, bound, "exact", deficit, basis)
    if fit.by_activation and timeline.unknown:
        return _unknown_ends(run, timeline, bound_text, bound, deficit)
    if fit.by_activation:
        basis = (
            "capacity does not free for this run before its bound (the runs queued ahead take "
            f"what frees first): the {bound_text} and the resolver makes room then"
        )
        return ForecastResult(run.key, bound, bound, bound, "bounded", deficit, basis)
    if fit.at is not None and fit.at <= bound:
        start = _at_least(fit.at, now)
        waits = _last_releases(timeline, fit)
        why = f"when {', '.join(waits)} reach(es) its scheduled end" if waits else "already"
        if fit.uncertain:
            # An estimated end (a reported ETA, similar runs' history) or a lottery draw for a
            # run ahead is an expectation, not a promise: P50 trusts it, P90 is the bound.
            return ForecastResult(
                run=run.key,
                earliest_start=start,
                p50=start,
                p90=bound,
                confidence="estimated",
                deficit_gpus=deficit,
                basis=f"capacity: fits at {format_instant(start)} {why} (after estimated "
                "events: a reported ETA, similar runs' history, or the resolver's lottery for a "
                f"run queued ahead); P90 is the {bound_text}",
            )
        return ForecastResult(
            run=run.key,
            earliest_start=start,
            p50=start,
            p90=start,
            confidence="exact",
            deficit_gpus=deficit,
            basis=f"capacity: {run.spec.resources.total_gpus} GPUs of {run.flavor} fit at "
            f"{format_instant(start)} {why}; the {bound_text}",
        )
    if fit.at is not None:
        basis = (
            f"capacity frees by scheduled ends at {format_instant(fit.at)}, after the bound: "
            f"the {bound_text} and the resolver makes room then"
        )
        return ForecastResult(run.key, bound, bound, bound, "bounded", deficit, basis)
    if timeline.unknown and fits_when_empty(state, run.key, request):
        return _unknown_ends(run, timeline, bound_text, bound, deficit)
    basis = (
        f"the fleet cannot fit {run.spec.resources.total_gpus} GPUs of {run.flavor} for this run "
        f"even with every lease gone ({fit.now_error.message if fit.now_error else 'no fit'}); "
        f"the {bound_text} but cannot make room"
    )
    return ForecastResult(run.key, None, None, None, "conservative", deficit, basis)


def _unknown_ends(
    run: Run, timeline: Timeline, bound_text: str, bound: Instant, deficit: int
) -> ForecastResult:
    """Blockers with no known end: the bound is the forecast (the resolver makes room then)."""
    shown = ", ".join(timeline.unknown[:5]) + (" ..." if len(timeline.unknown) > 5 else "")
    basis = (
        f"unknown: blocking leases have no scheduled end (no maxDuration) and no history "
        f"of similar runs says when they end: {shown}; the {bound_text} and the resolver "
        "makes room then, so that is the forecast (sooner only if they end first)"
    )
    return ForecastResult(run.key, bound, bound, bound, "bounded", deficit, basis)


def _window_wait(
    run: Run, res: Reservation, fit: Fit, timeline: Timeline, now: Instant
) -> ForecastResult:
    """A budget window opens at the bound; capacity that frees later than that decides, unless
    the wait is short of GPUs too: then the resolver makes room when the window opens."""
    opens = _at_least(res.earliest_start, now)
    basis = (
        f"budget window: reservation {res.name} activates at {format_instant(opens)} ({res.reason})"
    )
    if res.deficit_gpus > 0:
        basis += "; it is short of GPUs too: the resolver makes room then for what has not freed"
        return ForecastResult(
            run.key, opens, opens, opens, "window-aligned", res.deficit_gpus, basis
        )
    if fit.at is not None and fit.at > opens:
        start = fit.at
        basis += f"; capacity frees by scheduled ends only at {format_instant(start)}"
        return ForecastResult(run.key, start, start, start, "window-aligned", 0, basis)
    if fit.at is None:
        basis += "; " + _capacity_note(run, fit, timeline, now) + ", so the start may be later"
        return ForecastResult(run.key, opens, None, opens, "window-aligned", 0, basis)
    return ForecastResult(run.key, opens, opens, opens, "window-aligned", 0, basis)


def _budget_wait(
    run: Run, res: Reservation, fit: Fit, timeline: Timeline, now: Instant
) -> ForecastResult:
    """Capacity is there, the budget is committed: the bound starts the run unfunded."""
    bound = _at_least(res.earliest_start, now)
    basis = (
        f"budget-only wait ({res.reason}): reservation {res.name} activates at "
        f"{format_instant(bound)} and starts the run unfunded, cutting nobody"
    )
    if fit.at is not None and fit.at <= bound:
        return ForecastResult(run.key, bound, bound, bound, "bounded", 0, basis)
    # Capacity is not there at the bound: activation will re-reserve, so no promise holds.
    basis += "; " + _capacity_note(run, fit, timeline, now)
    if fit.at is not None:
        return ForecastResult(run.key, fit.at, fit.at, fit.at, "conservative", 0, basis)
    return ForecastResult(run.key, None, None, None, "conservative", 0, basis)


def _last_releases(timeline: Timeline, fit: Fit) -> list[str]:
    """The leases whose end the fit waits for at its instant (the ones that decide it)."""
    return [
        f"lease {r.lease}" for r in timeline.releases if r.at == fit.at and r.lease in fit.freed_by
    ]


# ------------------------------------------------------------------------------------------
# Remedies
# ------------------------------------------------------------------------------------------


def _remedies(
    state: FleetState,
    run: Run,
    res: Reservation,
    result: ForecastResult,
    *,
    timeline: Timeline,
    now: Instant,
) -> tuple[RemedyOption, ...]:
    """What the owner could change, each computed on the same timeline, best start first.

    Capacity remedies (shrink, drop spares, another flavor) only help a capacity wait; borrowing
    only helps when the budget is what the run waits for.  A remedy that would not start the run
    sooner than the forecast is not offered.
    """
    options: list[RemedyOption] = []
    if res.kind == "capacity":
        options.extend(_capacity_remedies(state, run, timeline, now))
    else:
        options.extend(_borrow_remedies(state, run, timeline, now))
    best = result.earliest_start
    kept = [o for o in options if o.start is not None and (best is None or o.start < best)]
    kept.sort(key=lambda o: (o.start if o.start is not None else 0, o.action, o.detail))
    return tuple(kept)


def _capacity_remedies(
    state: FleetState, run: Run, timeline: Timeline, now: Instant
) -> Iterable[RemedyOption]:
    m = run.spec.malleable
    total = run.spec.resources.total_gpus
    if m is not None and m.min_total_gpus < total:
        fit = earliest_fit(state, run.key, pack_request(run, width=m.min_total_gpus), timeline, now)
        yield RemedyOption(
            "shrink",
            f"shrink to {m.min_total_gpus} GPUs (spec.malleable.minTotalGPUs) from {total}",
            fit.at,
        )
    if run.spec.spares_per_group > 0:
        fit = earliest_fit(state, run.key, pack_request(run, spares=False), timeline, now)
        yield RemedyOption(
            "drop-spares",
            f"drop the {run.spec.spares_per_group} spare GPU(s) per group (sparesPerGroup: 0)",
            fit.at,
        )
    owner = state.index.family.owner_of(run.metadata.namespace)
    flavors = {n.flavor for n in state.nodes.values() if n.flavor and n.flavor != run.flavor}
    for flavor in sorted(flavors):
        if not any(e.admits_at(now) for e in state.index.of_owner(owner, flavor)):
            continue  # no budget of the owner could pay for it: not a real option
        other = _switch_flavor(run, flavor)
        try:
            timeline = build_timeline(state, flavor, run.key, now)
            fit = earliest_fit(state, run.key, pack_request(other), timeline, now)
        except ForecastError:
            continue  # that flavor's topology is broken; say nothing rather than guess
        yield RemedyOption(
            "flavor", f"switch to flavor {flavor} (an envelope of {owner} covers it)", fit.at
        )


def _switch_flavor(run: Run, flavor: str) -> Run:
    resources = msgspec.structs.replace(run.spec.resources, gpu_type=flavor)
    return msgspec.structs.replace(run, spec=msgspec.structs.replace(run.spec, resources=resources))


def _borrow_remedies(
    state: FleetState, run: Run, timeline: Timeline, now: Instant
) -> Iterable[RemedyOption]:
    """Sponsors with free headroom now that lend to the owner and the run does not use yet."""
    owner = state.index.family.owner_of(run.metadata.namespace)
    if not owner:
        return
    funding = run.spec.funding
    opted = set(funding.sponsors) if funding is not None and funding.allow_borrow else set()
    fit = earliest_fit(state, run.key, pack_request(run), timeline, now)
    if fit.at is None:
        return
    width = run.spec.resources.total_gpus
    usage = state.evaluation(now).envelopes
    lenders: dict[str, tuple[EnvelopeInfo, int]] = {}
    for key in sorted(state.index.envelopes):
        env = state.index.envelopes[key]
        if env.flavor != run.flavor or env.owner in (owner, *opted) or not env.lends_to(owner):
            continue
        if not env.admits_at(now):
            continue
        used = usage.get(key)
        headroom = used.headroom if used is not None else env.concurrency
        if env.lending_max is not None:
            lent = used.borrowed if used is not None else 0
            headroom = min(headroom, max(0, env.lending_max - lent))
        if headroom >= width and env.owner not in lenders:
            lenders[env.owner] = (env, headroom)
    for sponsor, (env, headroom) in sorted(lenders.items()):
        yield RemedyOption(
            "borrow",
            f"borrow from sponsor {sponsor} (envelope {env.key}, {headroom} GPUs free to lend): "
            "set spec.funding.allowBorrow and add the sponsor",
            _at_least(fit.at, now),
        )
