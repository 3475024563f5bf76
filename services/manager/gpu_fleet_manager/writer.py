"""A ``Fleet`` whose every commit is appended to the ledger stream before it is folded.

The core's decisions are synchronous and call ``commit`` between steps (one decision's events
per call).  The manager runs a command in a worker thread; ``commit`` first folds the batch
locally (so a decision that would break an invariant is refused before it can poison the
ledger), then hands it to the event loop to append atomically with the expected last sequence.
If the append fails, local state is ahead of the truth, so the manager rebuilds from the stream
before it answers anything else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import structlog

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.ledger import Event, LedgerError
from gpu_fleet.core.placement.pack import Planner
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet.runtime.observe import Observer
from gpu_fleet.views.log_context import event_context
from gpu_fleet.views.metrics import tally

log = structlog.get_logger("gpu_fleet.manager")

T = TypeVar("T")
log = structlog.get_logger("gpu_fleet.manager")


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

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the service's event loop from the decision thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def commit(self, events: Iterable[Event]) -> list[Event]:
        batch = list(events)
        if not batch:
            return []
        counted = tally(self.state, batch) if self.observer is not None else []
        done = super().commit(batch)
        self.seq = self.on_loop(self.ledger.append(batch, self.seq), self.append_timeout)
        self.appended_batches += 1
        if self.observer is not None:
            self.observer.record(counted)  # only once the batch is on the ledger
        first = self.seq - len(batch) + 1
        for offset, event in enumerate(batch):
            # One line per decision, with the context to find it in the ledger and in time.
            log.info("ledger.event", seq=first + offset, **event_context(event))
        return done

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
