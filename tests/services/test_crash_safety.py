"""Crash safety with real processes: SIGKILL a service (or NATS itself) mid-burst and restart it.

After each crash the stack must converge with nothing acknowledged lost, no lease duplicated, no
slot double-booked and no overdraft - checked by folding the JetStream ledger, the truth.
Clients retry as real clients do; waiting is bounded polling on conditions, never a sleep-based
timing assertion.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import nats
import nats.errors
import pytest

from gpu_fleet.cli.stack import ApiCallError, ProcessStack, call, wait_for_services
from gpu_fleet.core.ledger import FleetState, RunSubmitted, check_invariants, fold
from gpu_fleet.runtime.ledger_stream import LedgerStream

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

INVENTORY = """
nodes:
""" + "".join(
    f"  - {{name: n{i}, gpus: 8, labels: {{region: r1, cluster: c1, fabric.domain: f{i // 4},"
    f" gpu.flavor: H100}}}}\n"
    for i in range(8)
)

BUDGET = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team, namespace: team}
spec:
  owner: "org:team"
  envelopes:
    - {name: west, flavor: H100, selector: {region: r1}, concurrency: 48,
       start: "2026-01-01T00:00:00Z", end: "2100-01-01T00:00:00Z"}
"""


def run_doc(name: str, gpus: int) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: team}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


async def call_retrying(
    nc: nats.aio.client.Client, endpoint: str, body: dict[str, object], deadline: float
) -> object:
    """What a real client does: retry on unavailability until a deadline."""
    while True:
        try:
            return await call(nc, endpoint, body, timeout=5)
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
        ):
            pass
        except ApiCallError as exc:
            if exc.code not in ("unavailable", "conflict"):
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{endpoint} did not succeed before the deadline")
        await asyncio.sleep(0.05)


async def ledger_state(url: str) -> tuple[FleetState, int]:
    nc = await nats.connect(url)
    try:
        state = FleetState()
        n = 0
        async for _, event in LedgerStream(nc).read(1):
            if event is not None:
                fold(state, event)
            n += 1
        return state, n
    finally:
        await nc.close()


async def connect_retrying(url: str, deadline: float) -> nats.aio.client.Client:
    while True:
        try:
            return await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        except (OSError, nats.errors.NoServersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@pytest.fixture(name="stack")
def _stack(tmp_path: Path) -> ProcessStack:
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY)
    stack = ProcessStack(
        tmp_path / "data", inventory=str(inv), log_level="warning", services=("binder", "manager")
    )
    stack.start()
    yield stack
    stack.stop()


async def _burst(stack: ProcessStack, crash: str) -> None:
    deadline = time.monotonic() + 120
    nc = await connect_retrying(stack.admin_url, deadline)
    acked: list[str] = []
    try:
        await wait_for_services(nc, ("binder", "manager"), timeout=60)
        await call_retrying(nc, "apply", {"documents": BUDGET}, deadline)

        async def submit(i: int) -> None:
            await call_retrying(
                nc, "apply", {"documents": run_doc(f"r{i:02d}", 2 + (i % 3) * 2)}, deadline
            )
            acked.append(f"team/r{i:02d}")

        tasks = [asyncio.create_task(submit(i)) for i in range(24)]
        while len(acked) < 6 and time.monotonic() < deadline:  # crash with requests in flight
            await asyncio.sleep(0.01)
        if crash == "nats":
            stack.nats.kill()
            stack.nats.start()  # same port and store: the ledger must survive
        else:
            stack.kill(crash)
            stack.spawn(crash)
        await asyncio.gather(*tasks)
        assert len(acked) == 24
        await wait_for_services(nc, ("binder", "manager"), timeout=60)
        views = await call_retrying(nc, "list", {"namespace": "team"}, deadline)
    finally:
        await nc.close()
    state, _ = await ledger_state(stack.admin_url)
    submitted = {e.run.key for e in state.history if isinstance(e, RunSubmitted)}
    assert set(acked) <= submitted, f"acknowledged but lost: {set(acked) - submitted}"
    assert check_invariants(state) == []
    ids = [lease.id for lease in state.leases.values()]
    assert len(ids) == len(set(ids))
    slots = [s for lease in state.open_leases.values() for s in lease.slots]
    assert len(slots) == len(set(slots)), "a slot is double-booked"
    funded = sum(x.width for x in state.open_leases.values())
    assert 0 < funded <= 48
    by_name = {f"{v['namespace']}/{v['name']}": v for v in json.loads(json.dumps(views))}
    for key in acked:
        assert by_name[key]["phase"] in ("Running", "Pending"), by_name[key]
    # Every run holding leases holds its whole width (no half-committed gang).
    for key in acked:
        held = sum(x.width for x in state.leases_of(key, open_only=True))
        assert held in (0, state.runs[key].spec.resources.total_gpus), (key, held)


async def test_manager_sigkill_mid_burst_loses_nothing(stack: ProcessStack) -> None:
    """SIGKILL the manager mid-burst; restarted, it refolds and nothing acknowledged is lost."""
    await _burst(stack, "manager")


async def test_binder_sigkill_mid_burst_keeps_admitting(stack: ProcessStack) -> None:
    """SIGKILL the binder mid-burst; admissions continue and converge after its restart."""
    await _burst(stack, "binder")


async def test_nats_server_sigkill_services_reconnect(stack: ProcessStack) -> None:
    """SIGKILL nats-server itself; restarted on the same store, services reconnect unaided."""
    await _burst(stack, "nats")
    assert not stack.dead(), f"services died: {stack.dead()}"


async def test_sigterm_stops_every_service_cleanly(tmp_path: Path) -> None:
    """All four services start as processes, answer $SRV.PING, and exit 0 on SIGTERM."""
    stack = ProcessStack(tmp_path / "data", log_level="warning")
    stack.start()
    try:
        nc = await connect_retrying(stack.admin_url, time.monotonic() + 60)
        try:
            await wait_for_services(nc, ("binder", "manager", "forecaster", "notifier"), 120)
        finally:
            await nc.close()
        codes = {
            name: stack.stop_service(name, timeout=20)
            for name in ("notifier", "forecaster", "manager", "binder")
        }
    finally:
        stack.stop()
    assert codes == {"notifier": 0, "forecaster": 0, "manager": 0, "binder": 0}
