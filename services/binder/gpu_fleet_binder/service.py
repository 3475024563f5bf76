"""The binder actor: answers ``fleet.binder.place`` at a ledger sequence with CP-SAT.

Its topology index (nodes, domains, health) and active-slot index are folded from the ledger
stream, so a placement is always computed against exactly the state the manager decided on.
Requests wait until the asked-for sequence is folded (read-your-writes); a request for a
sequence the binder cannot reach in time is answered with an error, never with a stale plan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
import structlog
from nats.micro.request import Request

from gpu_fleet.core.placement import (
    PackError,
    PlannerSettings,
    TopologyError,
    plan_placement,
)
from gpu_fleet.messages import placement
from gpu_fleet.runtime import replies
from gpu_fleet.runtime.follower_service import FollowerService, Handler
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.observe import DEFAULT_MAX_LAG
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet_binder import __version__

log = structlog.get_logger("gpu_fleet.binder")


@dataclass
class BinderConfig:
    nats_url: str
    wait_timeout: float = 4.0
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    limits: ApiLimits = field(default_factory=ApiLimits)
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: no HTTP server)
    ready_max_lag: int = DEFAULT_MAX_LAG
    ledger_keys: LedgerKeys | None = None  # verify (and, manager only, sign) ledger events


class Binder(FollowerService):
    name = "binder"
    service_name = "gpu-fleet-binder"
    description = "gpu-fleet binder: topology index and CP-SAT placement"
    version = __version__
    group = "fleet.binder"
    metered = False  # placements read nodes and open leases, never funding

    def __init__(self, config: BinderConfig) -> None:
        super().__init__(
            config.nats_url,
            metrics_port=config.metrics_port,
            ready_max_lag=config.ready_max_lag,
            ledger_keys=config.ledger_keys,
        )
        self.config = config
        self.placed = 0

    def endpoints(self) -> Mapping[str, Handler]:
        return {"place": self.place}

    async def place(self, req: Request) -> None:
        started = time.perf_counter()
        limit = self.config.limits.max_request_bytes
        if len(req.data) > limit:
            message = f"invalid place request: {len(req.data)} bytes; the limit is {limit}"
            await replies.respond_text_error(req, "413", message)
            return
        try:
            request = placement.REQUEST_DECODER.decode(req.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            await replies.respond_text_error(req, "400", f"invalid place request: {exc}")
            return
        follower = self.follower
        assert follower is not None
        if not await follower.wait_for(request.seq, self.config.wait_timeout):
            await replies.respond_text_error(
                req, "503", f"ledger sequence {request.seq} not folded yet (at {follower.seq})"
            )
            self.observer.inc("gpu_fleet_placements_total", "not_folded")
            log.warning("binder.place", seq=request.seq, at=follower.seq, outcome="not_folded")
            return
        state = follower.state
        reply: placement.PlaceReply
        try:
            topology = state.topology(request.request.flavor)
            plan = plan_placement(topology, request.request, self.config.planner)
            reply = placement.PlaceReply(seq=follower.seq, plan=plan)
        except PackError as exc:
            reply = placement.PlaceReply(
                seq=follower.seq,
                error=placement.PlaceError(
                    kind=exc.kind.value, message=exc.message, shortfall=exc.shortfall
                ),
            )
        except TopologyError as exc:
            await replies.respond_text_error(req, "422", str(exc))
            return
        seconds = time.perf_counter() - started
        ms = seconds * 1000
        reply = msgspec.structs.replace(reply, solver_ms=round(ms, 3))
        max_payload = self.nc.max_payload if self.nc is not None else 1024 * 1024
        budget = replies.reply_budget(max_payload, self.config.limits)
        if not await replies.respond(req, placement.ENCODER.encode(reply), budget):
            return
        self.placed += 1
        solver = reply.plan.solver if reply.plan is not None else "error"
        self.observer.inc("gpu_fleet_placements_total", solver)
        self.observer.observe("gpu_fleet_placement_duration_seconds", seconds, solver)
        log.info(
            "binder.place",
            seq=request.seq,
            flavor=request.request.flavor,
            gpus=request.request.total_gpus,
            outcome="plan" if reply.plan is not None else "error",
            solver=solver,
            ms=round(ms, 2),
        )
