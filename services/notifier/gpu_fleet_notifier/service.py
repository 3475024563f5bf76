"""The notifier actor: ledger events and upcoming deadlines become notifications per team, and
NotificationChannels get them by webhook or NATS.

Delivery is **at least once, de-duplicated at the stream**:

* A durable JetStream pull consumer (``notifier``) reads the ledger stream ``FLEET``.  It has
  ``max_ack_pending=1`` so the server hands out one ledger message at a time, in order, even
  across restarts and redeliveries: the notifier folds each event into its own ``FleetState``
  and folding must see the ledger in order.
* Each ledger message yields its notifications in a fixed order.  Each is published with
  JetStream into the stream ``NOTIFY`` (subjects ``fleet.notify.>``) with ``Nats-Msg-Id`` =
  its id (``<ledger seq>:<event>:<run or lease>``), so a redelivered ledger message stores no
  duplicate; then each (notification, channel that wants it) goes into the outbox
  ``NOTIFY_OUTBOX`` with ``Nats-Msg-Id`` = the delivery id.  The ledger message is acknowledged
  (``ack_sync``) only after every publish succeeded; a failed publish naks it with a delay from
  ``error_delays``.  ``dispatch`` takes it from the outbox (its own docstring says how).
* On start, everything up to the consumer's ack floor is folded silently (it was notified
  before); the consumer then resumes right after it.

Teams are derived owners: the owner of the run's namespace in the notifier's own fold
(``state.index.family.owner_of``), ``_unbound`` when the namespace has none.  Subjects are
``fleet.notify.<team token>.<event>``.

Deadlines (lease expiry, funding expiry, demotions, budget renewals) are not ledger events:
they are checked against "now" - the wall clock (checked between fetches, at the head of the
ledger), or, with ``clock="ledger"``, the time of the latest ledger event (checked after each
fold), which makes them a deterministic function of the ledger: tests need no sleeping and a
restart re-derives exactly which warnings were already given.

What each event says is decided by pure functions of the folded state: ``derive`` (ledger events,
teams, forecasts), ``expiring`` (deadlines) and ``channels`` (routing); this module is the actor
that feeds them the ledger and publishes what they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
import nats.micro
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.micro.request import Request
from nats.micro.service import Service

from gpu_fleet.core.ledger import (
    Event,
    FleetState,
)
from gpu_fleet.core.model import Instant, NotificationChannel, run_key
from gpu_fleet.core.names import clamp, dns_label_problem, dns_subdomain_problem
from gpu_fleet.messages import notify, subjects
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.clock import Clock, WallClock
from gpu_fleet.runtime.connect import connect, drain
from gpu_fleet.runtime.follower import fold_at
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.ledger_stream import (
    STREAM,
    SUBJECT_PREFIX,
    LedgerStream,
    LedgerUnavailableError,
    fetcher,
    unpack,
)
from gpu_fleet.runtime.ledger_verifier import OneAtATime
from gpu_fleet.runtime.natsd_cluster import stream_replicas
from gpu_fleet.runtime.observe import DEFAULT_MAX_LAG, Health, Observer, ledger_health
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet_notifier import __version__
from gpu_fleet_notifier.channels import leads_of, routes
from gpu_fleet_notifier.derive import (
    ForecastKey,
    derive,
    forecast_changes,
    forecast_key,
    forecast_note,
    make_note,
)
from gpu_fleet_notifier.dispatch import (
    DeliveryConfig,
    Dispatcher,
    delivery_id,
    ensure_streams,
)
from gpu_fleet_notifier.expiring import Memory, check, funding_changes, lead_times
from gpu_fleet_notifier.policy import DeliveryClock, ScaledClock, WallDeliveryClock
from gpu_fleet_notifier.secrets import SecretResolver
from gpu_fleet_notifier.senders import NatsSender, Sender, WebhookSender

log = structlog.get_logger("gpu_fleet.notifier")


@dataclass
class NotifierConfig:
    nats_url: str
    clock: Literal["wall", "ledger"] = "wall"
    expiry_lead: int = 900  # seconds: the fleet-wide warning lead (channels add their own)
    durable: str = "notifier"  # the durable consumer on FLEET: one per notifier deployment
    ack_wait: float = 10.0  # redelivery delay of a message a crashed notifier left unacked
    fetch_timeout: float = 0.5  # also the wall-clock expiry check period and stop latency
    publish_timeout: float = 5.0
    duplicate_window: float = 86400.0  # NOTIFY's Nats-Msg-Id memory, when we create it
    error_delays: tuple[float, ...] = (1.0, 1.0, 2.0, 3.0, 5.0)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    secrets_dir: str | None = None  # where mounted Kubernetes Secrets are (secretRef.name)
    time_scale: float = 1.0  # delivery clock speed: <1 runs retries faster (tests, demos)
    metrics_port: int = 0  # /metrics, /healthz, /readyz (0: no HTTP server)
    ready_max_lag: int = DEFAULT_MAX_LAG
    ledger_keys: LedgerKeys | None = None  # verify (and, manager only, sign) ledger events


def build(
    nats_url: str,
    *,
    clock: Literal["wall", "ledger"] = "wall",
    expiry_lead: int = 900,
    ledger_keys: LedgerKeys | None = None,
) -> Notifier:
    """The factory ``gpu_fleet.cli.stack`` uses to start the notifier in-process."""
    return Notifier(
        NotifierConfig(
            nats_url=nats_url, clock=clock, expiry_lead=expiry_lead, ledger_keys=ledger_keys
        )
    )


Derived = tuple[list[notify.Notification], list[notify.Delivery]]


class Notifier(Actor):
    name = "notifier"

    def __init__(self, config: NotifierConfig) -> None:
        super().__init__()
        self.config = config
        self.wall: Clock = WallClock()  # replaceable: tests move time without sleeping
        self.delivery_clock: DeliveryClock = (
            WallDeliveryClock() if config.time_scale == 1.0 else ScaledClock(config.time_scale)
        )
        self.state = FleetState()
        self.memory = Memory()  # what the deadline checks already said
        self.seq = 0  # last ledger sequence folded
        self.handled = 0  # last ledger sequence acknowledged
        self.delivered = 0
        self.deduplicated = 0
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.sub: JetStreamContext.PullSubscription | None = None
        self.service: Service | None = None
        self.http: aiohttp.ClientSession | None = None
        self.dispatcher: Dispatcher | None = None
        # run -> the forecast last announced; not persisted: after a restart every waiting
        # run's forecast is announced once more (at least once, like everything here).
        self._announced: dict[str, ForecastKey] = {}
        self._inflight: dict[int, Derived] = {}
        self._verdicts: OneAtATime | None = None
        self._failures = 0
        self._last_wall_check: tuple[Instant, int] = (0, 0)
        self.ledger: LedgerStream | None = None
        self.observer = Observer("notifier", config.metrics_port)
        self.observer.probe = self.health

    # -- lifecycle -------------------------------------------------------------------------
    async def _on_start(self) -> None:
        await self.observer.start()  # first: /healthz answers while the ledger is folded
        self.nc = await connect(self.config.nats_url, "gpu-fleet-notifier", on_closed=self.abort)
        self.js = self.nc.jetstream(timeout=self.config.publish_timeout)
        self.ledger = LedgerStream(self.nc, keys=self.config.ledger_keys)
        self._verdicts = OneAtATime(self.config.ledger_keys, fetcher(self.js))
        await self.ledger.ensure()
        await self._ensure_notify_stream()
        await ensure_streams(self.js, self.config.delivery)
        self.sub = await self.js.pull_subscribe(
            f"{SUBJECT_PREFIX}.>",
            durable=self.config.durable,
            stream=STREAM,
            config=ConsumerConfig(
                durable_name=self.config.durable,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.config.ack_wait,
                max_ack_pending=1,
            ),
        )
        info = await self.sub.consumer_info()
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        await self._catch_up(floor)
        self.http = aiohttp.ClientSession()
        secrets = SecretResolver(self.config.secrets_dir)
        senders: dict[str, Sender] = {
            "webhook": WebhookSender(
                self.http,
                self.delivery_clock,
                secrets,
                self.config.delivery.attempt_timeout,
                f"gpu-fleet-notifier/{__version__}",
            ),
            "nats": NatsSender(self.js, self.delivery_clock, secrets),
        }
        self.dispatcher = Dispatcher(
            self.js,
            self.config.delivery,
            clock=self.delivery_clock,
            senders=senders,
            lookup=self.state.channels.get,
            on_dead=self._dead_letter,
        )
        await self.dispatcher.sync(self.state.channels)
        self.spawn("ledger consumer", self._consume())
        self.service = await nats.micro.add_service(
            self.nc,
            name="gpu-fleet-notifier",
            version=__version__,
            description="gpu-fleet notifier: ledger events and deadlines to teams and channels",
        )
        group = self.service.add_group(name=subjects.NOTIFIER_GROUP)
        await group.add_endpoint(name="status", handler=self.status)
        await group.add_endpoint(name="channels", handler=self._reply(self.channels))
        await group.add_endpoint(name="test", handler=self._reply(self.test))
        await group.add_endpoint(name="history", handler=self._reply(self.history))
        # Once start() returns the endpoints answer: the subscriptions reached the server.
        await self.nc.flush()

    async def _on_stop(self) -> None:
        # The ledger consumer (a root task) is already stopped; finish in-flight deliveries.
        if self.service is not None:
            with contextlib.suppress(nats.errors.Error):  # a closed connection: nothing to stop
                await self.service.stop()
        if self.dispatcher is not None:
            await self.dispatcher.stop()
        if self.sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self.sub.unsubscribe()
        if self.http is not None:
            await self.http.close()
        await drain(self.nc)
        await self.observer.stop()

    async def health(self) -> Health:
        """Ready once connected and the fold is within ``ready_max_lag`` of the ledger."""
        connected = self.nc is not None and self.nc.is_connected
        seq = self.seq if self.sub is not None else None
        return await ledger_health(connected, self.ledger, seq, self.config.ready_max_lag)

    async def _ensure_notify_stream(self) -> None:
        assert self.js is not None
        try:
            await self.js.stream_info(subjects.NOTIFY_STREAM)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(
                    StreamConfig(
                        name=subjects.NOTIFY_STREAM,
                        subjects=[f"{subjects.NOTIFY_PREFIX}.>"],
                        storage=StorageType.FILE,
                        duplicate_window=self.config.duplicate_window,
                        num_replicas=stream_replicas(),
                    )
                )
            except nats.js.errors.BadRequestError:
                await self.js.stream_info(subjects.NOTIFY_STREAM)  # created concurrently

    async def _catch_up(self, floor: int) -> None:
        """Fold ledger messages 1..floor: they were notified (and acknowledged) before.

        With the ledger clock, the deadline check at the last folded event is replayed silently
        (what was due then was said then).  With the wall clock only the funding picture is
        remembered; the first wall check says what is due, and the streams drop repeats.
        """
        async for seq, subject, data in self._read_raw(floor):
            self._fold(seq, unpack(seq, subject, data))
        if self.seq:
            if self.config.clock == "ledger":
                check(self.state, self.state.clock, self.seq, self._leads(), self.memory)
            else:
                funding_changes(self.state, self.state.clock, self.seq, {}, self.memory)
        self.handled = self.seq
        log.info("notifier.caught_up", seq=self.seq, ack_floor=floor)

    async def _read_raw(self, until: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """Raw ledger messages 1..until (ordered consumer) as (seq, subject, payload):
        undecodable ones are ours to judge; one whose batch does not verify is nothing
        (skipped like an undecodable one)."""
        if until <= 0:
            return
        assert self.ledger is not None
        async for seq, msg, verified in self.ledger.messages(1, until):
            yield seq, msg.subject, msg.data if verified else b""

    # -- folding ---------------------------------------------------------------------------
    async def _verified(self, seq: int, msg: Msg) -> bytes:
        """The message's payload, or nothing (skipped like any undecodable message) when the
        ledger is signed and its batch does not verify (``runtime.ledger_verifier``)."""
        assert self._verdicts is not None
        if await self._verdicts.accepted(seq, msg):
            return msg.data
        log.error("ledger.forged_event", seq=seq, subject=clamp(msg.subject, 100))
        return b""

    def _fold(self, seq: int, events: list[Event | None]) -> None:
        """Fold the message at ``seq``, every event of it in order (``None``: one this version
        does not know, skipped); one the fold refuses changes nothing and is logged."""
        for index, event in enumerate(events):
            fold_at(self.state, seq, index, event, refused="notifier.fold_refused")
        self.seq = seq

    def _leads(self) -> tuple[int, ...]:
        return lead_times(self.state, self.config.expiry_lead)

    def _derive(
        self, seq: int, subject: str, data: bytes, *, at_head: bool
    ) -> list[notify.Notification]:
        """Fold the message at ``seq`` and return what it must announce, in order: what each
        of its events says (on the state just before it), then - once the whole message is
        folded - the deadlines due.

        Forecasts are recomputed once the notifier has caught up with the ledger (``at_head``):
        a burst of changes yields one ``run-forecast`` per run whose answer changed, not one per
        ledger event.
        """
        notes: list[notify.Notification] = []
        for index, event in enumerate(unpack(seq, subject, data)):
            if event is not None:
                notes.extend(derive(self.state, seq, event, index))
            fold_at(self.state, seq, index, event, refused="notifier.fold_refused")
        self.seq = seq
        if self.config.clock == "ledger":
            notes.extend(check(self.state, self.state.clock, seq, self._leads(), self.memory))
        if at_head:
            notes.extend(self._forecast_notes(seq))
        return notes

    def _route(self, notes: list[notify.Notification]) -> list[notify.Delivery]:
        """Deliveries owed for ``notes``, against the channels the ledger holds now."""
        return [
            notify.Delivery(id=delivery_id(note, ch), channel=ch.key, note=note)
            for note in notes
            for ch in routes(self.state, note, self.config.expiry_lead)
        ]

    def _forecast_notes(self, seq: int) -> list[notify.Notification]:
        now = self.state.clock
        if self.config.clock == "wall":
            now = max(now, self.wall.now())
        changed = forecast_changes(self.state, now, self._announced)
        waiting = {
            k for k, st in self.state.status.items() if st.phase == "Pending"
        }  # forget runs that started or ended: a new wait is announced afresh
        self._announced = {k: v for k, v in self._announced.items() if k in waiting}
        for result in changed:
            self._announced[result.run] = forecast_key(result)
        return [forecast_note(self.state, seq, r, now) for r in changed]

    # -- the consumer loop -----------------------------------------------------------------
    async def _consume(self) -> None:
        """Fetch one ledger message at a time until stopped; never dies on an error."""
        assert self.sub is not None
        errors = 0
        while True:
            try:
                msgs = await self.sub.fetch(1, timeout=self.config.fetch_timeout)
            except nats.errors.TimeoutError:
                msgs = []
            except nats.errors.Error as exc:  # e.g. reconnecting: pause, do not spin
                delay = self.config.error_delays[min(errors, len(self.config.error_delays) - 1)]
                errors += 1
                log.warning("notifier.fetch_failed", error=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)
                continue
            errors = 0
            at_head = not msgs  # an empty fetch: every ledger message is handled
            for msg in msgs:
                await self._handle(msg)
                at_head = msg.metadata.num_pending == 0
            if self.config.clock == "wall" and at_head:
                await self._wall_check()

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        with structlog.contextvars.bound_contextvars(
            subject=msg.subject, seq=seq, num_delivered=meta.num_delivered
        ):
            if seq <= self.seq and seq not in self._inflight:
                await self._ack(msg)  # a late redelivery of something acknowledged already
                log.info("notifier.handled", outcome="already-handled")
                return
            derived = self._inflight.get(seq)
            if derived is None:
                try:  # fetches the rest of the message's batch to verify it (signed ledger)
                    data = await self._verified(seq, msg)
                except (nats.errors.Error, LedgerUnavailableError) as exc:
                    await self._retry_later(msg, exc, 0)
                    return
                notes = self._derive(seq, msg.subject, data, at_head=meta.num_pending == 0)
                derived = (notes, self._route(notes))
                self._inflight[seq] = derived
            notes, deliveries = derived
            started = time.perf_counter()
            try:
                stored, dups = await self._emit(notes, deliveries)
            except nats.errors.Error as exc:
                await self._retry_later(msg, exc, len(notes))
                return
            self._failures = 0
            if await self._ack(msg):
                self._inflight.pop(seq, None)
                self.handled = max(self.handled, seq)
            if self.dispatcher is not None:
                await self.dispatcher.sync(self.state.channels)
            log.info(
                "notifier.handled",
                outcome="ack",
                events=[n.event for n in notes],
                stored=stored,
                deduplicated=dups,
                deliveries=len(deliveries),
                ms=round((time.perf_counter() - started) * 1000, 2),
            )

    async def _retry_later(self, msg: Msg, exc: Exception, notifications: int) -> None:
        """NATS failed us mid-message (a server lost, a leader being elected): hand the message
        back for redelivery after a growing delay; nothing of it was acknowledged."""
        delay = self.config.error_delays[min(self._failures, len(self.config.error_delays) - 1)]
        self._failures += 1
        with contextlib.suppress(nats.errors.Error):
            await msg.nak(delay=delay)
        log.warning(
            "notifier.handled",
            outcome="nak",
            error=f"{type(exc).__name__}: {exc}",
            retry_in=delay,
            notifications=notifications,
        )

    async def _ack(self, msg: Msg) -> bool:
        try:
            await msg.ack_sync()
        except nats.errors.Error as exc:  # redelivered later; the publishes dedupe
            log.warning("notifier.ack_failed", error=type(exc).__name__)
            return False
        return True

    async def _emit(
        self, notes: list[notify.Notification], deliveries: list[notify.Delivery]
    ) -> tuple[int, int]:
        """Publish the notifications, then the deliveries; (stored, duplicates) of the former.

        Raises ``nats.errors.Error`` when a publish fails: the caller retries the whole set, and
        the streams drop what was already stored (same ids).
        """
        stored = dups = 0
        for note in notes:
            if await self._publish(note):
                stored += 1
            else:
                dups += 1
        assert self.js is not None
        for job in deliveries:
            ns, _, name = job.channel.partition("/")
            await self.js.publish(
                subjects.outbox(ns, name),
                notify.ENCODER.encode(job),
                headers={"Nats-Msg-Id": job.id},
            )
        return stored, dups

    async def _publish(self, note: notify.Notification) -> bool:
        """Publish into NOTIFY; True when stored, False when it was a duplicate."""
        assert self.js is not None
        try:
            ack = await self.js.publish(
                subjects.notify(note.team, note.event),
                notify.ENCODER.encode(note),
                headers={"Nats-Msg-Id": note.id},
            )
        except nats.errors.Error:
            self.observer.inc("gpu_fleet_notifications_total", note.event, "failed")
            raise
        if ack.duplicate:
            self.deduplicated += 1
            self.observer.inc("gpu_fleet_notifications_total", note.event, "duplicate")
            return False
        self.delivered += 1
        self.observer.inc("gpu_fleet_notifications_total", note.event, "stored")
        return True

    async def _wall_check(self) -> None:
        """Deadlines by the wall clock, once caught up with the ledger.

        Checking only at the head of the stream keeps a notifier that is catching up from warning
        about leases that a later, not yet folded, message already closed; a check is repeated only
        when the second or the ledger moved.  What a check found is remembered only once it is
        published, so a failed publish is found again by the next check.
        """
        now = max(self.wall.now(), self.state.clock)
        if (now, self.seq) == self._last_wall_check:
            return  # same second, same ledger: nothing new to find
        self._last_wall_check = (now, self.seq)
        memory = self.memory.copy()
        notes = check(self.state, now, self.seq, self._leads(), memory)
        if not notes:
            self.memory = memory
            return
        try:
            stored, dups = await self._emit(notes, self._route(notes))
        except nats.errors.Error as exc:
            log.warning("notifier.deadlines", outcome="retry", error=str(exc))
            return
        self.memory = memory
        log.info(
            "notifier.deadlines",
            events=[n.event for n in notes],
            stored=stored,
            deduplicated=dups,
            now=now,
        )

    async def _dead_letter(self, job: notify.Delivery, record: notify.DeliveryRecord) -> None:
        """A delivery given up: tell the team on NATS (and NATS-only channels), never a webhook.

        Raises ``nats.errors.Error`` if it cannot be published; the delivery is then retried
        rather than acknowledged, so a dead letter is never lost.
        """
        if job.note.event == "delivery-dead-lettered":
            return  # a notice about a failure is never itself reported as failed
        note = make_note(
            self.state,
            f"delivery-dead-lettered:{job.id}",
            "delivery-dead-lettered",
            job.note.run,
            at=int(record.at),
            seq=job.note.seq,
            detail={
                "channel": job.channel,
                "notification": job.note.id,
                "failedEvent": job.note.event,
                "attempts": record.attempt,
                "status": record.status,
                "error": record.error,
                "target": record.target,
            },
            lease=job.note.lease,
            envelope=job.note.envelope,
            reason=record.error,
            team=job.note.team or None,
            namespace=job.note.namespace,
        )
        deliveries = [d for d in self._route([note]) if d.channel != job.channel]
        await self._emit([note], deliveries)

    # -- endpoints -------------------------------------------------------------------------
    async def status(self, req: Request) -> None:
        body = notify.NotifierStatus(
            seq=self.handled, delivered=self.delivered, deduplicated=self.deduplicated
        )
        await req.respond(notify.ENCODER.encode(body))

    def _reply(
        self, handler: Callable[[bytes], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[None]]:
        """JSON in, JSON out; a bad request answers ``{"error", "code"}`` and logs one line."""

        async def handle(req: Request) -> None:
            try:
                result = await handler(req.data)
            except _EndpointError as exc:
                body = notify.ErrorReply(error=str(exc), code=exc.code)
                await req.respond(notify.ENCODER.encode(body))
                log.info("notifier.request", subject=req.subject, outcome=exc.code)
                return
            except Exception:
                log.exception("notifier.request", subject=req.subject, outcome="internal")
                body = notify.ErrorReply(error="internal error; see notifier log", code="internal")
                await req.respond(notify.ENCODER.encode(body))
                return
            await req.respond(notify.ENCODER.encode(result))

        return handle

    async def channels(self, data: bytes) -> list[notify.ChannelInfo]:
        req = _decode(data, notify.ChannelsRequest)
        assert self.dispatcher is not None
        chosen = {
            k: ch
            for k, ch in self.state.channels.items()
            if req.namespace is None or ch.metadata.namespace == req.namespace
        }
        return await self.dispatcher.info(chosen, lambda ch: leads_of(ch, self.config.expiry_lead))

    async def test(self, data: bytes) -> notify.ChannelTestReply:
        req = _decode(data, notify.ChannelTestRequest)
        channel = self._channel(req.namespace, req.name)
        assert self.dispatcher is not None
        return await self.dispatcher.test(channel)

    async def history(self, data: bytes) -> list[notify.DeliveryRecord]:
        req = _decode(data, notify.HistoryRequest)
        if req.channel is not None:
            self._channel(req.namespace or "default", req.channel)
        assert self.dispatcher is not None
        return await self.dispatcher.history.read(
            req.namespace if req.channel is None else (req.namespace or "default"),
            req.channel,
            req.run,
            max(1, min(req.limit, 10_000)),
        )

    def _channel(self, namespace: str, name: str) -> NotificationChannel:
        channel = self.state.channels.get(run_key(namespace, name))
        if channel is None:
            raise _EndpointError(
                f"notification channel {run_key(namespace, name)} not found", "not_found"
            )
        return channel


MAX_REQUEST_BYTES = ApiLimits().max_request_bytes
"""The fleet API's request limit, applied to the notifier's endpoints too."""


class _EndpointError(Exception):
    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code


def _decode(data: bytes, typ: type[Any]) -> Any:
    """Size, shape, then names: a namespace, channel or run that is not a Kubernetes name is
    refused here, naming the field (issue 12's fuzzing: a 512 KiB namespace became a 512 KiB
    subject filter, the server closed the notifier's connection and the notifier exited; a
    namespace of ``*`` would have matched every team's history)."""
    limit = MAX_REQUEST_BYTES
    if len(data) > limit:
        raise _EndpointError(f"invalid request: {len(data)} bytes; the limit is {limit}")
    try:
        req = msgspec.json.decode(data or b"{}", type=typ)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise _EndpointError(f"invalid request: {exc}") from exc
    for name, problem_of in (
        ("namespace", dns_label_problem),
        ("channel", dns_subdomain_problem),
        ("name", dns_subdomain_problem),
        ("run", _run_problem),
    ):
        value = getattr(req, name, None)
        problem = problem_of(value) if isinstance(value, str) else None
        if problem is not None:
            raise _EndpointError(f"invalid request: {name}: {problem}")
    return req


def _run_problem(value: str) -> str | None:
    """Why ``value`` is not ``namespace/name``, or None."""
    namespace, slash, name = value.partition("/")
    if not slash:
        return "must be namespace/name"
    return dns_label_problem(namespace) or dns_label_problem(name)
