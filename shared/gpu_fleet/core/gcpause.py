"""Pause the cyclic garbage collector around a pure computation that allocates a lot.

Why: a funding matching over 100k open leases allocates about a million short-lived tuples,
lists and claims, none of them in a reference cycle - reference counting frees each the moment
it is dropped.  The allocations still trigger the cyclic collector, whose older generations walk
every live object of the process (the fleet state: hundreds of thousands of leases, runs and
index entries), so at fleet scale about a third of an evaluation went to collecting nothing
(bench/funding.py, issue 11).  Paused for the duration, the same memory is freed; the collector
runs at the first allocation after it resumes.

Safe with threads (the manager decides in a worker thread): pausing is process-wide, a pause
only resumes what it paused itself, and a nested or concurrent pause that finds the collector
already off leaves it alone.

What a large block leaves alive - a matching's result: its per-lease maps, its rejection log,
its columns, about 90k objects and 0.9M references at 100k open leases - is walked by the first
young collection after the pause (36-52 ms measured) and by the next middle one again, only to
be found alive.  A process that has said its heap is long-lived state (a service,
``runtime.heap``) installs ``on_large_result``: a settle, which freezes everything alive then
(O(1)) and sweeps when one is due, so a cycle frozen with the result is reclaimed within the
policy's bound.  A process that has not keeps Python's collector exactly as it is: moving the
result to the oldest generation there would also move whatever young garbage cycles the
process had, which no full collection would then be counted to reach (issue 11).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator

LARGE_RESULT_FROM = 20_000
"""Young tracked objects (``gc.get_count()[0]``: allocated less freed) a block must leave for
``on_large_result``: an evaluation at 100k open leases leaves about 90k, at 10k about 8k -
whose walk costs a few milliseconds, so there the collector keeps its usual generations."""

on_large_result: Callable[[], None] | None = None
"""Called when a pause ends normally after a block that left ``LARGE_RESULT_FROM`` young objects
or more, before the collector resumes (``runtime.heap.enable`` sets it; ``None``: nothing)."""


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was, afterwards)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
        hook = on_large_result
        if hook is not None and gc.get_count()[0] >= LARGE_RESULT_FROM:
            hook()  # not after an exception: its traceback holds the block's partial state
    finally:
        gc.enable()
