"""Objects per namespace and pending requests per client (issue 12, "Limits").

A real manager on a real nats-server with small limits.  The pending-requests test makes
requests wait deterministically by holding the manager's lock (reads queue behind it), never
by timing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from _stack import Stack, budget, run, wait_until

from gpu_fleet.cli.stack import ApiCallError
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet_manager.__main__ import build_parser
from gpu_fleet_manager.quotas import client_of
from gpu_fleet_manager.service import Manager


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


async def limited_manager(stack: Stack, limits: ApiLimits) -> Manager:
    """Replace the stack's manager by one with ``limits`` (same ledger)."""
    old = next(a for a in stack.actors if isinstance(a, Manager))
    await stack.remove(old)
    manager = Manager(stack.manager_config(start=old.config.start, limits=limits))
    await stack.add(manager)
    return manager


@pytest.mark.asyncio
async def test_a_namespace_full_of_objects_refuses_creates_naming_the_limit(stack: Stack) -> None:
    await limited_manager(stack, ApiLimits(max_objects_per_namespace=3))
    await stack.node("n1", 8)
    await stack.apply(budget("team", "org:team"))
    await stack.apply(run("team", "a", 1) + "---" + run("team", "b", 1))  # 3 objects: full
    before = await stack.seq()
    with pytest.raises(ApiCallError) as refused:
        await stack.apply(run("team", "c", 1))
    assert refused.value.code == "validation"
    assert "namespace team holds 3 objects and this apply creates 1" in refused.value.message
    assert "the limit is 3 objects per namespace" in refused.value.message
    assert refused.value.errors[0]["path"] == "documents"
    assert await stack.seq() == before, "a refused create changed the ledger"
    # Updating what exists is allowed; another namespace has its own room.
    await stack.apply(run("team", "a", 2))
    await stack.apply(budget("other", "org:other"))
    await stack.apply(run("other", "x", 1))
    # An apply that would overflow is refused whole: neither of its runs is created.
    await stack.api("delete", {"kind": "Run", "namespace": "team", "name": "b"})
    with pytest.raises(ApiCallError, match="creates 2"):
        await stack.apply(run("team", "d", 1) + "---" + run("team", "e", 1))
    names = {r["name"] for r in await stack.api("list", {"namespace": "team"})}
    assert names == {"a"}
    await stack.apply(run("team", "d", 1))  # the freed place is usable


@pytest.mark.asyncio
async def test_a_client_with_too_many_pending_requests_is_told_the_limit(stack: Stack) -> None:
    manager = await limited_manager(stack, ApiLimits(max_pending_per_client=2))
    greedy = await nats.connect(stack.url)
    patient = await nats.connect(stack.url)
    try:
        async with manager.lock:  # every read waits behind it: requests stay pending
            first = [
                asyncio.create_task(greedy.request("fleet.api.seq", b"{}", timeout=30))
                for _ in range(2)
            ]
            await wait_until(lambda: manager.pending.pending, "two requests to be pending")
            await wait_until(
                lambda: sum(manager.pending.pending.values()) == 2, "both requests pending"
            )
            third = await greedy.request("fleet.api.seq", b"{}", timeout=30)
            other = asyncio.create_task(patient.request("fleet.api.seq", b"{}", timeout=30))
            await wait_until(
                lambda: sum(manager.pending.pending.values()) == 3, "the other client pending"
            )
        assert third.headers is not None
        assert third.headers["Nats-Service-Error-Code"] == "429"
        reply = json.loads(third.data)
        assert reply["ok"] is False
        assert reply["error"]["code"] == "unavailable"
        assert "the limit is 2 per client" in reply["error"]["message"]
        # Once the lock is free the waiting ones are answered: the other client was not refused.
        for msg in [*(await asyncio.gather(*first)), await other]:
            assert json.loads(msg.data)["ok"] is True
        await wait_until(lambda: not manager.pending.pending, "nothing pending any more")
        assert json.loads((await greedy.request("fleet.api.seq", b"{}", timeout=30)).data)["ok"]
    finally:
        await greedy.close()
        await patient.close()


def test_client_is_the_reply_inbox_without_the_request_token() -> None:
    assert client_of("_INBOX.abc123.7") == "_INBOX.abc123"
    assert client_of("_INBOX.abc123.8") == "_INBOX.abc123"
    assert client_of("_INBOX.single") == "_INBOX.single"  # old-style: one inbox per request
    assert client_of("") == ""


def test_limits_are_flags_with_environment_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args([])
    assert args.max_objects_per_namespace == ApiLimits().max_objects_per_namespace
    assert args.max_pending_per_client == ApiLimits().max_pending_per_client
    monkeypatch.setenv("GPU_FLEET_MAX_OBJECTS_PER_NAMESPACE", "50")
    monkeypatch.setenv("GPU_FLEET_MAX_PENDING_PER_CLIENT", "8")
    args = build_parser().parse_args([])
    assert (args.max_objects_per_namespace, args.max_pending_per_client) == (50, 8)
    args = build_parser().parse_args(["--max-pending-per-client", "3"])
    assert args.max_pending_per_client == 3
