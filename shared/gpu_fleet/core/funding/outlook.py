"""The funding outlook: which funded leases will demote, when, and why, if nothing else happens.

DESIGN decision 2 says funding expires too: when an envelope window ends, or its GPU-hours run
out at the current burn, the leases it pays for demote at a predictable instant, and the team is
warned ahead of it.  The prediction walks the same meter the ledger folds (a copy of it), piece
by piece, exactly as ``metering.advance_meter`` does - split at window bounds, lease ends and the
instants remaining hours cross a hysteresis threshold - and reports the first instant at which
each lease funded *now* is no longer funded.  "The current burn" is the open leases as they
stand: a lease minted or closed later changes the burn, and the caller simply asks again (the
answer is a pure function of the folded state and the instant).

A lease whose own scheduled end comes first is not a demotion (it expires; that is its own
warning).  A lease that moves to another envelope with room stays funded and is not reported:
payers are derived at each instant (DESIGN decision 9), so only a lease that ends up with no
payer demotes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gpu_fleet.core.funding.fill_result import FillResult
from gpu_fleet.core.funding.matching import fill
from gpu_fleet.core.funding.metering import (
    _MIN_STEP,
    FundingInputs,
    Meter,
    _accrue,
    _boundaries,
    _crossing_seconds,
    advance_meter,
)
from gpu_fleet.core.model import EnvelopeKey, Instant

DemotionCause = Literal["window", "gpu-hours", "displaced"]


@dataclass(frozen=True)
class Demotion:
    """A funded lease that will have no payer from ``at`` on (predicted at the current burn).

    ``payer`` is the envelope paying now; ``remaining_hours`` and ``burn_gpus`` describe that
    envelope at the instant of the prediction (hours left, GPUs it pays for), and
    ``exhausted_at`` is when those hours reach zero at that burn - the top claim spends the
    envelope to zero, lower-ranked ones demote earlier (DESIGN decision 1's hysteresis).
    """

    lease: str
    payer: EnvelopeKey
    at: Instant
    cause: DemotionCause
    remaining_hours: float | None = None
    burn_gpus: int = 0
    exhausted_at: Instant | None = None


def demotions(meter: Meter, inputs: FundingInputs, now: float, horizon: float) -> list[Demotion]:
    """Leases funded at ``now`` that will be unfunded at some instant in ``(now, horizon]``.

    Sorted by instant, then lease id.  ``meter`` is not changed (the walk uses a copy).
    """
    if not _can_demote(inputs, now, horizon):
        return []
    m = meter.copy()
    if now > m.t:
        advance_meter(m, inputs, now)
    index = inputs.index
    view = m.hours_view(index, inputs.period_hours)
    first = fill(index, inputs.leases, inputs.runs, inputs.admitted, inputs.node_labels, now, view)
    funded = {lid: env for lid, env in first.payer.items() if env is not None}
    if not funded:
        return []
    ends = {x.id: x.effective_end() for x in inputs.leases}
    context = _context(first, view.remaining_envelope, now)
    bounds = _boundaries(inputs, now)
    out: list[Demotion] = []
    t = float(now)
    f = first
    while funded and t < horizon:
        pos = bisect.bisect_right(bounds, t)
        nxt = min(horizon, bounds[pos]) if pos < len(bounds) else float(horizon)
        if view.remaining_envelope or view.remaining_cap:
            crossing = _crossing_seconds(inputs, f, view)
            if crossing is not None and t + crossing < nxt:
                nxt = max(t + crossing, t + _MIN_STEP)
        _accrue(m, inputs, f, t, nxt)
        m.previously_funded = f.funded_pairs()
        m.t = nxt
        t = nxt
        view = m.hours_view(index, inputs.period_hours)
        f = fill(index, inputs.leases, inputs.runs, inputs.admitted, inputs.node_labels, t, view)
        for lid in sorted(funded):
            end = ends.get(lid)
            if end is not None and end <= t:
                del funded[lid]  # it ends first: an expiry, not a demotion
                continue
            if f.payer.get(lid) is not None:
                continue
            payer = funded.pop(lid)
            remaining, burn, exhausted = context.get(payer, (None, 0, None))
            out.append(
                Demotion(
                    lease=lid,
                    payer=payer,
                    at=math.ceil(t - _MIN_STEP),  # float crossings land a hair late
                    cause=_cause(inputs, payer, t),
                    remaining_hours=remaining,
                    burn_gpus=burn,
                    exhausted_at=exhausted,
                )
            )
    return sorted(out, key=lambda d: (d.at, d.lease))


def _context(
    f: FillResult, left: Mapping[EnvelopeKey, float], now: float
) -> dict[EnvelopeKey, tuple[float | None, int, Instant | None]]:
    """Per paying envelope: hours left, GPUs it pays for, and when the hours hit zero."""
    out: dict[EnvelopeKey, tuple[float | None, int, Instant | None]] = {}
    for env in sorted({e for e in f.payer.values() if e is not None}):
        burn = f.funded_width(env)
        hours = left.get(env)
        exhausted = None
        if hours is not None and burn > 0:
            exhausted = math.ceil(now + max(0.0, hours) / burn * 3600.0)
        out[env] = (hours, burn, exhausted)
    return out


def _can_demote(inputs: FundingInputs, now: float, horizon: float) -> bool:
    """Can anyone lose funding in ``(now, horizon]`` at all?  Only a window that ends or hours
    that run out take funding away: a lease ending or a window opening only adds room, and in
    the deferred-acceptance matching more room (or fewer rivals) never leaves a claim worse off.
    So without either the walk is skipped - the common case of a fleet with plain concurrency
    envelopes and long windows costs nothing."""
    index = inputs.index
    if any(c.gpu_hours is not None for c in index.caps.values()):
        return True
    return any(
        e.gpu_hours is not None or (e.end is not None and now < e.end <= horizon)
        for e in index.envelopes.values()
    )


def _cause(inputs: FundingInputs, payer: EnvelopeKey, t: float) -> DemotionCause:
    info = inputs.index.envelopes.get(payer)
    if info is None:
        return "displaced"
    if info.end is not None and info.end <= t:
        return "window"
    if info.gpu_hours is not None or any(
        inputs.index.caps[c].gpu_hours is not None for c in info.caps
    ):
        return "gpu-hours"
    return "displaced"
