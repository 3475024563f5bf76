"""The ledger stream adapter over a real JetStream: atomic batches, races, evolution."""

from __future__ import annotations

from typing import Any

import nats
import pytest

from gpu_fleet.core.ledger import NodeRegistered
from gpu_fleet.core.model import Node
from gpu_fleet.runtime.follower import LedgerFollower
from gpu_fleet.runtime.ledger_stream import SUBJECT_PREFIX, LedgerConflictError, LedgerStream

pytestmark = pytest.mark.asyncio


def node(i: int) -> NodeRegistered:
    return NodeRegistered(at=100 + i, node=Node(name=f"n{i}", gpus=8, labels={}))


async def test_batch_is_atomic_and_guarded_by_last_sequence(nats_server: Any) -> None:
    """A batch lands whole after the expected sequence; a stale writer gets LedgerConflictError."""
    nc = await nats.connect(nats_server.url)
    try:
        ledger = LedgerStream(nc)
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
