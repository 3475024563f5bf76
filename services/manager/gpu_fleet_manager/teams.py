"""The team API: ``fleet.api.team.<team>.<endpoint>``, authorized by the caller's identity.

A team's NATS user may publish only on its own prefix (``runtime.permissions``), so the subject
a request arrives on *is* the caller's identity: the manager takes the team from it, never from
the payload.  A team's namespaces are those holding a Budget whose owner is the team (the
owner as a subject token, ``subjects.team_token``: ``org:ai:rai`` -> ``org_ai_rai``); Budgets
are granted by the operators, so a team cannot claim a namespace by applying one.

What a team may do (docs/security.md):

* apply Runs and NotificationChannels, delete, shrink, sponsor, complete, fail or report an ETA
  - only in its own namespaces; never Budgets, nodes or the clock;
* read details (get, explain, leases, runs in a list or a report) of its own runs only;
* read fleet-wide aggregates: budgets, the report's and fleet map's totals, ``seq``, the clock.
  Other teams' run names in a report or the fleet map are replaced by ``HIDDEN``.

Each refusal is a ``forbidden`` (403) error naming the field and the reason; nothing runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gpu_fleet import views
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.manifests import ManifestError, parse_manifests
from gpu_fleet.core.model import Budget, Instant
from gpu_fleet.messages import api
from gpu_fleet.messages.subjects import team_token
from gpu_fleet.views import build_report
from gpu_fleet_manager.boundary import ApiError

if TYPE_CHECKING:
    from gpu_fleet_manager.endpoints import Endpoints
    from gpu_fleet_manager.service import Manager

TEAM_PREFIX = "fleet.api.team"
HIDDEN = "(another team)"
TeamHandler = Callable[[str, bytes], Awaitable[Any]]
NAMED = frozenset({"run", "lease", "id", "key"})
"""Fields whose ``<namespace>/...`` value names a run or its lease (``ns/run@start#n``)."""


def team_of(subject: str) -> str:
    """``fleet.api.team.<team>.<endpoint>`` -> ``<team>`` (the subscription fixes the shape)."""
    return subject.split(".")[3]


def namespaces_of(state: FleetState, team: str) -> set[str]:
    """The namespaces holding a Budget owned by ``team``."""
    return {
        b.metadata.namespace for b in state.budgets.values() if team_token(b.spec.owner) == team
    }


def forbidden(path: str, message: str) -> ApiError:
    return ApiError("forbidden", message, [api.FieldErrorOut(path, message)], status="403")


def _namespace_of(run_key: str) -> str:
    return run_key.split("/", 1)[0]


def redact(value: Any, own: set[str]) -> Any:
    """Hide other teams' runs in a view: a run or lease name (``NAMED`` fields) becomes
    ``HIDDEN``, ``runs`` lists keep the team's own entries; counts and totals stay."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in NAMED and isinstance(v, str) and "/" in v and _namespace_of(v) not in own:
                out[k] = HIDDEN
            elif k == "runs" and isinstance(v, list):
                out[k] = [redact(x, own) for x in v if _visible(x, own)]
            else:
                out[k] = redact(v, own)
        return out
    if isinstance(value, list):
        return [redact(x, own) for x in value]
    return value


def _visible(item: Any, own: set[str]) -> bool:
    if isinstance(item, str):
        return _namespace_of(item) in own
    if isinstance(item, dict):
        if isinstance(item.get("namespace"), str):
            return item["namespace"] in own
        if isinstance(item.get("run"), str):
            return _namespace_of(item["run"]) in own
    return True


class TeamEndpoints:
    """The team's view of ``Endpoints``: check the caller's namespaces, then delegate."""

    def __init__(self, manager: Manager, endpoints: Endpoints) -> None:
        self.manager = manager
        self.endpoints = endpoints

    def table(self) -> dict[str, TeamHandler]:
        e = self.endpoints
        in_namespace = {
            "delete": (e.delete, api.DeleteRequest),
            "shrink": (e.shrink, api.ShrinkRequest),
            "sponsors": (e.sponsors, api.SponsorsRequest),
            "complete": (e.complete, api.RunRef),
            "eta": (e.eta, api.EtaRequest),
            "fail": (e.fail, api.RunRef),
            "get": (e.get, api.RunRef),
            "explain": (e.explain, api.RunRef),
        }
        table: dict[str, TeamHandler] = {
            name: self._scoped(handler, typ) for name, (handler, typ) in in_namespace.items()
        }
        table.update(
            {
                "apply": self.apply,
                "list": self.list_runs,
                "leases": self.leases,
                "budgets": lambda _team, data: e.budgets(data),
                "report": self.report,
                "fleetmap": self.fleetmap,
                "clock": self.clock,
                "seq": lambda _team, data: e.seq(data),
                "node": self.node,
            }
        )
        return table

    async def own(self, team: str) -> set[str]:
        return await self.manager.read(
            lambda _: namespaces_of(self.manager.require_fleet().state, team)
        )

    async def check(self, team: str, namespace: str, what: str) -> None:
        if namespace not in await self.own(team):
            raise forbidden("namespace", f"{what}: namespace {namespace} is not team {team}'s")

    def _scoped(self, handler: Callable[[bytes], Awaitable[Any]], typ: Any) -> TeamHandler:
        async def handle(team: str, data: bytes) -> Any:
            req = self.manager.decode(data, typ)
            if getattr(req, "kind", None) == "Budget":
                raise forbidden("kind", "a team may not delete Budgets; the operators grant them")
            await self.check(team, req.namespace, f"{typ.__name__} {req.namespace}/{req.name}")
            return await handler(data)

        return handle

    async def apply(self, team: str, data: bytes) -> Any:
        req = self.manager.decode(data, api.ApplyRequest)
        try:
            manifests = parse_manifests(req.documents, source=req.source)
        except ManifestError:
            return await self.endpoints.apply(data)  # its validation errors, as for anyone
        own = await self.own(team)
        for m in manifests:
            what = f"{type(m).__name__} {m.key}"
            if isinstance(m, Budget):
                raise forbidden(
                    "documents", f"{what}: a team may not apply Budgets; the operators grant them"
                )
            if m.metadata.namespace not in own:
                raise forbidden(
                    "documents", f"{what}: namespace {m.metadata.namespace} is not team {team}'s"
                )
        return await self.endpoints.apply(data)

    async def list_runs(self, team: str, data: bytes) -> Any:
        req = self.manager.decode(data, api.ListRequest)
        if req.namespace is not None:
            await self.check(team, req.namespace, f"runs in {req.namespace}")
            return await self.endpoints.list_runs(data)
        own = await self.own(team)
        runs = await self.manager.read(
            lambda now: views.list_runs(self.manager.require_fleet().state, now, None)
        )
        mine = [r for r in runs if r["namespace"] in own]
        return self.manager.page("runs", mine, _object_key, req.limit, req.continue_)

    async def leases(self, team: str, data: bytes) -> Any:
        req = self.manager.decode(data, api.LeasesRequest)
        if req.namespace is not None:
            await self.check(team, req.namespace, f"leases in {req.namespace}")
            return await self.endpoints.leases(data)
        if req.name is not None:
            raise forbidden("namespace", "name a namespace with the run")
        own = await self.own(team)
        leases = await self.manager.read(
            lambda now: views.leases(self.manager.require_fleet().state, now, None, None)
        )
        mine = [x for x in leases if _namespace_of(x["run"]) in own]
        return self.manager.page("leases", mine, _lease_key, req.limit, req.continue_)

    async def report(self, team: str, data: bytes) -> Any:
        req = self.manager.decode(data, api.ReportRequest)

        def build(now: Instant) -> tuple[dict[str, Any], set[str]]:
            state = self.manager.require_fleet().state
            return build_report(state, req.label, now), namespaces_of(state, team)

        report, own = await self.manager.read(build)
        return redact(report, own)

    async def fleetmap(self, team: str, data: bytes) -> Any:
        result = await self.endpoints.fleetmap(data)
        return redact(result, await self.own(team))

    async def clock(self, team: str, data: bytes) -> Any:
        req = self.manager.decode(data, api.ClockRequest)
        if req.advance_to is not None:
            raise forbidden("advance_to", "a team may not move the clock")
        return await self.endpoints.clock_endpoint(data)

    async def node(self, team: str, data: bytes) -> Any:
        del data
        raise forbidden("op", f"team {team} may not change nodes; the operators do")


def _object_key(item: dict[str, Any]) -> tuple[str, ...]:
    return (f"{item['namespace']}/{item['name']}",)


def _lease_key(item: dict[str, Any]) -> tuple[str, ...]:
    return (str(item["start"]), str(item["id"]))
