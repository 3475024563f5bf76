"""Small timing helpers shared by the benchmarks (no dependency beyond the standard library)."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def machine_line() -> str:
    """One line naming the machine: cores, Python, architecture."""
    return (
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.machine()}, {sys.platform}"
    )


def load_line() -> str:
    """The 1/5/15-minute load averages (other work on a shared box skews every timing)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds one call of ``fn`` took (garbage collector paused), and its result."""
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        if gc_was_on:
            gc.enable()


def repeat_adaptive(
    fn: Callable[[], object],
    *,
    budget_s: float = 10.0,
    min_reps: int = 1,
    max_reps: int = 25,
) -> list[float]:
    """Time ``fn`` repeatedly: as many times as fit in ``budget_s`` (first call included).

    The first call decides the count, so one slow call never blows the budget by more than itself.
    """
    first, _ = timed(fn)
    times = [first]
    reps = max(min_reps, min(max_reps, int(budget_s / max(first, 1e-9))))
    for _ in range(reps - 1):
        t, _ = timed(fn)
        times.append(t)
    return times


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in [0, 100]."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")
