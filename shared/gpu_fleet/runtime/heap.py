"""The cyclic garbage collector, told what a service's heap is made of.

Why: a service's heap is mostly its folded fleet state - at 10k nodes, millions of objects
(nodes, slots, runs, leases, index entries), none of them in a reference cycle; reference
counting frees whatever a fold replaces.  The cyclic collector walks them anyway: its oldest
generation is collected whenever the heap has grown by a quarter, and walks every live object.
Measured in the manager during a burst of 1,600 admissions at 10k nodes (``bench/e2e.py``): the
collector found **no** object in a cycle, and took 7.5 % of the burst's wall time, one full
collection alone 113 ms (issue 11).

The policy, for service processes (``enable`` in their entry points; a library user or a test
process keeps Python's default):

* ``settle()`` - ``gc.freeze()``: everything alive now moves to the permanent generation, which
  the collector never walks.  O(1).  Called where the heap is the state: by the manager after
  each group of decisions, by a follower every ``SETTLE_EVERY`` events.  Frozen objects are
  still freed by reference counting the moment nothing refers to them.
* a large pure computation ends with a settle (``core.gcpause.on_large_result``): what it
  leaves alive - a funding evaluation's result, 90k objects at 100k open leases - is frozen,
  not walked by the next young and middle collections first (36-52 ms for the young one): it
  is the state's for as long as it is alive, and freed by reference counting when it is
  replaced.  Being a settle, it also sweeps when a sweep is due, so a manager that only
  answers reads and scrapes (each an evaluation, and no decision group's settle) still
  reclaims what it froze.
* ``sweep()`` - unfreeze, one full collection, freeze again: reclaims any cycle that a settle
  froze (a caught exception's traceback, say - alive, or garbage not collected yet, when the
  settle came), so such a leak is bounded.  Done at the first settle after ``SWEEP_SECONDS``
  or after ``sweep_every`` settles, whichever comes first, and after a rebuild (where a pause
  is paid anyway).  A sweep costs one full collection (about 0.1 s at 10k nodes): once a
  minute, a fraction of a percent.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import structlog

from gpu_fleet.core import gcpause

log = structlog.get_logger("gpu_fleet.heap")

SETTLE_EVERY = 256
"""Ledger messages a follower folds between settles."""

SWEEP_SECONDS = 60.0
"""The longest a frozen cycle waits for a sweep (while settles come)."""


@dataclass
class _Policy:
    enabled: bool = False
    settles: int = 0
    sweep_every: int = 4096
    swept_at: float = 0.0  # time.monotonic() of the last sweep


_policy = _Policy()


def enable(sweep_every: int = 4096) -> None:
    """Adopt the policy in this process (a service's entry point), and settle as a large
    pure computation ends (``core.gcpause.on_large_result``)."""
    _policy.enabled, _policy.settles = True, 0
    _policy.sweep_every, _policy.swept_at = max(1, sweep_every), time.monotonic()
    gcpause.on_large_result = settle


def settle() -> None:
    """What is alive now is long-lived state: the collector need not walk it again."""
    if not _policy.enabled:
        return
    gc.freeze()
    _policy.settles += 1
    due = time.monotonic() - _policy.swept_at >= SWEEP_SECONDS
    if due or _policy.settles % _policy.sweep_every == 0:
        sweep()


def sweep() -> int:
    """A full collection over everything, frozen or not, then freeze again; returns how many
    unreachable objects it found (logged when any: a cycle the state should not have)."""
    if not _policy.enabled:
        return 0
    gc.unfreeze()
    found = gc.collect()
    gc.freeze()
    _policy.swept_at = time.monotonic()
    if found:
        log.info("heap.swept", unreachable=found, frozen=gc.get_freeze_count())
    return found
