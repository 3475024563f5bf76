"""Delivery to NotificationChannels: the outbox, one worker per channel, and the history.

The notifier's ledger consumer routes each notification to the channels that want it and
publishes one ``Delivery`` per (notification, channel) into the work-queue stream
``NOTIFY_OUTBOX`` (subject ``fleet.outbox.<namespace>.<channel>``, ``Nats-Msg-Id`` = the delivery
id) *before* it acknowledges the ledger message.  From there:

* **One durable pull consumer and one worker per channel**, so a slow or broken receiver only
  ever holds up its own deliveries.  Per endpoint (a receiver's origin) a concurrency limit
  bounds the requests in flight and a circuit breaker stops spending attempts on a receiver
  that keeps failing: while it is open the deliveries simply wait in the outbox.
* **An attempt's outcome is recorded before its message is acknowledged.**  Each attempt
  appends a ``DeliveryRecord`` to the stream ``NOTIFY_HISTORY`` (subject
  ``fleet.delivery.<namespace>.<channel>.<hash of the delivery id>``), then the outbox message
  is acknowledged (delivered, dead) or negatively acknowledged with the backoff delay (retry).
  JetStream keeps the schedule: a retry due in ten minutes survives a restart, and a crash
  before the acknowledgement only makes the server hand the delivery out again.
* **A delivery already delivered is never sent again.**  Before an attempt the worker reads the
  delivery's last record (the last message on its history subject): delivered or dead means
  acknowledge and skip.  So a healthy receiver gets each notice once, even when a restarted
  notifier re-derives and re-routes it (the outbox also drops a repeated ``Nats-Msg-Id`` within
  its duplicate window).  A receiver can still see a repeat if the notifier dies between the
  receiver's answer and the record - at least once - and de-duplicates by ``GPU-Fleet-Id``.
* **Dead letters.**  After ``max_attempts`` attempts, or at once for a permanent refusal (a
  4xx other than 408/425/429), the delivery is recorded ``dead``, a ``delivery-dead-lettered``
  notification goes to the team's NATS subject (and NATS-only channels), and the outbox message
  is acknowledged.  ``kubectl runs notify history`` shows every attempt and the dead letter.

A channel deleted from the ledger has its worker stopped, its consumer deleted and its pending
deliveries purged.  A channel changed in the ledger keeps its queue: pending deliveries go to
the new target and format (a fixed URL heals a backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from gpu_fleet.core.model import NotificationChannel
from gpu_fleet.messages import notify, subjects
from gpu_fleet.runtime.natsd_cluster import stream_replicas
from gpu_fleet_notifier.policy import Backoff, Breaker, DeliveryClock
from gpu_fleet_notifier.senders import Sender, SendResult, endpoint_of, target_of

log = structlog.get_logger("gpu_fleet.notifier.delivery")

ChannelLookup = Callable[[str], NotificationChannel | None]
DeadLetter = Callable[[notify.Delivery, notify.DeliveryRecord], Awaitable[None]]


@dataclass
class DeliveryConfig:
    max_attempts: int = 8
    attempt_timeout: float = 10.0  # real seconds per HTTP attempt
    concurrency: int = 4  # requests in flight per endpoint
    max_waiting: int = 10_000  # deliveries of one channel waiting for a retry at once
    breaker_threshold: int = 5  # consecutive failures that open an endpoint's breaker
    breaker_cooldown: float = 60.0  # seconds (delivery clock) before a trial request
    backoff: Backoff = field(default_factory=Backoff)
    fetch_timeout: float = 0.5  # real seconds a worker long-polls its outbox
    duplicate_window: float = 86400.0  # outbox and NATS-channel Nats-Msg-Id memory
    history_max_age: float = 7 * 86400.0  # how long attempts stay in NOTIFY_HISTORY
    stop_grace: float = 5.0  # real seconds in-flight attempts get to finish on stop
    seed: int | None = None  # jitter's random seed (tests); None: from the OS
    ack_wait: float | None = None  # redelivery of an attempt a crash left unfinished
    # (None: twice the attempt timeout plus 5 s)

    @property
    def outbox_ack_wait(self) -> float:
        return self.ack_wait if self.ack_wait is not None else self.attempt_timeout * 2 + 5.0


def delivery_id(note: notify.Notification, channel: NotificationChannel) -> str:
    return f"{note.id}@{channel.key}"


def delivery_key(delivery: str) -> str:
    """A subject token for a delivery id (ids hold ``.``, ``:`` and ``/``)."""
    return hashlib.sha256(delivery.encode()).hexdigest()[:24]


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


class History:
    """Every attempt's record, in the stream the notifier owns; survives restarts."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    async def last(self, job: notify.Delivery) -> notify.DeliveryRecord | None:
        ns, name = split_key(job.channel)
        try:
            raw = await self.js.get_last_msg(
                subjects.HISTORY_STREAM, subjects.history(ns, name, delivery_key(job.id))
            )
        except nats.js.errors.NotFoundError:
            return None
        if raw.data is None:
            return None
        return notify.RECORD_DECODER.decode(raw.data)

    async def put(self, record: notify.DeliveryRecord) -> None:
        ns, name = split_key(record.channel)
        await self.js.publish(
            subjects.history(ns, name, delivery_key(record.delivery)), notify.ENCODER.encode(record)
        )

    async def read(
        self,
        namespace: str | None = None,
        channel: str | None = None,
        run: str | None = None,
        limit: int = 200,
    ) -> list[notify.DeliveryRecord]:
        """The newest ``limit`` records matching, oldest first (one pass over the subject)."""
        if namespace is None:
            subject = f"{subjects.HISTORY_PREFIX}.>"
        elif channel is None:
            subject = f"{subjects.HISTORY_PREFIX}.{namespace}.>"
        else:
            subject = subjects.history(namespace, channel)
        out: deque[notify.DeliveryRecord] = deque(maxlen=max(1, limit))
        try:
            sub = await self.js.pull_subscribe(
                subject,
                stream=subjects.HISTORY_STREAM,
                config=ConsumerConfig(
                    ack_policy=AckPolicy.NONE,
                    deliver_policy=DeliverPolicy.ALL,
                    inactive_threshold=10.0,
                ),
            )
        except nats.js.errors.NotFoundError:
            return []
        consumer = ""
        try:
            info = await sub.consumer_info()
            consumer = info.name or ""
            left = info.num_pending or 0
            while left > 0:
                try:
                    msgs = await sub.fetch(min(left, 256), timeout=5.0)
                except nats.errors.TimeoutError:
                    break
                for msg in msgs:
                    left -= 1
                    record = notify.RECORD_DECODER.decode(msg.data)
                    if run is None or record.run == run:
                        out.append(record)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if consumer:  # a stream holds at most 1000 consumers: do not wait for the reaper
                with contextlib.suppress(nats.errors.Error):
                    await self.js.delete_consumer(subjects.HISTORY_STREAM, consumer)
        return list(out)


@dataclass
class Endpoint:
    """What is per receiver: its breaker and its concurrency limit."""

    breaker: Breaker
    slots: asyncio.Semaphore


@dataclass
class Counts:
    delivered: int = 0
    failed_attempts: int = 0
    dead: int = 0


async def ensure_streams(js: JetStreamContext, config: DeliveryConfig) -> None:
    """The outbox, the history and the NATS-channel stream (created if missing)."""
    replicas = stream_replicas()
    for stream in (
        StreamConfig(
            name=subjects.OUTBOX_STREAM,
            subjects=[f"{subjects.OUTBOX_PREFIX}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=config.duplicate_window,
        ),
        StreamConfig(
            name=subjects.HISTORY_STREAM,
            subjects=[f"{subjects.HISTORY_PREFIX}.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            max_age=config.history_max_age,
        ),
        StreamConfig(
            name=subjects.CHANNEL_STREAM,
            subjects=[f"{subjects.CHANNEL_PREFIX}.>"],
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=config.duplicate_window,
            max_age=config.history_max_age,
        ),
    ):
        assert stream.name is not None
        try:
            await js.stream_info(stream.name)
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(stream)
            except nats.js.errors.BadRequestError:
                await js.stream_info(stream.name)  # created concurrently


class Dispatcher:
    """The per-channel workers; ``sync`` starts and stops them as channels come and go."""

    def __init__(
        self,
        js: JetStreamContext,
        config: DeliveryConfig,
        *,
        clock: DeliveryClock,
        senders: dict[str, Sender],
        lookup: ChannelLookup,
        on_dead: DeadLetter,
    ) -> None:
        self.js = js
        self.config = config
        self.clock = clock
        self.senders = senders
        self.lookup = lookup
        self.on_dead = on_dead
        self.history = History(js)
        self.rng = random.Random(config.seed)
        self.endpoints: dict[str, Endpoint] = {}
        self.counts: dict[str, Counts] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._stopping = asyncio.Event()

    # -- workers -----------------------------------------------------------------------------
    async def sync(self, channels: dict[str, NotificationChannel]) -> None:
        """One worker per channel in ``channels``; the others are stopped and cleaned up."""
        if self._stopping.is_set():
            return
        for key in sorted(set(self._workers) - set(channels)):
            await self._retire(key)
        for key in sorted(set(channels) - set(self._workers)):
            self._workers[key] = asyncio.create_task(
                self._supervised(key), name=f"delivery worker {key}"
            )
        await self._drop_orphans(channels)

    async def _retire(self, key: str) -> None:
        task = self._workers.pop(key)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        ns, name = split_key(key)
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.Error):
            await self.js.delete_consumer(subjects.OUTBOX_STREAM, subjects.consumer_name(ns, name))
        with contextlib.suppress(nats.errors.Error):
            await self.js.purge_stream(subjects.OUTBOX_STREAM, subject=subjects.outbox(ns, name))
        log.info("delivery.channel_retired", channel=key)

    async def _drop_orphans(self, channels: dict[str, NotificationChannel]) -> None:
        """Consumers of channels deleted while no notifier ran (found once, at start)."""
        if getattr(self, "_orphans_checked", False):
            return
        self._orphans_checked = True
        wanted = {subjects.consumer_name(*split_key(key)): key for key in channels}
        try:
            infos = await self.js.consumers_info(subjects.OUTBOX_STREAM)
        except nats.errors.Error:
            return
        for info in infos:
            name = info.name or ""
            if name.startswith("deliver_") and name not in wanted:
                subject = info.config.filter_subject or ""
                with contextlib.suppress(nats.errors.Error):
                    await self.js.delete_consumer(subjects.OUTBOX_STREAM, name)
                if subject:
                    with contextlib.suppress(nats.errors.Error):
                        await self.js.purge_stream(subjects.OUTBOX_STREAM, subject=subject)
                log.info("delivery.orphan_dropped", consumer=name)

    async def stop(self) -> None:
        self._stopping.set()
        tasks = list(self._workers.values())
        self._workers.clear()
        # Workers finish their in-flight attempts within the grace, then are cancelled.
        done, pending = (
            await asyncio.wait(tasks, timeout=self.config.stop_grace)
            if tasks
            else (
                set(),
                set(),
            )
        )
        del done
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def endpoint(self, channel: NotificationChannel) -> Endpoint:
        key = endpoint_of(channel)
        ep = self.endpoints.get(key)
        if ep is None:
            ep = Endpoint(
                Breaker(self.config.breaker_threshold, self.config.breaker_cooldown),
                asyncio.Semaphore(self.config.concurrency),
            )
            self.endpoints[key] = ep
        return ep

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` of real time, or less when the dispatcher stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    async def _supervised(self, key: str) -> None:
        """Run a channel's worker; one that crashes is logged and restarted after a pause, so
        a bug in one delivery path never silently stops a channel."""
        # The task runs in a copy of its creator's context: keep the service's keys, drop the
        # ledger message that happened to start it.
        structlog.contextvars.unbind_contextvars("subject", "seq", "num_delivered")
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._worker(key)
                return
            except Exception:
                failures += 1
                log.exception("delivery.worker_crashed", channel=key, failures=failures)
                await self._pause(min(5.0, 0.1 * 2**failures))

    async def _worker(self, key: str) -> None:
        ns, name = split_key(key)
        subject = subjects.outbox(ns, name)
        config = self.config
        sub = None
        inflight: set[asyncio.Task[None]] = set()
        errors = 0
        try:
            while not self._stopping.is_set():
                channel = self.lookup(key)
                if channel is None:
                    return
                if sub is None:
                    try:
                        sub = await self.js.pull_subscribe(
                            subject,
                            durable=subjects.consumer_name(ns, name),
                            stream=subjects.OUTBOX_STREAM,
                            config=ConsumerConfig(
                                ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL,
                                ack_wait=config.outbox_ack_wait,
                                # A delivery waiting for its retry (nak with a delay) counts
                                # as pending: this bounds the backlog in backoff, while the
                                # requests in flight are bounded by ``concurrency`` here.
                                max_ack_pending=config.max_waiting + config.concurrency,
                                filter_subject=subject,
                            ),
                        )
                    except nats.errors.Error as exc:
                        errors += 1
                        log.warning("delivery.subscribe_failed", channel=key, error=str(exc))
                        await self._pause(min(5.0, 0.1 * 2**errors))
                        continue
                ep = self.endpoint(channel)
                closed_in = ep.breaker.remaining(self.clock.now())
                if closed_in > 0:  # open: leave the deliveries in the outbox meanwhile
                    await self._pause(self.clock.real(closed_in))
                    continue
                free = config.concurrency - len(inflight)
                if free <= 0:
                    await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    msgs = await sub.fetch(free, timeout=config.fetch_timeout)
                except nats.errors.TimeoutError:
                    continue
                except nats.errors.Error as exc:
                    errors += 1
                    log.warning("delivery.fetch_failed", channel=key, error=type(exc).__name__)
                    await self._pause(min(5.0, 0.1 * 2**errors))
                    continue
                errors = 0
                for msg in msgs:
                    task = asyncio.create_task(self._deliver(key, msg), name=f"delivery {key}")
                    inflight.add(task)
                    task.add_done_callback(inflight.discard)
        finally:
            if inflight:
                _, pending = await asyncio.wait(inflight, timeout=config.stop_grace)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
            if sub is not None:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()

    # -- one delivery ------------------------------------------------------------------------
    async def _deliver(self, key: str, msg: Msg) -> None:
        try:
            job = notify.DELIVERY_DECODER.decode(msg.data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            log.error("delivery.undecodable", channel=key, error=str(exc))
            with contextlib.suppress(nats.errors.Error):
                await msg.term()
            return
        with structlog.contextvars.bound_contextvars(
            channel=key, delivery=job.id, notice=job.note.event, run=job.note.run
        ):
            try:
                await self._attempt(job, msg)
            except nats.errors.Error as exc:  # recording failed: nothing acknowledged
                log.warning("delivery.record_failed", error=f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(nats.errors.Error):
                    await msg.nak(delay=1.0)

    async def _attempt(self, job: notify.Delivery, msg: Msg) -> None:
        last = await self.history.last(job)
        if last is not None and last.outcome in ("delivered", "dead", "skipped"):
            await msg.ack_sync()
            log.info("delivery.attempt", outcome="already-" + last.outcome)
            return
        channel = self.lookup(job.channel)
        if channel is None:
            skipped = SendResult(ok=False, target="", error="channel deleted")
            n = last.attempt if last is not None else 0
            await self._record(job, "skipped", skipped, at=self.clock.now(), attempt=n)
            await msg.ack_sync()
            return
        attempt = (last.attempt if last is not None else 0) + 1
        ep = self.endpoint(channel)
        sender = self.senders["webhook" if channel.spec.target.webhook else "nats"]
        async with ep.slots:
            wait = ep.breaker.wait(self.clock.now())  # takes the trial when half-open
            if wait > 0:
                # The receiver's breaker is open: back to the outbox, no attempt spent.
                await msg.nak(delay=self.clock.real(wait))
                log.info("delivery.attempt", outcome="breaker-open", retry_in=round(wait, 3))
                return
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()
            result = await sender.send(channel, job.note, attempt=attempt, delivery=job.id)
        now = self.clock.now()
        ep.breaker.record(result.ok, now)
        counts = self.counts.setdefault(job.channel, Counts())
        if result.ok:
            counts.delivered += 1
            await self._record(job, "delivered", result, at=now, attempt=attempt)
            await msg.ack_sync()
            return
        counts.failed_attempts += 1
        if result.permanent or attempt >= self.config.max_attempts:
            counts.dead += 1
            record = self._make(job, "dead", result, at=now, attempt=attempt)
            await self.on_dead(job, record)
            await self.history.put(record)
            await msg.ack_sync()
            log.warning("delivery.attempt", outcome="dead", attempt=attempt, error=result.error)
            return
        delay = self.config.backoff.delay(attempt, result.retry_after, self.rng)
        await self._record(job, "retry", result, at=now, attempt=attempt, next_at=now + delay)
        await msg.nak(delay=self.clock.real(delay))

    def _make(
        self,
        job: notify.Delivery,
        outcome: notify.Outcome,
        result: SendResult,
        *,
        at: float,
        attempt: int,
        next_at: float | None = None,
        test: bool = False,
    ) -> notify.DeliveryRecord:
        return notify.DeliveryRecord(
            delivery=job.id,
            notification=job.note.id,
            channel=job.channel,
            event=job.note.event,
            run=job.note.run,
            lease=job.note.lease,
            attempt=attempt,
            outcome=outcome,
            at=round(at, 3),
            target=result.target,
            status=result.status,
            error=result.error,
            next_at=round(next_at, 3) if next_at is not None else None,
            retry_after=result.retry_after,
            ms=result.ms,
            test=test,
        )

    async def _record(
        self,
        job: notify.Delivery,
        outcome: notify.Outcome,
        result: SendResult,
        *,
        at: float,
        attempt: int,
        next_at: float | None = None,
    ) -> None:
        record = self._make(job, outcome, result, at=at, attempt=attempt, next_at=next_at)
        await self.history.put(record)
        log.info(
            "delivery.attempt",
            outcome=outcome,
            attempt=attempt,
            status=result.status,
            error=result.error or None,
            ms=result.ms,
            next_at=record.next_at,
        )

    # -- the CLI's endpoints -----------------------------------------------------------------
    async def test(self, channel: NotificationChannel) -> notify.ChannelTestReply:
        """One signed sample, sent now, not retried; recorded in the history as a test."""
        now = self.clock.now()
        note = notify.Notification(
            id=f"channel-test:{channel.key}:{int(now * 1000)}",
            team="",
            event="channel-test",
            run="",
            at=int(now),
            detail={"channel": channel.key, "message": "a signed test from gpu-fleet"},
            reason="kubectl runs notify test",
            namespace=channel.metadata.namespace,
        )
        job = notify.Delivery(id=delivery_id(note, channel), channel=channel.key, note=note)
        sender = self.senders["webhook" if channel.spec.target.webhook else "nats"]
        result = await sender.send(channel, note, attempt=1, delivery=job.id)
        record = self._make(
            job,
            "delivered" if result.ok else "failed",
            result,
            at=self.clock.now(),
            attempt=1,
            test=True,
        )
        with contextlib.suppress(nats.errors.Error):
            await self.history.put(record)
        return notify.ChannelTestReply(
            channel=channel.key,
            target=result.target or target_of(channel),
            delivered=result.ok,
            status=result.status,
            body=result.body,
            error=result.error,
            ms=result.ms,
            id=note.id,
            signature=result.signature,
        )

    async def info(
        self,
        channels: dict[str, NotificationChannel],
        leads: Callable[[NotificationChannel], list[int]],
    ) -> list[notify.ChannelInfo]:
        out = []
        for key, channel in sorted(channels.items()):
            ns, name = split_key(key)
            pending = 0
            with contextlib.suppress(nats.errors.Error, nats.js.errors.NotFoundError):
                ci = await self.js.consumer_info(
                    subjects.OUTBOX_STREAM, subjects.consumer_name(ns, name)
                )
                pending = ci.num_pending + ci.num_ack_pending
            counts = self.counts.get(key, Counts())
            ep = self.endpoints.get(endpoint_of(channel))
            filt = channel.spec.filter
            out.append(
                notify.ChannelInfo(
                    channel=key,
                    target=target_of(channel),
                    format=channel.spec.format,
                    events=list(filt.events) if filt is not None else [],
                    lead_times=leads(channel),
                    scope=channel.spec.scope,
                    breaker=ep.breaker.state(self.clock.now()) if ep else "closed",
                    pending=pending,
                    delivered=counts.delivered,
                    failed_attempts=counts.failed_attempts,
                    dead=counts.dead,
                )
            )
        return out
