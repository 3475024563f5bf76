"""Group commit: every command waiting at one moment is decided in one pass and appended as one
atomic batch, and each gets its reply once the batch is on the ledger.

Why: a command used to cost a JetStream round trip to read the stream's last sequence, one
append (a publish with an ack) per decision it committed, and a binder round trip per placement
- one command at a time, under the single writer's lock.  With 16 clients submitting, 15 wait
while the 16th pays those round trips.  Grouped, the waiting commands share one catch-up and
one append, and the binder is asked only while the manager's state is the ledger's (a plan made
on the ledger's state would not see the group's earlier, not yet appended, decisions; the
manager then plans itself, with the same planner, on the state it decides on).

Semantics are those of one command at a time, in arrival order: each command reads the clock
when its turn comes and sees every decision before it.  Nothing is acknowledged before the
group's batch is appended.  If the append loses a race (another writer appended first) the
manager rebuilds from the ledger and decides the whole group again - nothing of it was
written, so replaying the same commands in the same order on the ledger's state is exactly
what a one-at-a-time writer would have done.  A command the engine refuses (``CommandError``,
``ApiError``, an oversized event) gets its error and the group goes on; anything else that
broke the local state mid-commit makes the manager rebuild and decide the group again without
that command.

Pipelined: while one group's batch is being appended, the next group is decided on top of it
(the append round trip was a third of a group's time, issue 11).  Appends stay in ledger order,
each group is answered once its own batch is on the ledger, and if an append fails the group
decided on top of it is void: the manager rebuilds from the ledger and decides it again, in
arrival order, as if it had waited.  The manager's state is the ledger's only between groups
with nothing in flight, so whoever needs such a consistent cut (a read, a metrics scrape, a
snapshot) makes the pipeline drain first (``Manager.consistent``).

Decided on the event loop (``run_inline``): a group - on top of an append in flight, or several
commands waiting with nothing in flight (a burst) - is decided on the loop itself, not in the
worker thread, as long as its commands are small (an apply of a few runs) and the loop has not
been held for ``INLINE_BUDGET_S``; the rest of the group goes to the thread.  Why: the decision
and the loop's own work (reading requests, sending replies and appends) cannot run at once
anyway - one interpreter lock - and handing that lock back and forth cost each side up to a
switch interval (5 ms) per system call: at 10k nodes, the same admissions took 15 % more time
that way, and a burst's first groups after a drain, still decided in the thread, were a fifth of
its deciding (issue 11).  A decision on the loop may not wait for the loop: it plans placements
itself instead of asking the binder (one CP-SAT search per group, then the rest goes to the
thread), and one that would have to wait (a second search, a buffer outgrowing ``FLUSH_AT``)
raises ``NeedsThreadError``; the group is then decided again in the thread on the ledger's
state, as after a command that broke the state.  A lone command with nothing in flight stays in
the thread: nothing waits behind it, so a search it needs is the binder's and the loop stays
free for reads.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gpu_fleet.core.engine import CommandError
from gpu_fleet.core.model import Instant
from gpu_fleet.messages import api
from gpu_fleet.runtime import heap
from gpu_fleet.runtime.ledger_stream import LedgerConflictError, LedgerEventTooLargeError
from gpu_fleet_manager.boundary import REQUEST, ApiError, FieldRefusedError
from gpu_fleet_manager.writer import APPEND_FAILURES, FLUSH_AT, NeedsThreadError

if TYPE_CHECKING:
    from gpu_fleet_manager.service import Manager
    from gpu_fleet_manager.writer import LedgerFleet

log = structlog.get_logger("gpu_fleet.manager")

MAX_GROUP = 256
"""Commands decided in one group at most (the rest wait for the next one)."""

INLINE_BUDGET_S = 0.02
"""How long a group may hold the event loop deciding before the rest goes to the thread."""

APPEND_YIELDS = 3
"""Loop turns given to a launched append before the next group is decided: one for the append
task to publish its batch and wait for the ack, one for the client's flusher to write it, one
for the reader to queue the requests that arrived meanwhile."""


@dataclass
class Command:
    """One waiting command: the decision to run, and where its caller waits for the outcome."""

    fn: Callable[[Instant], Any]
    done: asyncio.Future[Any]
    outcome: tuple[bool, Any] | None = field(default=None)  # (ok, result or exception)
    flushes: int = -1  # the group's mid-group flushes when this command's decision was complete
    small: bool = False  # may be decided on the event loop (``run_inline``)


class GroupCommitter:
    """The queue of waiting commands and the one task that decides them, group by group."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.queue: list[Command] = []
        self.runner: asyncio.Task[None] | None = None
        self.unsettled: list[Command] = []  # taken by the pipeline, maybe not answered yet
        self.groups = 0  # groups decided (for tests and the log)
        self.largest = 0
        self.arrived = asyncio.Event()  # set by every submission

    async def submit(self, fn: Callable[[Instant], Any], *, small: bool = False) -> Any:
        """Queue ``fn`` and wait until its group is decided and on the ledger.  ``small``: a
        command whose decision is short and writes a few events (``run_inline``)."""
        loop = asyncio.get_running_loop()
        command = Command(fn, loop.create_future(), small=small)
        self.queue.append(command)
        self.arrived.set()
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run(), name="group commit")
        return await command.done

    def take(self, most: int = MAX_GROUP) -> list[Command]:
        """The next group: the commands waiting now, in arrival order (at most ``most``)."""
        most = min(most, MAX_GROUP)
        group, self.queue = self.queue[:most], self.queue[most:]
        if group:
            self.groups += 1
            self.largest = max(self.largest, len(group))
            if len(self.unsettled) > 4 * MAX_GROUP:
                self.unsettled = [c for c in self.unsettled if not c.done.done()]
            self.unsettled += group
        return group

    def put_back(self, group: list[Command]) -> None:
        """A group decided on a state the ledger never got: first in line again, undecided
        (even a command that broke that state: it may not break the ledger's)."""
        for command in group:
            command.outcome, command.flushes = None, -1
        self.queue[:0] = group

    async def _run(self) -> None:
        while self.queue:
            self.unsettled = []
            try:
                await pipeline(self.manager, self)
            except Exception as exc:  # the ledger failed while recovering: answer everyone
                log.exception("group.failed")
                for command in [*self.unsettled, *self.queue]:
                    if not command.done.done():
                        command.done.set_exception(exc)
                self.queue = []


def _settle(group: list[Command]) -> None:
    """Hand every command of a finished group its outcome."""
    for command in group:
        if command.done.done() or command.outcome is None:
            continue
        ok, value = command.outcome
        if ok:
            command.done.set_result(value)
        else:
            command.done.set_exception(value)


async def pipeline(manager: Manager, committer: GroupCommitter) -> None:
    """Decide and append groups while commands wait, each group decided while the one before
    it is being appended; return drained (nothing in flight, the state is the ledger's)."""
    async with manager.lock:
        flight: list[Command] | None = None  # the group whose append is in flight
        while True:
            try:
                await manager._ensure_loaded()  # nothing is in flight when it has to load
            except ApiError as exc:
                group = committer.take()
                _answer_all(group, exc)
                _settle(group)
                return
            fleet = manager.require_fleet()
            if flight is None:
                # Nothing in flight: decide the first half of what waits, so the second half
                # is decided while the first half's append is in flight (with every client
                # waiting in one group, the pipeline had nothing to overlap).
                group = committer.take(-(-len(committer.queue) // 2))
            else:
                if not committer.queue and not manager.wants_drain():
                    await _arrival_or_landing(committer, fleet)
                group = [] if manager.wants_drain() else committer.take()
            clean: bool | BaseException = True
            if group:
                # On the loop when pipelined or in a burst; a lone command with nothing in
                # flight keeps the thread, where a search it needs is the binder's.
                ahead = flight is not None
                inline = ahead or len(group) > 1
                clean = await _decide_ahead(manager, fleet, group, ahead=ahead, inline=inline)
            if flight is not None:
                landed = await _land(manager, fleet, flight)
                flight = None
                if not landed:  # what ``group`` was decided on is not on the ledger
                    if group:
                        committer.put_back(group)
                    continue
            if not group:
                await manager._maybe_snapshot()  # drained: the state is the ledger's
                if not committer.queue or manager.waiting_for_cut():
                    return  # the lock is fair: a reader waiting for it goes first
                continue
            if clean is True and not fleet.flushed_in_group:
                # Answered the moment its batch is on the ledger, not when the next group
                # is decided; a failed append is ``_land``'s.
                fleet.launch().add_done_callback(functools.partial(_answer_landed, group))
                flight = group
                heap.settle()  # the decided state is long-lived: not the collector's to walk
                # Let the append task put its batch on the wire (and the reader queue what
                # has arrived) before the next group holds the loop deciding (``run_inline``).
                for _ in range(APPEND_YIELDS):
                    await asyncio.sleep(0)
                continue
            # A command broke the local state, or an append inside the group failed or was
            # made: the group takes the one-at-a-time path (rebuild, decide again, flush).
            if clean is True:  # flushed part-way: append the rest now, not in flight
                try:
                    await fleet.flush()
                except APPEND_FAILURES as exc:
                    clean = exc
            durable = fleet.group_flushes
            fleet.buffered, fleet.buffer = False, []
            if clean is True:
                _map_refusals(group)
            else:
                await _decide_locked(manager, group, failed=(clean, durable))
            _settle(group)


async def _arrival_or_landing(committer: GroupCommitter, fleet: LedgerFleet) -> None:
    """With an append in flight and nothing waiting: wait for whichever comes first, a command
    (decided on top of the append, which keeps the pipeline full: the clients answered by the
    group before it are sending their next commands now) or the append's end (then the
    pipeline lands it and drains).  Landing at once used to start every such command afresh -
    a catch-up read and a decision in the worker thread - about a tenth of a burst's commands."""
    task = fleet.in_flight
    if task is None or task.done():
        return
    committer.arrived.clear()
    waiter = asyncio.ensure_future(committer.arrived.wait())
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _answer_landed(group: list[Command], append: asyncio.Task[None]) -> None:
    if not append.cancelled() and append.exception() is None:
        _map_refusals(group)
        _settle(group)


async def _decide_ahead(
    manager: Manager, fleet: LedgerFleet, group: list[Command], *, ahead: bool, inline: bool = True
) -> bool | BaseException:
    """Decide ``group`` into the writer's buffer, on the loop while it may (``run_inline``),
    then in the worker thread (``ahead``: on top of an append in flight, so no catch-up read:
    the state is ahead of the ledger by that append).  True if clean, False if a command broke
    the state, or the append error a mid-group flush raised.

    Not ``inline``: all in the thread - a lone command with nothing in flight (nothing waits
    behind it, so a CP-SAT search it needs is left to the binder and the loop stays free), and
    a group decided again after a failure (what failed on the loop would fail there again)."""
    try:
        if not ahead:
            await manager._catch_up()
        fleet.buffered, fleet.buffer = True, []
        fleet.group_flushes = 0
        if inline:
            done = run_inline(group, manager.clock.now, fleet)
            if done is not None:
                return done
        return await asyncio.to_thread(run_group, group, manager.clock.now, fleet)
    except APPEND_FAILURES as exc:
        return exc


async def _land(manager: Manager, fleet: LedgerFleet, group: list[Command]) -> bool:
    """Wait for ``group``'s append and answer it.  A failed append is handled as the
    one-at-a-time path handles it (a lost race decides the group again; nothing of a group in
    flight is on the ledger); False then: the state was rebuilt from the ledger."""
    try:
        await fleet.landed()
    except LedgerConflictError as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        fleet.buffered, fleet.buffer = False, []
        # Nothing of a group in flight is on the ledger.
        await _decide_locked(manager, group, failed=(cause, 0))
        _settle(group)
        return False
    fleet.buffered = False
    _map_refusals(group)
    _settle(group)
    return True


async def _reload(manager: Manager) -> bool:
    """Rebuild from the ledger; if that fails too, drop the local state (it may hold decisions
    the ledger never got: nothing may read or decide on it) - the next command reloads."""
    try:
        await manager._rebuild()
    except Exception as exc:
        log.warning("ledger.rebuild_failed", error=type(exc).__name__)
        manager.fleet = None
        return False
    return True


async def _give_up(
    manager: Manager, group: list[Command], exc: BaseException, *, attempt: int, durable: int
) -> None:
    """Rebuild after a failed append, and answer the group: "conflict" after a lost race, else
    "unavailable".  Commands whose decision a mid-group flush of this group put on the ledger
    (``durable``: how many such flushes succeeded) keep their own outcome."""
    await _reload(manager)
    if isinstance(exc, LedgerConflictError):
        log.warning("ledger.conflict", attempt=attempt, error=str(exc))
        why = f"{exc}; retried {attempt} times"
        _answer_all(group, ApiError("conflict", why), durable=durable)
        return
    log.warning("ledger.unavailable", error=str(exc))
    _answer_all(group, _unavailable(exc), durable=durable)


def _unavailable(why: object) -> ApiError:
    return ApiError("unavailable", f"ledger unavailable: {why}; retry")


async def _decide_locked(
    manager: Manager,
    group: list[Command],
    attempts: int = 3,
    failed: tuple[bool | BaseException, int] | None = None,
) -> None:
    """Decide ``group`` (the writer's lock held, nothing in flight) and append it; set every
    command's outcome.  ``failed``: the group's first attempt, made by the pipeline, failed
    this way (``False``: a command broke the state; else the append's error), with this many
    mid-group flushes on the ledger.

    The error handling is ``Manager.mutate``'s of old, per group: a lost race re-folds and
    decides again (``attempts`` times), an unavailable ledger answers "unavailable", and each
    command the engine refused gets its own error.
    """
    for attempt in range(1, attempts + 1):
        if failed is not None:
            (outcome, durable), failed = failed, None
        else:
            fleet = manager.require_fleet()
            # In the thread: what failed on the loop (a decision that had to wait for it)
            # would fail there again.
            outcome = await _decide_ahead(manager, fleet, group, ahead=False, inline=False)
            if outcome is True:
                try:
                    await fleet.flush()
                except APPEND_FAILURES as exc:
                    outcome = exc
                else:
                    fleet.buffered = False
                    await manager._maybe_snapshot()
                    _map_refusals(group)
                    return
            durable = fleet.group_flushes
            fleet.buffered, fleet.buffer = False, []
        retry = outcome is False or (
            isinstance(outcome, LedgerConflictError) and attempt < attempts and not durable
        )
        if retry:
            if outcome is False:
                # A commit broke the local state: start the group over without that command.
                log.warning("group.rebuild_after_failed_command")
            else:
                log.warning("ledger.conflict", attempt=attempt, error=str(outcome))
            if not await _reload(manager):
                _answer_all(group, _unavailable("the ledger could not be read back"))
                return
            _forget_decided(group)
            continue
        assert isinstance(outcome, BaseException)
        await _give_up(manager, group, outcome, attempt=attempt, durable=durable)
        return
    _answer_all(group, ApiError("conflict", f"gave up after {attempts} attempts"))


def _forget_decided(group: list[Command]) -> None:
    """Before deciding the group again: only a command that broke the state keeps its error."""
    for command in group:
        if command.outcome is not None and not _broke_state(command):
            command.outcome = None


def _broke_state(command: Command) -> bool:
    if command.outcome is None or command.outcome[0]:
        return False
    refused = (CommandError, ApiError, LedgerEventTooLargeError, NeedsThreadError)
    return not isinstance(command.outcome[1], refused)


def _answer_all(group: list[Command], error: Exception, *, durable: int = -1) -> None:
    """Answer ``error`` to every command, except those whose decision a mid-group flush of
    this group that succeeded put on the ledger (``durable``: the group's successful flushes
    at the failure; a command records how many there were when its decision was complete)."""
    for command in group:
        if command.outcome is not None and 0 <= command.flushes < durable:
            _map_refusals([command])
            continue
        command.outcome = (False, error)


def _map_refusals(group: list[Command]) -> None:
    """The API's words for what the engine refused (as ``Manager.mutate`` always said)."""
    for command in group:
        if command.outcome is None or command.outcome[0]:
            continue
        exc = command.outcome[1]
        if isinstance(exc, LedgerEventTooLargeError):
            error = api.FieldErrorOut(REQUEST, str(exc))
            command.outcome = (False, ApiError("bad_request", str(exc), [error], status="413"))
        elif isinstance(exc, CommandError):
            # The object the request names is what is missing or in the wrong state, unless
            # the refusal says which other field it is about.
            path = exc.path if isinstance(exc, FieldRefusedError) else "name"
            error = api.FieldErrorOut(path, str(exc))
            command.outcome = (False, ApiError(exc.code, str(exc), [error]))


def run_group(
    fleet_commands: list[Command], clock: Callable[[], Instant], fleet: LedgerFleet
) -> bool:
    """Decide ``fleet_commands`` in order (in the worker thread); record each outcome.

    Returns False if a command broke the local state mid-commit (the caller rebuilds and decides
    the group again without it); its outcome is then the error.  A failed append (a buffer that
    outgrew ``FLUSH_AT`` is appended mid-group) is the group's failure: it propagates.
    Commands decided already (on the event loop, ``run_inline``) are skipped.
    """
    for command in fleet_commands:
        # A command with an outcome broke the state in an earlier pass of this group (it is
        # not decided again), or was decided on the loop already.
        if command.outcome is None and not _decide(command, clock, fleet):
            return False
    return True


def run_inline(
    fleet_commands: list[Command], clock: Callable[[], Instant], fleet: LedgerFleet
) -> bool | None:
    """Decide ``fleet_commands`` on the event loop, in order, while each is ``small``, no
    placement needed a search, the buffer is far from a flush and the loop has been held less
    than ``INLINE_BUDGET_S``; ``run_group``'s answer, or None when the rest is the worker
    thread's.  These are checked between commands; within one, a second search raises
    ``NeedsThreadError`` (one search, up to its deterministic limit, may hold the loop)."""
    started = time.perf_counter()
    fleet.inline, fleet.searched = True, False
    try:
        for command in fleet_commands:
            if command.outcome is not None:
                continue
            held = time.perf_counter() - started
            full = fleet.pending >= FLUSH_AT // 2  # a flush would need the loop
            if not command.small or fleet.searched or full or held > INLINE_BUDGET_S:
                return None
            if not _decide(command, clock, fleet):
                return False
        return True
    finally:
        fleet.inline = fleet.searched = False


def _decide(command: Command, clock: Callable[[], Instant], fleet: LedgerFleet) -> bool:
    """Decide one command and record its outcome; False if it broke the local state."""
    try:
        command.outcome = (True, command.fn(clock()))
    except APPEND_FAILURES:
        raise
    except (CommandError, ApiError, LedgerEventTooLargeError) as exc:
        command.outcome = (False, exc)
    except Exception as exc:  # NeedsThreadError too: decided again in the thread, after a rebuild
        command.outcome = (False, exc)
        return False
    command.flushes = fleet.group_flushes
    return True
