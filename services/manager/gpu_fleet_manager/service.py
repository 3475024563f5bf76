"""The manager actor: fleet API over NATS request/reply, serialized admission, ledger writes.

Every mutating request runs under one lock in a worker thread (the core is synchronous); each
decision is appended to the ledger as an atomic batch guarded by the expected last sequence, so
a second manager (a hot standby) can never double-spend: its append fails, it re-folds the
stream and retries.  Read requests take the same lock so they never see a half-applied command.

This module is the actor (start, stop, snapshots, the reconcile ticker, health) and the command
machinery the API runs through (``mutate``, ``read``, ``decode``, ``page``); the request handlers
themselves are in ``endpoints``, the request checks in ``boundary``, the ledger writes in
``writer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats.errors
import nats.micro
import structlog
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import Service

from gpu_fleet import views
from gpu_fleet.core.engine import Settings
from gpu_fleet.core.ledger import snapshot
from gpu_fleet.core.model import Instant, Node
from gpu_fleet.core.placement import (
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    Topology,
    plan_placement,
    plan_without_search,
)
from gpu_fleet.messages import api, placement, subjects
from gpu_fleet.messages.validation import Requests
from gpu_fleet.runtime import heap, paging, replies
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.clock import Clock, VirtualClock, WallClock
from gpu_fleet.runtime.connect import connect, drain
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.ledger_stream import (
    LedgerStream,
)
from gpu_fleet.runtime.observe import DEFAULT_MAX_LAG, Health, Observer, ledger_health
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet.runtime.snapshots import SnapshotStore
from gpu_fleet.views.metrics import GaugeFamily, fleet_gauges
from gpu_fleet_manager import __version__
from gpu_fleet_manager.boundary import (
    ApiError,
    decode_request,
)
from gpu_fleet_manager.endpoints import Endpoints
from gpu_fleet_manager.group import GroupCommitter
from gpu_fleet_manager.quotas import PendingPerClient, client_of
from gpu_fleet_manager.teams import TeamEndpoints, TeamHandler, team_of
from gpu_fleet_manager.writer import LedgerFleet, NeedsThreadError

log = structlog.get_logger("gpu_fleet.manager")
SNAPSHOT_NAME = "manager"
SNAPSHOT_TAIL = 8
"""A snapshot waits for a tail of 1/8 of the ledger since the last one (``_snapshot_due``)."""
MAX_INFLIGHT = 1024  # requests served at once; beyond, the next waits (back-pressure)
T = TypeVar("T")
R = TypeVar("R", bound=Requests)


@dataclass
class ManagerConfig:
    nats_url: str
    clock: str = "wall"  # wall | virtual
    start: Instant | None = None
    inventory: list[Node] = field(default_factory=list)
    settings: Settings = field(default_factory=Settings)
    tick_seconds: float = 1.0
    binder_timeout: float = 5.0
    use_binder: bool = True
    snapshot_every: int = 500  # appended batches between snapshots (0: never)
    snapshot_min_seconds: float = 0.0  # and at least this long (monotonic) since the last
    limits: ApiLimits = field(default_factory=ApiLimits)  # request, reply, page, object sizes
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: no HTTP server)
    ready_max_lag: int = DEFAULT_MAX_LAG
    ledger_keys: LedgerKeys | None = None  # verify (and, manager only, sign) ledger events
    # Several events of an append in one ledger message (runtime.ledger_packing); off while
    # readers older than packing still read the ledger (a rolling upgrade, docs/deploy.md).
    ledger_packing: bool = True


class Manager(Actor):
    name = "manager"

    def __init__(self, config: ManagerConfig) -> None:
        super().__init__()
        self.config = config
        self.clock: Clock = (
            VirtualClock(config.start or 0) if config.clock == "virtual" else WallClock()
        )
        self.lock = asyncio.Lock()
        self.nc: Client | None = None
        self.ledger: LedgerStream | None = None
        self.fleet: LedgerFleet | None = None
        self.service: Service | None = None
        self.rebuilds = 0
        self.snapshots: SnapshotStore | None = None
        self._snapshot_at = 0  # appended batches at the last snapshot
        self._snapshot_seq = 0  # and the ledger sequence it holds
        self._snapshot_time = -math.inf  # time.monotonic() when it was taken
        self._saving: asyncio.Task[None] | None = None  # a snapshot being saved
        self._cut_waiters = 0  # callers of ``consistent`` waiting for the lock
        self.last_rebuild: tuple[int, int] = (0, 0)  # (snapshot sequence, events folded after it)
        self.committer = GroupCommitter(self)
        self._inflight: set[asyncio.Task[None]] = set()  # requests being served
        self.pending = PendingPerClient(config.limits.max_pending_per_client)
        self.observer = Observer("manager", config.metrics_port)
        self.observer.probe = self.health
        self.observer.gauges = self.gauges

    # -- lifecycle -------------------------------------------------------------------------
    async def _on_start(self) -> None:
        await self.observer.start()  # first: /healthz answers while the ledger is folded
        self.nc = await connect(self.config.nats_url, "gpu-fleet-manager", on_closed=self.abort)
        self.ledger = LedgerStream(
            self.nc, keys=self.config.ledger_keys, packing=self.config.ledger_packing
        )
        await self.ledger.ensure()
        self.snapshots = SnapshotStore(self.nc)
        await self._rebuild()
        if self.config.inventory:
            await self.mutate(self._register_inventory)
        self.service = await nats.micro.add_service(
            self.nc,
            name="gpu-fleet-manager",
            version=__version__,
            description="gpu-fleet manager: fleet API and ledger writer",
        )
        group = self.service.add_group(name=subjects.API_GROUP)
        endpoints = Endpoints(self)
        for name, handler in endpoints.table().items():
            await group.add_endpoint(name=name, handler=self._wrap(name, _body(handler)))
        # fleet.api.team.<team>.<endpoint>: the team is the caller's identity (teams.py).
        for name, team_handler in TeamEndpoints(self, endpoints).table().items():
            await group.add_endpoint(
                name=f"team-{name}",
                subject=f"team.*.{name}",
                handler=self._wrap(f"team.{name}", _as_team(team_handler)),
            )
        await self.nc.flush()  # answer as soon as start() returns (no "no responders" race)
        if not self.clock.virtual:
            self.spawn("reconcile ticker", self._ticker())

    async def _on_stop(self) -> None:
        if self.nc is None or self.nc.is_closed:
            return  # the connection is gone for good: nothing to stop, drain or save through
        if self.service is not None:
            with contextlib.suppress(nats.errors.Error):  # closed meanwhile: nothing to stop
                await self.service.stop()
        if self._inflight:  # answer what was received before the endpoints stopped
            await asyncio.gather(*self._inflight, return_exceptions=True)
        async with self.consistent():  # let the groups in flight land, then save a snapshot
            if self._saving is not None:
                await self._saving
            if self.config.snapshot_every and self.fleet is not None:
                await self._save_snapshot()
        await drain(self.nc)
        await self.observer.stop()

    # -- metrics and health (runtime.observe) ------------------------------------------------
    async def health(self) -> Health:
        """Ready once connected and the fold is within ``ready_max_lag`` of the stream (the
        reconcile tick catches a standby up every second, so a standby stays ready)."""
        connected = self.nc is not None and self.nc.is_connected
        seq = self.fleet.seq if self.fleet is not None else None
        return await ledger_health(connected, self.ledger, seq, self.config.ready_max_lag)

    async def gauges(self) -> list[GaugeFamily]:
        """The fleet's gauges at scrape time, under the command lock (a consistent cut)."""
        async with self.consistent():
            fleet = self.fleet
            if fleet is None:
                return []
            return await asyncio.to_thread(fleet_gauges, fleet.state, self.clock.now())

    async def _rebuild(self) -> None:
        """Fresh state from the ledger (the truth): the latest snapshot, then the tail after it.

        A snapshot that cannot be read, or that claims a sequence the stream does not have (a
        reset stream), is ignored and the whole stream is folded instead.
        """
        assert self.ledger is not None
        assert self.snapshots is not None
        fleet = LedgerFleet(
            self.config.settings, self._planner, self.ledger, asyncio.get_running_loop()
        )
        last = await self.ledger.last_seq()
        from_seq = 1
        restored = None
        try:
            data = await self.snapshots.load(SNAPSHOT_NAME)
        except nats.errors.Error as exc:
            log.warning("snapshot.load_failed", error=type(exc).__name__)
            data = None
        if data is not None:
            restored = snapshot.restore(data)
        if restored is not None and restored[1] <= last:
            fleet.state, fleet.seq = restored
            from_seq = fleet.seq + 1
        count = 0
        if from_seq <= last:
            async for seq, event in self.ledger.read(from_seq, last):
                fleet.replay(event, seq)
                count += 1
        fleet.seq = max(fleet.seq, last)
        if self.clock.virtual and isinstance(self.clock, VirtualClock):
            self.clock.set(max(self.clock.now(), fleet.state.clock))
        fleet.observer = self.observer
        self.fleet = fleet
        self._snapshot_at, self._snapshot_seq = fleet.appended_batches, from_seq - 1
        self.rebuilds += 1
        self.last_rebuild = (from_seq - 1, count)
        heap.sweep()  # the heap is now the rebuilt state (runtime.heap)
        log.info("ledger.rebuilt", snapshot_seq=from_seq - 1, folded=count, seq=fleet.seq)

    async def _save_snapshot(self) -> None:
        """Persist folded state at its sequence (under the command lock: a consistent cut)."""
        await self._store_snapshot(self._take_snapshot())

    def _take_snapshot(self) -> tuple[bytes, int] | None:
        """The state encoded at a consistent cut (the caller holds the command lock), with
        its sequence; encoding 10k nodes takes some 30 ms.  The bookkeeping moves on now: a
        snapshot is not due again until ``snapshot_every`` more batches, whether or not this
        one's save succeeds (a failing store is retried then, not at every group)."""
        fleet = self.fleet
        if fleet is None or self.snapshots is None:
            return None
        self._snapshot_at, self._snapshot_seq = fleet.appended_batches, fleet.seq
        self._snapshot_time = time.monotonic()
        return snapshot.take(fleet.state, fleet.seq), fleet.seq

    async def _store_snapshot(self, taken: tuple[bytes, int] | None) -> None:
        """Save an encoded snapshot; a failure is logged, never raised (a snapshot only saves
        time at the next start, the ledger stays the truth)."""
        if taken is None or self.snapshots is None:
            return
        data, seq = taken
        try:
            await self.snapshots.save(SNAPSHOT_NAME, data)
        except Exception as exc:  # whatever the store raised, only time is lost
            log.warning("snapshot.save_failed", error=type(exc).__name__)
            return
        log.info("snapshot.saved", seq=seq, bytes=len(data))

    def _snapshot_due(self) -> bool:
        """``snapshot_every`` batches since the last one, a tail to replay of at least
        1/``SNAPSHOT_TAIL`` of the ledger, and ``snapshot_min_seconds`` since the last one.

        Why the second rule: a snapshot encodes the whole state, history included, so its cost
        grows with the ledger; taken every few hundred decisions on a 10k-node fleet it was a
        tenth of the manager's time (issue 11).  This way its cost per event stays constant,
        and a restart folds at most that share of the ledger (plus ``snapshot_every`` batches)
        after the snapshot.  Why the third: in a sustained burst that share is reached every
        second or so (a 13 MB snapshot at 5k runs, every 4k events), and each snapshot also
        drains the group pipeline for its consistent cut; a floor in time makes a burst pay
        a constant cost per second instead, and bounds the extra tail a restart folds to what
        the fleet appended in that time."""
        every, fleet = self.config.snapshot_every, self.fleet
        if not every or fleet is None or fleet.appended_batches - self._snapshot_at < every:
            return False
        if time.monotonic() - self._snapshot_time < self.config.snapshot_min_seconds:
            return False
        return (fleet.seq - self._snapshot_seq) * SNAPSHOT_TAIL >= fleet.seq

    async def _maybe_snapshot(self) -> None:
        """Take a snapshot if one is due (only where nothing is in flight: a consistent cut),
        and save it in the background: the object store's chunked upload of a 10k-node state
        (megabytes) need not hold the writer's lock.  One save at a time; a clean stop waits
        for it, then saves the last state itself."""
        saving = self._saving
        if saving is not None and not saving.done():
            return
        if self._snapshot_due():
            taken = await asyncio.to_thread(self._take_snapshot)
            self._saving = asyncio.create_task(self._store_snapshot(taken), name="snapshot save")

    def _register_inventory(self, now: Instant) -> dict[str, Any]:
        assert self.fleet is not None
        added = []
        for node in self.config.inventory:
            if node.name not in self.fleet.state.nodes:
                self.fleet.register_node(node, now)
                added.append(node.name)
        if added:
            self.fleet.reconcile(now)
        return {"registered": added}

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_seconds)
            try:
                await self.mutate(lambda now: self.require_fleet().advance_to(now))
            except ApiError as exc:
                log.warning("reconcile.failed", code=exc.code, error=exc.message)

    # -- placement through the binder -------------------------------------------------------
    def _planner(self, topology: Topology, request: PackRequest) -> PackPlan:
        """Ask the binder (at our ledger sequence); fall back to the same planner locally."""
        fleet = self.require_fleet()
        if fleet.inline:  # decided on the event loop, which cannot wait for the binder
            quick = plan_without_search(topology, request)
            if quick is not None:
                self.observer.inc("gpu_fleet_manager_plans_total", "manager")
                return quick
            if fleet.searched:  # one search per group may hold the loop, not more
                raise NeedsThreadError("a second placement search on the event loop")
            fleet.searched = True  # the rest of the group: in the worker thread
            self.observer.inc("gpu_fleet_manager_plans_total", "inline")
            return plan_placement(topology, request)
        # The binder plans on the ledger's state; while this group's earlier decisions that
        # took or freed slots are not appended yet, plan here on the state being decided (the
        # same planner: the plan the binder would make once it has folded them).
        if self.config.use_binder and self.nc is not None and not fleet.topology_ahead:
            # Ask the binder only for a search: without one its answer is this (issue 11).
            quick = plan_without_search(topology, request)
            if quick is not None:
                self.observer.inc("gpu_fleet_manager_plans_total", "manager")
                return quick
            try:
                reply = fleet.on_loop(
                    self._place(fleet.seq, request), self.config.binder_timeout + 1
                )
            except Exception as exc:
                log.warning("binder.unavailable", error=type(exc).__name__)
                reply = None
            if reply is not None:
                if reply.error is not None:
                    self.observer.inc("gpu_fleet_manager_plans_total", "binder")
                    raise PackError(
                        PackErrorKind(reply.error.kind), reply.error.message, reply.error.shortfall
                    )
                if reply.plan is not None and _plan_fits(topology, request, reply.plan):
                    self.observer.inc("gpu_fleet_manager_plans_total", "binder")
                    return reply.plan
                log.warning("binder.plan_rejected", seq=fleet.seq)
            self.observer.inc("gpu_fleet_manager_plans_total", "fallback")
        elif self.config.use_binder and fleet.topology_ahead:
            self.observer.inc("gpu_fleet_manager_plans_total", "ahead")
        return plan_placement(topology, request)

    async def _place(self, seq: int, request: PackRequest) -> placement.PlaceReply:
        assert self.nc is not None
        msg = await self.nc.request(
            subjects.BINDER_PLACE,
            placement.ENCODER.encode(placement.PlaceRequest(seq=seq, run="", request=request)),
            timeout=self.config.binder_timeout,
        )
        return placement.REPLY_DECODER.decode(msg.data)

    # -- command execution ------------------------------------------------------------------
    def require_fleet(self) -> LedgerFleet:
        if self.fleet is None:
            raise ApiError("unavailable", "manager is (re)loading the ledger; retry")
        return self.fleet

    async def _ensure_loaded(self) -> None:
        if self.fleet is None:
            try:
                await self._rebuild()
            except Exception as exc:
                raise ApiError("unavailable", f"ledger unavailable: {type(exc).__name__}") from exc

    async def _catch_up(self) -> None:
        """Fold what other writers appended since our last sequence (a standby's catch-up)."""
        fleet = self.require_fleet()
        assert self.ledger is not None
        last = await self.ledger.last_seq()
        if last > fleet.seq:
            async for seq, event in self.ledger.read(fleet.seq + 1, last):
                fleet.replay(event, seq)

    async def mutate(self, fn: Callable[[Instant], T], *, small: bool = False) -> T:
        """Run a command as the single writer, answered once its decision is on the ledger.

        Commands waiting together are decided in arrival order and appended as one atomic
        batch (``group``: group commit); a lost append race re-folds and decides again.
        ``small``: a short decision writing a few events, which may be made on the event loop
        (``group.run_inline``).
        """
        result: T = await self.committer.submit(fn, small=small)
        return result

    @contextlib.asynccontextmanager
    async def consistent(self) -> AsyncIterator[None]:
        """The command lock, taken where the state is exactly the ledger's: the group
        pipeline drains (lands what is in flight, decides nothing on top) for a waiter here,
        so a read never sees a decision that is not on the ledger yet."""
        self._cut_waiters += 1
        waiting = True
        try:
            async with self.lock:
                self._cut_waiters -= 1
                waiting = False
                yield
        finally:
            if waiting:  # cancelled before it got the lock
                self._cut_waiters -= 1

    def waiting_for_cut(self) -> bool:
        """Is somebody waiting in ``consistent``?"""
        return self._cut_waiters > 0

    def wants_drain(self) -> bool:
        """Should the group pipeline stop at a consistent cut before its next group?  When
        somebody waits for one (``consistent``), or a snapshot is due (it is taken there)."""
        return self.waiting_for_cut() or self._snapshot_due()

    async def read(self, fn: Callable[[Instant], T]) -> T:
        async with self.consistent():
            await self._ensure_loaded()
            self.require_fleet()
            try:
                return fn(self.clock.now())
            except views.NotFoundError as exc:
                raise ApiError(
                    "not_found", str(exc), [api.FieldErrorOut("name", str(exc))]
                ) from exc

    def _wrap(
        self, name: str, handler: Callable[[Request], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[None]]:
        async def handle(req: Request) -> None:
            # nats.micro awaits a handler before it delivers the endpoint's next request, so
            # a handler awaited here would let one command wait at a time: group commit needs
            # the waiting ones queued together.  Each request is served in its own task (in
            # arrival order: tasks start in the order they are created), up to a bound.
            # nats.micro's Request hides the message; its reply subject names the client.
            client = client_of(str(getattr(getattr(req, "_msg", None), "reply", "") or ""))
            refused = self.pending.enter(client)
            if refused is not None:
                log.warning("api.request", endpoint=name, outcome="too_many_pending")
                error = replies.error_out(refused.code, refused.message, refused.errors)
                with contextlib.suppress(nats.errors.Error):
                    await replies.respond_error(req, refused.status, error)
                return
            if len(self._inflight) >= MAX_INFLIGHT:
                await serve(req, client)
                return
            task = asyncio.create_task(serve(req, client), name=f"api {name}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        async def serve(req: Request, client: str) -> None:
            try:
                await answer(req)
            finally:
                self.pending.leave(client)

        async def answer(req: Request) -> None:
            structlog.contextvars.bind_contextvars(endpoint=name)
            started = time.perf_counter()
            outcome = "ok"
            try:
                result = await handler(req)
                body = api.ENCODER.encode(api.Reply(ok=True, result=result))
                sent = await replies.respond(req, body, self._reply_budget())
                outcome = "ok" if sent else "too_large"
                log.info(
                    "api.request",
                    endpoint=name,
                    outcome=outcome,
                    ms=round((time.perf_counter() - started) * 1000, 2),
                )
            except ApiError as exc:
                outcome = exc.code
                error = replies.error_out(exc.code, exc.message, exc.errors)
                await replies.respond_error(req, exc.status, error)
                log.info("api.request", endpoint=name, outcome=exc.code, error=error.message)
            except nats.errors.Error as exc:  # the reply itself failed: nobody to tell
                outcome = "reply_failed"
                log.warning("api.reply_failed", endpoint=name, error=type(exc).__name__)
            except Exception:
                outcome = "internal"
                log.exception("api.request", endpoint=name, outcome="internal")
                error = replies.error_out("internal", "internal error; see manager log")
                with contextlib.suppress(nats.errors.Error):
                    await replies.respond_error(req, "500", error)
            finally:
                structlog.contextvars.unbind_contextvars("endpoint")
                self.observer.observe(
                    "gpu_fleet_api_request_duration_seconds",
                    time.perf_counter() - started,
                    name,
                    outcome,
                )

        return handle

    def _reply_budget(self) -> int:
        max_payload = self.nc.max_payload if self.nc is not None else 1024 * 1024
        return replies.reply_budget(max_payload, self.config.limits)

    def decode(self, data: bytes, typ: type[R]) -> R:
        return decode_request(data, typ, self.config.limits)

    def page(
        self,
        listing: str,
        items: list[dict[str, Any]],
        key: Callable[[dict[str, Any]], paging.Key],
        limit: int | None,
        token: str | None,
    ) -> api.ListPage | list[dict[str, Any]]:
        """A page (``ListPage``) when the client pages; the bare list for one that does not.

        A request without ``limit`` and ``continue`` comes from a client written before lists
        paged, which expects a JSON list: it still gets one while the list fits one reply, and
        a 413 asking for ``limit``/``continue`` once it would not (never an oversized reply).
        """
        if limit is None and token is None:
            whole = sorted(items, key=key)
            size = len(api.ENCODER.encode(whole)) + paging.PAGE_OVERHEAD
            if size <= self._reply_budget():
                return whole
            raise ApiError(
                "bad_request",
                f"the {listing} list is {size} bytes, over the reply limit of"
                f" {self._reply_budget()}; page it with limit and continue",
                [api.FieldErrorOut("limit", "required for a list this large")],
                status="413",
            )
        try:
            return paging.page(
                listing,
                items,
                key,
                limit=limit or self.config.limits.page_size,
                token=token,
                budget=self._reply_budget(),
                encode=api.ENCODER.encode,
            )
        except paging.ContinueTokenError as exc:
            error = api.FieldErrorOut("continue", str(exc))
            raise ApiError("validation", f"invalid request: continue: {exc}", [error]) from exc


def _plan_fits(topology: Topology, request: PackRequest, plan: PackPlan) -> bool:
    """The binder's plan is advice: every slot must be free here and not reserved for others."""
    for g in plan.groups:
        for a in (*g.allocations, *g.spare_allocations):
            if not topology.has_node(a.node):
                return False
            free = set(topology.free_slots(a.node))
            if not set(a.slots) <= free or set(a.slots) & request.excluded_slots:
                return False
    return True


def _body(handler: Callable[[bytes], Awaitable[Any]]) -> Callable[[Request], Awaitable[Any]]:
    """An operator endpoint: only the request body matters."""

    async def handle(req: Request) -> Any:
        return await handler(req.data)

    return handle


def _as_team(handler: TeamHandler) -> Callable[[Request], Awaitable[Any]]:
    """A team endpoint: the team is read from the subject the request arrived on."""

    async def handle(req: Request) -> Any:
        return await handler(team_of(req.subject), req.data)

    return handle
