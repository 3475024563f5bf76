"""The waiting runs that only a change in the fleet can start: the index behind the
event-driven reconcile (issue 11).

Whenever anything changes, the reconcile loop offers each waiting run a start
(``Fleet._admit_pending``).  In a deep queue nearly every waiting run holds a pending
reservation and needs more GPUs of its flavor than are free, so the offer provably changes
nothing (``certain_to_wait``).  Finding that out by asking every waiting run made each change
cost O(waiting runs): 16 ms per submission with 7,000 runs waiting at 1k nodes.

A run is *parked* when everything ``certain_to_wait`` reads about the run itself says it waits
(``parked_need``): no follow gate, a pending reservation, no open lease, a well-formed request
and a funding principal.  Those facts change only with an event that names the run - its spec,
status, leases or reservations - or with the Budgets (who may fund whom).  The fold notes the
runs its events name (``fold.run_touched``) and drops the whole index when a Budget changes,
so the index re-examines only what changed when it is next asked (``FleetState.waiting_line``).

What is left to ask at an instant is about the fleet, not the runs: whether a run's reservation
is due, whether anything is Unfunded (reclaim could then make room), and the free GPUs of each
flavor.  A parked run needing more than the free GPUs open to it cannot be placed by any
planner; so the parked runs are kept per flavor and need (and whether they may backfill), in
promise order, and the next one that might start heads one of a handful of lists
(``engine.waiting``).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from gpu_fleet.core.model import Run
from gpu_fleet.core.placement.pack import groups

if TYPE_CHECKING:
    from gpu_fleet.core.ledger.state import FleetState


def parked_need(state: FleetState, run: Run) -> int | None:
    """The GPUs ``run`` needs (actives and spares) if it is parked, else ``None``.

    Parked: it has no follow gate, holds a pending reservation and no open lease, asks for a
    well-formed gang and has a funding principal.  ``certain_to_wait`` is this plus three facts
    about the fleet (the reservation is not yet due, the flavor has fewer free GPUs open to the
    run than it needs, nothing is Unfunded); it calls this, so the two cannot drift apart.
    """
    spec = run.spec
    if spec.follow is not None:
        return None
    key = run.key
    if state.pending_reservation(key) is None or state.holds_leases(key):
        return None
    total = spec.resources.total_gpus
    size = spec.locality.group_gpus if spec.locality is not None else None
    if total <= 0 or (size is not None and size <= 0) or spec.spares_per_group < 0:
        return None
    if not state.index.family.owner_of(run.metadata.namespace):
        return None
    if not spec.spares_per_group:
        return total
    return total + spec.spares_per_group * len(groups(total, size))


def fenced(run: Run) -> bool:
    """No ``maxDuration``: the run may backfill no reserved slice (``gang.closed_slices``), so
    while parked it is kept out of every one except where its own promise is first in line."""
    rt = run.spec.runtime
    return rt is None or rt.max_duration is None


class WaitingLine:
    """The waiting runs split into parked ones and the rest.

    Parked runs are kept per flavor, fenced or not (``fenced``) and need, in the order their
    reservations were promised (``FleetState.promise_order``, which is also their order in the
    reconcile loop): the next parked run that might start is the first, after a point, of the
    lists whose need is no more than the free GPUs open to them - a handful of lists, whatever
    the depth of the queue.

    Kept by ``FleetState``: ``dirty`` collects the runs the fold touched since the line was
    last asked, and ``FleetState.waiting_line`` re-files only those.  Read-only for callers.
    """

    __slots__ = ("by_need", "dirty", "parked", "unparked")

    def __init__(self) -> None:
        # run -> (flavor, fenced, need, place in line)
        self.parked: dict[str, tuple[str, bool, int, int]] = {}
        # (flavor, fenced) -> need -> (place in line, run) of its parked runs, sorted.  Fenced:
        # no maxDuration, so no reserved slice is open to the run but where it is first in line.
        self.by_need: dict[tuple[str, bool], dict[int, list[tuple[int, str]]]] = {}
        self.unparked: set[str] = set()  # waiting runs that are not parked
        self.dirty: set[str] = set()

    def place(
        self,
        key: str,
        flavor: str | None,
        need: int | None,
        place: int = 0,
        fenced: bool = True,
    ) -> None:
        """File run ``key``: parked (``need`` GPUs of ``flavor``, ``place`` in line, ``fenced``
        or not), waiting but not parked (``need`` None), or not waiting (``flavor`` None)."""
        was = self.parked.pop(key, None)
        if was is not None:
            group = (was[0], was[1])
            needs = self.by_need[group]
            entries = needs[was[2]]
            del entries[bisect.bisect_left(entries, (was[3], key))]
            if not entries:
                del needs[was[2]]
                if not needs:
                    del self.by_need[group]
        self.unparked.discard(key)
        if flavor is None:
            return
        if need is None:
            self.unparked.add(key)
            return
        self.parked[key] = (flavor, fenced, need, place)
        needs = self.by_need.setdefault((flavor, fenced), {})
        bisect.insort(needs.setdefault(need, []), (place, key))
