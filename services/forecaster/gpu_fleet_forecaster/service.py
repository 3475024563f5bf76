"""The forecaster actor: answers ``fleet.forecast.run`` from its own fold of the ledger.

Like the binder it folds the stream ``FLEET`` into a ``FleetState`` and answers a request only
once the asked-for sequence is folded (read-your-writes), so a client that just submitted a run
gets a forecast that knows about it.  The maths is the pure ``gpu_fleet.core.forecast``; this
module only decodes, waits, calls it at "now" and encodes.

"Now" is the wall clock in production.  With a manager on a virtual clock (scenarios, tests) the
wall clock means nothing, so ``clock="ledger"`` uses the ledger's latest event time instead.

It also judges its own forecasts: as it follows the ledger it keeps the forecast of each run at
the moment its wait began and, when the run starts, counts P50/P90 hits and the error
(``views.forecast_accuracy``; the metrics ``gpu_fleet_forecast_starts_total`` and
``gpu_fleet_forecast_error_seconds``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import structlog
from nats.micro.request import Request

from gpu_fleet.core.forecast import ForecastError, ForecastResult, forecast
from gpu_fleet.core.ledger import Event, FleetState
from gpu_fleet.core.model import Instant, run_key
from gpu_fleet.core.names import clamp, dns_label_problem
from gpu_fleet.messages import forecast as messages
from gpu_fleet.messages import subjects
from gpu_fleet.runtime import replies
from gpu_fleet.runtime.clock import WallClock
from gpu_fleet.runtime.follower_service import FollowerService, Handler
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.observe import DEFAULT_MAX_LAG
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet.views.forecast_accuracy import ForecastAccuracy
from gpu_fleet_forecaster import __version__

log = structlog.get_logger("gpu_fleet.forecaster")

GROUP, ENDPOINT = subjects.FORECAST_RUN.rsplit(".", 1)

ERROR_CODES = {"not_found": "404", "terminal": "409", "topology": "422"}
"""``ForecastError.kind`` -> the service error code in the reply headers."""


@dataclass
class ForecasterConfig:
    nats_url: str
    clock: Literal["wall", "ledger"] = "wall"
    wait_timeout: float = 4.0  # how long a request may wait for its ledger sequence
    limits: ApiLimits = field(default_factory=ApiLimits)
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: no HTTP server)
    ready_max_lag: int = DEFAULT_MAX_LAG
    ledger_keys: LedgerKeys | None = None  # verify (and, manager only, sign) ledger events


def build(
    nats_url: str,
    *,
    clock: Literal["wall", "ledger"] = "wall",
    ledger_keys: LedgerKeys | None = None,
) -> Forecaster:
    """The factory ``gpu_fleet.cli.stack`` uses to start the forecaster in-process."""
    return Forecaster(ForecasterConfig(nats_url=nats_url, clock=clock, ledger_keys=ledger_keys))


def to_message(result: ForecastResult, seq: int, at: Instant) -> messages.Forecast:
    return messages.Forecast(
        run=result.run,
        earliest_start=result.earliest_start,
        p50=result.p50,
        p90=result.p90,
        confidence=result.confidence,
        deficit_gpus=result.deficit_gpus,
        basis=result.basis,
        remedies=[
            messages.Remedy(action=r.action, detail=r.detail, start=r.start)
            for r in result.remedies
        ],
        seq=seq,
        at=at,
    )


class Forecaster(FollowerService):
    name = "forecaster"
    service_name = "gpu-fleet-forecaster"
    description = "gpu-fleet forecaster: earliest start, P50/P90 and remedies"
    version = __version__
    group = GROUP

    def __init__(self, config: ForecasterConfig) -> None:
        super().__init__(
            config.nats_url,
            metrics_port=config.metrics_port,
            ready_max_lag=config.ready_max_lag,
            ledger_keys=config.ledger_keys,
        )
        self.config = config
        self.wall = WallClock()
        self.answered = 0
        self.accuracy = ForecastAccuracy()

    def on_ledger_event(self, seq: int, event: Event, state: FleetState, index: int) -> None:
        """Count the forecasts' accuracy as runs start (``views.forecast_accuracy``)."""
        self.accuracy.live = self.live
        self.observer.record(self.accuracy.on_event(event, state))

    def endpoints(self) -> Mapping[str, Handler]:
        return {ENDPOINT: self.run_forecast}

    def _budget(self) -> int:
        max_payload = self.nc.max_payload if self.nc is not None else 1024 * 1024
        return replies.reply_budget(max_payload, self.config.limits)

    def _problem(self, data: bytes) -> str | None:
        """Why a request body is refused (size, shape, names), or None; never echoes it."""
        limit = self.config.limits.max_request_bytes
        if len(data) > limit:
            return f"request is {len(data)} bytes; the limit is {limit}"
        try:
            request = messages.REQUEST_DECODER.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return clamp(str(exc), 200)
        for path, value in (("namespace", request.namespace), ("name", request.name)):
            problem = dns_label_problem(value)
            if problem is not None:
                return f"{path}: {problem}"
        return None

    def now(self, state: FleetState) -> Instant:
        """The forecast instant: never before the ledger's own clock (time comes from events)."""
        if self.config.clock == "ledger":
            return state.clock
        return max(self.wall.now(), state.clock)

    async def run_forecast(self, req: Request) -> None:
        started = time.perf_counter()
        outcome = await self._answer(req, started)
        self.observer.inc("gpu_fleet_forecasts_total", outcome)
        self.observer.observe("gpu_fleet_forecast_duration_seconds", time.perf_counter() - started)

    async def _answer(self, req: Request, started: float) -> str:
        """Answer one request; return its outcome (the metric's label)."""
        problem = self._problem(req.data)
        if problem is not None:
            await replies.respond_text_error(req, "400", f"invalid forecast request: {problem}")
            log.info("forecaster.forecast", outcome="bad_request", error=clamp(problem, 200))
            return "bad_request"
        request = messages.REQUEST_DECODER.decode(req.data)
        key = run_key(request.namespace, request.name)
        follower = self.follower
        assert follower is not None
        if not await follower.wait_for(request.seq, self.config.wait_timeout):
            await replies.respond_text_error(
                req, "503", f"ledger sequence {request.seq} not folded yet (at {follower.seq})"
            )
            log.info("forecaster.forecast", run=key, seq=request.seq, outcome="not_folded")
            return "not_folded"
        # No await from reading the state to the computed result: the fold cannot interleave.
        state = follower.state
        seq = follower.seq
        now = self.now(state)
        try:
            result = forecast(state, key, now)
        except ForecastError as exc:
            await replies.respond_text_error(req, ERROR_CODES[exc.kind], exc.message)
            log.info("forecaster.forecast", run=key, seq=seq, outcome=exc.kind, error=exc.message)
            return exc.kind
        except Exception:  # a bug: answer with a code and a safe text, keep the details here
            log.exception("forecaster.forecast", run=key, seq=seq, outcome="internal")
            await replies.respond_text_error(req, "500", "internal error; see the forecaster log")
            return "internal"
        body = messages.ENCODER.encode(to_message(result, seq, now))
        if not await replies.respond(req, body, self._budget()):
            return "reply_too_large"
        self.answered += 1
        log.info(
            "forecaster.forecast",
            run=key,
            seq=seq,
            outcome="ok",
            confidence=result.confidence,
            earliest_start=result.earliest_start,
            remedies=len(result.remedies),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return "ok"
