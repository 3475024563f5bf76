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
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off (as it was, afterwards)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
