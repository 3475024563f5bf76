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

What the block leaves alive - a matching's result: its per-lease maps, its rejection log, its
columns, about 0.9M references at 100k open leases - goes straight to the oldest generation
when the pause ends (``_promote``).  Left young, the first collection after the pause walked
all of it, to find it alive, and the next generation walked it again: 6 % of an evaluation at
100k open leases, 10 % of the first one after a budget change (issue 11).  It is the same place
those objects reach after two collections; a cycle among them, if the block made one, waits
for a full collection instead of a young one.
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
        _promote()
        gc.enable()


PROMOTE_FROM = 20_000
"""Young tracked objects (``gc.get_count()[0]``) from which a pause ends by promoting them: an
evaluation at 100k open leases leaves about 90k, at 10k about 8k - whose walk costs a few
milliseconds, so there the collector keeps its usual generations."""


def _promote() -> None:
    """Move every tracked object to the oldest generation, without walking any: ``freeze``
    moves all of them to the permanent generation and ``unfreeze`` moves that into the oldest,
    each a splice of lists.

    Only after a block that left many (``PROMOTE_FROM``), and only while nothing is frozen: a
    service freezes its settled heap (``runtime.heap``), and unfreezing would hand that back to
    the collector.  (A settle from another thread between the two calls is undone until that
    service's next settle, which freezes it again.)"""
    if gc.get_count()[0] >= PROMOTE_FROM and gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()
