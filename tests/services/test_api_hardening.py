"""No request can take the fleet down (issue 19), against a real nats-server and real services.

Each test names the break it reproduces: it failed on the code before the fix and passes after.
Waiting is bounded polling or a request timeout, never a timing assertion.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from gpu_fleet.cli.stack import (
    READINESS_PROBE,
    ApiCallError,
    InProcessStack,
    call,
    wait_until_answers,
)
from gpu_fleet.core.ledger import FleetState, NodeRegistered, check_invariants, fold
from gpu_fleet.core.model import Node
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime.ledger_stream import (
    SUBJECT_PREFIX,
    LedgerEventTooLargeError,
    LedgerStream,
)
from gpu_fleet.runtime.replies import HEADER_MAX, ApiLimits
from gpu_fleet_binder.service import Binder
from gpu_fleet_manager.service import Manager, ManagerConfig

pytestmark = pytest.mark.asyncio

T0 = parse_instant("2026-03-02T00:00:00Z")
LABELS = {"region": "r1", "cluster": "c1", "fabric.domain": "f1", "gpu.flavor": "H100"}


def budget(namespace: str, owner: str, parents: str = "[]", concurrency: int = 16) -> str:
    return f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: b, namespace: {namespace}}}
spec:
  owner: "{owner}"
  parents: {parents}
  envelopes:
    - {{name: west, flavor: H100, selector: {{region: r1}}, concurrency: {concurrency},
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}}
"""


def run_doc(name: str, gpus: int, ns: str = "team") -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[InProcessStack]:
    stack = InProcessStack(tmp_path, virtual_start=T0, services=("binder", "manager"), root=True)
    await stack.start()
    assert stack.nc is not None
    for i in range(2):
        node = {"name": f"n{i}", "gpus": 8, "labels": LABELS}
        await call(stack.nc, "node", {"op": "register", "node": node})
    await call(stack.nc, "apply", {"documents": budget("team", "org:team")})
    yield stack
    await stack.stop()


def client(stack: InProcessStack) -> Client:
    assert stack.nc is not None
    return stack.nc


async def raw(nc: Client, endpoint: str, body: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """A request as any NATS client can send it: headers and the decoded JSON reply."""
    msg = await nc.request(f"fleet.api.{endpoint}", body, timeout=20)
    return dict(msg.headers or {}), json.loads(msg.data)


async def seq(stack: InProcessStack) -> int:
    return int((await call(client(stack), "seq", {}))["seq"])


async def replace_manager(stack: InProcessStack, limits: ApiLimits) -> Manager:
    """Swap the stack's manager for one with other API limits (same ledger, virtual clock)."""
    await stack.stop_service("manager")
    manager = Manager(
        ManagerConfig(
            nats_url=stack.url_for("manager"),
            ledger_keys=stack.keys_for("manager"),
            clock="virtual",
            start=T0,
            limits=limits,
        )
    )
    await manager.start()
    stack.actors["manager"] = manager
    # Its subscriptions can be unseen by another connection for a moment (found flaky under
    # load: "no responders" on the first request; ``wait_until_answers``).
    await wait_until_answers(client(stack), READINESS_PROBE["manager"])
    return manager


async def ledger_state(stack: InProcessStack) -> FleetState:
    state = FleetState()
    async for _, event in LedgerStream(client(stack)).read(1):
        if event is not None:
            fold(state, event)
    return state


# -- break 1: one read request took the whole API down -----------------------------------------


async def test_a_600_kb_name_is_refused_before_decoding_and_the_api_keeps_answering(
    stack: InProcessStack,
) -> None:
    """Break 1: the not-found reply quoted the name in a header and the body, exceeded
    max_payload, and the server dropped the manager's connection for good.  Now the request is
    refused by size (413) with a reply that does not grow with it."""
    manager = stack.actors["manager"]
    assert isinstance(manager, Manager)
    body = json.dumps({"namespace": "team", "name": "x" * 600_000}).encode()
    headers, reply = await raw(client(stack), "get", body)
    assert headers["Nats-Service-Error-Code"] == "413"
    assert len(headers["Nats-Service-Error"]) <= HEADER_MAX
    assert reply["error"]["code"] == "bad_request"
    assert reply["error"]["errors"] == [
        {
            "path": "<request>",
            "message": f"must be no more than {512 * 1024} bytes (got {len(body)})",
        }
    ]
    assert manager.nc is not None
    assert not manager.nc.is_closed
    assert await seq(stack) > 0  # the API still answers


async def test_a_long_name_under_the_request_limit_gets_a_field_error_quoting_nothing(
    stack: InProcessStack,
) -> None:
    """With room for it in the request, the name reaches the rules: a 400 naming the field."""
    await replace_manager(stack, ApiLimits(max_request_bytes=900 * 1024))
    body = json.dumps({"namespace": "team", "name": "x" * 600_000}).encode()
    headers, reply = await raw(client(stack), "get", body)
    assert headers["Nats-Service-Error-Code"] == "400"
    assert reply["error"]["errors"] == [
        {"path": "name", "message": "must be no more than 63 characters (got 600000)"}
    ]
    assert len(json.dumps(reply)) < 1000
    assert await seq(stack) > 0


@pytest.mark.parametrize(
    ("endpoint", "body", "path"),
    [
        ("get", {"namespace": "Team", "name": "x"}, "namespace"),
        ("explain", {"namespace": "team", "name": "UPPER"}, "name"),
        ("complete", {"namespace": "team", "name": "a_b"}, "name"),
        ("fail", {"namespace": "team", "name": "a.b"}, "name"),
        ("retry", {"namespace": "team", "name": "x", "attempt": -1}, "attempt"),
        ("retry", {"namespace": "team", "name": "x", "pod": "p" * 300}, "pod"),
        ("delete", {"kind": "Budget", "namespace": "team", "name": "-b"}, "name"),
        ("delete", {"kind": "Pod", "namespace": "team", "name": "b"}, "kind"),
        ("shrink", {"namespace": "team", "name": "x", "by": 0}, "by"),
        ("sponsors", {"name": "x", "op": "add", "sponsor": "org a"}, "sponsor"),
        ("eta", {"name": "x", "eta": "9" * 100}, "eta"),
        ("eta", {"name": "x", "eta": 10**15}, "eta"),
        ("node", {"op": "cordon", "name": "Bad_Node"}, "name"),
        ("node", {"op": "register"}, "node"),
        ("list", {"namespace": "NS"}, "namespace"),
        ("list", {"limit": 0}, "limit"),
        ("leases", {"namespace": "team", "name": "x_y"}, "name"),
        ("budgets", {"continue": "not-a-token"}, "continue"),
        ("report", {"label": "-x-"}, "label"),
        ("clock", {"advance_to": 10**15}, "advance_to"),
        ("apply", {"documents": "---\n---\n"}, "documents"),
        ("apply", {"documents": "a: 1", "source": "x" * 2000}, "source"),
        ("get", {"name": 5}, "name"),
        ("get", {"namespace": "team"}, "name"),
    ],
)
async def test_every_endpoint_refuses_a_bad_field_by_name_and_changes_nothing(
    stack: InProcessStack, endpoint: str, body: dict[str, Any], path: str
) -> None:
    """Names follow Kubernetes' rules, counts are positive; a 400 names the field."""
    before = await seq(stack)
    with pytest.raises(ApiCallError) as info:
        await call(client(stack), endpoint, body)
    assert info.value.code in ("validation", "bad_request")
    assert path in [e["path"] for e in info.value.errors]
    assert await seq(stack) == before


# -- paging ---------------------------------------------------------------------------------


async def test_lists_page_with_limit_and_continue_in_order_and_a_foreign_token_is_refused(
    stack: InProcessStack,
) -> None:
    """Kubernetes-style paging: every item once, in order, with the remaining count."""
    nc = client(stack)
    for i in range(7):
        await call(nc, "apply", {"documents": run_doc(f"r{i}", 1)})
    names: list[str] = []
    token = None
    pages = 0
    while True:
        page = await call(nc, "list", {"namespace": "team", "limit": 3, "continue": token})
        pages += 1
        names += [r["name"] for r in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            assert "remainingItemCount" not in page["metadata"]
            break
        assert page["metadata"]["remainingItemCount"] == 7 - len(names)
    assert (pages, names) == (3, [f"r{i}" for i in range(7)])
    leases = await call(nc, "leases", {"namespace": "team", "limit": 2})
    assert len(leases["items"]) == 2
    first = await call(nc, "list", {"limit": 1})
    with pytest.raises(ApiCallError) as info:  # a runs token given to the leases list
        await call(nc, "leases", {"limit": 1, "continue": first["metadata"]["continue"]})
    assert info.value.errors == [
        {"path": "continue", "message": "not a continue token from this list"}
    ]


async def test_pages_stay_under_the_reply_limit_and_an_unpaged_list_too_large_is_refused(
    stack: InProcessStack,
) -> None:
    """Replies never outgrow the bound: pages shrink to fit, an old-style request gets a 413."""
    nc = client(stack)
    for i in range(12):
        await call(nc, "apply", {"documents": run_doc(f"run-{i:02d}", 1)})
    await replace_manager(stack, ApiLimits(max_reply_bytes=8 * 1024))
    headers, reply = await raw(nc, "list", b'{"namespace": "team"}')
    assert headers["Nats-Service-Error-Code"] == "413"
    assert reply["error"]["errors"][0]["path"] == "limit"
    seen = []
    token = None
    while True:
        msg = await nc.request(
            "fleet.api.list", json.dumps({"limit": 500, "continue": token}).encode(), timeout=20
        )
        assert len(msg.data) <= 8 * 1024
        page = json.loads(msg.data)["result"]
        assert page["items"]
        seen += [r["name"] for r in page["items"]]
        token = page["metadata"].get("continue")
        if not token:
            break
    assert seen == sorted(seen)
    assert len(seen) == len(set(seen)) == 12


# -- break 6: budget parent cycles ---------------------------------------------------------


async def test_a_budget_closing_a_parent_cycle_is_refused_with_the_whole_apply(
    stack: InProcessStack,
) -> None:
    """Break 6: a's parent b and b's parent a were accepted and then shared as family."""
    nc = client(stack)
    await call(nc, "apply", {"documents": budget("bns", "org:b", parents='["org:a"]')})
    before = await seq(stack)
    documents = run_doc("bystander", 1) + "---\n" + budget("ans", "org:a", parents='["org:b"]')
    with pytest.raises(ApiCallError) as info:
        await call(nc, "apply", {"documents": documents})
    assert info.value.code == "validation"
    assert info.value.errors == [
        {
            "path": "spec.parents",
            "message": "Budget ans/b: parents form a cycle: org:a -> org:b -> org:a",
        }
    ]
    assert await seq(stack) == before
    with pytest.raises(ApiCallError) as missing:
        await call(nc, "get", {"namespace": "team", "name": "bystander"})
    assert missing.value.code == "not_found"


# -- break 9: garbage on the ledger stream ---------------------------------------------------


async def test_garbage_on_the_ledger_is_skipped_by_every_reader_with_its_sequence(
    stack: InProcessStack,
) -> None:
    """Break 9: a non-JSON message on the ledger's subjects raised out of every reader.

    Only the manager may publish there now (docs/security.md); the garbage comes from an
    unrestricted user, as from a mis-configured account."""
    nc = client(stack)
    root = await nats.connect(stack.url_for("root"))
    try:
        ack = await root.jetstream().publish(f"{SUBJECT_PREFIX}.Garbage", b"\x00{not json")
    finally:
        await root.close()
    await call(nc, "apply", {"documents": run_doc("after-garbage", 4)})
    view = await call(nc, "get", {"namespace": "team", "name": "after-garbage"})
    assert view["phase"] == "Running"  # the manager folded past it, the binder placed it
    binder = stack.actors["binder"]
    assert isinstance(binder, Binder)
    assert binder.follower is not None
    assert binder.follower.seq > ack.seq
    # The binder folds for placement only (``Binder.metered``): the run's leases are open in
    # its state, and no GPU-hour was charged there.
    state = binder.follower.state
    assert not state.metered
    assert any(x.run == "team/after-garbage" for x in state.open_leases.values())
    assert not state.meter.run_hours
    await stack.stop_service("manager")  # a restart rebuilds from the stream, garbage included
    await stack.start_service("manager")
    view = await call(nc, "get", {"namespace": "team", "name": "after-garbage"})
    assert view["phase"] == "Running"


# -- liveness: a connection closed by the server ends the service; a new one serves ----------


async def close_from_the_server(nc: Client) -> None:
    """Make the server close ``nc``: a message over max_payload once headers count.

    nats-py checks only the payload against max_payload, so with a large header the server
    sees the violation, answers ``-ERR 'Maximum Payload Violation'`` and closes the connection;
    nats-py then stays CLOSED, exactly as after issue 19's oversized reply.
    """
    half = nc.max_payload // 2 + 1024
    await nc.publish("test.kick", b"x" * half, headers={"X-Pad": "y" * half})


async def test_a_service_whose_connection_the_server_closes_exits_1_and_a_restart_serves(
    stack: InProcessStack,
) -> None:
    """The manager no longer lingers as a zombie: it stops with exit code 1 at once, and a new
    manager (what gpu-fleet up, compose or Kubernetes start) serves with nothing lost."""
    nc = client(stack)
    for i in range(3):
        await call(nc, "apply", {"documents": run_doc(f"keep-{i}", 2)})
    before = await seq(stack)
    manager = stack.actors["manager"]
    assert isinstance(manager, Manager)
    assert manager.nc is not None
    running = asyncio.create_task(manager.run())
    await close_from_the_server(manager.nc)
    await asyncio.wait_for(running, timeout=30)
    assert manager.exit_code == 1
    assert manager.failure is not None
    assert "maximum payload violation" in manager.failure
    stack.actors.pop("manager")
    await stack.start_service("manager")
    assert await seq(stack) == before
    for i in range(3):
        view = await call(nc, "get", {"namespace": "team", "name": f"keep-{i}"})
        assert view["phase"] == "Running"
    await call(nc, "apply", {"documents": run_doc("after", 2)})
    assert check_invariants(await ledger_state(stack)) == []


async def test_serve_returns_1_when_the_connection_closes_for_good(
    stack: InProcessStack,
) -> None:
    """What the services' ``main`` returns, so the process exits non-zero (a standby manager
    here: the binder's ordered consumer leaves nats-py tasks behind on a closed connection)."""
    standby = Manager(
        ManagerConfig(
            nats_url=stack.url_for("manager"),
            ledger_keys=stack.keys_for("manager"),
            clock="virtual",
            start=T0,
        )
    )
    serving = asyncio.create_task(standby.serve())
    try:
        nc = await wait_for_connection(standby)
        await close_from_the_server(nc)
        assert await asyncio.wait_for(serving, timeout=30) == 1
    finally:
        if not serving.done():
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
    assert await seq(stack) > 0  # the stack's own manager is untouched


async def wait_for_connection(actor: Manager) -> Client:
    """Until the actor has connected and registered its endpoints (bounded polling)."""
    for _ in range(3000):
        if actor.nc is not None and actor.nc.is_connected and actor.service is not None:
            return actor.nc
        await asyncio.sleep(0.01)
    raise AssertionError("the manager did not connect")


# -- objects: every ledger event must fit one NATS message ---------------------------------


async def test_an_object_too_large_for_the_ledger_is_refused_naming_it(
    stack: InProcessStack,
) -> None:
    """A 300 KB pod template fits the request but not ``max_object_bytes`` (256 KiB)."""
    before = await seq(stack)
    big = run_doc("big", 1).replace(
        "totalGPUs: 1}}",
        "totalGPUs: 1}, roles: [{name: w, template: {spec: {containers: [{name: c, image: "
        + "x" * 300_000
        + "}]}}}]}",
    )
    with pytest.raises(ApiCallError) as info:
        await call(client(stack), "apply", {"documents": big})
    (error,) = info.value.errors
    assert error["path"] == "documents"
    assert error["message"].startswith("Run team/big is ")
    assert error["message"].endswith(f"bytes once encoded; the limit is {256 * 1024}")
    assert await seq(stack) == before


async def test_the_ledger_refuses_an_event_over_max_payload_before_publishing(
    stack: InProcessStack,
) -> None:
    """The last line of defence: the server would close the connection for good."""
    nc = client(stack)
    ledger = LedgerStream(nc)
    last = await ledger.last_seq()
    huge = Node(name="huge", gpus=1, labels={"x": "y" * nc.max_payload})
    with pytest.raises(LedgerEventTooLargeError):
        await ledger.append([NodeRegistered(at=T0, node=huge)], last)
    assert not nc.is_closed
    assert await ledger.last_seq() == last
