"""A subscription's messages handed to one reader without a task and a timer per message.

Why: nats-py's ``Subscription.next_msg`` wraps every call in a new task, an ``asyncio.wait_for``
(another task and a timer) and a ``uuid4`` (a system call): about a sixth of a ledger
follower's CPU in a 10k-node admission burst, where the binder reads four messages per
admission (issue 11).  Subscribed with ``Inbox.put`` as its callback, the subscription's own
task hands each message over into a deque; ``get`` takes it without waiting whenever one is
there, and waits (with a timer) only when the deque is empty.

Back-pressure is kept: past ``limit`` messages held, ``put`` waits until the reader has taken
half of them, so the subscription stops taking messages from nats-py's pending queue and the
server's flow control (which counts what the callback has taken) pauses delivery, as it does
for a reader that calls ``next_msg`` too slowly.
"""

from __future__ import annotations

import asyncio
from collections import deque

import nats.errors
from nats.aio.msg import Msg

LIMIT = 4096
"""Messages held for the reader before the subscription waits for room."""


class Inbox:
    """Messages in arrival order, for one reader (``get``) and one subscription (``put``)."""

    def __init__(self, limit: int = LIMIT) -> None:
        self._items: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._limit = max(2, limit)

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, msg: Msg) -> None:
        """The subscription's callback: hold ``msg``; wait while ``limit`` are held."""
        self._items.append(msg)
        self._arrived.set()
        if len(self._items) >= self._limit:
            self._room.clear()
            await self._room.wait()

    async def get(self, timeout: float) -> Msg:
        """The next message; ``nats.errors.TimeoutError`` after ``timeout`` s with none (as
        ``next_msg`` raises)."""
        if not self._items:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        msg = self._items.popleft()
        if not self._room.is_set() and len(self._items) <= self._limit // 2:
            self._room.set()
        return msg
