"""Play a flavor's capacity forward the way the engine will serve it (DESIGN decision 4).

A forecast that only asks "when do enough GPUs free?" promises the next freed GPUs to every
queued run at once; under contention it is early for almost everyone.  This module replays the
engine's order of work at every instant the capacity changes, on a private copy of the held
slots, with no ledger and no funding:

1. **what ends** - open leases at their scheduled (or estimated) end, and the runs the
   simulation itself started, after their ``maxDuration`` or the median of similar runs;
2. **activations** - a pending reservation falls due at its ``earliest_start``: its run starts
   if it fits; a capacity wait that still does not fit gets room from the resolver, modelled as
   the lottery's two-stage draw (an owner uniformly, then one of its runs) over running work in
   the reservation's scope, seeded like the real one (``attested_seed``), so one simulation is
   reproducible;
3. **admissions** - every other queued run, those still holding a reservation first in the
   order the promises were made, then the rest in admission order (the engine's backfill),
   each kept off the free slots of other runs' intended slices unless its ``maxDuration`` ends
   before that reservation activates or it was promised that slice first.

The answer for one run is its simulated start and *how* it started (naturally, or by its own
activation), plus whether anything uncertain happened before it (an estimated end, a lottery
draw): that decides whether the forecast may call itself exact.

Cost: a pack is attempted only when the flavor has enough free GPUs for the request (a count
check first), and the topology is rebuilt from the cached skeleton only after the held slots
change, so a queue of hundreds costs milliseconds per simulated instant, not a pack per run.
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.engine.gang import max_duration, protects
from gpu_fleet.core.engine.resolver import attested_seed
from gpu_fleet.core.forecast.history import DurationHistory
from gpu_fleet.core.ledger.events import Reservation
from gpu_fleet.core.ledger.reservation_line import SliceEntry
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant, Run, slot
from gpu_fleet.core.placement.pack import (
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    Planner,
    groups,
    pack_greedy,
)
from gpu_fleet.core.placement.topology import (
    Topology,
    TopologyError,
    compile_nodes,
    domain_location,
    parse_slot,
    topology_from,
)


class SimTopologyError(ValueError):
    """A node of the flavor lacks a location label: no topology, so no simulation."""


@dataclass(frozen=True)
class Release:
    """``slots`` of open lease ``lease`` become free at ``at`` (its scheduled or expected end)."""

    at: Instant
    lease: str
    slots: tuple[str, ...]
    estimated: bool = False  # from a reported ETA or similar runs' history, not a scheduled end


@dataclass(frozen=True)
class Start:
    """When and how a queued run starts in the simulation."""

    at: Instant
    by_activation: bool  # its own reservation fell due and the resolver made room
    uncertain: bool  # an estimated end or a lottery draw happened before it
    freed_by: tuple[str, ...]  # leases whose end this start waited for (the latest instant's)


@dataclass
class Outcome:
    """What the simulation saw: starts, and why each queued run did not fit at ``now``."""

    starts: dict[str, Start] = field(default_factory=dict)
    queued: frozenset[str] = frozenset()  # the runs the walk served (the queue at ``now``)
    now_errors: dict[str, PackError] = field(default_factory=dict)


@dataclass
class _Unit:
    """Something holding slots in the simulation: an open lease or a simulated run."""

    key: str
    run: str
    slots: list[tuple[str, int]]
    end: Instant | None
    estimated: bool


def _slots(names: Iterable[str]) -> list[tuple[str, int]]:
    return [p for p in (parse_slot(n) for n in names) if p is not None]


def expected_duration(run: Run, history: DurationHistory) -> int | None:
    """A run's expected duration: ``maxDuration``, else the median of similar completed runs."""
    declared = max_duration(run)
    return declared if declared is not None else history.typical(run)


QUEUED_REASONS = ("Reserved", "Reclaimed", "Unschedulable")
"""Pending reasons of runs that wait for capacity (not for a follow gate or a budget alone)."""


def queue_of(state: FleetState, flavor: str, now: Instant) -> list[str]:
    """Runs of ``flavor`` waiting to start, in the engine's admission order (time, then key)."""
    keys = [
        key
        for key, st in state.status.items()
        if st.phase == "Pending"
        and (st.reason in QUEUED_REASONS or state.pending_reservation(key) is not None)
        and (run := state.runs.get(key)) is not None
        and run.flavor == flavor
    ]
    return sorted(keys, key=lambda k: (state.admitted.get(k, now), k))


def pack_request(run: Run, *, width: int | None = None, spares: bool = True) -> PackRequest:
    """The request admission would pack for ``run`` (optionally at another width, no spares)."""
    loc = run.spec.locality
    return PackRequest(
        flavor=run.flavor,
        total_gpus=width if width is not None else run.spec.resources.total_gpus,
        group_gpus=loc.group_gpus if loc is not None else None,
        allow_cross_group_spread=loc.allow_cross_group_spread if loc is not None else True,
        spares_per_group=run.spec.spares_per_group if spares else 0,
    )


def needed_gpus(request: PackRequest) -> int:
    """GPUs the request takes, actives and spares: a count below it cannot pack."""
    return request.total_gpus + request.spares_per_group * len(
        groups(request.total_gpus, request.group_gpus)
    )


class Simulation:
    """One forward play of a flavor from ``now``: build it, then ``run_until(target)``."""

    def __init__(
        self,
        state: FleetState,
        flavor: str,
        releases: Sequence[Release],
        now: Instant,
        *,
        history: DurationHistory,
        requests: Mapping[str, PackRequest],
        queue: Sequence[str],
        resolve_for: Callable[[str], bool] = lambda key: True,
        packer: Planner = pack_greedy,
    ) -> None:
        try:  # compiled afresh: one pass over the nodes, and never a stale cache
            self.skeleton = compile_nodes(list(state.nodes.values()), flavor)
        except TopologyError as exc:
            raise SimTopologyError(str(exc)) from exc
        self.state = state
        self.flavor = flavor
        self.now = now
        self.history = history
        self.requests = dict(requests)
        self.queue = [k for k in queue if k in self.requests]
        self.resolve_for = resolve_for
        self.packer = packer
        self.outcome = Outcome(queued=frozenset(self.queue))
        self.held: dict[str, set[int]] = {}
        self.free = 0
        for name, _key, gpus, _labels, ok in self.skeleton.nodes:
            taken = set(state.held_by_node.get(name, ()))
            self.held[name] = taken
            if ok:
                self.free += gpus - len([i for i in taken if i < gpus])
        self.node_ok = {name: ok for name, _k, _g, _l, ok in self.skeleton.nodes}
        self.node_location = {
            name: domain_location(k) for name, k, _g, _l, _o in self.skeleton.nodes
        }
        self.units: dict[str, _Unit] = {}
        self.events: list[tuple[Instant, int, str]] = []
        self.seq = 0
        self.freed_now: list[str] = []
        self.uncertain = False
        ends = {r.lease: r for r in releases}
        for _, lease in sorted(state.open_leases.items()):  # an end on the timeline, or held
            if lease.node not in self.held:
                continue
            r = ends.get(lease.id)
            unit = _Unit(lease.id, lease.run, _slots(lease.slots), None, False)
            if r is not None:
                unit.end, unit.estimated = r.at, r.estimated
            self._hold_unit(unit, take=False)
        self.reservations = self._capacity_reservations()
        # Runs the resolver already cut for (notices pending in their favour): they wait for
        # the deadlines, and the play must not cut for them a second time.
        self.awaiting = {
            p.beneficiary for p in state.pending_preemptions() if p.beneficiary in self.requests
        }
        self._topology: Topology | None = None
        self._protected: dict[tuple[tuple[str, ...], ...], tuple[frozenset[str], int]] = {}
        self._slice_index: dict[tuple[str, ...], list[SliceEntry]] | None = None
        self._durations: dict[str, int | None] = {
            key: max_duration(run) if (run := state.runs.get(key)) is not None else None
            for key in self.queue
        }
        self._needs: dict[str, int] = {key: needed_gpus(self.requests[key]) for key in self.queue}
        self._t: Instant = now
        self.target: str | None = None

    # -- bookkeeping -----------------------------------------------------------------------

    def _capacity_reservations(self) -> dict[str, Reservation]:
        """Pending reservations of queued runs, by run: their bound and intended slice."""
        out: dict[str, Reservation] = {}
        for key in self.queue:
            res = self.state.pending_reservation(key)
            if res is not None:
                out[key] = res
        return out

    def _hold_unit(self, unit: _Unit, *, take: bool) -> None:
        self.units[unit.key] = unit
        if take:
            for node, i in unit.slots:
                self.held.setdefault(node, set()).add(i)
            self.free -= len(unit.slots)
            self._changed()
        if unit.end is not None:
            heapq.heappush(self.events, (unit.end, self.seq, unit.key))
            self.seq += 1

    def _release(self, key: str) -> None:
        unit = self.units.pop(key, None)
        if unit is None:
            return  # cut by a simulated activation before its end
        for node, i in unit.slots:
            taken = self.held.get(node)
            if taken is not None and i in taken:
                taken.discard(i)
                if self.node_ok.get(node, False):
                    self.free += 1
        self._changed()

    def _changed(self) -> None:
        self._topology = None
        self._protected.clear()

    def topology(self) -> Topology:
        if self._topology is None:
            self._topology = topology_from(self.skeleton, self.held)
        return self._topology

    def _slices(self) -> dict[tuple[str, ...], list[SliceEntry]]:
        """Intended slices still promised: nodes -> (bound, name, run) in activation order."""
        if self._slice_index is None:
            index: dict[tuple[str, ...], list[SliceEntry]] = {}
            for nodes, entries in self.state.protected_slices().items():
                kept = [e for e in entries if e[2] in self.reservations]
                if kept:
                    index[nodes] = kept
            self._slice_index = index
        return self._slice_index

    def _excluded(self, key: str, t: Instant) -> tuple[frozenset[str], int]:
        """Free slots of the intended slices of reservations ahead of ``key`` at ``t``.

        The rule of ``gang.reserved_slots`` with the simulated clock; a reservation protects
        its slice until its run starts (here or for real) or it falls due.
        """
        own = self.reservations.get(key)
        mine = (own.earliest_start, own.name) if own is not None else None
        duration = self._durations.get(key)
        chosen = [
            nodes
            for nodes, entries in self._slices().items()
            if protects(entries, key, mine, duration, t)
        ]
        names = tuple(chosen)
        cached = self._protected.get(names)
        if cached is not None:
            return cached
        topo = self.topology()
        slots: set[str] = set()
        for nodes in chosen:
            for node in nodes:
                if topo.has_node(node):
                    slots.update(slot(node, i) for i in topo.free_ordinals(node))
        result = (frozenset(slots), len(slots))
        self._protected[names] = result
        return result

    def _try(self, key: str, t: Instant) -> PackPlan | PackError:
        request = self.requests[key]
        excluded, count = self._excluded(key, t)
        need = self._needs[key]
        if self.free - count < need and not (key == self.target and t == self.now):
            short = need - max(0, self.free - count)
            return PackError(
                PackErrorKind.INSUFFICIENT_CAPACITY,
                f"{self.free - count} free GPUs of {self.flavor}, {need} needed",
                {"": short},
            )
        try:
            return self.packer(
                self.topology(), msgspec.structs.replace(request, excluded_slots=excluded)
            )
        except PackError as exc:
            return exc

    def _start(self, key: str, plan: PackPlan, t: Instant, *, by_activation: bool) -> None:
        run = self.state.runs.get(key)  # None: a hypothetical run (a test, a what-if)
        duration = expected_duration(run, self.history) if run is not None else None
        slots = _slots(plan.slots())
        estimated = self._durations.get(key) is None
        self._hold_unit(
            _Unit(f"sim:{key}", key, slots, None if duration is None else t + duration, estimated),
            take=True,
        )
        self.outcome.starts[key] = Start(t, by_activation, self.uncertain, tuple(self.freed_now))
        self._dequeue(key)

    def _dequeue(self, key: str) -> None:
        self.queue.remove(key)
        self._drop_reservation(key)

    def _drop_reservation(self, key: str) -> None:
        """The run's slice is no longer promised (it started, or its bound passed)."""
        if self.reservations.pop(key, None) is not None:
            self._slice_index = None
            self._protected.clear()

    # -- the resolver, modelled --------------------------------------------------------------

    def _make_room(self, key: str, res: Reservation, t: Instant) -> PackPlan | None:
        """Cut running work in the reservation's scope by the lottery's draw until ``key`` fits."""
        scope = domain_location(res.domain)
        family = self.state.index.family
        notices = {p.lease for p in self.state.pending_preemptions()}
        by_owner: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for unit in self.units.values():
            if unit.run == key or unit.key in notices or not unit.slots:
                continue
            if not self._in_scope(unit, scope):
                continue
            run = self.state.runs.get(unit.run)
            owner = family.owner_of(run.metadata.namespace) if run is not None else ""
            by_owner[owner or f"unbound:{unit.run}"][unit.run].append(unit.key)
        _, seed = attested_seed(res.name, t)
        rng = random.Random(seed)
        while True:
            outcome = self._try(key, t)
            if isinstance(outcome, PackPlan):
                return outcome
            if outcome.kind is PackErrorKind.INVALID_REQUEST:
                return None
            owners = sorted(o for o, runs in by_owner.items() if runs)
            if not owners:
                return None
            owner = owners[rng.randrange(len(owners))]
            runs = sorted(by_owner[owner])
            victim = runs[rng.randrange(len(runs))]
            for unit_key in by_owner[owner].pop(victim):
                self._release(unit_key)
            self.uncertain = True

    def _in_scope(self, unit: _Unit, scope: Mapping[str, str]) -> bool:
        return any(
            all(self.node_location.get(node, {}).get(k) == v for k, v in scope.items())
            for node, _ in unit.slots
        )

    # -- the walk ----------------------------------------------------------------------------

    def _step(self, t: Instant) -> None:
        """Everything the engine does at ``t``: ends, activations, then admissions."""
        self.freed_now = []
        while self.events and self.events[0][0] <= t:
            _, _, key = heapq.heappop(self.events)
            unit = self.units.get(key)
            if unit is None:
                continue
            if unit.estimated:
                self.uncertain = True
            self.freed_now.append(key)
            self._release(key)
        due = sorted(
            (res for k, res in self.reservations.items() if res.earliest_start <= t),
            key=lambda r: (r.earliest_start, r.name),
        )
        for res in due:
            key = res.run
            if key not in self.queue:
                continue
            outcome = self._try(key, t)
            if isinstance(outcome, PackPlan):
                self._start(key, outcome, t, by_activation=True)
                continue
            if key in self.awaiting:
                continue  # the room is being cut for it: it takes it at the notices' deadline
            self._drop_reservation(key)  # the engine re-reserves it: that slice is gone
            if (res.kind == "capacity" or res.holds_slice) and self.resolve_for(key):
                plan = self._make_room(key, res, t)
                if plan is not None:
                    self._start(key, plan, t, by_activation=True)
        floor = min((self._needs[k] for k in self.queue), default=0)
        for key in self._admission_order():
            if self.free < floor and t != self.now:
                break  # nothing queued fits in the free count: skip the rest of the queue
            outcome = self._try(key, t)
            if isinstance(outcome, PackPlan):
                mine = self.reservations.get(key)
                if (
                    key != self.target
                    and mine is not None
                    and mine.kind != "capacity"
                    and mine.earliest_start > t
                ):
                    continue  # a budget or window wait does not start before its bound
                self._start(key, outcome, t, by_activation=False)
                continue
            if t == self.now:
                self.outcome.now_errors[key] = outcome
            if outcome.kind is PackErrorKind.INVALID_REQUEST:
                self._dequeue(key)  # an invalid request never starts

    def _admission_order(self) -> list[str]:
        """The engine's order (``Fleet._admit_pending``): runs still holding a reservation in
        the order the promises were made, then the rest of the queue in admission order."""
        line = self.state.promise_order()
        place = {key: i for i, key in enumerate(self.queue)}

        def order(key: str) -> tuple[int, int]:
            res = self.reservations.get(key)
            return (0, line.get(res.name, 0)) if res is not None else (1, place[key])

        return sorted(self.queue, key=order)

    def _next_instant(self) -> Instant | None:
        """The next instant anything can change: an end, or a reservation falling due."""
        times = [self.events[0][0]] if self.events else []
        times += [res.earliest_start for res in self.reservations.values()]
        later = [x for x in times if x > self._t]
        return min(later) if later else None

    def run_until(self, target: str | None = None) -> Outcome:
        """Walk until ``target`` starts (or every queued run, for ``None``) or nothing changes."""
        self.target = target
        t: Instant | None = self.now
        while t is not None:
            self._t = t
            self._step(t)
            if target is not None and (target in self.outcome.starts or target not in self.queue):
                break
            if not self.queue:
                break
            t = self._next_instant()
        return self.outcome


def simulate(
    state: FleetState,
    flavor: str,
    releases: Iterable[Release],
    now: Instant,
    *,
    history: DurationHistory,
    requests: Mapping[str, PackRequest],
    target: str | None = None,
    resolve_for: Callable[[str], bool] = lambda key: True,
    packer: Planner = pack_greedy,
) -> Outcome:
    """Play ``flavor`` forward from ``now``; ``requests`` overrides queued runs' requests.

    ``target`` stops the walk once that run has started.  ``resolve_for`` says which runs the
    modelled resolver may make room for at their bound (the forecast of a run excludes itself:
    its own bound is the promise the forecast states separately).
    """
    queue = list(queue_of(state, flavor, now))
    if target is not None and target not in queue and target in requests:
        queue.append(target)
    every = {k: pack_request(state.runs[k]) for k in queue if k in state.runs}
    every.update(requests)
    sim = Simulation(
        state,
        flavor,
        list(releases),
        now,
        history=history,
        requests=every,
        queue=queue,
        resolve_for=resolve_for,
        packer=packer,
    )
    return sim.run_until(target)
