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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nats.errors
import structlog

from gpu_fleet.core.engine import CommandError
from gpu_fleet.core.model import Instant
from gpu_fleet.messages import api
from gpu_fleet.runtime.ledger_stream import (
    LedgerConflictError,
    LedgerEventTooLargeError,
    LedgerUnavailableError,
)
from gpu_fleet_manager.boundary import REQUEST, ApiError, FieldRefusedError

if TYPE_CHECKING:
    from gpu_fleet_manager.service import Manager
    from gpu_fleet_manager.writer import LedgerFleet

log = structlog.get_logger("gpu_fleet.manager")

MAX_GROUP = 256
"""Commands decided in one group at most (the rest wait for the next one)."""


@dataclass
class Command:
    """One waiting command: the decision to run, and where its caller waits for the outcome."""

    fn: Callable[[Instant], Any]
    done: asyncio.Future[Any]
    outcome: tuple[bool, Any] | None = field(default=None)  # (ok, result or exception)
    flushes: int = -1  # the writer's flush count when this command's decision was complete


class GroupCommitter:
    """The queue of waiting commands and the one task that decides them, group by group."""

    def __init__(self, manager: Manager) -> None:
        self.manager = manager
        self.queue: list[Command] = []
        self.runner: asyncio.Task[None] | None = None
        self.groups = 0  # groups decided (for tests and the log)
        self.largest = 0

    async def submit(self, fn: Callable[[Instant], Any]) -> Any:
        """Queue ``fn`` and wait until its group is decided and on the ledger."""
        loop = asyncio.get_running_loop()
        command = Command(fn, loop.create_future())
        self.queue.append(command)
        if self.runner is None or self.runner.done():
            self.runner = asyncio.create_task(self._run(), name="group commit")
        return await command.done

    async def _run(self) -> None:
        while self.queue:
            group, self.queue = self.queue[:MAX_GROUP], self.queue[MAX_GROUP:]
            self.groups += 1
            self.largest = max(self.largest, len(group))
            try:
                await decide(self.manager, group)
            except Exception as exc:  # pragma: no cover - decide answers every command
                log.exception("group.failed")
                for command in group:
                    if not command.done.done():
                        command.done.set_exception(exc)
            for command in group:
                if command.done.done() or command.outcome is None:
                    continue
                ok, value = command.outcome
                if ok:
                    command.done.set_result(value)
                else:
                    command.done.set_exception(value)


APPEND_ERRORS = (LedgerConflictError, LedgerUnavailableError, nats.errors.Error, TimeoutError)
"""What a failed append raises: the group's fate, not one command's."""


async def decide(manager: Manager, group: list[Command], attempts: int = 3) -> None:
    """Decide ``group`` under the writer's lock and append it; set every command's outcome.

    The error handling is ``Manager.mutate``'s of old, per group: a lost race re-folds and
    decides again (``attempts`` times), an unavailable ledger answers "unavailable", and each
    command the engine refused gets its own error.
    """
    async with manager.lock:
        try:
            await manager._ensure_loaded()
        except ApiError as exc:
            _answer_all(group, exc)
            return
        for attempt in range(1, attempts + 1):
            fleet = manager.require_fleet()
            try:
                await manager._catch_up()
                fleet.buffered, fleet.buffer = True, []
                fleet.flushed_in_group = fleet.poisoned = False
                clean = await asyncio.to_thread(run_group, group, manager.clock.now, fleet)
                if not clean:
                    # A commit broke the local state: start the group over without that command.
                    log.warning("group.rebuild_after_failed_command")
                    fleet.buffered, fleet.buffer = False, []
                    await manager._rebuild()
                    _forget_decided(group)
                    continue
                await fleet.flush()
                fleet.buffered = False
                await manager._maybe_snapshot()
                _map_refusals(group)
                return
            except LedgerConflictError as exc:
                log.warning("ledger.conflict", attempt=attempt, error=str(exc))
                flushed = fleet.flushed_in_group
                fleet.buffered, fleet.buffer = False, []
                await manager._rebuild()
                if attempt == attempts or flushed:
                    why = f"{exc}; retried {attempt} times"
                    _answer_all(group, ApiError("conflict", why), durable=fleet.flushes)
                    return
                _forget_decided(group)
            except APPEND_ERRORS as exc:
                log.warning("ledger.unavailable", error=str(exc))
                fleet.buffered, fleet.buffer = False, []
                try:
                    await manager._rebuild()
                except Exception as rebuild_exc:
                    log.warning("ledger.rebuild_failed", error=type(rebuild_exc).__name__)
                    manager.fleet = None
                error = ApiError("unavailable", f"ledger unavailable: {exc}; retry")
                _answer_all(group, error, durable=fleet.flushes)
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
    return not isinstance(command.outcome[1], (CommandError, ApiError, LedgerEventTooLargeError))


def _answer_all(group: list[Command], error: Exception, *, durable: int = -1) -> None:
    """Answer ``error`` to every command, except those whose decision a flush that succeeded
    (mid-group, the writer's ``flushes`` count was ``durable`` at the failure) put on the
    ledger: those keep their own outcome."""
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
    """
    for command in fleet_commands:
        if command.outcome is not None:
            continue  # broke the state in an earlier pass of this group: not decided again
        try:
            command.outcome = (True, command.fn(clock()))
        except APPEND_ERRORS:
            raise
        except (CommandError, ApiError, LedgerEventTooLargeError) as exc:
            command.outcome = (False, exc)
        except Exception as exc:
            command.outcome = (False, exc)
            return False
        command.flushes = fleet.flushes
    return True
