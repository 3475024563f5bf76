"""Group commit (issue 11): commands waiting together are decided in one pass, in arrival
order, appended as one atomic batch, and each is answered once the batch is on the ledger.

The checks: concurrent submissions are grouped (fewer appends than commands); the ledger holds
exactly what one-command-at-a-time decisions give when the same commands are replayed in the
ledger's order through the in-process engine; a refused command in a group leaves the others
alone; two writers racing still never double-book.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gpu_fleet.cli.stack import ApiCallError, InProcessStack, call
from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import Event, FleetState, RunSubmitted, check_invariants, fold
from gpu_fleet.core.placement import plan_placement
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
            "fabric.domain": f"f{i // 4}",
            "gpu.flavor": "H100",
        },
    }
    for i in range(12)
]

BUDGET = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: team, namespace: team}
spec:
  owner: "org:team"
  envelopes:
    - {name: west, flavor: H100, selector: {region: r1}, concurrency: 64,
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}
"""


def run_doc(name: str, gpus: int) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: team}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


async def ledger_events(stack: InProcessStack) -> list[Event]:
    assert stack.nc is not None
    return [e async for _, e in LedgerStream(stack.nc).read(1) if e is not None]


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


def manager_of(stack: InProcessStack) -> Manager:
    actor = stack.actors["manager"]
    assert isinstance(actor, Manager)
    return actor


@pytest.mark.asyncio
async def test_concurrent_commands_share_appends_and_replay_to_the_same_decisions(
    stack: InProcessStack,
) -> None:
    """24 concurrent submissions (more than the budget and the fleet hold): grouped into fewer
    appends, and the ledger is exactly what deciding them one at a time, in the ledger's
    order, gives - the engine replayed in-process on the same commands."""
    nc = stack.nc
    assert nc is not None
    manager = manager_of(stack)
    fleet = manager.fleet
    assert fleet is not None
    before_batches = fleet.appended_batches
    before_flushes = fleet.flushes
    sizes = [4, 8, 2, 6] * 6
    replies = await asyncio.gather(
        *(call(nc, "apply", {"documents": run_doc(f"g{i:02d}", w)}) for i, w in enumerate(sizes))
    )
    assert all(r[0]["action"] == "created" for r in replies)
    fleet = manager.fleet
    assert fleet is not None
    decisions = fleet.appended_batches - before_batches
    appends = fleet.flushes - before_flushes
    assert appends < 24 <= decisions  # every command committed, in fewer appends
    assert manager.committer.largest > 1

    events = await ledger_events(stack)
    state = FleetState()
    for e in events:
        fold(state, e)
    assert check_invariants(state) == []
    assert state.history == fleet.state.history  # what was answered is what is on the ledger

    # The same commands, one at a time, in the ledger's order, through the in-process engine.
    first = next(i for i, e in enumerate(events) if isinstance(e, RunSubmitted))
    replay = Fleet(planner=plan_placement)
    replay.commit(events[:first])
    for e in events[first:]:
        if isinstance(e, RunSubmitted):
            replay.apply(e.run, e.at)
    assert replay.state.history == events
    running = [k for k, st in state.status.items() if st.phase == "Running"]
    assert sum(state.runs[k].spec.resources.total_gpus for k in running) <= 64


@pytest.mark.asyncio
async def test_a_refused_command_in_a_group_leaves_the_others_alone(stack: InProcessStack) -> None:
    """Completing a run that does not exist is refused; the submissions beside it commit."""
    nc = stack.nc
    assert nc is not None
    outcomes = await asyncio.gather(
        call(nc, "apply", {"documents": run_doc("ok-1", 4)}),
        call(nc, "complete", {"namespace": "team", "name": "ghost"}),
        call(nc, "apply", {"documents": run_doc("ok-2", 4)}),
        return_exceptions=True,
    )
    assert not isinstance(outcomes[0], BaseException)
    assert isinstance(outcomes[1], ApiCallError)
    assert outcomes[1].code == "not_found"
    assert not isinstance(outcomes[2], BaseException)
    state = FleetState()
    for e in await ledger_events(stack):
        fold(state, e)
    assert {"team/ok-1", "team/ok-2"} <= {
        k for k, s in state.status.items() if s.phase == "Running"
    }


@pytest.mark.asyncio
async def test_two_writers_racing_groups_never_double_book(stack: InProcessStack) -> None:
    """A standby serving the API too: both decide groups, the loser of each append race
    re-folds and decides its group again; no slot is booked twice, the budget holds."""
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
        await asyncio.gather(
            *(call(nc, "apply", {"documents": run_doc(f"r{i:02d}", 4)}) for i in range(20))
        )
    finally:
        await standby.stop()
    state = FleetState()
    for e in await ledger_events(stack):
        fold(state, e)
    assert check_invariants(state) == []
    slots = [s for lease in state.open_leases.values() for s in lease.slots]
    assert len(slots) == len(set(slots)) <= 64
    assert len(state.runs) == 20
