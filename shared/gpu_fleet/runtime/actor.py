"""One actor contract for all four services.

* ``start()`` and ``stop()`` may each be called any number of times; ``stop()`` is safe even if
  ``start()`` never ran.
* ``run()`` returns only once shutdown has *completed*.
* A few named root tasks are supervised: the first one to exit (crash, cancellation or an
  unexpected normal return) is logged and stops the actor, because a service missing one of its
  loops is worse than a restarted service.
* SIGTERM only sets a flag; shutdown then follows the normal path: stop taking work, let
  in-flight handlers finish within a budget, drain NATS.
* ``exit_code`` says how the actor ended: 0 for a requested stop, 1 when it stopped because
  something broke (a root task died, or ``abort`` was called, e.g. when the NATS connection
  closed for good).  ``serve`` returns it, so the process exits non-zero and whatever
  supervises it (``gpu-fleet up``, compose ``restart:``, Kubernetes) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Coroutine
from typing import Any, Self

import structlog

log = structlog.get_logger("gpu_fleet.actor")


class Actor:
    name = "actor"
    shutdown_budget = 10.0

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._stopped = asyncio.Event()
        self._started = False
        self._stopping = False
        self.exit_code = 0
        self.failure: str | None = None

    # -- subclass hooks --------------------------------------------------------------------
    async def _on_start(self) -> None:
        """Connect and spawn root tasks."""

    async def _on_stop(self) -> None:
        """Stop taking work, finish in-flight work, drain connections."""

    # -- contract --------------------------------------------------------------------------
    @property
    def stopped(self) -> asyncio.Event:
        return self._stopped

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.create_task(self._guard(name, coro), name=name))

    async def _guard(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
            if not self._stopping:
                log.error("actor.task_returned", actor=self.name, task=name)
                self.exit_code = 1
        except asyncio.CancelledError:
            if not self._stopping:
                log.warning("actor.task_cancelled", actor=self.name, task=name)
                self.exit_code = 1
            raise
        except Exception:
            if self._stopping:  # e.g. a follower seeing its connection drain during shutdown
                log.debug("actor.task_ended_during_stop", actor=self.name, task=name)
            else:
                log.exception("actor.task_crashed", actor=self.name, task=name)
                self.exit_code = 1
        finally:
            self._stop_requested.set()

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._on_start()
        log.info("actor.started", actor=self.name)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def abort(self, reason: str) -> None:
        """Stop because something broke (exit code 1); ignored once a stop is under way.

        Used as the NATS ``on_closed`` hook: a closed connection never comes back, so the only
        way to serve again is a new process.  Our own drain at shutdown also closes the
        connection, which is why a stop already under way is not a failure.
        """
        if self._stopping:
            return
        if self.failure is None:
            log.error("actor.aborted", actor=self.name, reason=reason)
            self.failure = reason
        self.exit_code = 1
        self._stop_requested.set()

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._stop_requested.set()
        try:
            # Root tasks first (followers unsubscribe while the connection is still up, so the
            # client's own consumer tasks end too), then the service's drain.
            await _cancel_all(self.name, self._tasks, self.shutdown_budget)
            self._tasks.clear()
            if self._started:
                try:
                    await asyncio.wait_for(self._on_stop(), timeout=self.shutdown_budget)
                except TimeoutError:
                    log.warning("actor.shutdown_budget_exceeded", actor=self.name)
        finally:
            self._stopped.set()
            if self._started:
                log.info("actor.stopped", actor=self.name)

    async def run(self) -> None:
        """Start, wait for a stop request (signal or a failed root task), then stop."""
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            await self.stop()

    async def serve(self) -> int:
        """What a service's ``main`` runs: signals stop it, and the exit code says how it ended."""
        self.install_signal_handlers()
        try:
            await self.run()
        except Exception:
            log.exception("actor.start_failed", actor=self.name)
            return 1
        return self.exit_code

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


RECANCEL_EVERY = 0.2
"""Seconds between two cancellations of a root task still running at stop."""


async def _cancel_all(actor: str, tasks: list[asyncio.Task[None]], budget: float) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again every ``RECANCEL_EVERY``
    those still running, for at most ``budget`` seconds; those still running then are logged
    and left.

    Why again: a library may swallow a cancellation - nats-py's flush catches
    ``CancelledError`` and returns - and a root task cancelled there carries on with its loop,
    so a stop that waited for it without a bound hung for good (seen twice in CI, in the
    notifier's ledger consumer).  The next cancellation meets it at its next await.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.warning(
                "actor.tasks_outlived_stop",
                actor=actor,
                tasks=sorted(t.get_name() for t in pending),
            )
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY, left))
    for task in tasks:  # their outcome read, so none is reported as never retrieved
        if task.done() and not task.cancelled():
            task.exception()
