"""Batch signatures, judged without I/O: what a reader accepts and what it refuses.

A signed ledger is a run of atomic batches, each signed once on its last message
(``runtime.ledger_verifier``).  These tests build such runs in memory - with forged, replayed,
altered and legacy (one signature per event) messages mixed in - and hold the verifier to the
rule that a message is accepted exactly when it belongs to a complete batch the manager signed
at those sequences, however the reader meets it: in order from the start, starting or ending
inside a batch, or one message at a time.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.runtime.ledger_keys import BATCH_HEADER, HEADER, LedgerKeys
from gpu_fleet.runtime.ledger_verifier import (
    MAX_SPAN,
    InOrder,
    OneAtATime,
    judged_beyond,
    judged_in_order,
)

KEYS = LedgerKeys.generate()
OTHER = LedgerKeys.generate()


@dataclass
class Stream:
    """An in-memory ledger: (subject, data, headers) at sequences 1, 2, ...; ``good`` are the
    sequences the manager appended and signed."""

    messages: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    good: set[int] = field(default_factory=set)

    @property
    def last(self) -> int:
        return len(self.messages)

    def batch(self, payloads: list[bytes], keys: LedgerKeys = KEYS) -> list[int]:
        """Append one batch signed as ``LedgerStream.append`` signs it."""
        first = self.last + 1
        items = [(f"fleet.ledger.E{first + i}", p) for i, p in enumerate(payloads)]
        span = {BATCH_HEADER: f"{first} {first + len(items) - 1}"}
        sig = keys.sign_batch(first, items)
        for i, (subject, data) in enumerate(items):
            headers = dict(span)
            if i == len(items) - 1:
                headers[HEADER] = sig
            self.messages.append((subject, data, headers))
        seqs = list(range(first, self.last + 1))
        if keys is KEYS:
            self.good.update(seqs)
        return seqs

    def legacy(self, data: bytes) -> int:
        """One event signed on its own (a ledger written before batch signatures)."""
        seq = self.last + 1
        subject = f"fleet.ledger.E{seq}"
        self.messages.append((subject, data, {HEADER: KEYS.sign(seq, subject, data)}))
        self.good.add(seq)
        return seq

    def raw(self, subject: str, data: bytes, headers: Mapping[str, str]) -> int:
        """Anything a publisher without the key can put on the stream."""
        self.messages.append((subject, data, dict(headers)))
        return self.last

    def at(self, seq: int) -> tuple[str, bytes, dict[str, str]]:
        return self.messages[seq - 1]


@dataclass(frozen=True)
class Raw:
    """A stored message as a reader meets it."""

    subject: str
    data: bytes
    headers: dict[str, str]


class Fetcher:
    """``Fetch`` over an in-memory stream, counting what it is asked for."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.asked: list[int] = []

    async def __call__(self, seq: int) -> Raw | None:
        self.asked.append(seq)
        return Raw(*self.stream.at(seq)) if 1 <= seq <= self.stream.last else None


def _released(out: list[tuple[int, object, bool]]) -> dict[int, bool]:
    seqs = [seq for seq, _, _ in out]
    assert seqs == sorted(seqs), "in order"
    assert len(seqs) == len(set(seqs)), "each once"
    assert all(isinstance(item, Raw) for _, item, _ in out)
    return {seq: ok for seq, _, ok in out}


def read(stream: Stream, start: int = 1, end: int | None = None) -> dict[int, bool]:
    """Verdicts of a sequential read of ``start..end`` through the readers' own code
    (``judged_in_order``, then ``judged_beyond``), fetching outside it from the stream."""
    end = stream.last if end is None else end
    fetch = Fetcher(stream)

    async def go() -> list[tuple[int, object, bool]]:
        order = InOrder(KEYS)
        out: list[tuple[int, object, bool]] = []
        for seq in range(start, end + 1):
            out += await judged_in_order(order, seq, Raw(*stream.at(seq)), fetch)
        return out + await judged_beyond(order, end, fetch)

    verdicts = _released(asyncio.run(go()))
    assert list(verdicts) == list(range(start, end + 1))
    return verdicts


def follow(stream: Stream, start: int = 1) -> tuple[dict[int, bool], dict[int, bool]]:
    """A follower from ``start`` that has received every message: what it released before it
    went idle, and after (``InOrder.impossible`` at the stream's last sequence)."""
    fetch = Fetcher(stream)

    async def go() -> tuple[list[tuple[int, object, bool]], list[tuple[int, object, bool]]]:
        order = InOrder(KEYS)
        out: list[tuple[int, object, bool]] = []
        for seq in range(start, stream.last + 1):
            out += await judged_in_order(order, seq, Raw(*stream.at(seq)), fetch)
        return out, order.impossible(stream.last)

    busy, idle = asyncio.run(go())
    return _released(busy), _released(idle)


def one_at_a_time(stream: Stream, seqs: list[int]) -> tuple[dict[int, bool], list[int]]:
    """Verdicts as the notifier's consumer reaches them (``OneAtATime``), and what it fetched."""
    fetch = Fetcher(stream)
    reader = OneAtATime(KEYS, fetch)

    async def go() -> dict[int, bool]:
        return {seq: await reader.accepted(seq, Raw(*stream.at(seq))) for seq in seqs}

    return asyncio.run(go()), fetch.asked


def test_a_batch_is_accepted_whole_and_only_at_its_signed_end() -> None:
    stream = Stream()
    stream.batch([b"a", b"b", b"c"])
    order = InOrder(KEYS)
    assert order.push(1, *stream.at(1), 1) == []
    assert order.push(2, *stream.at(2), 2) == []  # held: its signature has not arrived
    assert order.push(3, *stream.at(3), 3) == [(1, 1, True), (2, 2, True), (3, 3, True)]


def test_an_altered_message_sinks_its_whole_batch_and_nothing_else() -> None:
    stream = Stream()
    stream.batch([b"a", b"b"])
    stream.batch([b"c", b"d", b"e"])
    stream.batch([b"f"])
    subject, _, headers = stream.at(4)
    stream.messages[3] = (subject, b"D", headers)
    assert read(stream) == {1: True, 2: True, 3: False, 4: False, 5: False, 6: True}


def test_forged_replayed_and_foreign_signed_messages_are_refused() -> None:
    stream = Stream()
    stream.batch([b"a", b"b"])
    stream.raw("fleet.ledger.X", b"evil", {})  # no signature at all
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: "4 5"})  # claims a batch it is not in
    stream.batch([b"f", b"g"], keys=OTHER)  # signed by another key
    for seq in (1, 2):  # the manager's first batch, copied byte for byte to the end
        stream.raw(*stream.at(seq))
    stream.batch([b"h"])
    verdicts = read(stream)
    assert {seq for seq, ok in verdicts.items() if ok} == stream.good == {1, 2, 9}


def test_a_legacy_ledger_with_one_signature_per_event_still_verifies() -> None:
    stream = Stream()
    stream.legacy(b"a")
    stream.legacy(b"b")
    stream.batch([b"c", b"d"])
    copied = stream.raw(*stream.at(2))  # a legacy event replayed: signed for sequence 2
    assert read(stream) == {1: True, 2: True, 3: True, 4: True, copied: False}


def test_a_read_that_starts_or_ends_inside_a_batch_judges_it_whole() -> None:
    stream = Stream()
    stream.batch([b"a", b"b", b"c", b"d"])
    stream.batch([b"e", b"f", b"g"])
    assert read(stream, start=3) == {3: True, 4: True, 5: True, 6: True, 7: True}
    assert read(stream, start=4, end=5) == {4: True, 5: True}
    assert read(stream, start=7) == {7: True}


def test_a_span_that_never_completes_is_refused_when_the_reader_passes_its_end() -> None:
    stream = Stream()
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: "1 3"})  # the rest never comes
    stream.batch([b"b", b"c"])
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"4 {3 + MAX_SPAN}"})  # too long
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: "five six"})
    assert read(stream) == {1: False, 2: True, 3: True, 4: False, 5: False}


def test_a_signature_must_sit_on_the_last_message_of_its_span() -> None:
    stream = Stream()
    stream.batch([b"a", b"b"])
    subject, data, headers = stream.at(1)
    _, _, signed = stream.at(2)
    stream.messages[0] = (subject, data, {**headers, HEADER: signed[HEADER]})
    assert read(stream) == {1: False, 2: False}
    garbage = base64.b64encode(b"x" * 64).decode()
    stream = Stream()
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: "1 1", HEADER: garbage})
    assert read(stream) == {1: False}


def test_a_forged_far_claim_does_not_hold_a_follower_back() -> None:
    """A forger's message claims a batch ending 9,999 sequences later (found by review: a
    follower held every genuine batch behind it until 10,000 more messages came).  The next
    message inside the claim shows it is no batch; a claim past the stream's end is refused
    when the follower goes idle."""
    stream = Stream()
    stream.batch([b"a"])
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"2 {1 + MAX_SPAN}"})
    for i in range(5):
        stream.batch([f"{i}".encode(), b"x"])
    tail = stream.last + 1
    stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"{tail} {tail + 50}"})
    busy, idle = follow(stream)
    assert busy == {seq: seq in stream.good for seq in range(1, tail)}
    assert idle == {tail: False}


def test_one_at_a_time_refuses_a_far_claim_after_one_fetch_and_agrees_with_a_sequential_read() -> (
    None
):
    """The notifier's reader meets a forged message claiming a batch far past the stream's end
    (found by review: it fetched 10,000 sequences one by one, and a batch the manager appended
    meanwhile was refused).  It fetches the claimed end, finds none, refuses; the genuine batch
    appended after that is accepted, as every other reader accepts it."""
    stream = Stream()
    stream.batch([b"a"])
    forged = stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"2 {1 + MAX_SPAN - 1}"})
    fetch = Fetcher(stream)
    reader = OneAtATime(KEYS, fetch)

    async def meet(seq: int) -> bool:
        return await reader.accepted(seq, Raw(*stream.at(seq)))

    assert asyncio.run(meet(1)) is True
    assert asyncio.run(meet(forged)) is False
    assert fetch.asked == [MAX_SPAN]  # the claimed end, which the stream does not have
    genuine = stream.batch([b"b", b"c", b"d"])  # appended after the forger's message
    assert [asyncio.run(meet(seq)) for seq in genuine] == [True, True, True]
    assert read(stream) == {1: True, forged: False, **dict.fromkeys(genuine, True)}


def test_one_at_a_time_does_not_fetch_backwards_except_where_it_starts() -> None:
    """A claim reaching back before the message is fetched only for the first message the
    reader meets (it may start inside a batch); later, a batch's earlier members came first
    (found by review: forged backward claims made the notifier re-fetch what it had passed
    and keep the verdicts for ever)."""
    stream = Stream()
    stream.batch([b"a", b"b", b"c"])
    back = [
        stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"1 {stream.last + 1}"})
        for _ in range(3)
    ]
    stream.batch([b"d", b"e"])
    verdicts, asked = one_at_a_time(stream, list(range(2, stream.last + 1)))
    assert verdicts == {seq: seq in stream.good for seq in range(2, stream.last + 1)}
    assert back[0] not in stream.good
    # The first batch, met inside: its end, then its start; the last batch: its end.  The
    # forged backward claims: nothing.
    assert asked == [3, 1, 8]


# -- property: however it is read, a message is accepted iff the manager appended it ---------
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("batch"), st.integers(1, 6)),
        st.tuples(st.just("legacy"), st.just(1)),
        st.tuples(st.just("forged"), st.integers(0, 4)),
        st.tuples(st.just("far"), st.integers(1, 3 * MAX_SPAN)),
        st.tuples(st.just("back"), st.integers(1, 8)),
        st.tuples(st.just("signed end"), st.integers(1, 4)),
        st.tuples(st.just("replay"), st.integers(1, 40)),
        st.tuples(st.just("foreign"), st.integers(1, 3)),
    ),
    min_size=1,
    max_size=14,
)


def build(ops: list[tuple[str, int]]) -> Stream:
    stream = Stream()
    for op, n in ops:
        seq = stream.last + 1
        if op == "batch":
            stream.batch([f"{stream.last}.{i}".encode() for i in range(n)])
        elif op == "legacy":
            stream.legacy(f"legacy{stream.last}".encode())
        elif op in {"forged", "far"}:  # unsigned, claiming a span that may reach later ones
            stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"{seq} {seq + n}"})
        elif op == "back":  # a claim reaching back over what came before
            stream.raw("fleet.ledger.X", b"evil", {BATCH_HEADER: f"{max(1, seq - n)} {seq}"})
        elif op == "signed end":  # a forged batch end, signature and all, over a claimed span
            junk = base64.b64encode(bytes(64)).decode()
            headers = {BATCH_HEADER: f"{max(1, seq - n)} {seq}", HEADER: junk}
            stream.raw("fleet.ledger.X", b"evil", headers)
        elif op == "replay" and stream.last:
            stream.raw(*stream.at(1 + (n - 1) % stream.last))
        elif op == "foreign":
            stream.batch([b"x"] * n, keys=OTHER)
    return stream


@settings(max_examples=300, deadline=None)
@given(ops=OPS, data=st.data())
def test_any_read_accepts_exactly_what_the_manager_appended(
    ops: list[tuple[str, int]], data: st.DataObject
) -> None:
    """From any sequence to any other, a follower from any sequence, and the one-at-a-time
    reader: each accepts exactly the manager's messages, and none of them is held back by
    what follows it once the follower has gone idle."""
    stream = build(ops)
    if not stream.last:
        return
    start = data.draw(st.integers(1, stream.last))
    end = data.draw(st.integers(start, stream.last))
    expected = {seq: seq in stream.good for seq in range(start, end + 1)}
    assert read(stream, start, end) == expected
    verdicts, asked = one_at_a_time(stream, list(range(start, end + 1)))
    assert verdicts == expected
    assert len(asked) <= 2 * (end - start + 1) + 6  # no claim makes it fetch a span's length
    busy, idle = follow(stream, start)
    assert {**busy, **idle} == {seq: seq in stream.good for seq in range(start, stream.last + 1)}
