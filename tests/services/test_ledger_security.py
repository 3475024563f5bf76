"""Only the manager writes the truth: by NATS permission first, by signature when that fails.

The stack runs as deployed (authorization on, a signed ledger).  The operator's ``admin`` user
is refused the ledger's subjects by the server; an *unrestricted* user (``root``, which only the
tests' profile has: a mis-configured account, a leaked server password) can put a message on
the stream, and then every reader skips it - a forged event and a replayed, validly signed one
alike - so no state changes, before or after a manager restart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
import pytest_asyncio
from tests.services._stack import LABELS, T0, Stack, budget, run, wait_until

from gpu_fleet.core.ledger import EVENT_ENCODER, NodeHealthChanged, NodeRegistered
from gpu_fleet.core.model import Node, NodeHealth
from gpu_fleet.runtime.ledger_keys import HEADER, LedgerKeys
from gpu_fleet.runtime.ledger_stream import STREAM, LedgerStream
from gpu_fleet_binder.service import Binder
from gpu_fleet_manager.service import Manager

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n0", 8)
        await stack.node("n1", 8)
        await stack.apply(budget("team", "org:team"))
        await stack.apply(run("team", "train", 8))
        yield stack
    finally:
        await stack.stop()


def binder(stack: Stack) -> Binder:
    found = next(a for a in stack.actors if isinstance(a, Binder))
    assert found.follower is not None
    return found


def folded(stack: Stack) -> int:
    """The ledger sequence the binder has folded to."""
    follower = binder(stack).follower
    assert follower is not None
    return follower.seq


def manager(stack: Stack) -> Manager:
    return next(a for a in stack.actors if isinstance(a, Manager))


async def last_seq(stack: Stack) -> int:
    return await LedgerStream(stack.client).last_seq()


def fingerprint(stack: Stack) -> tuple[dict[str, str], list[str], int]:
    """Node health and runs as the binder's fold and the manager's state see them."""
    follower = binder(stack).follower
    assert follower is not None
    fleet = manager(stack).require_fleet()
    health = {n: node.health.value for n, node in sorted(follower.state.nodes.items())}
    assert health == {n: node.health.value for n, node in sorted(fleet.state.nodes.items())}
    return health, sorted(follower.state.runs), len(fleet.state.nodes)


async def test_the_admin_user_is_refused_the_ledgers_subjects_by_the_server(stack: Stack) -> None:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    admin = await nats.connect(stack.url, error_cb=on_error)
    try:
        before = await last_seq(stack)
        forged = NodeRegistered(at=T0, node=Node(name="evil", gpus=64, labels=LABELS))
        await admin.publish("fleet.ledger.NodeRegistered", EVENT_ENCODER.encode(forged))
        await admin.publish(f"$JS.API.STREAM.PURGE.{STREAM}", b"{}")
        await wait_until(lambda: len(errors) >= 2, "two permission violations")
        assert all("permissions violation" in e.lower() for e in errors)
        assert any("fleet.ledger.noderegistered" in e.lower() for e in errors)
        assert any(f"$js.api.stream.purge.{STREAM}".lower() in e.lower() for e in errors)
        assert await last_seq(stack) == before
    finally:
        await admin.close()


async def test_forged_and_replayed_events_are_skipped_by_every_reader(stack: Stack) -> None:
    await stack.api("node", {"op": "fence", "name": "n1"})
    fenced_at = await last_seq(stack)  # the NodeHealthChanged(fenced) the manager signed
    await stack.api("node", {"op": "uncordon", "name": "n1"})
    seq = await stack.seq()
    await wait_until(lambda: folded(stack) >= seq, "the binder at the head")
    before = fingerprint(stack)
    assert before[0] == {"n0": "Ready", "n1": "Ready"}

    root = await nats.connect(stack.url_for("root"))
    try:
        js = root.jetstream()
        # 1. Forged: a well-formed event without the manager's signature (and one with a
        #    signature by another key).
        evil = NodeRegistered(at=T0, node=Node(name="evil", gpus=64, labels=LABELS))
        await js.publish("fleet.ledger.NodeRegistered", EVENT_ENCODER.encode(evil))
        other = LedgerKeys.generate()
        fence = EVENT_ENCODER.encode(NodeHealthChanged(at=T0, node="n0", health=NodeHealth.FENCED))
        target = await last_seq(stack) + 1
        sig = other.sign(target, "fleet.ledger.NodeHealthChanged", fence)
        await js.publish("fleet.ledger.NodeHealthChanged", fence, headers={HEADER: sig})
        # 2. Replayed: the manager's own signed "fence n1", copied byte for byte.
        original = await js.get_msg(STREAM, fenced_at)
        assert original.headers is not None
        assert HEADER in original.headers
        assert msgspec.json.decode(original.data)["health"] == "Fenced"
        ack = await js.publish(
            original.subject, original.data, headers={HEADER: original.headers[HEADER]}
        )
    finally:
        await root.close()

    assert ack.seq == fenced_at + 4  # uncordon, evil, foreign-signed fence, then the replay
    await wait_until(lambda: folded(stack) >= ack.seq, "the binder past them")
    assert fingerprint(stack) == before
    # The manager keeps deciding on top of them (its append re-folds past them) ...
    await stack.apply(run("team", "after", 4))
    view = await stack.api("get", {"namespace": "team", "name": "after"})
    assert view["phase"] == "Running"
    # ... and a manager rebuilt from the stream skips them too.
    old = manager(stack)
    await stack.remove(old)
    await stack.add(Manager(stack.manager_config()))
    health, runs, nodes = fingerprint(stack)
    assert health == before[0]
    assert "team/after" in runs
    assert nodes == 2
    # Without the key (an unsigned reader) the forged node would have been folded: the
    # signature, not luck, is what kept it out.
    unsigned = [
        e async for _, e in LedgerStream(stack.client).read(1) if isinstance(e, NodeRegistered)
    ]
    assert "evil" in {e.node.name for e in unsigned}
