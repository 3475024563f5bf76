"""The manager's fleet API: one handler per ``fleet.api.*`` endpoint.

Each handler decodes its request at the boundary (``Manager.decode``: size, shape and names
checked before anything runs), then either runs a command through ``Manager.mutate`` (under the
single writer's lock, appended to the ledger as one atomic batch) or a read through
``Manager.read``.  The handlers hold no state of their own: the manager owns the fleet, the
lock, the clock and the ledger, so this module is only the API's vocabulary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from gpu_fleet import views
from gpu_fleet.core.engine import CommandError
from gpu_fleet.core.funding.cycles import parent_cycle
from gpu_fleet.core.manifests import ManifestError, parse_manifests, validate_node
from gpu_fleet.core.model import (
    Budget,
    Funding,
    Instant,
    NodeHealth,
    NotificationChannel,
    Run,
    run_key,
)
from gpu_fleet.core.names import clamp
from gpu_fleet.core.timeutil import format_instant, parse_instant
from gpu_fleet.messages import api
from gpu_fleet.runtime import paging
from gpu_fleet.runtime.clock import VirtualClock
from gpu_fleet.views import build_report
from gpu_fleet_manager.boundary import (
    ApiError,
    FieldRefusedError,
    object_too_large,
)
from gpu_fleet_manager.quotas import check_namespace_room

if TYPE_CHECKING:
    from gpu_fleet_manager.service import Manager
    from gpu_fleet_manager.writer import LedgerFleet

SMALL_APPLY = 4
"""Run documents an apply may hold and still be a small command (``group.run_inline``)."""


class Endpoints:
    """The request handlers, bound to the manager that runs them."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager

    def _fleet(self) -> LedgerFleet:
        return self.manager.require_fleet()

    def table(self) -> dict[str, Callable[[bytes], Awaitable[Any]]]:
        return {
            "apply": self.apply,
            "delete": self.delete,
            "shrink": self.shrink,
            "sponsors": self.sponsors,
            "complete": self.complete,
            "eta": self.eta,
            "fail": self.fail,
            "retry": self.retry,
            "node": self.node,
            "get": self.get,
            "list": self.list_runs,
            "explain": self.explain,
            "leases": self.leases,
            "budgets": self.budgets,
            "clock": self.clock_endpoint,
            "report": self.report,
            "fleetmap": self.fleetmap,
            "seq": self.seq,
        }

    async def apply(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ApplyRequest)
        try:
            manifests = parse_manifests(req.documents, source=req.source)
        except ManifestError as exc:
            raise ApiError(
                "validation",
                f"{len(exc.errors)} validation error(s)",
                [api.FieldErrorOut(e.path, e.message) for e in exc.errors],
            ) from exc
        if not manifests:
            raise ApiError(
                "validation",
                "nothing to apply",
                [api.FieldErrorOut("documents", "must hold at least one Budget or Run")],
            )
        oversized = [
            error
            for m in manifests
            if (
                error := object_too_large(
                    len(msgspec.json.encode(m)),
                    self.manager.config.limits,
                    f"{type(m).__name__} {m.key}",
                    "documents",
                )
            )
        ]
        if oversized:
            raise ApiError("validation", f"{len(oversized)} validation error(s)", oversized)
        budgets = [m for m in manifests if isinstance(m, Budget)]

        def run(now: Instant) -> list[dict[str, str]]:
            fleet = self._fleet()
            # Checked against the whole apply before anything is committed, so a refused
            # cycle leaves every other object of the request unapplied too.
            cycle = parent_cycle(fleet.state.budgets.values(), budgets) if budgets else None
            if cycle is not None:
                budget, path = cycle
                message = f"Budget {budget.key}: parents form a cycle: {path}"
                raise ApiError(
                    "validation",
                    "1 validation error(s)",
                    [api.FieldErrorOut("spec.parents", message)],
                )
            limit = self.manager.config.limits.max_objects_per_namespace
            check_namespace_room(fleet.state, manifests, limit)
            out = []
            for m in manifests:
                if isinstance(m, Run):
                    existed = m.key in fleet.state.runs
                elif isinstance(m, NotificationChannel):
                    existed = m.key in fleet.state.channels
                else:
                    existed = m.key in fleet.state.budgets
                fleet.apply(m, now)
                out.append(
                    {
                        "kind": type(m).__name__,
                        "namespace": m.metadata.namespace,
                        "name": m.metadata.name,
                        "action": "updated" if existed else "created",
                    }
                )
            return out

        # A few runs: decided quickly, a few events each - may be decided on the event loop.
        small = not budgets and len(manifests) <= SMALL_APPLY
        return await self.manager.mutate(run, small=small)

    async def delete(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.DeleteRequest)
        await self.manager.mutate(
            lambda now: self._fleet().delete(req.kind, req.namespace, req.name, now)
        )
        return {"deleted": f"{req.kind} {req.namespace}/{req.name}"}

    async def shrink(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ShrinkRequest)
        key = run_key(req.namespace, req.name)

        def run(now: Instant) -> dict[str, Any]:
            fleet = self._fleet()
            r = fleet.require_run(key)
            if req.desired is not None:
                desired = req.desired
            elif req.by is not None and req.by > 0:
                desired = r.desired_width - req.by
            else:
                raise FieldRefusedError("by", "--by must be > 0")
            # The engine checks the rest, with the words the in-process runner reports too.
            try:
                fleet.shrink(key, desired, now)
            except CommandError as exc:
                if exc.code == "not_found":
                    raise
                # Not malleable is about the run itself; anything else about the width asked.
                width = "desired" if req.desired is not None else "by"
                field = "name" if r.spec.malleable is None else width
                raise FieldRefusedError(field, str(exc), exc.code) from exc
            return {"run": key, "desiredGPUs": desired}

        return await self.manager.mutate(run)

    async def sponsors(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.SponsorsRequest)
        key = run_key(req.namespace, req.name)

        def run(now: Instant) -> dict[str, Any]:
            fleet = self._fleet()
            r = fleet.require_run(key)
            funding = r.spec.funding
            current = list(funding.sponsors) if funding else []
            if req.op == "list":
                return {
                    "sponsors": sorted(current),
                    "allowBorrow": bool(funding and funding.allow_borrow),
                }
            if not req.sponsor:
                raise FieldRefusedError("sponsor", "sponsor is required")
            if funding is not None and not funding.allow_borrow and req.op == "add":
                raise FieldRefusedError(
                    "op", "run does not allow borrowing; edit spec to enable it"
                )
            if req.op == "add":
                if req.sponsor not in current:
                    current.append(req.sponsor)
            elif req.sponsor in current:
                current.remove(req.sponsor)
            else:
                raise FieldRefusedError("sponsor", f"sponsor {req.sponsor} not found on run {key}")
            new_funding = msgspec.structs.replace(
                funding or Funding(allow_borrow=True),
                sponsors=tuple(current),
                max_borrow_gpus=(
                    req.max_borrow
                    if req.max_borrow
                    else (funding.max_borrow_gpus if funding else None)
                ),
            )
            updated = msgspec.structs.replace(
                r, spec=msgspec.structs.replace(r.spec, funding=new_funding)
            )
            fleet.apply(updated, now)
            return {"sponsors": sorted(current), "allowBorrow": new_funding.allow_borrow}

        return await self.manager.mutate(run)

    async def complete(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.RunRef)
        key = run_key(req.namespace, req.name)
        await self.manager.mutate(lambda now: self._fleet().complete(key, now))
        return {"run": key, "phase": "Completed"}

    async def eta(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.EtaRequest)
        key = run_key(req.namespace, req.name)
        try:
            when = req.eta if isinstance(req.eta, int) else parse_instant(req.eta)
        except ValueError as exc:
            raise ApiError(
                "validation", "invalid eta", [api.FieldErrorOut("eta", clamp(str(exc), 200))]
            ) from exc
        await self.manager.mutate(lambda now: self._fleet().report_eta(key, when, now))
        return {"run": key, "eta": format_instant(when)}

    async def fail(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.RunRef)
        key = run_key(req.namespace, req.name)
        await self.manager.mutate(lambda now: self._fleet().fail(key, now))
        return {"run": key, "phase": "Failed"}

    async def retry(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.RetryRequest)
        key = run_key(req.namespace, req.name)
        await self.manager.mutate(lambda now: self._fleet().retry(key, now, req.attempt, req.pod))
        st = self._fleet().state
        r = st.retries.get(key)
        return {
            "run": key,
            "phase": st.status[key].phase if key in st.status else "",
            "failedAttempts": r.attempt if r is not None else 0,
            "retryAfter": format_instant(r.retry_after) if r is not None else None,
        }

    async def node(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.NodeRequest)
        if req.op == "register":
            try:
                node = validate_node(req.node, "node")
            except ManifestError as exc:
                raise ApiError(
                    "validation",
                    "invalid node",
                    [api.FieldErrorOut(e.path, e.message) for e in exc.errors],
                ) from exc
            size = len(msgspec.json.encode(node))
            too_large = object_too_large(
                size, self.manager.config.limits, f"node {node.name}", "node"
            )
            if too_large is not None:
                raise ApiError("validation", "invalid node", [too_large])

            def reg(now: Instant) -> dict[str, Any]:
                fleet = self._fleet()
                fleet.register_node(node, now)
                fleet.reconcile(now)
                return {"registered": node.name}

            return await self.manager.mutate(reg)
        health = {
            "cordon": NodeHealth.CORDONED,
            "fence": NodeHealth.FENCED,
            "uncordon": NodeHealth.READY,
        }[req.op]
        await self.manager.mutate(lambda now: self._fleet().set_node_health(req.name, health, now))
        return {"node": req.name, "health": health.value}

    async def get(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.RunRef)
        return await self.manager.read(
            lambda now: views.run_view(self._fleet().state, run_key(req.namespace, req.name), now)
        )

    async def list_runs(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ListRequest)
        runs = await self.manager.read(
            lambda now: views.list_runs(self._fleet().state, now, req.namespace)
        )
        return self.manager.page("runs", runs, _object_key, req.limit, req.continue_)

    async def explain(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.RunRef)
        rows = await self.manager.read(
            lambda now: views.explain(self._fleet().state, run_key(req.namespace, req.name), now)
        )
        return [{"field": f, "value": v} for f, v in rows]

    async def leases(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.LeasesRequest)
        leases = await self.manager.read(
            lambda now: views.leases(self._fleet().state, now, req.namespace, req.name)
        )
        return self.manager.page("leases", leases, _lease_key, req.limit, req.continue_)

    async def budgets(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ListRequest)
        budgets = await self.manager.read(
            lambda now: views.budgets(self._fleet().state, now, req.namespace)
        )
        return self.manager.page("budgets", budgets, _object_key, req.limit, req.continue_)

    async def clock_endpoint(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ClockRequest)
        if req.advance_to is not None:
            clock = self.manager.clock
            if not isinstance(clock, VirtualClock):
                message = "the clock is the wall clock; start with --clock virtual"
                raise ApiError("bad_request", message, [api.FieldErrorOut("advance_to", message)])
            target = req.advance_to
            if target < clock.now():
                message = f"cannot move the clock back to {format_instant(target)}"
                raise ApiError("bad_request", message, [api.FieldErrorOut("advance_to", message)])

            def advance(_: Instant) -> None:
                clock.set(target)
                self._fleet().advance_to(target)

            await self.manager.mutate(advance)
        now = self.manager.clock.now()
        return {"now": now, "iso": format_instant(now), "virtual": self.manager.clock.virtual}

    async def report(self, data: bytes) -> Any:
        req = self.manager.decode(data, api.ReportRequest)
        return await self.manager.read(
            lambda now: build_report(self._fleet().state, req.label, now)
        )

    async def fleetmap(self, data: bytes) -> Any:
        self.manager.decode(data or b"{}", api.FleetMapRequest)
        return await self.manager.read(lambda now: views.fleet_map(self._fleet().state, now))

    async def seq(self, data: bytes) -> Any:
        del data
        return await self.manager.read(lambda _: {"seq": self._fleet().seq})


def _object_key(item: dict[str, Any]) -> paging.Key:
    """Runs and budgets page in ``namespace/name`` order, the order the views list them in."""
    return (f"{item['namespace']}/{item['name']}",)


def _lease_key(item: dict[str, Any]) -> paging.Key:
    """Leases page in (start, id) order, the order the views list them in."""
    return (str(item["start"]), str(item["id"]))
