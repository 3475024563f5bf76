"""A ``Fleet`` whose every commit is appended to the ledger stream before it is folded.

The core's decisions are synchronous and call ``commit`` between steps (one decision's events
per call).  The manager runs a command in a worker thread; ``commit`` first folds the batch
locally (so a decision that would break an invariant is refused before it can poison the
ledger), then hands it to the event loop to append atomically with the expected last sequence.
If the append fails, local state is ahead of the truth, so the manager rebuilds from the stream
before it answers anything else.

Group commit (``buffered``): while the manager decides a group of waiting requests, commits are
folded and kept, and ``flush`` appends them all as one atomic batch - one round trip to
JetStream for the group instead of one per decision.  Nothing is acknowledged before the flush
returns.  A buffer that grows past ``FLUSH_AT`` events is flushed at a commit boundary (one
atomic batch may hold only so many messages).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

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
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet.runtime.observe import Observer
from gpu_fleet.views.log_context import event_context
from gpu_fleet.views.metrics import tally

log = structlog.get_logger("gpu_fleet.manager")

T = TypeVar("T")

_TOPOLOGY_EVENTS = (LeaseMinted, LeaseClosed, NodeRegistered, NodeHealthChanged)

FLUSH_AT = 512
"""Buffered events that force a flush at the next commit boundary (JetStream caps the messages
of one atomic batch; a group stays well below it)."""


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
        self.buffer: list[tuple[list[Event], list[Any]]] = []
        self.flushed_in_group = False  # a buffer that outgrew FLUSH_AT was appended mid-group
        self.flushes = 0  # buffers appended so far (group commit's "is it on the ledger?")
        self.poisoned = False  # a fold refused part of a commit: local state is not the buffer's

    @property
    def pending(self) -> int:
        """Events folded locally and not yet on the ledger."""
        return sum(len(batch) for batch, _ in self.buffer)

    @property
    def topology_ahead(self) -> bool:
        """Do the buffered events change a topology (nodes or held slots)?  Then a placement
        made on the ledger's state - the binder's - could take a slot this group just took."""
        return any(isinstance(e, _TOPOLOGY_EVENTS) for batch, _ in self.buffer for e in batch)

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the service's event loop from the decision thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def commit(self, events: Iterable[Event]) -> list[Event]:
        batch = list(events)
        if not batch:
            return []
        if self.buffered:
            return self._buffer(batch)
        counted = tally(self.state, batch) if self.observer is not None else []
        done = super().commit(batch)
        self.seq = self.on_loop(self.ledger.append(batch, self.seq), self.append_timeout)
        self._appended([(batch, counted)])
        return done

    def _buffer(self, batch: list[Event]) -> list[Event]:
        """Group commit: fold now, append at ``flush``.  An oversized event is refused before
        it is folded (the request that made it gets 413, the group goes on)."""
        self.ledger.check_sizes(batch)
        if self.pending >= FLUSH_AT:
            self.on_loop(self.flush(), self.append_timeout)
            self.flushed_in_group = True
        counted = tally(self.state, batch) if self.observer is not None else []
        try:
            done = super().commit(batch)
        except Exception:
            self.poisoned = True  # part of the batch may be folded: rebuild before trusting it
            raise
        self.buffer.append((batch, counted))
        return done

    async def flush(self) -> None:
        """Append every buffered decision as one atomic batch (on the event loop)."""
        if not self.buffer:
            return
        done = self.buffer
        events = [e for batch, _ in done for e in batch]
        self.seq = await self.ledger.append(events, self.seq)
        self.buffer = []
        self.flushes += 1
        self._appended(done)

    def _appended(self, done: list[tuple[list[Event], list[Any]]]) -> None:
        """Bookkeeping once decisions are on the ledger: counters, metrics, one log line each."""
        self.appended_batches += len(done)
        first = self.seq - sum(len(batch) for batch, _ in done) + 1
        for batch, counted in done:
            if self.observer is not None:
                self.observer.record(counted)  # only once the batch is on the ledger
            for event in batch:
                # One line per decision, with the context to find it in the ledger and in time.
                log.info("ledger.event", seq=first, **event_context(event))
                first += 1

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
