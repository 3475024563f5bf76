"""The manager's fleet API over a real nats-server: validation, admission, reads, two writers."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio

from gpu_fleet.cli.stack import ApiCallError, InProcessStack, call
from gpu_fleet.core.ledger import FleetState, check_invariants, fold
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet_manager.service import Manager, ManagerConfig

T0 = parse_instant("2026-03-02T00:00:00Z")

NODES = [
    {
        "name": f"n{i}",
        "gpus": 8,
        "labels": {
            "region": "r1",
            "cluster": "c1",
            "fabric.domain": "f1" if i < 2 else "f2",
            "gpu.flavor": "H100",
        },
    }
    for i in range(4)
]

BUDGET = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team, namespace: team}
spec:
  owner: "org:team"
  envelopes:
    - {name: west, flavor: H100, selector: {region: r1}, concurrency: 16,
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}
"""


def run_doc(name: str, gpus: int, ns: str = "team") -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


async def ledger_state(stack: InProcessStack) -> FleetState:
    assert stack.nc is not None
    state = FleetState()
    async for _, event in LedgerStream(stack.nc).read(1):
        if event is not None:
            fold(state, event)
    return state


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> Any:
    stack = InProcessStack(tmp_path, virtual_start=T0, services=("binder", "manager"))
    await stack.start()
    assert stack.nc is not None
    for node in NODES:
        await call(stack.nc, "node", {"op": "register", "node": node})
    await call(stack.nc, "apply", {"documents": BUDGET})
    yield stack
    await stack.stop()


@pytest.mark.asyncio
async def test_submit_admits_through_binder_into_the_ledger(stack: InProcessStack) -> None:
    """A submitted run is placed, funded, and its leases are in the stream; the binder is asked
    only for a placement that needs a CP-SAT search (a whole free node for 8 GPUs does not)."""
    nc = stack.nc
    assert nc is not None
    binder = stack.actors["binder"]
    result = await call(nc, "apply", {"documents": run_doc("train", 8)})
    assert result == [{"kind": "Run", "namespace": "team", "name": "train", "action": "created"}]
    view = await call(nc, "get", {"namespace": "team", "name": "train"})
    assert (view["phase"], view["width"]["allocated"], view["funding"]["owned"]) == (
        "Running",
        8,
        8,
    )
    assert getattr(binder, "placed", None) == 0  # evident: planned by the manager

    pairs = "totalGPUs: 2}, locality: {groupGPUs: 2}"
    grouped = run_doc("pairs", 2).replace("totalGPUs: 2}", pairs)
    await call(nc, "apply", {"documents": grouped})
    view = await call(nc, "get", {"namespace": "team", "name": "pairs"})
    assert (view["phase"], view["width"]["allocated"]) == ("Running", 2)
    assert getattr(binder, "placed", None) == 1  # a search: the binder planned it
    state = await ledger_state(stack)
    assert sum(x.width for x in state.open_leases.values()) == 10
    assert check_invariants(state) == []


@pytest.mark.asyncio
async def test_validation_errors_name_every_field_and_change_nothing(stack: InProcessStack) -> None:
    """A bad manifest is refused with every field error; nothing already accepted changes."""
    nc = stack.nc
    assert nc is not None
    await call(nc, "apply", {"documents": run_doc("keep", 4)})
    before = await call(nc, "seq", {})
    bad = (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: bad, namespace: team}\n"
        "spec: {resources: {gpuType: H100, totalGPUs: 0}, sparesPerGroup: -1, bogus: 1}\n"
    )
    with pytest.raises(ApiCallError) as info:
        await call(nc, "apply", {"documents": bad})
    assert info.value.code == "validation"
    paths = {e["path"]: e["message"] for e in info.value.errors}
    assert paths["spec.bogus"] == "unknown field"
    assert paths["spec.resources.totalGPUs"] == "must be >= 1"
    assert "spec.sparesPerGroup" in paths
    assert await call(nc, "seq", {}) == before
    view = await call(nc, "get", {"namespace": "team", "name": "keep"})
    assert view["phase"] == "Running"


@pytest.mark.asyncio
async def test_unknown_run_is_not_found(stack: InProcessStack) -> None:
    """Asking about a run that does not exist is a not_found error, not a crash."""
    assert stack.nc is not None
    with pytest.raises(ApiCallError) as info:
        await call(stack.nc, "get", {"namespace": "team", "name": "ghost"})
    assert info.value.code == "not_found"
    with pytest.raises(ApiCallError) as info:
        await call(stack.nc, "complete", {"namespace": "team", "name": "ghost"})
    assert info.value.code == "not_found"


@pytest.mark.asyncio
async def test_budget_wait_reserves_and_virtual_clock_activates_unfunded(
    stack: InProcessStack,
) -> None:
    """A budget-only wait gets a reservation (deficit 0) and starts unfunded at the lead bound."""
    nc = stack.nc
    assert nc is not None
    await call(nc, "apply", {"documents": run_doc("big", 16)})
    await call(nc, "apply", {"documents": run_doc("extra", 8)})
    view = await call(nc, "get", {"namespace": "team", "name": "extra"})
    assert view["reason"] == "Reserved"
    res = view["reservationDetail"]
    assert res["deficitGPUs"] == 0
    assert view["forecast"]["p90"] == res["earliestStart"]  # run status carries the forecast
    await call(nc, "clock", {"advance_to": parse_instant(res["earliestStart"])})
    view = await call(nc, "get", {"namespace": "team", "name": "extra"})
    assert view["phase"] == "Running"
    assert view["funding"] == {"owned": 0, "shared": 0, "borrowed": 0, "unfunded": 8}
    big = await call(nc, "get", {"namespace": "team", "name": "big"})
    assert big["funding"]["owned"] == 16  # nobody was cut for a budget shortfall


@pytest.mark.asyncio
async def test_complete_closes_leases_and_explain_reports(stack: InProcessStack) -> None:
    """complete closes every lease Completed; explain and budgets read the folded ledger."""
    nc = stack.nc
    assert nc is not None
    await call(nc, "apply", {"documents": run_doc("done", 4)})
    await call(nc, "complete", {"namespace": "team", "name": "done"})
    leases = await call(nc, "leases", {"namespace": "team", "name": "done"})
    assert leases
    assert {x["closureReason"] for x in leases} == {"Completed"}
    explained = await call(nc, "explain", {"namespace": "team", "name": "done"})
    rows = {r["field"]: r["value"] for r in explained}
    assert rows["Phase"] == "Completed"
    budgets = await call(nc, "budgets", {"namespace": "team"})
    assert budgets[0]["envelopes"][0]["headroom"] == 16


@pytest.mark.asyncio
async def test_second_manager_never_double_books(stack: InProcessStack) -> None:
    """Two managers serve the API together; the append race is lost by one, which re-folds."""
    nc = stack.nc
    assert nc is not None
    standby = Manager(
        ManagerConfig(
            nats_url=stack.url_for("manager"),
            ledger_keys=stack.keys_for("manager"),
            clock="virtual",
            start=T0,
        )
    )
    await standby.start()
    try:
        for i in range(8):
            await call(nc, "apply", {"documents": run_doc(f"r{i}", 4)})
    finally:
        await standby.stop()
    state = await ledger_state(stack)
    assert check_invariants(state) == []
    running = [k for k, st in state.status.items() if st.phase == "Running"]
    assert len(running) == 4  # 16 GPUs of budget, 4 GPUs each
    slots = [s for lease in state.open_leases.values() for s in lease.slots]
    assert len(slots) == len(set(slots)) == 16


@pytest.mark.asyncio
async def test_restart_loads_snapshot_and_folds_only_the_tail(stack: InProcessStack) -> None:
    """A restarted manager starts from its snapshot plus the ledger tail, and agrees with a
    full replay of the stream."""
    nc = stack.nc
    assert nc is not None
    for i in range(3):
        await call(nc, "apply", {"documents": run_doc(f"s{i}", 4)})
    await stack.stop_service("manager")  # a clean stop saves a snapshot
    actor = await stack.start_service("manager")
    assert isinstance(actor, Manager)
    snap_seq, folded = actor.last_rebuild
    assert snap_seq > 0
    assert folded == 0
    await call(nc, "apply", {"documents": run_doc("after", 4)})
    assert actor.fleet is not None
    replayed = await ledger_state(stack)
    assert actor.fleet.state.leases == replayed.leases
    assert {k: v.phase for k, v in actor.fleet.state.status.items()} == {
        k: v.phase for k, v in replayed.status.items()
    }


def test_a_snapshot_waits_for_batches_and_for_a_tail_worth_its_cost() -> None:
    """Due after ``snapshot_every`` batches, and once the events after the last snapshot are
    1/8 of the ledger (``SNAPSHOT_TAIL``): its cost (the whole state) stays constant per event.
    And not before ``snapshot_min_seconds`` since the last one: a burst pays one per that."""
    manager = Manager(ManagerConfig(nats_url="nats://unused", snapshot_every=2))
    fleet = SimpleNamespace(appended_batches=1, seq=100)
    manager.fleet = fleet  # type: ignore[assignment]
    assert not manager._snapshot_due()  # one batch since
    fleet.appended_batches = 2
    assert manager._snapshot_due()  # two batches, and all 100 events are the tail
    manager._snapshot_at, manager._snapshot_seq = 2, 100  # saved there
    fleet.appended_batches, fleet.seq = 4, 110
    assert not manager._snapshot_due()  # 10 events after a snapshot of 100: not worth it
    fleet.seq = 114
    assert not manager._snapshot_due()  # 14 x 8 < 114
    fleet.seq = 115
    assert manager._snapshot_due()  # 15 x 8 >= 115
    manager.config.snapshot_min_seconds = 3600.0
    manager._snapshot_at, manager._snapshot_seq = 4, 115  # saved there, just now
    manager._snapshot_time = time.monotonic()
    fleet.appended_batches, fleet.seq = 10, 1_000
    assert not manager._snapshot_due()  # a tail worth it, but less than an hour since
    manager._snapshot_time -= 3600.0
    assert manager._snapshot_due()  # an hour later
    manager.config.snapshot_every = 0
    assert not manager._snapshot_due()  # snapshots off


@pytest.mark.asyncio
async def test_a_snapshot_store_that_fails_costs_only_the_snapshot(stack: InProcessStack) -> None:
    """Whatever the snapshot store raises is logged: commands are still answered and a clean
    stop still completes (found by review: a non-NATS error aborted the stop)."""
    nc = stack.nc
    assert nc is not None
    actor = stack.actors["manager"]
    assert isinstance(actor, Manager)
    assert actor.snapshots is not None

    async def broken(*_args: object) -> None:
        raise RuntimeError("the object store is broken")

    actor.snapshots.save = broken  # type: ignore[method-assign]
    actor.config.snapshot_every = 1
    for i in range(3):
        await call(nc, "apply", {"documents": run_doc(f"f{i}", 4)})
    await stack.stop_service("manager")
    assert actor.exit_code == 0
    assert actor._saving is None or actor._saving.done()
