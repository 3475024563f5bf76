"""Fuzzing the fleet API boundary (issue 19): any body to any ``fleet.api.*`` endpoint.

A real manager and binder on a real nats-server answer hypothesis-generated request bodies:
well-formed requests with hostile values (huge, empty, non-ASCII, control characters, wrong
types, out-of-range numbers), unknown fields, other JSON values and raw bytes.  After each one:

* an answer came (a bounded request timeout: no hang), small, with a one-line short header;
* it is a well-formed ``Reply``; an error is never ``internal`` (no traceback in the manager)
  and names at least one field path;
* a rejected request left the ledger exactly as it was (same last sequence);
* the manager's connection is still up.

Seeded (``@seed(19)``) so a failure reproduces; example counts are in ``EXAMPLES``.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from gpu_fleet.cli.stack import InProcessStack, call
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.messages import api
from gpu_fleet.runtime import logs
from gpu_fleet.runtime.replies import HEADER_MAX
from gpu_fleet_manager.service import Manager

T = TypeVar("T")
T0 = parse_instant("2026-03-02T00:00:00Z")
EXAMPLES = 400
"""Request bodies per run (the ``ci`` profile's 50 is overridden: this is the boundary)."""

FIELDS: dict[str, tuple[str, ...]] = {
    "apply": ("documents", "source"),
    "delete": ("kind", "namespace", "name"),
    "shrink": ("namespace", "name", "by", "desired"),
    "sponsors": ("namespace", "name", "op", "sponsor", "max_borrow"),
    "complete": ("namespace", "name"),
    "eta": ("namespace", "name", "eta"),
    "fail": ("namespace", "name"),
    "node": ("op", "name", "node"),
    "get": ("namespace", "name"),
    "list": ("namespace", "limit", "continue"),
    "explain": ("namespace", "name"),
    "leases": ("namespace", "name", "limit", "continue"),
    "budgets": ("namespace", "limit", "continue"),
    "clock": ("advance_to",),
    "report": ("label",),
    "seq": (),
}


SEED_OBJECTS = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team, namespace: team}
spec:
  owner: "org:team"
  envelopes:
    - {name: west, flavor: H100, selector: {region: r1}, concurrency: 4,
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}
---
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: r0, namespace: team}
spec:
  resources: {gpuType: H100, totalGPUs: 4}
  malleable: {minTotalGPUs: 2, maxTotalGPUs: 4, stepGPUs: 1}
  funding: {allowBorrow: true, sponsors: ["org:ai"]}
"""


class Loop:
    """The stack's event loop on a thread, so hypothesis' synchronous test can drive it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


class Fleet:
    def __init__(self, loop: Loop, stack: InProcessStack, nc: Client) -> None:
        self.loop, self.stack, self.nc = loop, stack, nc

    def request(self, endpoint: str, body: bytes) -> Any:
        return self.loop.run(self.nc.request(f"fleet.api.{endpoint}", body, timeout=30))

    def seq(self) -> int:
        return int(self.loop.run(call(self.nc, "seq", {}))["seq"])


@pytest.fixture(name="fleet", scope="module")
def _fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs.configure("fuzz", "error", io.StringIO())
    loop = Loop()
    stack = InProcessStack(
        Path(tmp_path_factory.mktemp("fuzz")), virtual_start=T0, services=("binder", "manager")
    )

    async def start() -> Client:
        await stack.start()
        assert stack.nc is not None
        labels = {"region": "r1", "cluster": "c1", "fabric.domain": "f1", "gpu.flavor": "H100"}
        await call(
            stack.nc,
            "node",
            {"op": "register", "node": {"name": "n0", "gpus": 8, "labels": labels}},
        )
        # Real objects for the names the strategies use, so refusals come from deep in the
        # handlers (a run in the wrong state, a sponsor it lacks), not only from the edge.
        await call(stack.nc, "apply", {"documents": SEED_OBJECTS})
        nc: Client = await nats.connect(stack.admin_url)
        return nc

    nc = loop.run(start())
    yield Fleet(loop, stack, nc)

    async def stop() -> None:
        await nc.close()
        await stack.stop()

    loop.run(stop())
    loop.close()


names = st.sampled_from(["team", "default", "r0", "n0", "a.b", "Team", "-x", "", "x" * 64])
hostile_text = st.text(max_size=80) | st.sampled_from(
    ["\r\nX-Injected: 1", "\x00", "é" * 70, "x" * 3000, "😀", "../../etc", "a" * 254]
)
numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from(
    [0, -1, 1, 2**31, 2**63 - 1, 253_402_300_800]
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.floats(allow_nan=False) | hostile_text | names,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
documents = (
    st.sampled_from(
        [
            "",
            "---\n---\n",
            "a: &a [1, *a]",
            "kind: Run\napiVersion: rq.davidlangworthy.io/v1\nmetadata: {name: Bad_Name}\n",
            "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\nmetadata: {name: b}\n"
            "spec: {owner: org:a, parents: [org:a], envelopes: []}\n",
            "[" * 200,
            "l0: &l0 [x,x,x,x,x,x,x,x,x]\n"
            + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)),
        ]
    )
    | hostile_text
)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    endpoint = draw(st.sampled_from(sorted(FIELDS)))
    shape = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if shape == "bytes":
        return endpoint, draw(st.binary(max_size=64))
    if shape == "json":
        return endpoint, json.dumps(draw(json_values)).encode()
    body: dict[str, Any] = {}
    for field in draw(st.lists(st.sampled_from(FIELDS[endpoint] or ("x",)), max_size=4)):
        if field == "documents":
            body[field] = draw(documents)
        elif field in ("namespace", "name", "sponsor", "label"):
            body[field] = draw(names | hostile_text | json_values)
        else:
            body[field] = draw(json_values | st.sampled_from(["Run", "Budget", "add", "cordon"]))
    if draw(st.booleans()):
        body[draw(st.text(max_size=10))] = draw(json_values)  # an unknown field
    return endpoint, json.dumps(body).encode()


@seed(19)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(bodies())
def test_no_request_body_breaks_the_api_or_changes_the_ledger_when_refused(
    fleet: Fleet, case: tuple[str, bytes]
) -> None:
    endpoint, body = case
    before = fleet.seq()
    msg = fleet.request(endpoint, body)
    assert len(msg.data) < 256 * 1024
    reply = msgspec.json.decode(msg.data, type=api.Reply)
    if reply.ok:
        return
    assert reply.error is not None
    assert reply.error.code != "internal", reply.error.message
    if reply.error.code in ("validation", "bad_request", "not_found"):
        assert reply.error.errors, reply.error  # field-precise: the path of what to fix
    assert all(e.path for e in reply.error.errors)
    header = (msg.headers or {})["Nats-Service-Error"]
    assert len(header) <= HEADER_MAX + 40
    assert "\n" not in header
    assert "\r" not in header
    assert fleet.seq() == before, f"{endpoint} was refused but the ledger moved"
    manager = fleet.stack.actors["manager"]
    assert isinstance(manager, Manager)
    assert manager.nc is not None
    assert not manager.nc.is_closed
