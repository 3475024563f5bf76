"""The Kubernetes bridge actor: objects in, status and pods out, the ledger in between.

Two halves, which one process may run together (tests, ``gpu-fleet up``) or apart (the chart:
``objects`` in the manager's pod, ``pods`` in the binder's, as DESIGN splits them):

* **objects** (manager side): Run and Budget objects become ``fleet.api.apply`` / ``delete``
  commands; a Run carries a finalizer so deleting it closes its leases first; status is written
  back through the status subresource with the object's resourceVersion as precondition.
* **pods** (binder side): Nodes feed the topology (``fleet.api.node``); each open lease becomes
  pods created from the role template and bound through ``pods/binding`` once the whole gang
  exists; orphans are deleted; pod outcomes complete or fail the run.

It talks to the fleet only over NATS: it folds the ledger with the same follower as the other
services (read-your-writes through ``fleet.api.seq``) and sends API commands.  Reconciling is
level-triggered: any informer or ledger change marks the bridge dirty, and one pass compares
the whole picture in sorted order.  Every action is idempotent - a spec is applied once per
(uid, generation), which the ledger itself remembers in the run's annotations; AlreadyExists and
"already bound here" are success - so a crash anywhere converges on restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client

from gpu_fleet.core.engine.retry import waiting_retry
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import (
    API_VERSION,
    Budget,
    Lease,
    LeaseRole,
    NodeHealth,
    NotificationChannel,
    Run,
    run_key,
)
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.kube import nodes as node_rows
from gpu_fleet.kube.client import (
    AlreadyExistsError,
    ApiStatusError,
    ConflictError,
    KubeClient,
    NotFoundError,
)
from gpu_fleet.kube.events import (
    NODE_EVENTS_NAMESPACE,
    EventLog,
    RunEvent,
    bound_event,
    node_left_out_event,
)
from gpu_fleet.kube.informer import Informer
from gpu_fleet.kube.leader import LeaderElector, LeaderSettings
from gpu_fleet.kube.mirrors import Mirrors, keep_transitions, mirrors
from gpu_fleet.kube.objects import (
    A_ATTEMPT,
    A_GENERATION,
    A_LEASE,
    A_UID,
    BUDGETS,
    CHANNELS,
    EVENTS,
    FINALIZER,
    GPULEASES,
    L_RUN,
    MANAGED_BY,
    MANAGER_NAME,
    NODE_SOURCE,
    NODE_SOURCE_LABEL,
    NODES,
    PODS,
    RESERVATIONS,
    RUNS,
    SERVICES,
    Obj,
    annotations_of,
    is_deleting,
    key_of,
    labels_of,
    meta,
    name_of,
    namespace_of,
    rv_of,
    uid_of,
)
from gpu_fleet.kube.pods import PodIntent, PodSettings, headless_service, run_pods
from gpu_fleet.kube.status import budget_status, merge_patch_to, rejected_status, run_status
from gpu_fleet.kube.wire import Connection
from gpu_fleet.messages import api, subjects
from gpu_fleet.messages import forecast as forecast_msgs
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.connect import connect, drain
from gpu_fleet.runtime.follower import LedgerFollower
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.ledger_stream import LedgerStream

log = structlog.get_logger("gpu_fleet.kube.bridge")


class FleetApiError(Exception):
    def __init__(self, code: str, message: str, errors: list[str] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.errors = errors or []


@dataclass
class BridgeConfig:
    nats_url: str
    connection: Connection = field(default_factory=Connection)
    objects: bool = True  # Run/Budget in, status out (manager side)
    pods: bool = True  # Nodes in, pods out, outcomes in (binder side)
    mapping: node_rows.LabelMapping = field(default_factory=node_rows.LabelMapping)
    pod_settings: PodSettings = field(default_factory=PodSettings)
    watch_timeout: int = 300
    resync_seconds: float = 30.0  # a full pass even when nothing changed (missed-event safety)
    api_timeout: float = 20.0
    forecasts: bool = True
    instance: str = field(default_factory=socket.gethostname)  # Events' reportingInstance
    leader: LeaderSettings | None = None  # None: no election (one replica, tests, `up`)
    ledger_keys: LedgerKeys | None = None  # verify ledger events (docs/security.md)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest(kind: str, obj: Obj) -> dict[str, Any]:
    """What the fleet API applies for an object: its spec, names and labels, and the uid and
    generation it came from (so the ledger remembers what it has applied)."""
    m = meta(obj)
    annotations = {
        k: v
        for k, v in annotations_of(obj).items()
        if not k.startswith("kubectl.kubernetes.io/") and k not in (A_UID, A_GENERATION)
    }
    annotations[A_UID] = uid_of(obj)
    annotations[A_GENERATION] = str(m.get("generation", 1))
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {
            "name": name_of(obj),
            "namespace": namespace_of(obj) or "default",
            "labels": dict(labels_of(obj)),
            "annotations": annotations,
        },
        "spec": obj.get("spec") or {},
    }


def applied(known: Run | Budget | NotificationChannel | None, obj: Obj) -> bool:
    """Has the ledger applied exactly this object's uid and generation?"""
    if known is None:
        return False
    a = known.metadata.annotations
    return a.get(A_UID) == uid_of(obj) and a.get(A_GENERATION) == str(
        meta(obj).get("generation", 1)
    )


class KubeBridge(Actor):
    name = "kube-bridge"

    def __init__(
        self,
        config: BridgeConfig,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._client_factory = client_factory
        self.client: KubeClient | None = None
        self.nc: Client | None = None
        self.follower: LedgerFollower | None = None
        self.ledger: LedgerStream | None = None
        self.informers: dict[str, Informer] = {}
        self._dirty = asyncio.Event()
        self.passes = 0
        self.commands = 0  # fleet API commands sent (reads such as ``seq`` are not counted)
        self._pass_lock = asyncio.Lock()  # passes never interleave, whoever starts them
        self.rejected: dict[tuple[str, str], str] = {}  # (uid, generation) -> why
        self.problems: dict[str, str] = {}  # node -> why it is left out
        self._forecasts: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self.events = EventLog(derive=config.objects)
        self.elector: LeaderElector | None = None
        self.working = False  # informers and passes running (the leader, or no election)
        self._mirror_failures: set[tuple[str, tuple[str, str]]] = set()
        self.events_created = 0
        self.pass_failures = 0  # passes that raised (a bug or an unreachable API server)

    # -- lifecycle ---------------------------------------------------------------------------
    async def _on_start(self) -> None:
        self.nc = await connect(self.config.nats_url, "gpu-fleet-kube-bridge", on_closed=self.abort)
        ledger = LedgerStream(self.nc, keys=self.config.ledger_keys)
        await ledger.ensure()
        self.ledger = ledger
        self.follower = LedgerFollower(ledger, on_event=self._on_ledger_event)
        await self.follower.catch_up()
        if self._client_factory is not None:
            self.client = self._client_factory()
        else:
            from gpu_fleet.kube.wire import connect as kube_connect  # noqa: PLC0415 - only when no client is injected

            self.client = await kube_connect(self.config.connection)
        self.spawn("ledger follower", self.follower.follow())
        leader = self.config.leader
        if leader is None:
            self._start_work()
        else:
            identity = leader.identity or f"{socket.gethostname()}-{os.getpid()}"
            self.elector = LeaderElector(self.client, leader, self.lease_name, identity)
            self.spawn("leader election", self._lead())
        log.info(
            "kube.started",
            server=self.config.connection.describe(),
            objects=self.config.objects,
            pods=self.config.pods,
            leader_election=self.lease_name if leader is not None else None,
        )

    @property
    def lease_name(self) -> str:
        """The coordination Lease of this half: halves run apart, each elects its own."""
        assert self.config.leader is not None
        half = "bridge"
        if self.config.objects and not self.config.pods:
            half = "objects"
        elif self.config.pods and not self.config.objects:
            half = "pods"
        return f"{self.config.leader.name}-{half}"

    async def _lead(self) -> None:
        """Stand by until we hold the Lease, then work; losing it ends the bridge (exit 1:
        the supervisor starts a fresh standby, which never acts on a stale cache)."""
        assert self.elector is not None
        await self.elector.acquire()
        self._start_work()
        why = await self.elector.hold()
        self.abort(f"leadership lost: {why}")

    def _start_work(self) -> None:
        """Informers and the reconcile loop: only the leader (or the only bridge) runs them."""
        assert self.client is not None
        wanted = []
        if self.config.objects:
            wanted += [RUNS, BUDGETS, CHANNELS, GPULEASES, RESERVATIONS]
        if self.config.pods:
            wanted += [NODES, PODS] + ([] if self.config.objects else [RUNS])
        for res in wanted:
            inf = Informer(self.client, res, self.kick, watch_timeout=self.config.watch_timeout)
            self.informers[res.plural] = inf
            self.spawn(f"informer {res.plural}", inf.run())
        self.spawn("reconcile", self._loop())
        self.working = True

    async def stop(self) -> None:
        """Cancel the root tasks until they have ended, then stop as every actor does.

        nats-py waits with ``asyncio.wait_for``, which on Python 3.11 can swallow a
        cancellation that races its timeout; the follower (or a request in a pass) then treats
        it as a timeout and loops on, and one ``cancel()`` is not enough.
        """
        for _ in range(100):
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                break
            for t in pending:
                t.cancel()
            await asyncio.wait(pending, timeout=0.1)
        await super().stop()

    async def _on_stop(self) -> None:
        leader = self.config.leader
        if self.elector is not None and leader is not None and leader.release_on_stop:
            await self.elector.release()
        if self.client is not None:
            await self.client.close()
        await drain(self.nc)

    def kick(self) -> None:
        self._dirty.set()

    def _on_ledger_event(self, seq: int, event: Any, state: FleetState, index: int) -> None:
        self.events.observe(seq, event, state, index)
        self.kick()

    async def _loop(self) -> None:
        for inf in self.informers.values():
            await inf.synced.wait()
        while True:
            try:
                async with asyncio.timeout(self.config.resync_seconds):
                    await self._dirty.wait()
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.pass_failures += 1
                log.exception("kube.reconcile_failed")
                await asyncio.sleep(1.0)
                self.kick()

    # -- fleet API ---------------------------------------------------------------------------
    async def _api(self, endpoint: str, body: dict[str, Any]) -> Any:
        """Send one command (it may change the ledger, so the pass settles and looks again)."""
        self.commands += 1
        return await self._request(endpoint, body)

    async def _request(self, endpoint: str, body: dict[str, Any]) -> Any:
        assert self.nc is not None
        try:
            msg = await self.nc.request(
                subjects.api(endpoint), json.dumps(body).encode(), timeout=self.config.api_timeout
            )
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError) as exc:
            raise FleetApiError(
                "unavailable", f"fleet API {endpoint}: {type(exc).__name__}"
            ) from exc
        reply = api.REPLY_DECODER.decode(msg.data)
        if not reply.ok:
            err = reply.error
            raise FleetApiError(
                err.code if err else "internal",
                err.message if err else "error",
                [f"{e.path}: {e.message}" for e in (err.errors if err else [])],
            )
        return reply.result

    async def _settle(self) -> None:
        """Read-your-writes: wait until the follower has folded what our commands appended."""
        assert self.follower is not None
        try:
            seq = int((await self._request("seq", {}))["seq"])
        except FleetApiError:
            return
        await self.follower.wait_for(seq, self.config.api_timeout)

    async def _at_batch_boundary(self, attempts: int = 20) -> bool:
        """Wait until the follower sits exactly at the stream's last sequence.

        The manager appends each decision as one atomic batch, but the follower folds it event
        by event, so between two awaits it may hold half a decision (two of a gang's four
        leases).  The stream only ever holds whole batches, so "folded up to the stream's last
        sequence" is a batch boundary; callers read the state synchronously right after.
        """
        assert self.follower is not None
        assert self.ledger is not None
        for _ in range(attempts):
            try:
                last = await self.ledger.last_seq()
            except (nats.errors.Error, TimeoutError):
                return False
            if not await self.follower.wait_for(last, self.config.api_timeout):
                return False
            if self.follower.seq == last:
                return True
        return False

    @property
    def state(self) -> FleetState:
        assert self.follower is not None
        return self.follower.state

    # -- one pass ----------------------------------------------------------------------------
    async def reconcile_once(self) -> None:
        """One level-triggered pass over everything (sorted: deterministic).

        Serialized: a pass started by hand (tests, a resync) waits for the loop's pass, so two
        passes never both see an object as unapplied and send it twice.
        """
        async with self._pass_lock:
            await self._pass()

    async def _pass(self) -> None:
        self.passes += 1
        before = self.commands
        if self.config.objects:
            await self._budgets()
            await self._runs()
            await self._channels()
        if self.config.pods:
            await self._nodes()
            if self.commands > before:
                await self._settle()
            await self._pods()
        if self.commands > before:
            await self._settle()
            self.kick()  # our commands changed the ledger: look again
        elif self.config.objects:
            await self._write_status()

    # -- objects side ------------------------------------------------------------------------
    async def _budgets(self) -> None:
        objs = self.informers["budgets"].items()
        seen = set()
        for obj in objs:
            key = run_key(*key_of(obj))
            seen.add(key)
            if is_deleting(obj) or applied(self.state.budgets.get(key), obj):
                continue
            await self._apply("Budget", obj)
        for key in sorted(self.state.budgets):
            b = self.state.budgets[key]
            if b.metadata.annotations.get(A_UID) and key not in seen:
                await self._delete("Budget", b.metadata.namespace, b.metadata.name)

    async def _channels(self) -> None:
        """NotificationChannels in (``kubectl apply``), as Budgets: applied once per generation,
        deleted from the ledger when the object goes.  The notifier reads them from the ledger;
        nothing is written back (delivery state is ``kubectl runs notify list``)."""
        seen = set()
        for obj in self.informers["notificationchannels"].items():
            key = run_key(*key_of(obj))
            seen.add(key)
            if is_deleting(obj) or applied(self.state.channels.get(key), obj):
                continue
            await self._apply("NotificationChannel", obj)
        for key in sorted(self.state.channels):
            c = self.state.channels[key]
            if c.metadata.annotations.get(A_UID) and key not in seen:
                await self._delete("NotificationChannel", c.metadata.namespace, c.metadata.name)

    async def _apply(self, kind: str, obj: Obj) -> bool:
        mark = (uid_of(obj), str(meta(obj).get("generation", 1)))
        if mark in self.rejected:
            return False
        doc = manifest(kind, obj)
        try:
            await self._api(
                "apply",
                {
                    "documents": json.dumps(doc),
                    "source": f"{kind} {doc['metadata']['namespace']}/{doc['metadata']['name']}",
                },
            )
        except FleetApiError as exc:
            if exc.code in ("validation", "bad_request"):
                why = "; ".join(exc.errors) or exc.message
                self.rejected[mark] = why
                log.warning("kube.rejected", kind=kind, object=name_of(obj), error=why)
                self.kick()
                return False
            raise
        log.info(
            "kube.applied",
            kind=kind,
            object=f"{doc['metadata']['namespace']}/{doc['metadata']['name']}",
            generation=mark[1],
        )
        return True

    async def _delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            await self._api("delete", {"kind": kind, "namespace": namespace, "name": name})
            log.info("kube.deleted", kind=kind, object=f"{namespace}/{name}")
        except FleetApiError as exc:
            if exc.code != "not_found":
                raise

    async def _runs(self) -> None:
        assert self.client is not None
        seen = set()
        for obj in self.informers["runs"].items():
            ns, name = key_of(obj)
            key = run_key(ns, name)
            seen.add(key)
            known = self.state.runs.get(key)
            finalizers = list(meta(obj).get("finalizers") or [])
            if is_deleting(obj):
                if FINALIZER not in finalizers:
                    continue
                if known is not None and known.metadata.annotations.get(A_UID) == uid_of(obj):
                    await self._delete("Run", ns, name)  # closes its leases (RunDeleted)
                await self._patch_quietly(
                    RUNS,
                    obj,
                    {"metadata": {"finalizers": [f for f in finalizers if f != FINALIZER] or None}},
                )
                continue
            if FINALIZER not in finalizers:
                await self._patch_quietly(
                    RUNS, obj, {"metadata": {"finalizers": [*finalizers, FINALIZER]}}
                )
            if applied(known, obj):
                continue
            if known is not None and known.metadata.annotations.get(A_UID) not in (
                None,
                uid_of(obj),
            ):
                await self._delete("Run", ns, name)  # an earlier incarnation of the name
            await self._apply("Run", obj)
        for key in sorted(self.state.runs):
            r = self.state.runs[key]
            if r.metadata.annotations.get(A_UID) and key not in seen:
                await self._delete("Run", r.metadata.namespace, r.metadata.name)

    async def _patch_quietly(self, res: Any, obj: Obj, patch: Obj, sub: str = "") -> bool:
        """A merge patch guarded by the object's resourceVersion; a conflict or a vanished
        object is not an error (the informer brings the new version and we look again)."""
        assert self.client is not None
        body = {
            **patch,
            "metadata": {**(patch.get("metadata") or {}), "resourceVersion": rv_of(obj)},
        }
        try:
            await self.client.patch(res, namespace_of(obj) or None, name_of(obj), body, sub)
        except (ConflictError, NotFoundError) as exc:
            log.debug("kube.patch_skipped", object=name_of(obj), reason=exc.reason)
            return False
        return True

    async def _forecast(self, key: str) -> dict[str, Any] | None:
        """The forecaster's answer for a waiting run, once per ledger sequence (None if it
        does not answer: status then shows the reservation's bound alone)."""
        assert self.nc is not None
        assert self.follower is not None
        seq = self.follower.seq
        hit = self._forecasts.get(key)
        if hit is not None and hit[0] == seq:
            return hit[1]
        ns, _, name = key.partition("/")
        out: dict[str, Any] | None = None
        try:
            msg = await self.nc.request(
                subjects.FORECAST_RUN,
                forecast_msgs.ENCODER.encode(
                    forecast_msgs.ForecastRequest(namespace=ns, name=name, seq=seq)
                ),
                timeout=5.0,
            )
            f = forecast_msgs.REPLY_DECODER.decode(msg.data)
            out = {
                "earliestStart": format_instant(f.earliest_start) if f.earliest_start else None,
                "p50": format_instant(f.p50) if f.p50 else None,
                "p90": format_instant(f.p90) if f.p90 else None,
                "confidence": f.confidence,
                "deficitGPUs": f.deficit_gpus,
            }
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError, msgspec.ValidationError):
            out = None
        self._forecasts[key] = (seq, out)
        return out

    async def _write_status(self) -> None:
        if not await self._at_batch_boundary():
            self.kick()
            return
        now = _now()
        state = self.state
        for obj in self.informers["runs"].items():
            if is_deleting(obj):
                continue
            key = run_key(*key_of(obj))
            known = state.runs.get(key)
            previous = obj.get("status") or None
            mark = (uid_of(obj), str(meta(obj).get("generation", 1)))
            if known is None or known.metadata.annotations.get(A_UID) != uid_of(obj):
                why = self.rejected.get(mark)
                if why is None:
                    continue
                want = rejected_status(why, int(mark[1]), previous, now)
            else:
                generation = int(known.metadata.annotations.get(A_GENERATION, "1"))
                st = state.status.get(key)
                fc = None
                if self.config.forecasts and st is not None and st.phase in ("Pending", "Waiting"):
                    fc = await self._forecast(key)
                    state = self.state
                    if key not in state.runs:
                        continue
                want = run_status(
                    state, key, generation=generation, previous=previous, now=now, forecast=fc
                )
                if mark in self.rejected:
                    want["message"] = f"generation {mark[1]} rejected: {self.rejected[mark]}"
            if want != previous:
                patch = {"status": merge_patch_to(previous, want)}
                await self._patch_quietly(RUNS, obj, patch, "status")
        for obj in self.informers["budgets"].items():
            if is_deleting(obj):
                continue
            key = run_key(*key_of(obj))
            b = state.budgets.get(key)
            if b is None or b.metadata.annotations.get(A_UID) != uid_of(obj):
                continue
            previous = obj.get("status") or None
            want = budget_status(
                state, b, int(b.metadata.annotations.get(A_GENERATION, "1")), previous, now
            )
            if want != previous:
                patch = {"status": merge_patch_to(previous, want)}
                await self._patch_quietly(BUDGETS, obj, patch, "status")
        await self._mirrors(state, now)
        for ev in self.events.due(state.clock):
            if not await self._create_event(ev):
                break

    async def _create_event(self, ev: RunEvent) -> bool:
        """Create one Event; AlreadyExists is success (a replay).  False: try again later."""
        assert self.client is not None
        try:
            await self.client.create(EVENTS, ev.namespace, ev.body(self.config.instance))
            self.events_created += 1
            log.info("kube.event", run=f"{ev.namespace}/{ev.run}", reason=ev.reason, name=ev.name)
        except AlreadyExistsError:
            pass
        except NotFoundError as exc:  # the namespace is gone: nothing to attach it to
            log.info("kube.event_dropped", name=ev.name, error=exc.message)
        except ApiStatusError as exc:
            log.warning("kube.event_failed", name=ev.name, error=str(exc))
            if exc.code >= 500 or exc.code == 429:
                return False
        self.events.done(ev)
        return True

    # -- objects side: read-only mirrors ------------------------------------------------------
    async def _mirrors(self, state: FleetState, now: str) -> None:
        """One GPULease per open lease, one Reservation per pending reservation; the rest of
        the managed mirrors go.  Runs up to the same batch boundary as the status writes."""
        run_objs = {}
        for obj in self.informers["runs"].items():
            key = run_key(*key_of(obj))
            known = state.runs.get(key)
            if known is not None and known.metadata.annotations.get(A_UID) == uid_of(obj):
                run_objs[key] = obj
        leases, reservations = mirrors(state, run_objs, now)
        await self._sync_mirrors(GPULEASES, leases)
        await self._sync_mirrors(RESERVATIONS, reservations)

    async def _sync_mirrors(self, res: Any, want: Mirrors) -> None:
        """Make the managed objects of ``res`` exactly ``want``: create what is missing
        (AlreadyExists is success: an earlier incarnation or pass made it), write status that
        differs through the status subresource, delete what the ledger no longer holds."""
        assert self.client is not None
        inf = self.informers[res.plural]
        existing = {
            key_of(o): o for o in inf.items() if labels_of(o).get(MANAGED_BY) == MANAGER_NAME
        }
        for key in sorted(set(existing) - set(want)):
            try:
                await self.client.delete(res, key[0], key[1])
                log.info("kube.mirror_deleted", kind=res.kind, object=f"{key[0]}/{key[1]}")
            except NotFoundError:
                pass
        self._mirror_failures = {
            f for f in self._mirror_failures if f[0] != res.plural or f[1] in want
        }
        for key in sorted(want):
            m = want[key]
            obj = existing.get(key)
            if obj is None:
                try:
                    obj = await self.client.create(res, m.namespace, m.body)
                    log.info("kube.mirror_created", kind=res.kind, object=f"{key[0]}/{key[1]}")
                except AlreadyExistsError:
                    try:
                        obj = await self.client.get(res, m.namespace, m.name)
                    except NotFoundError:
                        continue
                except ApiStatusError as exc:  # e.g. the namespace does not exist
                    if (res.plural, key) not in self._mirror_failures:  # once, not every pass
                        self._mirror_failures.add((res.plural, key))
                        log.warning("kube.mirror_create_failed", kind=res.kind, error=str(exc))
                    continue
            previous = obj.get("status") or None
            status = keep_transitions(previous, m.status)
            if status != previous:
                patch = {"status": merge_patch_to(previous, status)}
                await self._patch_quietly(res, obj, patch, "status")

    # -- pods side: nodes ------------------------------------------------------------------------
    async def _nodes(self) -> None:
        rows, problems = node_rows.snapshot(
            self.informers["nodes"].items(), self.informers["pods"].items(), self.config.mapping
        )
        by_name = {name_of(n): n for n in self.informers["nodes"].items()}
        for p in problems:
            if self.problems.get(p.node) != p.message:
                self.problems[p.node] = p.message
                log.warning("kube.node_left_out", node=p.node, reason=p.message)
                await self._node_event(by_name.get(p.node) or {}, p.message)
        for name in sorted(set(self.problems) - {p.node for p in problems}):
            del self.problems[name]
        fleet_nodes = self.state.nodes
        for name, row in sorted(rows.items()):
            known = fleet_nodes.get(name)
            labels = {**row.labels, NODE_SOURCE_LABEL: NODE_SOURCE}
            if known is None or known.gpus != row.gpus or dict(known.labels) != labels:
                health = known.health if known is not None else NodeHealth.READY
                await self._api("node", {"op": "register", "node": row.inventory(health)})
                log.info("kube.node_registered", node=name, gpus=row.gpus, labels=row.labels)
                current = health
            else:
                current = known.health
            if row.health is not current:
                op = {
                    NodeHealth.FENCED: "fence",
                    NodeHealth.CORDONED: "cordon",
                    NodeHealth.READY: "uncordon",
                }[row.health]
                await self._api("node", {"op": op, "name": name})
                log.info(
                    "kube.node_health", node=name, health=row.health.value, suspect=row.suspect
                )
        present = {name_of(n) for n in self.informers["nodes"].items()}
        for name in sorted(fleet_nodes):
            n = fleet_nodes[name]
            if (
                n.labels.get(NODE_SOURCE_LABEL) == NODE_SOURCE
                and name not in present
                and n.health is not NodeHealth.FENCED
            ):
                await self._api("node", {"op": "fence", "name": name})
                log.info("kube.node_fenced", node=name, reason="deleted")

    async def _node_event(self, node: Obj, message: str) -> None:
        """Report a left-out node as a Warning Event on the Node (AlreadyExists: reported)."""
        assert self.client is not None
        body = node_left_out_event(node, message, time.time(), self.config.instance)
        try:
            await self.client.create(EVENTS, NODE_EVENTS_NAMESPACE, body)
        except AlreadyExistsError:
            pass
        except ApiStatusError as exc:
            log.warning("kube.event_failed", name=body["metadata"]["name"], error=str(exc))

    # -- pods side: pods ---------------------------------------------------------------------------
    def _intents(self) -> tuple[dict[str, list[PodIntent]], dict[str, Obj], set[str]]:
        """Per run key, the pods its open leases call for; the Run objects; leases under notice.
        Computed synchronously from one consistent view of the ledger."""
        state = self.state
        by_run: dict[str, list[Lease]] = {}
        for lease in state.leases.values():  # dict order is mint order
            by_run.setdefault(lease.run, []).append(lease)
        noticed = {p.lease for p in state.pending_preemptions()}
        intents: dict[str, list[PodIntent]] = {}
        objs: dict[str, Obj] = {}
        for obj in self.informers["runs"].items():
            key = run_key(*key_of(obj))
            run = state.runs.get(key)
            if run is None or run.metadata.annotations.get(A_UID) != uid_of(obj):
                continue
            objs[key] = obj
            retry = state.retries.get(key)
            intents[key] = run_pods(
                run,
                run_obj=obj,
                leases=by_run.get(key, []),
                open_ids=state.open_leases,
                noticed=noticed,
                settings=self.config.pod_settings,
                attempt=retry.attempt if retry is not None else 0,
                backoff=waiting_retry(state, key) is not None,
            )
        return intents, objs, noticed

    async def _pods(self) -> None:
        assert self.client is not None
        if not await self._at_batch_boundary():
            self.kick()
            return
        state = self.state
        intents, objs, noticed = self._intents()
        running = {
            key: (run.spec.roles[0].failure_policy if run.spec.roles else "Fail")
            for key in intents
            if (run := state.runs.get(key)) is not None
            and (st := state.status.get(key)) is not None
            and st.phase == "Running"
        }
        wanted = {(i.namespace, i.name): i for pods in intents.values() for i in pods}
        deadlines = {p.lease: p.deadline for p in state.pending_preemptions()}
        clock = state.clock
        pods = {key_of(p): p for p in self.informers["pods"].items()}
        # Orphans first: a managed pod whose lease is not open (or is under notice) goes.
        for pkey in sorted(pods):
            pod = pods[pkey]
            if labels_of(pod).get(MANAGED_BY) != MANAGER_NAME or not labels_of(pod).get(L_RUN):
                continue
            lease_id = annotations_of(pod).get(A_LEASE, "")
            intent = wanted.get(pkey)
            attempt = annotations_of(pod).get(A_ATTEMPT, "0")  # pods from before retries: 0
            if (
                intent is not None
                and intent.lease == lease_id
                and (intent.role is not LeaseRole.ACTIVE or attempt == str(intent.attempt))
            ):
                continue
            grace = max(0, deadlines[lease_id] - clock) if lease_id in noticed else None
            why = "lease closed" if intent is None else f"replaced by attempt {intent.attempt}"
            if waiting_retry(state, run_key(pkey[0], labels_of(pod)[L_RUN])) is not None:
                why = "retry backoff"
            await self._delete_pod(pod, why, grace)
            pods.pop(pkey)
        for key in sorted(intents):
            gang = intents[key]
            if not gang:
                continue
            obj = objs[key]
            run = state.runs.get(key)
            if run is None:
                continue
            await self._ensure_service(run, obj)
            uids: dict[str, str] = {}
            complete = True
            for intent in gang:
                existing = pods.get((intent.namespace, intent.name))
                if existing is None:
                    existing = await self._create_pod(intent)
                    if existing is None:
                        complete = False
                        continue
                    pods[(intent.namespace, intent.name)] = existing
                uids[intent.name] = uid_of(existing)
            if not complete:
                continue  # bind only once the whole gang's pods exist
            placed = 0
            bound_now = 0
            for intent in gang:
                pod = pods[(intent.namespace, intent.name)]
                bound = (pod.get("spec") or {}).get("nodeName")
                if bound == intent.node:
                    placed += 1
                    continue
                if bound:
                    await self._delete_pod(
                        pod, f"bound to {bound}, lease is on {intent.node}", None
                    )
                    continue
                if await self._bind(intent, uids[intent.name]):
                    placed += 1
                    bound_now += 1
            if bound_now and placed == len(gang):
                lease_ids = sorted({i.lease for i in gang})
                ev = bound_event(
                    state,
                    key,
                    lease_ids=lease_ids,
                    pods=len(gang),
                    mint_seq=self.events.mint_seq,
                    at=state.clock,
                    restart_seq=self.events.restart_seq.get(key, 0),
                )
                if ev is not None:
                    await self._create_event(ev)
        await self._outcomes(intents, pods, running)

    async def _ensure_service(self, run: Run, obj: Obj) -> None:
        assert self.client is not None
        try:
            await self.client.create(SERVICES, run.metadata.namespace, headless_service(run, obj))
            log.info("kube.service_created", run=run.key)
        except AlreadyExistsError:
            pass

    async def _create_pod(self, intent: PodIntent) -> Obj | None:
        assert self.client is not None
        try:
            created = await self.client.create(PODS, intent.namespace, intent.body)
            log.info(
                "kube.pod_created",
                pod=f"{intent.namespace}/{intent.name}",
                node=intent.node,
                lease=intent.lease,
            )
            return created
        except AlreadyExistsError:
            try:
                return await self.client.get(PODS, intent.namespace, intent.name)
            except NotFoundError:
                return None
        except ApiStatusError as exc:
            log.warning("kube.pod_create_failed", pod=intent.name, error=str(exc))
            return None

    async def _bind(self, intent: PodIntent, uid: str) -> bool:
        """Bind one pod; True when it is bound on its lease's node (already-bound-here too)."""
        assert self.client is not None
        try:
            await self.client.bind(intent.namespace, intent.name, uid, intent.node)
            log.info("kube.pod_bound", pod=f"{intent.namespace}/{intent.name}", node=intent.node)
        except ConflictError:
            pod = await self.client.get(PODS, intent.namespace, intent.name)
            if (pod.get("spec") or {}).get("nodeName") != intent.node:
                await self._delete_pod(pod, "bound elsewhere", None)
                return False
        except NotFoundError:
            self.kick()
            return False
        return True

    async def _delete_pod(self, pod: Obj, why: str, grace: int | None) -> None:
        assert self.client is not None
        try:
            await self.client.delete(PODS, namespace_of(pod), name_of(pod), grace)
            log.info(
                "kube.pod_deleted",
                pod=f"{namespace_of(pod)}/{name_of(pod)}",
                reason=why,
                grace_s=grace,
            )
        except NotFoundError:
            pass

    async def _outcomes(
        self,
        intents: dict[str, list[PodIntent]],
        pods: dict[tuple[str, str], Obj],
        running: Mapping[str, str],
    ) -> None:
        """All active pods Succeeded -> complete; a Failed one under ``Fail`` -> fail.
        ``running``: the runs the ledger had Running when the intents were taken, and their
        roles' failure policy."""
        for key in sorted(running):
            policy = running[key]
            ns, _, name = key.partition("/")
            active = [i for i in intents[key] if i.role is LeaseRole.ACTIVE]
            if not active:
                continue
            phases = [
                ((pods.get((i.namespace, i.name)) or {}).get("status") or {}).get("phase")
                for i in active
            ]
            failed = [i.name for i, p in zip(active, phases, strict=True) if p == "Failed"]
            if failed and policy == "Retry":
                attempt = active[0].attempt
                body = {"namespace": ns, "name": name, "attempt": attempt, "pod": failed[0]}
                try:
                    result = await self._api("retry", body)
                    log.info(
                        "kube.run_retry",
                        run=key,
                        pods=failed,
                        attempt=attempt,
                        phase=result.get("phase"),
                        failed_attempts=result.get("failedAttempts"),
                        retry_after=result.get("retryAfter"),
                    )
                except FleetApiError as exc:
                    log.info("kube.retry_skipped", run=key, error=exc.message)
                continue
            if failed and policy != "Ignore":
                try:
                    await self._api("fail", {"namespace": ns, "name": name})
                    log.info("kube.run_failed", run=key, pods=failed, policy=policy)
                except FleetApiError as exc:
                    log.info("kube.fail_skipped", run=key, error=exc.message)
                continue
            done = ("Succeeded", "Failed") if policy == "Ignore" else ("Succeeded",)
            if all(p in done for p in phases) and "Succeeded" in phases:
                try:
                    await self._api("complete", {"namespace": ns, "name": name})
                    log.info("kube.run_completed", run=key, pods=len(active))
                except FleetApiError as exc:
                    log.info("kube.complete_skipped", run=key, error=exc.message)
