"""A ``Fleet`` whose every commit is appended to the ledger stream before it is folded.

The core's decisions are synchronous and call ``commit`` between steps (one decision's events
per call).  The manager runs a command in a worker thread; ``commit`` first folds the batch
locally (so a decision that would break an invariant is refused before it can poison the
ledger), then hands it to the event loop to append atomically with the expected last sequence.
If the append fails, local state is ahead of the truth, so the manager rebuilds from the stream
before it answers anything else.

Group commit (``buffered``): while the manager decides a group of waiting requests, commits are
folded and kept, and ``flush`` appends them all at once - one round trip to JetStream for the
group instead of one per decision, and one stream message holding all its events
(``runtime.ledger_packing``).  Nothing is acknowledged before the flush returns.  A buffer that
grows past ``FLUSH_AT`` events is flushed at a commit boundary (what one append carries stays
bounded).

Pipelined (``launch``): a group's buffer is handed to an append task, and the next group is
decided on top of it while the append is in flight.  Appends stay in order: a flush waits for
the append in flight, and fails if that one failed (what was decided on top of it is void).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, NamedTuple, TypeVar

import nats.errors
import structlog

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.ledger import (
    Event,
    LeaseClosed,
    LeaseMinted,
    LedgerError,
    NodeHealthChanged,
    NodeRegistered,
)
from gpu_fleet.core.placement.pack import Planner
from gpu_fleet.runtime.ledger_stream import (
    LedgerConflictError,
    LedgerStream,
    LedgerUnavailableError,
)
from gpu_fleet.runtime.observe import Observer
from gpu_fleet.views.log_context import event_context
from gpu_fleet.views.metrics import tally

log = structlog.get_logger("gpu_fleet.manager")

T = TypeVar("T")


class Decided(NamedTuple):
    """One decision folded into the buffer and not yet appended: its events, their metric
    tallies, and the events encoded (measured against a message's size when buffered, and
    appended as they are: an event is encoded once on its way to the ledger)."""

    events: list[Event]
    counted: list[Any]
    encoded: list[bytes]


_TOPOLOGY_EVENTS = (LeaseMinted, LeaseClosed, NodeRegistered, NodeHealthChanged)

APPEND_FAILURES = (LedgerConflictError, LedgerUnavailableError, nats.errors.Error, TimeoutError)
"""What a failed append raises."""


class NeedsThreadError(RuntimeError):
    """A decision made on the event loop (``inline``) needed the loop to wait for something -
    an append, a binder answer - which only a decision made in the worker thread can do.  The
    group is decided again in the thread, on the ledger's state (``group._decide_locked``)."""


FLUSH_AT = 512
"""Buffered events that force a flush at the next commit boundary (an append stays a message
or a few, and a short atomic batch when it outgrows one; a group stays well below it)."""


class LedgerFleet(Fleet):
    def __init__(
        self,
        settings: Settings,
        planner: Planner | None,
        ledger: LedgerStream,
        loop: asyncio.AbstractEventLoop,
        append_timeout: float = 15.0,
    ) -> None:
        super().__init__(settings, planner)
        self.ledger = ledger
        self.loop = loop
        self.seq = 0
        self.append_timeout = append_timeout
        self.appended_batches = 0
        self.observer: Observer | None = None  # counts each appended decision once
        # Group commit: decisions folded but not yet appended (events, their metric tallies).
        self.buffered = False
        self.buffer: list[Decided] = []
        self.flushes = 0  # buffers appended so far
        # Successful flushes of the group being decided (mid-group, at ``FLUSH_AT``): the
        # group's "is this command's decision on the ledger?" (``Command.flushes``).  Only
        # this group's own flushes count - the previous group's append landing meanwhile
        # puts none of this group on the ledger.
        self.group_flushes = 0
        # Deciding on the event loop itself (``group.run_inline``): nothing may wait for the
        # loop then; ``searched`` says a placement needed a CP-SAT search (done here, on the
        # loop), after which the rest of the group is decided in the worker thread.
        self.inline = False
        self.searched = False
        # Pipelining: the append of the previous group's buffer, and what it holds.
        self.in_flight: asyncio.Task[None] | None = None
        self.flying: list[Decided] = []

    @property
    def pending(self) -> int:
        """Events folded locally and not yet on the ledger."""
        return sum(len(decided.events) for decided in self.buffer)

    @property
    def flushed_in_group(self) -> bool:
        """Was part of the group being decided appended already (its buffer outgrew
        ``FLUSH_AT``)?  Read before the group's own final append."""
        return self.group_flushes > 0

    @property
    def topology_ahead(self) -> bool:
        """Do the events not yet on the ledger (buffered, or in an append in flight) change a
        topology (nodes or held slots)?  Then a placement made on the ledger's state - the
        binder's - could take a slot this group, or the one before it, just took."""
        return any(
            isinstance(e, _TOPOLOGY_EVENTS)
            for buffer in (self.flying, self.buffer)
            for decided in buffer
            for e in decided.events
        )

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the service's event loop from the decision thread and wait for it;
        past ``timeout`` it is cancelled (an append abandoned here must not land later, after
        its commands were answered "unavailable").  A decision made on the loop itself cannot
        wait for it: ``NeedsThreadError``."""
        if self.inline:
            coro.close()
            raise NeedsThreadError("a decision made on the event loop cannot wait for the loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no answer from the event loop in {timeout} s") from None

    def commit(self, events: Iterable[Event]) -> list[Event]:
        batch = list(events)
        if not batch:
            return []
        if self.buffered:
            return self._buffer(batch)
        encoded = self.ledger.check_sizes(batch)  # refused before it is folded, as buffered
        counted = tally(self.state, batch) if self.observer is not None else []
        done = super().commit(batch)
        self.seq = self.on_loop(
            self.ledger.append(batch, self.seq, encoded=encoded), self.append_timeout
        )
        self._appended([Decided(batch, counted, encoded)])
        return done

    def _buffer(self, batch: list[Event]) -> list[Event]:
        """Group commit: fold now, append at ``flush``.  An oversized event is refused before
        it is folded (the request that made it gets 413, the group goes on)."""
        encoded = self.ledger.check_sizes(batch)
        if self.pending >= FLUSH_AT:
            self.on_loop(self.flush(), self.append_timeout)
        counted = tally(self.state, batch) if self.observer is not None else []
        # A fold that refuses part of the batch raises: the command broke the local state,
        # and the group is decided again after a rebuild (``group.run_group``).
        done = super().commit(batch)
        self.buffer.append(Decided(batch, counted, encoded))
        return done

    async def flush(self) -> None:
        """Append every buffered decision as one atomic batch (on the event loop), after the
        append in flight (``LedgerConflictError`` if that one failed)."""
        await self.landed()
        if not self.buffer:
            return
        done, self.buffer = self.buffer, []
        try:
            await self._append(done)
        except BaseException:
            self.buffer = done  # not on the ledger: still the group's
            raise
        self.group_flushes += 1

    def launch(self) -> asyncio.Task[None]:
        """Start appending the buffer (on the event loop) and return at once: the next group
        may be decided meanwhile.  ``landed`` says how the append ended.  Only with nothing
        in flight: appends stay in ledger order because the pipeline lands one first."""
        assert self.in_flight is None, "land the append in flight before launching another"
        done, self.buffer = self.buffer, []
        self.flying = done
        self.in_flight = asyncio.create_task(self._append(done), name="ledger append")
        return self.in_flight

    async def landed(self) -> None:
        """Wait for the append in flight, if any; raise what it raised (as a conflict: the
        decisions made on top of it were made on a state the ledger does not have)."""
        task = self.in_flight
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except APPEND_FAILURES as exc:
            # Kept in flight: whoever asks next (the pipeline landing that group) must learn
            # that it failed too - a mid-group flush asking first must not use the news up.
            raise LedgerConflictError(f"the append before failed: {exc}") from exc
        if self.in_flight is task:
            self.in_flight, self.flying = None, []

    async def _append(self, done: list[Decided]) -> None:
        events = [e for decided in done for e in decided.events]
        encoded = [data for decided in done for data in decided.encoded]
        self.seq = await self.ledger.append(events, self.seq, encoded=encoded)
        self.flushes += 1
        self._appended(done)

    def _appended(self, done: list[Decided]) -> None:
        """Bookkeeping once decisions are on the ledger: counters, metrics, one log line each."""
        self.appended_batches += len(done)
        if self.observer is not None:
            for decided in done:
                self.observer.record(decided.counted)  # only once the batch is on the ledger
        # One line per decision, with the context to find it in the ledger and in time; its
        # context is not built at a level that drops it (a burst appends thousands a second).
        if log.is_enabled_for(logging.INFO):
            events = [e for decided in done for e in decided.events]
            encoded = [data for decided in done for data in decided.encoded]
            for (seq, index), event in zip(
                self.ledger.addresses(encoded, self.seq), events, strict=True
            ):
                log.info("ledger.event", seq=seq, index=index, **event_context(event))

    def replay(self, event: Event | None, seq: int) -> None:
        """Fold an event read back from the stream (no append).

        Skipped, with its sequence logged: a message that is no event we know (``None``), and
        an event the fold refuses (which then changed nothing).  Every reader skips the same
        sequences, so they still agree; dying on one would stop the fleet API for good.
        """
        if event is not None:
            try:
                super().commit([event])
            except LedgerError as exc:
                log.error(
                    "ledger.event_refused", seq=seq, type=type(event).__name__, error=str(exc)
                )
        self.seq = seq
