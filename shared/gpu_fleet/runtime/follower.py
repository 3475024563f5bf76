"""Fold the ledger stream into local state and keep following it.

Binder, forecaster and notifier each hold their own ``FleetState`` built exactly like the
manager's (the same ``fold``), so they agree with it by construction.  ``wait_for(seq)`` gives
read-your-writes: a request made at ledger sequence N is answered only once N is folded.  A
message is folded whole, all its events (``runtime.ledger_packing``), so ``seq`` is always a
message boundary.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from gpu_fleet.core.ledger import Event, FleetState, LedgerError, fold
from gpu_fleet.runtime import heap
from gpu_fleet.runtime.ledger_stream import LedgerStream

log = structlog.get_logger("gpu_fleet.follower")


def fold_at(
    state: FleetState,
    seq: int,
    index: int,
    event: Event | None,
    refused: str = "ledger.event_refused",
) -> bool:
    """Fold the event at ``(seq, index)``; False, and nothing folded, when it is no event we
    know (``None``: a newer type, or garbage) or the fold refuses it (logged as ``refused``:
    the fold then changed nothing).  Every reader skips the same events, so they agree."""
    if event is None:
        return False
    try:
        fold(state, event)
    except LedgerError as exc:
        log.error(refused, seq=seq, index=index, type=type(event).__name__, error=str(exc))
        return False
    return True


class LedgerFollower:
    def __init__(
        self,
        ledger: LedgerStream,
        period_hours: float = 24.0,
        on_event: Callable[[int, Event, FleetState, int], None] | None = None,
        *,
        metered: bool = True,
    ) -> None:
        self.ledger = ledger
        self.state = FleetState(settings_period_hours=period_hours, metered=metered)
        self.seq = 0
        self.on_event = on_event
        self._advanced = asyncio.Condition()

    def _apply(self, seq: int, events: list[Event | None]) -> None:
        """Fold the message at ``seq`` whole (every event of it, in order), once."""
        if seq <= self.seq:
            return  # an ordered consumer may redeliver after a reconnect; folding is not idempotent
        self.seq = seq
        if seq % heap.SETTLE_EVERY == 0:
            heap.settle()  # what was folded so far is long-lived state (runtime.heap)
        for index, event in enumerate(events):
            if event is None or not fold_at(self.state, seq, index, event):
                continue  # not an event we know (a newer type, or garbage), or refused
            if self.on_event is not None:
                self.on_event(seq, event, self.state, index)

    async def catch_up(self) -> None:
        async for seq, events in self.ledger.entries(self.seq + 1):
            self._apply(seq, events)
        heap.sweep()  # after the rebuild: the state is the heap (runtime.heap)
        async with self._advanced:
            self._advanced.notify_all()
        log.info("ledger.caught_up", seq=self.seq)

    async def follow(self) -> None:
        """Run forever: fold every new event and wake waiters."""
        async for seq, events in self.ledger.follow(self.seq + 1):
            self._apply(seq, events)
            async with self._advanced:
                self._advanced.notify_all()

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """True once ``seq`` is folded, False on timeout."""
        if self.seq >= seq:
            return True
        try:
            async with asyncio.timeout(timeout), self._advanced:
                await self._advanced.wait_for(lambda: self.seq >= seq)
        except TimeoutError:
            return False
        return True
