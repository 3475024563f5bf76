"""The ledger stream adapter over a real JetStream: atomic batches, races, evolution."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import nats
import pytest
from tests.services._stack import wait_until

from gpu_fleet.core.ledger import EVENT_ENCODER, NodeRegistered
from gpu_fleet.core.model import Node
from gpu_fleet.runtime import ledger_stream
from gpu_fleet.runtime.follower import LedgerFollower
from gpu_fleet.runtime.ledger_keys import BATCH_HEADER, HEADER, LedgerKeys
from gpu_fleet.runtime.ledger_stream import (
    PACKED_SUBJECT,
    STREAM,
    SUBJECT_PREFIX,
    LedgerConflictError,
    LedgerGapError,
    LedgerStream,
    fetcher,
)
from gpu_fleet.runtime.ledger_verifier import OneAtATime

pytestmark = pytest.mark.asyncio


def node(i: int) -> NodeRegistered:
    return NodeRegistered(at=100 + i, node=Node(name=f"n{i}", gpus=8, labels={}))


ONE_NODE_EVENT = 150
"""A ``message_limit`` that holds one ``node`` event (93-99 bytes) and never two: a ledger
that lays each event out as a message of its own, as every append did before packing."""


def spread(nc: Any, **kwargs: Any) -> LedgerStream:
    """A ledger writing one message per event (``ONE_NODE_EVENT``)."""
    return LedgerStream(nc, message_limit=ONE_NODE_EVENT, **kwargs)


async def test_batch_is_atomic_and_guarded_by_last_sequence(nats_server: Any) -> None:
    """A batch of several messages lands whole after the expected sequence; a stale writer
    gets LedgerConflictError."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = spread(nc)
        await ledger.ensure()
        seq = await ledger.append([node(0), node(1), node(2)], 0)
        assert seq == 3
        with pytest.raises(LedgerConflictError):
            await ledger.append([node(3), node(4)], 1)  # stale: someone appended after 1
        assert await ledger.last_seq() == 3  # the refused batch left nothing behind
        events = [e async for _, e in ledger.read(1)]
        assert [e.node.name for e in events if isinstance(e, NodeRegistered)] == ["n0", "n1", "n2"]
    finally:
        await nc.close()


async def test_follower_skips_an_unknown_event_type_and_passes_its_sequence(
    nats_server: Any,
) -> None:
    """A newer writer's event type is skipped (logged), not fatal; later events still fold."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = LedgerStream(nc)
        await ledger.ensure()
        await ledger.append([node(0)], 0)
        js = nc.jetstream()
        await js.publish(f"{SUBJECT_PREFIX}.FromTheFuture", b'{"type":"FromTheFuture","at":101}')
        await ledger.append([node(1)], 2)
        follower = LedgerFollower(ledger)
        await follower.catch_up()
        assert follower.seq == 3
        assert sorted(follower.state.nodes) == ["n0", "n1"]
    finally:
        await nc.close()


# -- batch signatures over a real JetStream (runtime.ledger_verifier) -----------------------
async def _signed(nc: Any) -> tuple[LedgerStream, LedgerKeys]:
    keys = LedgerKeys.generate()
    ledger = spread(nc, keys=keys)
    await ledger.ensure()
    await ledger.append([node(0), node(1), node(2)], 0)
    await ledger.append([node(3), node(4)], 3)
    return ledger, keys


async def test_a_signed_batch_names_its_span_on_every_message_and_signs_once(
    nats_server: Any,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await _signed(nc)
        js = nc.jetstream()
        stored = [await js.get_msg(STREAM, seq) for seq in range(1, 6)]
        assert [(m.headers or {}).get(BATCH_HEADER) for m in stored] == ["1 3"] * 3 + ["4 5"] * 2
        assert [HEADER in (m.headers or {}) for m in stored] == [False, False, True, False, True]
    finally:
        await nc.close()


async def test_every_read_of_a_signed_ledger_verifies_whole_batches(nats_server: Any) -> None:
    """From the start, from inside a batch, up to inside one, one message at a time - and a
    copied batch is refused wherever it is met."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger, keys = await _signed(nc)
        js = nc.jetstream()
        for seq in (1, 2, 3):  # the first batch, copied with its headers (a replay)
            original = await js.get_msg(STREAM, seq)
            ours = {k: v for k, v in (original.headers or {}).items() if k.startswith("Fleet-")}
            await js.publish(original.subject, original.data, headers=ours)
        await ledger.append([node(5)], 8)

        async def names(start: int, until: int | None = None) -> dict[int, str | None]:
            reader = LedgerStream(nc, keys=keys.reader())
            return {
                seq: e.node.name if isinstance(e, NodeRegistered) else None
                async for seq, e in reader.read(start, until)
            }

        assert await names(1) == {
            1: "n0",
            2: "n1",
            3: "n2",
            4: "n3",
            5: "n4",
            6: None,
            7: None,
            8: None,
            9: "n5",
        }
        assert await names(2, 4) == {2: "n1", 3: "n2", 4: "n3"}  # began and ended inside one
        assert await names(5, 5) == {5: "n4"}

        follower = LedgerFollower(LedgerStream(nc, keys=keys.reader()))
        await follower.catch_up()
        assert follower.seq == 9
        assert sorted(follower.state.nodes) == ["n0", "n1", "n2", "n3", "n4", "n5"]

        # The notifier's consumer meets messages one by one and acknowledges each.
        one = OneAtATime(keys.reader(), fetcher(js))
        sub = await js.pull_subscribe(f"{SUBJECT_PREFIX}.>", durable="verdicts")
        verdicts = {}
        for _ in range(9):
            (msg,) = await sub.fetch(1, timeout=5)
            verdicts[msg.metadata.sequence.stream] = await one.accepted(
                msg.metadata.sequence.stream, msg
            )
            await msg.ack()
        assert verdicts == {
            1: True,
            2: True,
            3: True,
            4: True,
            5: True,
            6: False,
            7: False,
            8: False,
            9: True,
        }
    finally:
        await nc.close()


async def test_a_follower_is_not_held_back_by_a_forged_far_claim(nats_server: Any) -> None:
    """A forger's message claims a batch ending far ahead: the follower folds the genuine
    batch after it at once (a message inside the claim shows it is no batch), and passes a
    forged claim that ends the stream once it goes idle (found by review: the follower held
    everything behind such a claim until its end arrived)."""
    nc = await nats.connect(nats_server.url)
    follower_task = None
    try:
        ledger, keys = await _signed(nc)
        js = nc.jetstream()
        far = {BATCH_HEADER: "6 5000"}
        await js.publish(f"{SUBJECT_PREFIX}.NodeRegistered", b'{"type":"x"}', headers=far)
        await ledger.append([node(5), node(6)], 6)
        follower = LedgerFollower(LedgerStream(nc, keys=keys.reader()))
        follower_task = asyncio.create_task(follower.follow())
        await wait_until(lambda: follower.seq == 8, "the genuine batch after the claim folded")
        assert "n6" in follower.state.nodes
        await js.publish(f"{SUBJECT_PREFIX}.NodeRegistered", b'{"type":"x"}', headers=far)
        await wait_until(lambda: follower.seq == 9, "the follower past the claim when idle")
        assert sorted(follower.state.nodes) == [f"n{i}" for i in range(7)]
    finally:
        if follower_task is not None:
            follower_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower_task
        await nc.close()


async def test_a_reader_far_behind_gets_every_message_in_order_through_the_quick_path(
    nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``next_message`` takes queued messages without nats-py's per-call task, with the same
    bookkeeping as ``next_msg`` (flow control answered as the reader takes messages): a slow
    reader that starts 20,000 messages behind reads every one, in order, and through the quick
    path - which reads nats-py's private fields, so an upgrade that moves them fails here
    instead of silently taking the slow path."""
    nc = await nats.connect(nats_server.url)
    subs: list[Any] = []
    try:
        ledger = spread(nc)
        await ledger.ensure()
        last = 0
        for start in range(0, 20000, 500):
            last = await ledger.append([node(i) for i in range(start, start + 500)], last)
        subscribe = ledger.js.subscribe

        async def kept(*args: Any, **kwargs: Any) -> Any:
            sub = await subscribe(*args, **kwargs)
            subs.append(sub)
            return sub

        monkeypatch.setattr(ledger.js, "subscribe", kept)
        # Flow-control answers the reader itself publishes (nats-py's heartbeat path would
        # answer too, but only after seconds of a stalled read).
        answered: list[str] = []
        publish = nc.publish

        async def noted(subject: str, *args: Any, **kwargs: Any) -> None:
            if sys._getframe(1).f_code.co_name == "next_message":
                answered.append(subject)
            await publish(subject, *args, **kwargs)

        monkeypatch.setattr(nc, "publish", noted)
        seqs = []
        async for seq, event in ledger.read(1):
            assert isinstance(event, NodeRegistered)
            assert event.node.name == f"n{seq - 1}"
            seqs.append(seq)
            if seq % 4000 == 0:
                await asyncio.sleep(0.01)  # a slow reader: the backlog waits for it
        assert seqs == list(range(1, 20001))
        assert subs[0]._gpu_fleet_quick is True
        assert subs[0]._gpu_fleet_taken > 10000
        assert answered  # the server asked for flow control, and the reader answered it
        assert all(subject.startswith("$JS.FC.") for subject in answered)
    finally:
        await nc.close()


async def test_a_read_that_loses_a_message_stops_instead_of_skipping_it(
    nats_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that drops messages (past its pending limits: 3,000 messages against a backlog
    of 20,000 did it here) loses them without the ordered consumer seeing them missing - the
    read used to hand out sequence 3,012 after 3,002.  A ledger has no gaps, so a read or a
    follow that meets one now stops with ``LedgerGapError`` (read again) and never hands out
    anything past it.  The loss is made here, deterministically, by a reader that drops the
    100th message it is given."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = spread(nc)
        await ledger.ensure()
        await ledger.append([node(i) for i in range(300)], 0)
        taken = 0
        real = ledger_stream.next_message

        async def lossy(sub: Any, timeout: float) -> Any:
            nonlocal taken
            taken += 1
            if taken == 100:
                await real(sub, timeout)  # dropped
            return await real(sub, timeout)

        monkeypatch.setattr(ledger_stream, "next_message", lossy)
        for reader in (ledger.read(1), ledger.follow(1)):
            taken = 0
            seqs: list[int] = []

            async def read_all(reader: Any = reader, seqs: list[int] = seqs) -> None:
                async for seq, _ in reader:  # (seq, event) or (seq, events): one per message
                    seqs.append(seq)

            with pytest.raises(LedgerGapError, match="skipped sequences 100-100"):
                await asyncio.wait_for(read_all(), 30)
            assert seqs == list(range(1, 100))
    finally:
        await nc.close()


# -- several events in one message (runtime.ledger_packing) ---------------------------------
async def test_an_append_of_several_events_is_one_message_read_back_in_order(
    nats_server: Any,
) -> None:
    """Three events appended together are one stored message on ``fleet.ledger.Events``; one
    event alone keeps its own subject.  ``entries`` hands the message out whole, ``read`` each
    event under the message's sequence, and a follower folds all of it and stands at it."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = LedgerStream(nc)
        await ledger.ensure()
        assert await ledger.append([node(0), node(1), node(2)], 0) == 1
        assert await ledger.append([node(3)], 1) == 2
        three = ledger.check_sizes([node(0), node(1), node(2)])
        assert ledger.addresses(three, 1) == [(1, 0), (1, 1), (1, 2)]
        js = nc.jetstream()
        assert [(await js.get_msg(STREAM, seq)).subject for seq in (1, 2)] == [
            PACKED_SUBJECT,
            f"{SUBJECT_PREFIX}.NodeRegistered",
        ]
        entries = [
            (seq, [e.node.name for e in events if isinstance(e, NodeRegistered)])
            async for seq, events in ledger.entries(1)
        ]
        assert entries == [(1, ["n0", "n1", "n2"]), (2, ["n3"])]
        flat = [
            (seq, e.node.name) async for seq, e in ledger.read(1) if isinstance(e, NodeRegistered)
        ]
        assert flat == [(1, "n0"), (1, "n1"), (1, "n2"), (2, "n3")]
        follower = LedgerFollower(ledger)
        await follower.catch_up()
        assert (follower.seq, sorted(follower.state.nodes)) == (2, ["n0", "n1", "n2", "n3"])
        # A message handed out again (an ordered consumer after a reconnect) folds nothing.
        follower._apply(1, [node(9)])
        assert "n9" not in follower.state.nodes
    finally:
        await nc.close()


async def test_events_that_outgrow_a_message_are_split_into_one_atomic_batch(
    nats_server: Any,
) -> None:
    """Past the message limit an append becomes several messages - packed ones, and a last
    event left alone on its own subject - landing together or not at all; a signed one
    verifies, and its addresses say where each event went."""
    nc = await nats.connect(nats_server.url)
    try:
        keys = LedgerKeys.generate()
        two = 2 * 99 + 3  # two node events and their brackets, never three
        ledger = LedgerStream(nc, keys=keys, message_limit=two)
        await ledger.ensure()
        five = [node(i) for i in range(5)]
        assert await ledger.append(five, 0) == 3
        sizes = ledger.check_sizes(five)
        assert ledger.addresses(sizes, 3) == [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
        with pytest.raises(LedgerConflictError):
            await ledger.append([node(5), node(6), node(7)], 1)  # stale: nothing of it lands
        assert await ledger.last_seq() == 3
        js = nc.jetstream()
        stored = [await js.get_msg(STREAM, seq) for seq in (1, 2, 3)]
        assert [m.subject for m in stored] == [PACKED_SUBJECT] * 2 + [
            f"{SUBJECT_PREFIX}.NodeRegistered"
        ]
        assert all(len(m.data) <= two for m in stored)
        assert [(m.headers or {}).get(BATCH_HEADER) for m in stored] == ["1 3"] * 3
        reader = LedgerStream(nc, keys=keys.reader())
        names = [
            (seq, e.node.name) async for seq, e in reader.read(1) if isinstance(e, NodeRegistered)
        ]
        assert names == [(1, "n0"), (1, "n1"), (2, "n2"), (2, "n3"), (3, "n4")]
    finally:
        await nc.close()


async def test_a_packed_message_skips_only_what_it_cannot_read(nats_server: Any) -> None:
    """An unknown event type inside a packed message is skipped and its neighbours fold; a
    packed message that is no JSON array at all is one skipped entry; every reader passes both
    sequences and goes on."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = LedgerStream(nc)
        await ledger.ensure()
        js = nc.jetstream()
        known = [EVENT_ENCODER.encode(node(i)) for i in (0, 1)]
        future = b'{"type":"FromTheFuture","at":101}'
        await js.publish(PACKED_SUBJECT, b"[" + b",".join([known[0], future, known[1]]) + b"]")
        await js.publish(PACKED_SUBJECT, b'{"not": "a list"}')
        await ledger.append([node(2), node(3)], 2)
        entries = [
            (seq, [e.node.name if isinstance(e, NodeRegistered) else None for e in events])
            async for seq, events in ledger.entries(1)
        ]
        assert entries == [(1, ["n0", None, "n1"]), (2, [None]), (3, ["n2", "n3"])]
        follower = LedgerFollower(ledger)
        await follower.catch_up()
        assert (follower.seq, sorted(follower.state.nodes)) == (3, ["n0", "n1", "n2", "n3"])
    finally:
        await nc.close()
