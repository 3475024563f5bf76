"""The capacity timeline of a flavor, and the first instant a run fits on it.

The GPUs free now plus the GPUs each open lease gives back at its scheduled or expected end; at
every instant the timeline changes, the same greedy packer admission uses answers whether the run
*fits* (a count would call a run of 8 startable when two domains each free 4).  The queue ahead
is played forward by ``queue_play``; this module asks it where a run lands.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gpu_fleet.core.engine.gang import reserved_slots
from gpu_fleet.core.forecast.history import duration_history
from gpu_fleet.core.forecast.queue_play import (
    Outcome,
    Release,
    SimTopologyError,
    simulate,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant, Lease, Node, Run
from gpu_fleet.core.placement.pack import PackError, PackRequest, Planner, pack_greedy
from gpu_fleet.core.placement.topology import TopologyError, build_topology


class ForecastError(ValueError):
    """No forecast can be given; ``kind`` maps to a reply code (not_found, terminal, topology)."""

    def __init__(self, kind: Literal["not_found", "terminal", "topology"], message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class Timeline:
    """The flavor's capacity story: releases in time order, and leases with no known end."""

    flavor: str
    releases: tuple[Release, ...]
    unknown: tuple[str, ...]  # open leases of the flavor without a scheduled end

    def instants(self, now: Instant) -> list[Instant]:
        """``now`` and every later instant at which the free capacity grows."""
        return sorted({now, *(r.at for r in self.releases)})


@dataclass(frozen=True)
class Fit:
    """When a request first fits on the timeline (``None``: not by any scheduled end)."""

    at: Instant | None
    now_error: PackError | None  # why it does not fit now (``None`` when it does)
    freed_by: tuple[str, ...] = ()  # leases whose end the fit waits for (at its instant)
    uncertain: bool = False  # an estimated end or a modelled lottery draw came before it
    by_activation: bool = False  # it starts only when its own reservation falls due


# ------------------------------------------------------------------------------------------
# The timeline
# ------------------------------------------------------------------------------------------


def build_timeline(state: FleetState, flavor: str, run_key: str | None, now: Instant) -> Timeline:
    """Releases of the flavor's open leases; an end already past frees ``now``.

    A pending preemption notice ends a lease at its deadline only when it makes room for *this*
    run (or names no beneficiary): room cut for someone else is theirs, so it stays held here.
    For the whole queue (``run_key=None``) every notice ends its lease at its deadline: the
    play then hands the room to whoever the engine would.
    """
    flavor_nodes = {n.name for n in state.nodes.values() if n.flavor == flavor}
    notices: Mapping[str, object] = getattr(state, "preemptions", {})
    releases: list[Release] = []
    unknown: list[str] = []
    started: dict[str, Instant] = {}  # each run's first open lease start: its age
    for lease in state.open_leases.values():
        started[lease.run] = min(started.get(lease.run, lease.start), lease.start)
    for lease in sorted(state.open_leases.values(), key=lambda x: x.id):
        if lease.node not in flavor_nodes or lease.run == run_key:
            continue
        notice = notices.get(lease.id)
        if run_key is None and not _still_wanted(state, notice):
            notice = None  # the engine cancels a notice whose beneficiary no longer waits
        end = _scheduled_end(lease, notice, run_key)
        if end is not None:
            releases.append(Release(max(end, now), lease.id, lease.slots))
            continue
        expected = _expected_end(state, lease, started.get(lease.run, lease.start), now)
        if expected is None:
            unknown.append(lease.id)
        else:
            releases.append(Release(expected, lease.id, lease.slots, estimated=True))
    releases.sort(key=lambda r: (r.at, r.lease))
    return Timeline(flavor, tuple(releases), tuple(unknown))


def _expected_end(
    state: FleetState, lease: Lease, started: Instant, now: Instant
) -> Instant | None:
    """A lease with no scheduled end: its run's reported ETA, else the history of similar runs
    (conditioned on how long the run, started at ``started``, has run; see ``history``)."""
    eta = state.etas.get(lease.run)
    if eta is not None and eta >= now:
        return eta
    run = state.runs.get(lease.run)
    if run is None:
        return None
    return duration_history(state, now).expected_end(run, started, now)


def _still_wanted(state: FleetState, notice: object | None) -> bool:
    """Does the notice's beneficiary still wait (``resolver.stale_preemptions``' rule)?"""
    beneficiary = getattr(notice, "beneficiary", "")
    if not beneficiary:
        return notice is not None
    status = state.status.get(beneficiary)
    return beneficiary in state.runs and status is not None and status.phase == "Pending"


def _scheduled_end(lease: Lease, notice: object | None, run_key: str | None) -> Instant | None:
    """The lease's end, brought forward by a preemption notice that benefits ``run_key``.

    The notice is read by attribute name so an evolving event type never breaks the forecast.
    """
    end = lease.end
    deadline = getattr(notice, "deadline", None)
    beneficiary = getattr(notice, "beneficiary", "")
    if isinstance(deadline, int) and (run_key is None or beneficiary in ("", run_key)):
        end = deadline if end is None else min(end, deadline)
    return end


def earliest_fit(
    state: FleetState,
    run_key: str,
    request: PackRequest,
    timeline: Timeline,
    now: Instant,
    *,
    packer: Planner = pack_greedy,
) -> Fit:
    """The first instant at which ``request`` packs for ``run_key``; ``None`` if none does.

    The flavor is played forward the way the engine serves it (``capacity_sim``): the runs
    queued with it take freed capacity in admission order, reservations of others fall due and
    the resolver makes room for them, and every run started in the play gives its slots back
    after its expected duration.  Only this run's own bound is left out: it is the promise
    the forecast states separately.

    Raises ``ForecastError("topology")`` when a node of the flavor lacks a location label.
    """
    try:
        outcome = simulate(
            state,
            request.flavor,
            timeline.releases,
            now,
            history=duration_history(state, now),
            requests={run_key: request},
            target=run_key,
            resolve_for=lambda key: key != run_key,
            packer=packer,
        )
    except SimTopologyError as exc:
        raise ForecastError("topology", str(exc)) from exc
    now_error = outcome.now_errors.get(run_key)
    start = outcome.starts.get(run_key)
    if start is None:
        return Fit(None, now_error)
    return Fit(start.at, now_error, start.freed_by, start.uncertain)


def queue_outcome(state: FleetState, flavor: str, now: Instant) -> Outcome:
    """One play of the flavor's whole queue at ``now``, shared by every forecast taken at the
    same ledger version and instant (``kubectl runs plan`` for each run, the notifier's
    forecast events): the cost is one walk per flavor, not one per run."""

    def play() -> Outcome:
        timeline = build_timeline(state, flavor, None, now)
        try:
            return simulate(
                state,
                flavor,
                timeline.releases,
                now,
                history=duration_history(state, now),
                requests={},
            )
        except SimTopologyError as exc:
            raise ForecastError("topology", str(exc)) from exc

    return state.cached(f"forecast.queue:{flavor}", play, at=now)


def _queued_fit(state: FleetState, run: Run, request: PackRequest, now: Instant) -> Fit | None:
    """The run's fit from the shared play of its queue (``None``: it is not in that queue)."""
    outcome = queue_outcome(state, run.flavor, now)
    if run.key not in outcome.queued:
        return None
    nodes = sorted(state.nodes.values(), key=lambda n: n.name)
    now_error = _try_pack(
        state, run.key, nodes, set(state.slot_holder), request, packer=pack_greedy
    )
    start = outcome.starts.get(run.key)
    if start is None:
        return Fit(None, now_error)
    return Fit(start.at, now_error, start.freed_by, start.uncertain, start.by_activation)


def fits_when_empty(state: FleetState, run_key: str, request: PackRequest) -> bool:
    """Would ``request`` pack if every lease of the fleet were gone (reservations still apply)?"""
    nodes = sorted(state.nodes.values(), key=lambda n: n.name)
    return _try_pack(state, run_key, nodes, set(), request, packer=pack_greedy) is None


def _try_pack(
    state: FleetState,
    run_key: str,
    nodes: list[Node],
    held: set[str],
    request: PackRequest,
    *,
    packer: Planner,
) -> PackError | None:
    try:
        topology = build_topology(nodes, held, request.flavor)
    except TopologyError as exc:  # a node of the flavor without a location label
        raise ForecastError("topology", str(exc)) from exc
    excluded = reserved_slots(state, run_key, topology)
    try:
        packer(topology, _with_excluded(request, excluded))
    except PackError as exc:
        return exc
    return None


def _with_excluded(request: PackRequest, excluded: frozenset[str]) -> PackRequest:
    return PackRequest(
        flavor=request.flavor,
        total_gpus=request.total_gpus,
        group_gpus=request.group_gpus,
        allow_cross_group_spread=request.allow_cross_group_spread,
        spares_per_group=request.spares_per_group,
        excluded_slots=excluded,
    )
