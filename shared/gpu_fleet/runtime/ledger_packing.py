"""How ledger events become stream messages, and back.

A decision, or a group of decisions appended together (``gpu_fleet_manager.group``), is
usually several events.  Appended one message per event, a group of 8 admissions was 24
messages: each stored and acknowledged by JetStream, delivered to every follower and parsed by
each of them (nats-py's header parsing alone was a fifth of the binder).  So an append of more
than one event *packs* them: one message on ``fleet.ledger.Events`` whose payload is the JSON
array of the events, in order.  Measured in ``bench/e2e.py`` (issue 11), packing took
nats-server from 0.12-0.14 to about 0.03 ms of CPU per admission.

What a stream sequence means follows from it: a sequence names a *message*, which holds one
event or several.  An event's address in the ledger is ``(seq, index)`` - ``index`` its place
in the message, 0 for a message of one event - shown as ``"<seq>"`` or ``"<seq>.<index>"``
(``event_address``).  A message is folded whole or not at all: followers remember the last
sequence they folded, snapshots are taken between messages, and a reader's position is always
a message boundary.

A single event is still written alone on its own subject (``fleet.ledger.<Type>``), as every
append did before packing; readers take both shapes, so a ledger written before packing reads
as it always did.  Events that would not fit one message (the connection's ``max_payload``)
are split into several, appended as one atomic batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import structlog

from gpu_fleet.core.ledger import EVENT_DECODER, Event
from gpu_fleet.core.names import clamp

log = structlog.get_logger("gpu_fleet.ledger")

SUBJECT_PREFIX = "fleet.ledger"
PACKED_SUBJECT = f"{SUBJECT_PREFIX}.Events"
"""Subject of a message holding several events (no event type is called ``Events``)."""

_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])


def subject_for(event: Event) -> str:
    """The subject of a message holding ``event`` alone."""
    return f"{SUBJECT_PREFIX}.{type(event).__name__}"


def event_address(seq: int, index: int) -> str:
    """Where an event sits in the ledger, as people and notification ids read it: ``"7"`` for
    the first (or only) event of message 7, ``"7.2"`` for its third."""
    return str(seq) if index == 0 else f"{seq}.{index}"


def pack(
    events: Sequence[Event], encoded: Sequence[bytes], limit: int, *, packed: bool = True
) -> list[tuple[str, bytes]]:
    """The messages (subject, payload) that hold ``events`` in order (``layout``)."""
    return [_message(events, encoded, a, b) for a, b in layout(encoded, limit, packed=packed)]


def layout(encoded: Sequence[bytes], limit: int, *, packed: bool = True) -> list[tuple[int, int]]:
    """How events of these encoded sizes are split into messages of at most ``limit`` bytes
    (every event is known to fit ``limit`` alone): ``[start, end)`` of each message, in order.
    Consecutive events are packed into as few ``PACKED_SUBJECT`` messages as fit; an event
    left alone is a message of its own on its own subject.  Not ``packed``: one message per
    event, as before packing (a manager writes so while readers older than packing may still
    read the ledger: ``--ledger-packing off``)."""
    if not packed:
        return [(i, i + 1) for i in range(len(encoded))]
    spans: list[tuple[int, int]] = []
    start, size = 0, 1  # the message's first event; its bytes with the closing bracket
    for i, data in enumerate(encoded):
        grown = size + len(data) + 1  # the opening bracket or a comma
        if i > start and grown > limit:
            spans.append((start, i))
            start, grown = i, 1 + len(data) + 1
        size = grown
    spans.append((start, len(encoded)))
    return spans


def _message(
    events: Sequence[Event], encoded: Sequence[bytes], start: int, end: int
) -> tuple[str, bytes]:
    if end - start == 1:
        return subject_for(events[start]), encoded[start]
    return PACKED_SUBJECT, b"[" + b",".join(encoded[start:end]) + b"]"


def unpack(seq: int, subject: str, data: bytes) -> list[Event | None]:
    """The events of the message at ``seq``, in order; ``None`` for each one that is no event
    this version knows (``decode_event``).  A packed message that is not a JSON array of at
    least one element is one undecodable entry: skipped like any garbage, its sequence still
    passed (every message yields an entry, so a reader's position always moves past it)."""
    if subject != PACKED_SUBJECT:
        return [decode_event(seq, data)]
    try:
        parts = _RAW_LIST.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error("ledger.undecodable_event", seq=seq, bytes=len(data), error=clamp(str(exc), 200))
        return [None]
    if not parts:
        log.error("ledger.undecodable_event", seq=seq, bytes=len(data), error="no events")
        return [None]
    return [decode_event(seq, part, index) for index, part in enumerate(parts)]


def decode_event(seq: int, data: bytes | msgspec.Raw, index: int = 0) -> Event | None:
    """Decode one ledger event; ``None`` (logged with its address) when it is not an event.

    A newer manager may append an event type an older follower does not know yet (rolling
    upgrade), and anyone allowed to publish on ``fleet.ledger.>`` can put garbage on the stream
    (issue 19: a non-JSON message used to raise ``msgspec.DecodeError`` out of every reader,
    killing the binder's and forecaster's followers and failing every manager command).
    Skipping it - while still advancing past its sequence - keeps every reader alive and all of
    them agree, since they all skip the same event; unknown *fields* are already ignored by
    the decoder itself.
    """
    try:
        event: Event = EVENT_DECODER.decode(data)
    except msgspec.ValidationError as exc:
        log.warning("ledger.unknown_event", seq=seq, index=index, error=clamp(str(exc), 200))
        return None
    except msgspec.DecodeError as exc:
        log.error(
            "ledger.undecodable_event",
            seq=seq,
            index=index,
            bytes=len(data),
            error=clamp(str(exc), 200),
        )
        return None
    return event
