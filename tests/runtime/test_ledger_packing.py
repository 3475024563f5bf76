"""How ledger events are laid out in stream messages (``runtime.ledger_packing``)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from gpu_fleet.core.ledger import EVENT_ENCODER, NodeRegistered
from gpu_fleet.core.model import Node
from gpu_fleet.runtime.ledger_packing import (
    PACKED_SUBJECT,
    event_address,
    layout,
    pack,
    unpack,
)


def _packed_size(sizes: list[int]) -> int:
    return sum(sizes) + len(sizes) + 1  # brackets and commas


@given(
    limit=st.integers(min_value=3, max_value=400),
    sizes=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40),
)
def test_a_layout_covers_every_event_in_order_in_as_few_messages_as_fit(
    limit: int, sizes: list[int]
) -> None:
    sizes = [min(s, limit) for s in sizes]  # every event fits a message alone
    spans = layout([b"x" * s for s in sizes], limit)

    assert [i for a, b in spans for i in range(a, b)] == list(range(len(sizes)))
    for a, b in spans:
        if b - a > 1:
            assert _packed_size(sizes[a:b]) <= limit
    for (a, b), (c, _) in itertools.pairwise(spans):
        assert c == b
        assert _packed_size(sizes[a : b + 1]) > limit  # greedy: the next one did not fit


def node(i: int) -> NodeRegistered:
    return NodeRegistered(at=i, node=Node(name=f"n{i}", gpus=8, labels={}))


def test_messages_read_back_as_the_events_they_were_made_of() -> None:
    events = [node(i) for i in range(7)]
    encoded = [EVENT_ENCODER.encode(e) for e in events]
    limit = 3 * len(encoded[0]) + 4  # three to a message
    messages = pack(events, encoded, limit)

    assert [subject for subject, _ in messages] == [PACKED_SUBJECT] * 2 + [
        "fleet.ledger.NodeRegistered"
    ]
    assert [e for seq, (s, data) in enumerate(messages, 1) for e in unpack(seq, s, data)] == events
    assert pack(events[:1], encoded[:1], limit) == [("fleet.ledger.NodeRegistered", encoded[0])]


def test_an_event_address_is_its_message_then_its_place_after_the_first() -> None:
    assert [event_address(7, 0), event_address(7, 1), event_address(12, 30)] == [
        "7",
        "7.1",
        "12.30",
    ]


def test_a_packed_message_without_events_is_one_skipped_entry() -> None:
    """Every message yields at least one entry, so a reader that counts where it is (the
    manager's catch-up, a follower) always moves past it; garbage and an empty array alike."""
    for data in (b"[]", b"{}", b"not json", b"[1, 2]"):
        entries = unpack(9, PACKED_SUBJECT, data)
        assert entries, data
        assert all(e is None for e in entries), data
