"""Fuzzing every API subject (issues 19, 12): any body to ``fleet.api.*`` and to the binder's,
forecaster's and notifier's request subjects.

All four services on a real nats-server answer hypothesis-generated request bodies:
well-formed requests with hostile values (huge, empty, non-ASCII, control characters, wrong
types, out-of-range numbers), unknown fields, other JSON values, raw bytes, bodies cut short and
bodies over the request limit.  After each one to the fleet API:

* an answer came (a bounded request timeout: no hang), small, with a one-line short header;
* it is a well-formed ``Reply``; an error is never ``internal`` (no traceback in the manager)
  and names at least one field path;
* a rejected request left the ledger exactly as it was (same last sequence);
* the manager's connection is still up.

For the other services' subjects (``test_no_body_hangs_or_breaks_the_other_services``): an
answer came, bounded in size, the ledger did not move, and every service is still connected.

Seeded (``@seed(19)``) so a failure reproduces.  Examples per test: ``EXAMPLES``, 400 unless
the environment sets ``GPU_FLEET_FUZZ_EXAMPLES`` (the recorded campaign in docs/reliability.md
ran 5,000 per test).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
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
from gpu_fleet.messages import api, subjects
from gpu_fleet.runtime import logs
from gpu_fleet.runtime.replies import HEADER_MAX
from gpu_fleet_manager.service import Manager

T = TypeVar("T")
T0 = parse_instant("2026-03-02T00:00:00Z")
EXAMPLES = int(os.environ.get("GPU_FLEET_FUZZ_EXAMPLES", "400"))
"""Request bodies per test (the ``ci`` profile's 50 is overridden: this is the boundary)."""
OVERSIZE = 512 * 1024 + 1
"""One byte over the default request limit (``ApiLimits.max_request_bytes``)."""
OTHER_SUBJECTS = (
    subjects.BINDER_PLACE,
    subjects.FORECAST_RUN,
    *(f"{subjects.NOTIFIER_GROUP}.{name}" for name in ("status", "channels", "test", "history")),
)
"""Every request subject outside ``fleet.api.*``."""

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
    "fleetmap": (),
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

    def request_subject(self, subject: str, body: bytes) -> Any:
        return self.loop.run(self.nc.request(subject, body, timeout=30))

    def seq(self) -> int:
        return int(self.loop.run(call(self.nc, "seq", {}))["seq"])


@pytest.fixture(name="fleet", scope="module")
def _fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs.configure("fuzz", "error", io.StringIO())
    loop = Loop()
    stack = InProcessStack(
        Path(tmp_path_factory.mktemp("fuzz")), virtual_start=T0
    )  # all four services: every API subject is fuzzed

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
    shape = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes", "cut", "big"]))
    if shape == "bytes":
        return endpoint, draw(st.binary(max_size=64))
    if shape == "json":
        return endpoint, json.dumps(draw(json_values)).encode()
    if shape == "big":
        return endpoint, oversize(draw(st.sampled_from(FIELDS[endpoint] or ("x",))))
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
    data = json.dumps(body).encode()
    if shape == "cut":  # truncated on the wire: a prefix of a well-formed body
        data = data[: draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))]
    return endpoint, data


def oversize(field: str) -> bytes:
    """A well-formed body one byte over the request limit (the big value in ``field``)."""
    head = json.dumps({field: ""}).encode()[:-2]  # '{"field": ' + opening quote
    return head + b"x" * (OVERSIZE - len(head) - 2) + b'"}'


@st.composite
def other_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """A body for a binder, forecaster or notifier subject."""
    subject = draw(st.sampled_from(OTHER_SUBJECTS))
    shape = draw(st.sampled_from(["json", "fields", "bytes", "cut", "big"]))
    if shape == "bytes":
        return subject, draw(st.binary(max_size=64))
    if shape == "big":
        return subject, oversize("namespace")
    if shape == "json":
        return subject, json.dumps(draw(json_values)).encode()
    keys = ("namespace", "name", "seq", "request", "channel", "limit", "flavor", "team")
    body = {k: draw(json_values | names) for k in draw(st.lists(st.sampled_from(keys), max_size=4))}
    data = json.dumps(body).encode()
    if shape == "cut":
        data = data[: draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))]
    return subject, data


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


@seed(19)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(other_bodies())
def test_no_body_hangs_or_breaks_the_other_services(fleet: Fleet, case: tuple[str, bytes]) -> None:
    subject, body = case
    before = fleet.seq()
    msg = fleet.request_subject(subject, body)  # an answer, within the request timeout
    assert len(msg.data) < 256 * 1024
    if msg.data[:1] == b"{":
        json.loads(msg.data)  # a JSON answer is whole JSON
    header = (msg.headers or {}).get("Nats-Service-Error", "")
    assert "\n" not in header
    assert len(header) <= HEADER_MAX + 40
    assert fleet.seq() == before, f"{subject} moved the ledger"
    for name, actor in fleet.stack.actors.items():
        nc = getattr(actor, "nc", None)
        assert nc is not None, name
        assert not nc.is_closed, f"{name} lost its connection"
