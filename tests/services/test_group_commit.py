"""Group commit (issue 11): commands waiting together are decided in one pass, in arrival
order, appended as one atomic batch, and each is answered once the batch is on the ledger.

The checks: concurrent submissions are grouped (fewer appends than commands); the ledger holds
exactly what one-command-at-a-time decisions give when the same commands are replayed in the
ledger's order through the in-process engine; a refused command in a group leaves the others
alone; two writers racing still never double-book.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

from gpu_fleet.cli.stack import ApiCallError, InProcessStack, call
from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import (
    Event,
    FleetState,
    NodeRegistered,
    RunSubmitted,
    check_invariants,
    fold,
)
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Instant, Node
from gpu_fleet.core.placement import plan_placement
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime.ledger_stream import LedgerStream, LedgerUnavailableError
from gpu_fleet_manager import group, service, writer
from gpu_fleet_manager.boundary import ApiError
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


def node(name: str) -> Node:
    labels = {"region": "r1", "cluster": "c1", "fabric.domain": "f9", "gpu.flavor": "H100"}
    return Node(name=name, gpus=8, labels=labels)


class GatedAppends:
    """Holds the manager's next ledger append at a gate; when the gate opens, another writer
    may append first (then the held append loses the race: a real conflict).  Appends counted
    in ``fail`` (1 is the held one) are refused as if the ledger were down."""

    def __init__(
        self,
        stack: InProcessStack,
        manager: Manager,
        intruder: Node | None,
        fail: Collection[int] = (),
        on_refusal: Callable[[], None] = lambda: None,
    ) -> None:
        assert manager.ledger is not None
        self.stack = stack
        self.ledger = manager.ledger
        self.original = manager.ledger.append
        self.intruder = intruder
        self.fail = set(fail)
        self.on_refusal = on_refusal
        self.appends = 0
        self.gate = asyncio.Event()
        self.ledger.append = self.append  # type: ignore[method-assign]

    async def append(self, events: Sequence[Event], expected_last_seq: int, **options: Any) -> int:
        self.appends += 1
        number = self.appends
        if number == 1:
            await self.gate.wait()
            if self.intruder is not None:  # a standby manager, say: it may write the ledger
                nc = await nats.connect(self.stack.url_for("manager"))
                try:
                    other = LedgerStream(nc, keys=self.stack.keys_for("manager"))
                    last = await other.last_seq()
                    await other.append([NodeRegistered(at=T0, node=self.intruder)], last)
                finally:
                    await nc.close()
        if number in self.fail:
            self.on_refusal()
            raise LedgerUnavailableError(f"append {number} refused by the test")
        return await self.original(events, expected_last_seq, **options)

    def open_from_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(self.gate.set)


@dataclass
class InFlight:
    """What ``decided_in_flight`` saw: each command's runs and answer, in answer order."""

    manager: Manager
    runs: dict[str, int]
    answers: dict[str, str]  # "ok" or the error's code
    answered: list[str]


async def decided_in_flight(
    stack: InProcessStack,
    intruder: Node | None,
    *,
    fail: Collection[int] = (),
    b_nodes: int = 1,
    on_refusal: Callable[[], None] = lambda: None,
) -> InFlight:
    """Command A registers node a and, while it is decided, queues command B (nodes b, b1,
    ...), so B is decided while A's append is held at the gate; B opens the gate once its
    first node is decided."""
    manager = manager_of(stack)
    loop = asyncio.get_running_loop()
    gated = GatedAppends(stack, manager, intruder, fail, on_refusal)
    seen = InFlight(manager, {"a": 0, "b": 0}, {}, [])
    queued: list[asyncio.Future[None]] = []

    async def answer(name: str, fn: Callable[[Instant], None]) -> None:
        try:
            await manager.mutate(fn)
            seen.answers[name] = "ok"
        except ApiError as exc:
            seen.answers[name] = exc.code
        seen.answered.append(name)

    def b(now: Instant) -> None:
        seen.runs["b"] += 1
        manager.require_fleet().register_node(node("b"), now)
        gated.open_from_thread(loop)  # B is decided on top of A, whose append is held
        for i in range(1, b_nodes):
            manager.require_fleet().register_node(node(f"b{i}"), now)

    def a(now: Instant) -> None:
        seen.runs["a"] += 1
        manager.require_fleet().register_node(node("a"), now)
        if not queued:  # queued once: A is decided again after a lost race
            queued.append(asyncio.run_coroutine_threadsafe(answer("b", b), loop))

    await answer("a", a)
    await asyncio.wrap_future(queued[0])
    return seen


async def registered(stack: InProcessStack) -> list[str]:
    return [e.node.name for e in await ledger_events(stack) if isinstance(e, NodeRegistered)]


@pytest.mark.timeout(60)  # a hang guard: without the pipeline, B never opens A's gate
@pytest.mark.asyncio
async def test_a_group_is_decided_while_the_one_before_is_appended(stack: InProcessStack) -> None:
    """The pipeline: B is decided while A's append is in flight; both land in order, once."""
    seen = await decided_in_flight(stack, intruder=None)
    manager, runs, answered = seen.manager, seen.runs, seen.answered
    assert runs == {"a": 1, "b": 1}
    assert answered == ["a", "b"]
    events = await ledger_events(stack)
    registered = [e.node.name for e in events if isinstance(e, NodeRegistered)]
    assert registered[-2:] == ["a", "b"]
    fleet = manager.require_fleet()
    assert fleet.state.history == events  # the manager's state is the ledger's
    assert fleet.in_flight is None


@pytest.mark.timeout(60)  # a hang guard: without the pipeline, B never opens A's gate
@pytest.mark.asyncio
async def test_a_lost_race_under_a_group_in_flight_decides_both_again(
    stack: InProcessStack,
) -> None:
    """A's append loses a race to another writer while B, decided on top of A, waits: A is
    decided again on the ledger's state, then B (its first decision was on a state the ledger
    never got), each answered once and committed once, in arrival order."""
    seen = await decided_in_flight(stack, intruder=node("x"))
    manager, runs, answered = seen.manager, seen.runs, seen.answered
    assert seen.answers == {"a": "ok", "b": "ok"}
    assert runs == {"a": 2, "b": 2}
    assert answered == ["a", "b"]
    events = await ledger_events(stack)
    registered = [e.node.name for e in events if isinstance(e, NodeRegistered)]
    assert registered[-3:] == ["x", "a", "b"]
    assert registered.count("a") == registered.count("b") == 1
    state = FleetState()
    for e in events:
        fold(state, e)
    assert check_invariants(state) == []
    assert manager.require_fleet().state.history == events


@pytest.mark.timeout(60)  # a hang guard: without the pipeline, B never opens A's gate
@pytest.mark.asyncio
async def test_a_group_whose_own_append_fails_is_answered_unavailable(
    stack: InProcessStack,
) -> None:
    """A lands; B, decided while A was in flight, fails to append: B is answered
    "unavailable" - the append that landed meanwhile was A's, none of B is on the ledger (found
    by review: B was answered "ok")."""
    seen = await decided_in_flight(stack, intruder=None, fail={2})
    assert seen.answers == {"a": "ok", "b": "unavailable"}
    names = await registered(stack)
    assert "a" in names
    assert "b" not in names
    events = await ledger_events(stack)
    assert seen.manager.require_fleet().state.history == events


@pytest.mark.timeout(60)  # a hang guard: without the pipeline, B never opens A's gate
@pytest.mark.asyncio
async def test_a_failed_append_is_not_used_up_by_a_mid_group_flush(stack: InProcessStack) -> None:
    """A's append fails while B, decided on top, flushes part of itself (``FLUSH_AT`` 1) and
    so waits for A first: A is answered "unavailable" and is not on the ledger; B is decided
    again on the ledger's state and lands (found by review: the flush used the failure up and
    A was answered "ok")."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer, "FLUSH_AT", 1)
        seen = await decided_in_flight(stack, intruder=None, fail={1}, b_nodes=2)
    assert seen.answers == {"a": "unavailable", "b": "ok"}
    assert seen.runs == {"a": 1, "b": 2}
    names = await registered(stack)
    assert "a" not in names
    assert names[-2:] == ["b", "b1"]
    assert seen.manager.require_fleet().state.history == await ledger_events(stack)


@pytest.mark.asyncio
async def test_a_state_that_cannot_be_rebuilt_is_dropped_not_read(stack: InProcessStack) -> None:
    """A's append fails, and the ledger is still unreadable when the manager rebuilds: the
    local state, which holds A's decision, is dropped; the next read loads the ledger's and
    never sees A (found by review)."""
    manager = manager_of(stack)
    assert manager.ledger is not None
    ledger = manager.ledger
    last_seq = ledger.last_seq
    down = {"reads": 0}

    async def flaky_last_seq() -> int:
        if down["reads"]:
            down["reads"] -= 1
            raise LedgerUnavailableError("still down")
        return await last_seq()

    def still_down() -> None:
        down["reads"] = 1  # the rebuild after this refusal cannot read the stream either

    ledger.last_seq = flaky_last_seq  # type: ignore[method-assign]
    gated = GatedAppends(stack, manager, None, fail={1}, on_refusal=still_down)
    gated.gate.set()

    def a(now: Instant) -> None:
        manager.require_fleet().register_node(node("a"), now)

    with pytest.raises(ApiError) as refused:
        await manager.mutate(a)
    assert refused.value.code == "unavailable"
    assert down["reads"] == 0  # the rebuild did meet the outage
    nodes = await manager.read(lambda _now: set(manager.require_fleet().state.nodes))
    assert "a" not in nodes
    assert nodes == set(await registered(stack))


@pytest.mark.timeout(60)  # a hang guard: without the pipeline, B never opens A's gate
@pytest.mark.asyncio
async def test_a_read_waits_for_the_groups_in_flight(stack: InProcessStack) -> None:
    """A read asked while A is in flight and B is decided on top sees what the ledger holds
    when it runs - never a decision not on the ledger yet - and it gets its turn there: the
    pipeline lands both and lets it in before it decides C, queued after the read."""
    manager = manager_of(stack)
    loop = asyncio.get_running_loop()
    gated = GatedAppends(stack, manager, None)
    seen: list[set[str]] = []
    reads: list[asyncio.Task[set[str]]] = []
    later: list[concurrent.futures.Future[None]] = []

    async def read() -> set[str]:
        names = await manager.read(lambda _now: set(manager.require_fleet().state.nodes))
        events = await ledger_events(stack)
        assert names == {e.node.name for e in events if isinstance(e, NodeRegistered)}
        return names

    def c(now: Instant) -> None:
        manager.require_fleet().register_node(node("c"), now)

    def b(now: Instant) -> None:
        manager.require_fleet().register_node(node("b"), now)
        # Asked now: A is held at the gate, B is folded here and on the ledger nowhere.  C
        # comes after the read: the pipeline drains for the read before it decides C.
        loop.call_soon_threadsafe(lambda: reads.append(loop.create_task(read())))
        later.append(asyncio.run_coroutine_threadsafe(manager.mutate(c), loop))
        gated.open_from_thread(loop)

    def a(now: Instant) -> None:
        manager.require_fleet().register_node(node("a"), now)
        asyncio.run_coroutine_threadsafe(manager.mutate(b), loop)

    await manager.mutate(a)
    while not reads:
        await asyncio.sleep(0)
    seen.append(await reads[0])
    assert {"a", "b"} <= seen[0]
    assert "c" not in seen[0]  # decided after the read, not before it
    await asyncio.wrap_future(later[0])
    assert "c" in await registered(stack)


# -- decided on the event loop (group.run_inline) ------------------------------------------
def _where() -> str:
    return "loop" if threading.current_thread() is threading.main_thread() else "thread"


async def pipelined(
    stack: InProcessStack, commands: dict[str, tuple[bool, Callable[[Instant], None]]]
) -> dict[str, list[str]]:
    """Command A (decided in the thread, nothing in flight) queues ``commands`` (name: small,
    decision) and its append is held at a gate until the first of them is decided: they are
    decided on top of it, as one group.  Returns where each decision ran, every time it ran."""
    manager = manager_of(stack)
    loop = asyncio.get_running_loop()
    gated = GatedAppends(stack, manager, None)
    ran: dict[str, list[str]] = {name: [] for name in ["a", *commands]}
    queued: list[concurrent.futures.Future[Any]] = []

    def wrap(name: str, fn: Callable[[Instant], None]) -> Callable[[Instant], None]:
        def decide(now: Instant) -> None:
            ran[name].append(_where())
            gated.open_from_thread(loop)
            fn(now)

        return decide

    def a(now: Instant) -> None:
        ran["a"].append(_where())
        manager.require_fleet().register_node(node("a"), now)
        if not queued:
            for name, (small, fn) in commands.items():
                queued.append(
                    asyncio.run_coroutine_threadsafe(
                        manager.mutate(wrap(name, fn), small=small), loop
                    )
                )

    await manager.mutate(a)
    for future in queued:
        await asyncio.wrap_future(future)
    assert manager.require_fleet().state.history == await ledger_events(stack)
    return ran


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_small_commands_on_top_of_an_append_are_decided_on_the_event_loop(
    stack: InProcessStack,
) -> None:
    """Pipelined, small commands are decided on the loop itself; the first that is not small
    sends the rest of the group to the worker thread, in arrival order."""
    manager = manager_of(stack)

    def register(name: str) -> Callable[[Instant], None]:
        return lambda now: manager.require_fleet().register_node(node(name), now)

    ran = await pipelined(
        stack,
        {"b": (True, register("b")), "c": (False, register("c")), "d": (True, register("d"))},
    )
    assert ran == {"a": ["thread"], "b": ["loop"], "c": ["thread"], "d": ["thread"]}
    assert (await registered(stack))[-4:] == ["a", "b", "c", "d"]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_with_nothing_in_flight_a_burst_is_decided_on_the_loop_a_lone_command_is_not(
    stack: InProcessStack,
) -> None:
    """The first group of a burst takes the loop as a pipelined one does (in the thread it was
    a fifth of a burst's deciding); a lone small command keeps the thread, where a search it
    needs is the binder's."""
    manager = manager_of(stack)
    ran: dict[str, str] = {}

    def register(name: str) -> Callable[[Instant], None]:
        def decide(now: Instant) -> None:
            ran[name] = _where()
            manager.require_fleet().register_node(node(name), now)

        return decide

    assert manager.require_fleet().in_flight is None
    await manager.mutate(register("lone"), small=True)
    names = ["b0", "b1", "b2", "b3"]
    await asyncio.gather(*(manager.mutate(register(n), small=True) for n in names))
    # Four waiting: the first half decided with nothing in flight, the rest on top of it.
    assert ran == {"lone": "thread", "b0": "loop", "b1": "loop", "b2": "loop", "b3": "loop"}
    assert (await registered(stack))[-5:] == ["lone", *names]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_decision_on_the_loop_that_must_wait_for_it_is_decided_again_in_the_thread(
    stack: InProcessStack,
) -> None:
    """A decision on the loop cannot wait for the loop (a mid-group flush, say): the group is
    decided again in the thread on the ledger's state - once on the ledger, answered ok."""
    manager = manager_of(stack)

    def b(now: Instant) -> None:
        fleet = manager.require_fleet()
        fleet.register_node(node("b"), now)
        assert fleet.on_loop(asyncio.sleep(0, result=1), 5) == 1

    ran = await pipelined(stack, {"b": (True, b)})
    assert ran == {"a": ["thread"], "b": ["loop", "thread"]}
    names = await registered(stack)
    assert names[-2:] == ["a", "b"]
    assert names.count("b") == 1


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_search_on_the_loop_is_the_managers_and_the_rest_goes_to_the_thread(
    stack: InProcessStack,
) -> None:
    """A placement that needs a CP-SAT search, asked on the loop: the manager plans it itself
    (the loop cannot wait for the binder), and the rest of the group goes to the thread."""
    manager = manager_of(stack)
    manifests = parse_manifests(run_doc("searched", 8))
    placed = {"by": "inline"}
    before = manager.observer.registry.get_sample_value("gpu_fleet_manager_plans_total", placed)

    def b(now: Instant) -> None:
        manager.require_fleet().apply(manifests[0], now)

    def c(now: Instant) -> None:
        manager.require_fleet().register_node(node("c"), now)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "plan_without_search", lambda *_: None)  # always a search
        ran = await pipelined(stack, {"b": (True, b), "c": (True, c)})
    assert ran == {"a": ["thread"], "b": ["loop"], "c": ["thread"]}
    after = manager.observer.registry.get_sample_value("gpu_fleet_manager_plans_total", placed)
    assert (after or 0) - (before or 0) == 1
    view = await manager.read(lambda _: manager.require_fleet().state.status["team/searched"])
    assert view.phase == "Running"


@pytest.mark.timeout(60)  # a hang guard: landing A first would wait for a gate only B opens
@pytest.mark.asyncio
async def test_a_command_arriving_while_an_append_is_in_flight_is_decided_on_top_of_it(
    stack: InProcessStack,
) -> None:
    """A's append is held and nothing else waits; B arrives: B is decided at once, on the
    event loop, on top of A - not after A lands - and both land in order."""
    manager = manager_of(stack)
    gated = GatedAppends(stack, manager, None)
    seen: dict[str, object] = {}

    def a(now: Instant) -> None:
        manager.require_fleet().register_node(node("a"), now)

    def b(now: Instant) -> None:
        seen["where"] = _where()
        seen["a in flight"] = not gated.gate.is_set()
        manager.require_fleet().register_node(node("b"), now)
        gated.gate.set()

    first = asyncio.create_task(manager.mutate(a))
    while gated.appends == 0:  # A's append has reached the gate
        await asyncio.sleep(0)
    for _ in range(4 * group.APPEND_YIELDS):  # and the pipeline found nothing waiting
        await asyncio.sleep(0)
    await manager.mutate(b, small=True)
    await first
    assert seen == {"where": "loop", "a in flight": True}
    assert (await registered(stack))[-2:] == ["a", "b"]
    assert manager.require_fleet().state.history == await ledger_events(stack)


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_second_search_on_the_loop_sends_the_group_to_the_thread(
    stack: InProcessStack,
) -> None:
    """One search may hold the event loop, not two (found by review: a small command's
    reconcile could search once per run it admits): the second raises, and the group is
    decided again in the thread - both runs admitted, the command answered once."""
    manager = manager_of(stack)
    manifests = parse_manifests(run_doc("one", 8) + "---\n" + run_doc("two", 8))

    def b(now: Instant) -> None:
        for m in manifests:
            manager.require_fleet().apply(m, now)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(service, "plan_without_search", lambda *_: None)  # always a search
        ran = await pipelined(stack, {"b": (True, b)})
    assert ran == {"a": ["thread"], "b": ["loop", "thread"]}
    status = await manager.read(lambda _: dict(manager.require_fleet().state.status))
    assert status["team/one"].phase == status["team/two"].phase == "Running"
    submitted = [e for e in await ledger_events(stack) if isinstance(e, RunSubmitted)]
    assert [e.run.key for e in submitted][-2:] == ["team/one", "team/two"]
