"""The JetStream stream ``FLEET``: the ledger, the system of record.

Each decision's events are appended as one *atomic batch* guarded by the expected last sequence,
so a decision lands whole or not at all, and two writers can never both spend the same headroom
or the same GPU slot: the loser gets ``LedgerConflictError``, re-folds and retries.  Every service
rebuilds its state by folding the stream from the start (``replay``) and then follows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RawStreamMsg, StorageType, StreamConfig

from gpu_fleet.core.ledger import EVENT_ENCODER, Event
from gpu_fleet.core.names import clamp
from gpu_fleet.runtime.ledger_keys import BATCH_HEADER, LedgerKeys
from gpu_fleet.runtime.ledger_keys import HEADER as SIGNATURE_HEADER
from gpu_fleet.runtime.ledger_packing import (
    PACKED_SUBJECT,
    SUBJECT_PREFIX,
    decode_event,
    layout,
    pack,
    subject_for,
    unpack,
)
from gpu_fleet.runtime.ledger_verifier import (
    Fetch,
    InOrder,
    judged_beyond,
    judged_in_order,
)
from gpu_fleet.runtime.natsd_cluster import stream_replicas

log = structlog.get_logger("gpu_fleet.ledger")

STREAM = "FLEET"
__all__ = [  # the message shapes live in ``ledger_packing``; readers import them from here too
    "PACKED_SUBJECT",
    "SUBJECT_PREFIX",
    "decode_event",
    "subject_for",
    "unpack",
]
WRONG_LAST_SEQUENCE = 10071


class LedgerConflictError(RuntimeError):
    """Someone else appended first; re-fold from the stream and decide again."""


class LedgerUnavailableError(RuntimeError):
    """The stream did not answer (NATS down or JetStream not ready); nothing was appended."""


class LedgerGapError(LedgerUnavailableError):
    """A read skipped stream sequences: the client dropped messages (its pending limits) that
    the ordered consumer never saw missing.  The ledger has no gaps (nothing is ever deleted),
    so a reader that went on would fold a different history; it stops instead, and is read
    again (a follower's service exits and is restarted; a catch-up is retried)."""


def _in_sequence(last: int, msg: Msg) -> int:
    """``msg``'s stream sequence, which must not skip any after ``last`` (the highest read so
    far; an ordered consumer may redeliver one at or below it): ``LedgerGapError`` if it does."""
    got: int = msg.metadata.sequence.stream
    if got > last + 1:
        raise LedgerGapError(
            f"ledger read skipped sequences {last + 1}-{got - 1} (messages dropped by the client)"
        )
    return got


class LedgerEventTooLargeError(ValueError):
    """An event would not fit one NATS message; nothing was appended.

    Checked before publishing because the server answers an oversized message by closing the
    connection, which nats-py never reopens.  The API bounds objects well below this
    (``ApiLimits.max_object_bytes``), so this is the last line of defence, not the rule.
    """


HEADER_ROOM = 1024
"""Bytes of ``max_payload`` kept for the batch headers of an appended event."""


def fetcher(js: JetStreamContext, stream: str = STREAM, attempts: int = 6) -> Fetch:
    """``Fetch`` over JetStream: one stored message by sequence (``None``: the stream has none
    there), retried while the stream is briefly unavailable (a server lost, a leader being
    elected) as an ordered consumer would wait; ``LedgerUnavailableError`` if it stays so."""

    async def fetch(seq: int) -> RawStreamMsg | None:
        delay = 0.1
        for attempt in range(attempts):
            try:
                return await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                return None
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
                if attempt == attempts - 1:
                    raise LedgerUnavailableError(f"ledger read failed: {exc}") from exc
                await asyncio.sleep(delay)
                delay *= 2
        return None

    return fetch


class LedgerStream:
    """The ledger stream; with ``keys`` every append is signed and every read verified."""

    def __init__(
        self,
        nc: Client,
        stream: str = STREAM,
        timeout: float = 5.0,
        keys: LedgerKeys | None = None,
        *,
        message_limit: int | None = None,
        packing: bool = True,
    ) -> None:
        self.nc = nc
        self.keys = keys
        # Bytes a ledger message may hold: the connection's ``max_payload`` less header room,
        # or less (a test lays events out one per message with it; ``ledger_packing``).
        self.message_limit = message_limit
        # Several events of an append in one message (``ledger_packing``); off: one message
        # per event, readable by readers older than packing (a rolling upgrade).
        self.packing = packing
        self.js: JetStreamContext = nc.jetstream(timeout=timeout)
        self.stream = stream
        self.timeout = timeout
        self.fetch = fetcher(self.js, stream)

    @property
    def limit(self) -> int:
        """Bytes one ledger message may hold."""
        room = self.nc.max_payload - HEADER_ROOM
        return room if self.message_limit is None else min(room, self.message_limit)

    async def ensure(self) -> None:
        """Create the stream if missing (file storage, atomic batches allowed)."""
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            try:
                await self.js.add_stream(
                    StreamConfig(
                        name=self.stream,
                        subjects=[f"{SUBJECT_PREFIX}.>"],
                        storage=StorageType.FILE,
                        allow_atomic=True,
                        duplicate_window=120.0,
                        num_replicas=stream_replicas(),
                    )
                )
            except nats.js.errors.BadRequestError:
                await self.js.stream_info(self.stream)  # created concurrently: fine

    async def last_seq(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    def check_sizes(self, events: Sequence[Event]) -> list[bytes]:
        """The events encoded, or ``LedgerEventTooLargeError`` if one would not fit a message
        (checked before anything is published, or folded by a writer that buffers)."""
        encoded = [EVENT_ENCODER.encode(event) for event in events]
        limit = self.limit
        for event, data in zip(events, encoded, strict=True):
            if len(data) > limit:
                raise LedgerEventTooLargeError(
                    f"{type(event).__name__} event is {len(data)} bytes; a ledger message"
                    f" holds at most {limit}"
                )
        return encoded

    async def append(
        self,
        events: Sequence[Event],
        expected_last_seq: int,
        *,
        encoded: Sequence[bytes] | None = None,
    ) -> int:
        """Append ``events`` atomically after ``expected_last_seq``; return the new last seq.

        Several events are packed into one message (``ledger_packing``), or into a few
        appended as one atomic batch when they outgrow a message; a batch's first message
        carries the guard.  ``encoded``: what ``check_sizes`` returned for ``events`` (a
        writer that measured them already need not encode them again).
        """
        if not events:
            return expected_last_seq
        if encoded is None:
            encoded = self.check_sizes(events)
        messages = pack(events, encoded, self.limit, packed=self.packing)
        subjects = [subject for subject, _ in messages]
        payloads = [data for _, data in messages]
        n = len(messages)
        signed = self._signed(expected_last_seq + 1, subjects, payloads)
        guard = {"Nats-Expected-Last-Sequence": str(expected_last_seq)}
        try:
            if n == 1:  # one message is atomic by itself: no batch to open and commit
                reply = await self.nc.request(
                    subjects[0], payloads[0], timeout=self.timeout, headers={**guard, **signed[1]}
                )
            else:
                batch = uuid.uuid4().hex
                for i in range(1, n):
                    headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(i), **signed[0]}
                    if i == 1:
                        headers.update(guard)
                    await self.nc.publish(subjects[i - 1], payloads[i - 1], headers=headers)
                headers = {
                    "Nats-Batch-Id": batch,
                    "Nats-Batch-Sequence": str(n),
                    "Nats-Batch-Commit": "1",
                    **signed[1],
                }
                reply = await self.nc.request(
                    subjects[-1], payloads[-1], timeout=self.timeout, headers=headers
                )
        except (
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
        ) as exc:
            raise LedgerUnavailableError(f"ledger append failed: {type(exc).__name__}") from exc
        body = json.loads(reply.data)
        error = body.get("error")
        if error:
            if error.get("err_code") == WRONG_LAST_SEQUENCE:
                raise LedgerConflictError(error.get("description", "wrong last sequence"))
            raise LedgerUnavailableError(f"ledger append refused: {error.get('description')}")
        return int(body["seq"])

    def addresses(self, encoded: Sequence[bytes], last_seq: int) -> list[tuple[int, int]]:
        """Where an ``append`` of events encoded as ``encoded`` (``check_sizes``) that ended
        at ``last_seq`` put each of them: ``(seq, index)`` (``ledger_packing.event_address``).
        Laid out again from the sizes to find out: for a log line per event, which costs more
        to render than that."""
        spans = layout(encoded, self.limit, packed=self.packing)
        first = last_seq - len(spans) + 1
        return [(first + m, i) for m, (a, b) in enumerate(spans) for i in range(b - a)]

    def _signed(
        self, first: int, subjects: list[str], encoded: list[bytes]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The signature headers of a batch landing at ``first`` if the guarded append is
        accepted: (every message's, the last message's).  One signature for the whole batch
        (``runtime.ledger_verifier``); none on an unsigned ledger."""
        if self.keys is None:
            return {}, {}
        span = {BATCH_HEADER: f"{first} {first + len(encoded) - 1}"}
        sig = self.keys.sign_batch(first, list(zip(subjects, encoded, strict=True)))
        return span, {**span, SIGNATURE_HEADER: sig}

    async def read(
        self, from_seq: int = 1, until_seq: int | None = None, idle_timeout: float = 5.0
    ) -> AsyncIterator[tuple[int, Event | None]]:
        """Yield ``(seq, event)`` for every event of the messages from ``from_seq`` up to
        ``until_seq`` (default: current last); the events of one message share its ``seq``.

        ``event`` is ``None`` for an event type this version does not know (see ``decode_event``)
        and for a message whose batch does not verify (a signed ledger).  A reader that
        remembers where it is (``runtime.follower``) reads ``entries`` instead, whole messages.
        """
        async for seq, events in self.entries(from_seq, until_seq, idle_timeout):
            for event in events:
                yield seq, event

    async def entries(
        self, from_seq: int = 1, until_seq: int | None = None, idle_timeout: float = 5.0
    ) -> AsyncIterator[tuple[int, list[Event | None]]]:
        """``read`` a message at a time: ``(seq, its events in order)``."""
        async for seq, msg, verified in self.messages(from_seq, until_seq, idle_timeout):
            yield _verdict(seq, msg, verified)

    async def messages(
        self, from_seq: int = 1, until_seq: int | None = None, idle_timeout: float = 5.0
    ) -> AsyncIterator[tuple[int, Msg, bool]]:
        """``read``'s raw messages, each with whether it may be folded (always on an unsigned
        ledger; on a signed one, whether its batch verifies)."""
        target = until_seq if until_seq is not None else await self.last_seq()
        if target < from_seq:
            return
        order = InOrder(self.keys) if self.keys is not None else None
        sub = await self._subscribe(from_seq)
        try:
            seq = from_seq - 1
            while seq < target:
                msg = await next_message(sub, idle_timeout)
                got = _in_sequence(seq, msg)
                seq = max(seq, got)
                for item in await self._judged(order, got, msg):
                    if item[0] <= target:
                        yield item
            if order is not None:
                for item in await self._beyond(order, target):
                    if item[0] <= target:
                        yield item
        finally:
            await sub.unsubscribe()

    async def follow(self, from_seq: int) -> AsyncIterator[tuple[int, list[Event | None]]]:
        """Yield messages from ``from_seq`` forever, as ``entries`` does (an ordered consumer
        survives reconnects, and may then hand a message out again: compare ``seq``); on a
        signed ledger each batch once its last message has arrived."""
        order = InOrder(self.keys) if self.keys is not None else None
        sub = await self._subscribe(from_seq)
        last = from_seq - 1
        try:
            while True:
                try:
                    msg = await next_message(sub, 1.0)
                except nats.errors.TimeoutError:
                    if order is not None and order.waiting_for() is not None:
                        # Idle with messages held: a batch that ends past the stream's last
                        # message was never appended whole (a forger's claim).
                        try:
                            stored_last = await self.last_seq()
                        except (nats.errors.Error, nats.js.errors.Error):
                            stored_last = None  # asked again at the next idle second
                        if stored_last is not None:
                            for seq, held, verified in _as_messages(order.impossible(stored_last)):
                                yield _verdict(seq, held, verified)
                    await asyncio.sleep(0)
                    continue
                got = _in_sequence(last, msg)
                last = max(last, got)
                for seq, held, verified in await self._judged(order, got, msg):
                    yield _verdict(seq, held, verified)
        finally:
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await sub.unsubscribe()

    async def _subscribe(self, from_seq: int) -> JetStreamContext.PushSubscription:
        return await self.js.subscribe(
            f"{SUBJECT_PREFIX}.>",
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=from_seq
            ),
        )

    async def _judged(
        self, order: InOrder | None, seq: int, msg: Msg
    ) -> list[tuple[int, Msg, bool]]:
        """What a read may hand out after ``msg``: the message itself on an unsigned ledger;
        on a signed one every message whose batch is now judged, in order (``InOrder``)."""
        if order is None:
            return [(seq, msg, True)]
        return _as_messages(await judged_in_order(order, seq, msg, self.fetch))

    async def _beyond(self, order: InOrder, target: int) -> list[tuple[int, Msg, bool]]:
        return _as_messages(await judged_beyond(order, target, self.fetch))


YIELD_EVERY = 64
"""Messages ``next_message`` takes from the queue before it gives the loop a turn."""


async def next_message(sub: JetStreamContext.PushSubscription, timeout: float) -> Msg:
    """``sub.next_msg(timeout)``, without its per-call task when a message is already queued.

    Why: nats-py's ``next_msg`` makes a task, a ``wait_for`` and a ``uuid4`` for every message,
    about a fifth of a follower's CPU in a burst, on the cores where nats-server and the clients
    turn the single writer's appends and replies around (issue 11).  A message already
    delivered is taken here with exactly the bookkeeping ``next_msg`` does, in its order: the
    subscription's pending size, ``task_done``, and the ordered consumer's flow control
    answered when the reader *takes* a message, as before.
    (Answered when messages *arrive* - a callback subscription - a reader far behind is sent
    its whole backlog and drops past its pending limits; that was tried and reverted.)
    Reads nats-py's private fields as of 2.16; if they are not there, every call takes the
    public path (``tests/services/test_ledger_stream.py`` checks the quick one is taken).
    It gives the loop a turn every ``YIELD_EVERY`` messages, as ``next_msg`` gave one each.
    """
    quick: bool | None = getattr(sub, "_gpu_fleet_quick", None)
    if quick is None:
        quick = sub._gpu_fleet_quick = _has_quick_fields(sub)  # type: ignore[attr-defined]
    inner: Any = sub._sub if quick else None
    if inner is None or inner._pending_queue.empty() or sub._conn.is_closed:
        return await sub.next_msg(timeout=timeout)
    queue = inner._pending_queue
    msg: Msg = queue.get_nowait()
    inner._pending_size -= len(msg.data)
    queue.task_done()
    jsi = inner._jsi
    jsi._active = True
    if jsi.get_js_delivered() >= jsi._fciseq:
        fc_reply = jsi._fcr
        if fc_reply:
            await sub._conn.publish(fc_reply)
            jsi._fcr = None
    taken = getattr(sub, "_gpu_fleet_taken", 0) + 1
    sub._gpu_fleet_taken = taken  # type: ignore[attr-defined]
    if taken % YIELD_EVERY == 0:
        await asyncio.sleep(0)
    return msg


def _has_quick_fields(sub: JetStreamContext.PushSubscription) -> bool:
    """Does ``sub`` hold the nats-py fields ``next_message`` reads (a message subscription of
    an ordered consumer, without a callback)?"""
    inner = getattr(sub, "_sub", None)
    jsi = getattr(inner, "_jsi", None)
    return (
        isinstance(getattr(inner, "_pending_queue", None), asyncio.Queue)
        and hasattr(inner, "_pending_size")
        and getattr(inner, "_cb", None) is None
        and all(hasattr(jsi, name) for name in ("_active", "_fcr", "_fciseq", "get_js_delivered"))
    )


def _as_messages(judged: list[tuple[int, object, bool]]) -> list[tuple[int, Msg, bool]]:
    out = []
    for seq, msg, verified in judged:
        assert isinstance(msg, Msg)  # what the reads push (fetched messages are never handed out)
        if not verified:
            log.error("ledger.forged_event", seq=seq, subject=clamp(msg.subject, 100))
        out.append((seq, msg, verified))
    return out


def _verdict(seq: int, msg: Msg, verified: bool) -> tuple[int, list[Event | None]]:
    """A message's events; a forged one (its batch does not verify) is one skipped entry."""
    return seq, unpack(seq, msg.subject, msg.data) if verified else [None]
