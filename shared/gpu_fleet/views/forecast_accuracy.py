"""How good were the forecasts: P50 and P90 hit rates and the error at start, as metrics.

A forecast is a promise about the future, so its accuracy is known only when the run starts.
The forecaster keeps, for every run that begins to wait while it is following the ledger, the
forecast it would have answered *when the wait began* (the first pending reservation: what a
user sees first, and what the queue is judged by).  When the run's gang is bound it counts:

* ``gpu_fleet_forecast_starts_total{quantile, hit}`` - for ``p50`` and ``p90``, whether the run
  started by that forecast (``hit="true"``).  A calibrated forecaster hits its P50 about half the
  time and its P90 about nine times in ten; far more means it is pessimistic, far less optimistic.
  A quantile the forecast did not estimate (an unknown P50) is not counted.
* ``gpu_fleet_forecast_error_seconds{quantile}`` - how far the start was from that forecast,
  either way (absolute seconds of ledger time).

Only waits that begin while the service follows live count (``live`` is set after the catch-up):
replaying history on a restart would recount what the previous process already counted, and
Prometheus counters are per process.  A run deleted or ended before it starts is forgotten.
Pure: fed ledger events with the fold after each, returns ``Increment``s; no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_fleet.core.engine.gang import TERMINAL
from gpu_fleet.core.forecast import ForecastError, forecast
from gpu_fleet.core.ledger import (
    Event,
    FleetState,
    ReservationCreated,
    RunDeleted,
    RunStatusChanged,
)
from gpu_fleet.core.model import Instant
from gpu_fleet.views.metrics import Increment

QUANTILES = ("p50", "p90")


@dataclass
class ForecastAccuracy:
    live: bool = False
    pending: dict[str, tuple[Instant | None, Instant | None]] = field(default_factory=dict)
    """Run key -> the (P50, P90) forecast when its wait began."""

    def on_event(self, event: Event, state: FleetState) -> list[Increment]:
        """Feed one folded event (``state`` already includes it); the metrics it settles."""
        match event:
            case ReservationCreated(reservation=r):
                if self.live and r.run not in self.pending:
                    try:
                        result = forecast(state, r.run, r.created_at, remedies=False)
                    except ForecastError:
                        return []
                    self.pending[r.run] = (result.p50, result.p90)
            case RunStatusChanged(run=run, reason="GangBound", at=at):
                promised = self.pending.pop(run, None)
                if promised is not None:
                    return list(_settle(promised, at))
            case RunStatusChanged(run=run, phase=phase) if phase in TERMINAL:
                self.pending.pop(run, None)
            case RunDeleted(run=run):
                self.pending.pop(run, None)
            case _:
                pass
        return []


def _settle(promised: tuple[Instant | None, Instant | None], started: Instant) -> list[Increment]:
    out = []
    for quantile, at in zip(QUANTILES, promised, strict=True):
        if at is None:
            continue
        hit = "true" if started <= at else "false"
        out.append(Increment("gpu_fleet_forecast_starts_total", (quantile, hit)))
        out.append(
            Increment("gpu_fleet_forecast_error_seconds", (quantile,), float(abs(started - at)))
        )
    return out
