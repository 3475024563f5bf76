"""Delivery policy: the clock deliveries run on, exponential backoff with jitter, and a
per-endpoint circuit breaker.  No I/O; the dispatcher applies them.

**Clock.**  Deliveries read time from a ``DeliveryClock``: ``now()`` for signatures, records and
the breaker, ``real(seconds)`` for how long to actually wait.  Production uses the wall clock
(``real`` is the identity).  Tests use a ``ScaledClock`` on which one real millisecond is one
second, so a ``Retry-After: 120`` is honoured - recorded as 120 s, the next attempt due 120 s
later on that clock - while the test waits 0.12 s, and nothing is asserted on wall time.

**Backoff.**  Attempt ``n`` (1-based) failed: wait ``min(cap, base * factor**(n-1))`` scaled down
by up to ``jitter`` (a random fraction, "equal jitter", so a fleet of notices does not retry in
lock-step), and never less than the receiver's ``Retry-After`` (itself capped).

**Breaker.**  ``threshold`` consecutive failures open it for ``cooldown`` seconds: deliveries to
that endpoint wait in the outbox, attempts are not spent.  Then one trial is let through
(half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Literal, Protocol


class DeliveryClock(Protocol):
    def now(self) -> float: ...

    def real(self, seconds: float) -> float: ...


class WallDeliveryClock:
    def now(self) -> float:
        return time.time()

    def real(self, seconds: float) -> float:
        return seconds


class ScaledClock:
    """A clock that runs ``1 / scale`` times faster than real time (tests, demos)."""

    def __init__(self, scale: float, start: float | None = None) -> None:
        if scale <= 0:
            raise ValueError("scale must be > 0")
        self.scale = scale
        self._start = time.time() if start is None else start
        self._origin = time.monotonic()

    def now(self) -> float:
        return self._start + (time.monotonic() - self._origin) / self.scale

    def real(self, seconds: float) -> float:
        return seconds * self.scale


@dataclass(frozen=True)
class Backoff:
    base: float = 2.0
    factor: float = 2.0
    cap: float = 600.0
    jitter: float = 0.5
    retry_after_cap: float = 3600.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds (on the delivery clock) before attempt ``attempt + 1``."""
        raw = min(self.cap, self.base * self.factor ** max(0, attempt - 1))
        delay = raw * (1.0 - self.jitter * rng.random())
        if retry_after is not None:
            delay = max(delay, min(max(0.0, retry_after), self.retry_after_cap))
        return delay


BreakerState = Literal["closed", "open", "half-open"]


class Breaker:
    """One endpoint's circuit breaker (see the module docstring)."""

    def __init__(self, threshold: int = 5, cooldown: float = 30.0) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.opened_at: float | None = None
        self._trial = False

    def state(self, now: float) -> BreakerState:
        if self.opened_at is None:
            return "closed"
        return "open" if now < self.opened_at + self.cooldown else "half-open"

    def remaining(self, now: float) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        if self.state(now) != "open":
            return 0.0
        assert self.opened_at is not None
        return self.opened_at + self.cooldown - now

    def wait(self, now: float) -> float:
        """0 when a request may go now; otherwise seconds until one may (and take the trial)."""
        state = self.state(now)
        if state == "closed":
            return 0.0
        if state == "open":
            assert self.opened_at is not None
            return self.opened_at + self.cooldown - now
        if self._trial:
            return self.cooldown / 10 or 0.001  # one trial at a time; ask again shortly
        self._trial = True
        return 0.0

    def record_skipped(self) -> None:
        """The trial found nothing to send: let the next request be the trial."""
        self._trial = False

    def record(self, ok: bool, now: float) -> None:
        self._trial = False
        if ok:
            self.failures = 0
            self.opened_at = None
            return
        self.failures += 1
        if self.opened_at is not None or self.failures >= self.threshold:
            self.opened_at = now  # a failed trial opens it again for a full cooldown
