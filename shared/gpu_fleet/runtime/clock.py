"""Clocks: the wall clock in production, a virtual clock for scenarios and tests.

Services never call ``time.time()`` directly; they read their clock.  A virtual clock only moves
when told to (``fleet.api.clock``), which is how ``scenario run --via-nats`` replays a story with
the same instants as the in-process runner, and how tests avoid sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol

from gpu_fleet.core.model import Instant


class Clock(Protocol):
    virtual: bool

    def now(self) -> Instant: ...


class WallClock:
    virtual = False

    def now(self) -> Instant:
        return int(time.time())


class VirtualClock:
    virtual = True

    def __init__(self, start: Instant) -> None:
        self._now = start

    def now(self) -> Instant:
        return self._now

    def set(self, t: Instant) -> None:
        if t < self._now:
            raise ValueError(f"virtual clock cannot go back from {self._now} to {t}")
        self._now = t
