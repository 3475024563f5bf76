"""Admission: try to start a run now (follow gate, owner, pack, cover, verify, mint).

A run that cannot start now is handed to ``reservation``; Unfunded work is reclaimed for it only
when that alone makes it fit (SPEC §B.8 step 13).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.engine.failures import top_up
from gpu_fleet.core.engine.follow import follow_gate
from gpu_fleet.core.engine.gang import (
    Settings,
    checkpoint_deadline,
    closed_free,
    cover_run,
    first_location,
    mint_leases,
    plan_pack,
    release_reservations,
    status_event,
    verify_funded,
)
from gpu_fleet.core.engine.reservation import reserve
from gpu_fleet.core.engine.resolver import (
    WAITING_FOR_PREEMPTIONS,
    apply_resolution,
    awaiting_notices,
    resolve,
    waiting_for_preemptions,
)
from gpu_fleet.core.funding.cover import CoverFailure, CoverPlan, CoverReason
from gpu_fleet.core.ledger.events import (
    Event,
    LeaseMinted,
    RunStatusChanged,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.ledger.waiting_line import parked_need
from gpu_fleet.core.model import (
    Instant,
    Lease,
    LeaseRole,
    Run,
)
from gpu_fleet.core.placement.pack import PackError, PackErrorKind, PackPlan, Planner
from gpu_fleet.core.placement.topology import Topology, TopologyError, domain_location


@dataclass
class Admission:
    """What an admission attempt decided, with everything ``explain`` needs."""

    events: list[Event] = field(default_factory=list)
    started: bool = False
    plan: PackPlan | None = None
    pack_error: PackError | None = None
    cover_result: CoverPlan | CoverFailure | None = None
    note: str = ""


def admit(
    state: FleetState, run: Run, now: Instant, planner: Planner, settings: Settings
) -> Admission:
    """Try to start ``run`` now: follow gate, owner, pack, cover, verify, mint.

    On failure the returned events put the run into its waiting state (a reservation, or
    Unfunded/Unschedulable with the reason) unless it already has a pending reservation.
    A run in checkpoint grace that still holds part of its gang is topped up instead (only its
    lost groups), and a run with preemptions pending in its favour waits for their deadline.
    """
    out = _admit(state, run, now, planner, settings)
    deadline = checkpoint_deadline(state, run.key)
    if deadline is not None and not out.started:
        # A run in checkpoint grace keeps its deadline whatever it waits for next, so the
        # deadline is never lost to a later status write (SPEC §B.8 step 6).
        out.events = [_keep_deadline(state, e, deadline) for e in out.events]
    return out


def certain_to_wait(state: FleetState, run: Run, now: Instant) -> bool:
    """True only if ``admit(state, run, now, ...)`` would return no event, with any planner.

    The reconcile loop offers every waiting run a start at every instant something changes;
    in a deep queue almost all of those attempts end in "still waiting" and change nothing,
    yet each one packs, reads the protected slices and walks reclaim.  This is the cheap proof
    that an attempt is such a no-op, walking ``_admit``'s steps in order:

    * no follow gate, and no preemption notices in its favour (those wait, emitting nothing);
    * a funding principal (else a status write), and no lease held (so no top-up);
    * a pending reservation not yet due: on any pack failure ``reserve`` keeps it, emitting
      nothing, and nothing Unfunded anywhere, so reclaim-for-admission draws nobody;
    * a well-formed request (validation would fail the same way every time) whose actives and
      spares exceed the free GPUs of its flavor outside the slices closed to it - then no
      planner can place it (every plan uses distinct free, non-excluded slots), so the pack
      fails with a capacity or topology error, never an invalid request.

    Anything less certain returns False and the run gets its full attempt.
    """
    if run.spec.follow is not None:
        return False
    key = run.key
    if state.has_pending_preemptions() and waiting_for_preemptions(state, key):
        return True  # admit returns at once, with no event
    need = parked_need(state, run)  # a reservation, no lease, well-formed, a principal
    if need is None:
        return False
    res = state.pending_reservation(key)
    if res is None or res.earliest_start <= now:
        return False
    try:
        topology = state.topology(run.flavor)
    except TopologyError:
        return False
    free = topology.total_free()
    if need <= free and need <= free - closed_free(state, key, topology):
        return False
    return not state.has_unfunded_actives(now)


def _keep_deadline(state: FleetState, e: Event, deadline: Instant) -> Event:
    if not isinstance(e, RunStatusChanged) or e.phase not in ("Pending", "Waiting"):
        return e
    if "checkpointDeadline" in e.detail:
        return e
    cur = state.status.get(e.run)
    detail = dict(e.detail)
    detail["checkpointDeadline"] = deadline
    if cur is not None and "lostGroups" in cur.detail:
        detail["lostGroups"] = cur.detail["lostGroups"]
    return msgspec.structs.replace(e, detail=detail)


def _admit(
    state: FleetState, run: Run, now: Instant, planner: Planner, settings: Settings
) -> Admission:
    out = Admission()
    key = run.key
    gate = follow_gate(state, run, now)
    if gate is not None:
        out.events.extend(gate)
        out.note = "follow gate"
        return out
    if waiting_for_preemptions(state, key):
        out.note = WAITING_FOR_PREEMPTIONS
        return out
    index = state.index
    owner = index.family.owner_of(run.metadata.namespace)
    if not owner:
        conflict = index.family.conflicts.get(run.metadata.namespace or "default")
        why = (
            conflict.describe()
            if conflict is not None
            else f"namespace {run.metadata.namespace} has no Budget"
        )
        out.events.append(
            status_event(
                key, now, "Pending", "Unfunded", f"no funding principal: {why}; held, not cancelled"
            )
        )
        return out
    topped = top_up(state, run, now, planner, settings)
    if topped is not None:
        out.events.extend(topped.events)
        out.started = topped.started
        out.note = "top-up"
        return out
    try:
        topology, _, packed = plan_pack(state, run, planner)
    except TopologyError as exc:
        out.events.append(status_event(key, now, "Pending", "Unschedulable", str(exc)))
        return out
    if isinstance(packed, PackError):
        out.pack_error = packed
        if packed.kind is PackErrorKind.INVALID_REQUEST:
            out.events.append(status_event(key, now, "Pending", "Unschedulable", packed.message))
            return out
        reclaimed = _reclaim_for_admission(
            state, run, now=now, planner=planner, settings=settings, pack_error=packed
        )
        if reclaimed is not None:
            reclaimed.pack_error = packed
            return reclaimed
        out.events.extend(reserve(state, run, now, settings, topology, None, packed, None))
        return out
    out.plan = packed
    result = _cover(state, run, plan=packed, topology=topology, now=now, settings=settings)
    out.cover_result = result
    if isinstance(result, CoverFailure):
        if result.reason is CoverReason.INVALID_REQUEST:
            out.events.append(status_event(key, now, "Pending", "Unfunded", result.message))
            return out
        out.events.extend(reserve(state, run, now, settings, topology, packed, None, result))
        return out
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, packed, segments, now)
    problem = verify_funded(state, run, leases, now, result.borrowed > 0)
    if problem:
        failure = CoverFailure(
            CoverReason.INSUFFICIENT_CAPACITY, problem, result.quantity, 0, result.attempts
        )
        out.cover_result = failure
        out.events.extend(reserve(state, run, now, settings, topology, packed, None, failure))
        return out
    out.events.extend(start_events(state, run, leases, now, "admitted"))
    out.started = True
    return out


def _cover(
    state: FleetState,
    run: Run,
    *,
    plan: PackPlan,
    topology: Topology,
    now: Instant,
    settings: Settings,
) -> CoverPlan | CoverFailure:
    """Ordinary admission's cover: the plan's location, conservative ranking (SPEC §B.5)."""
    return cover_run(
        state,
        run,
        quantity=plan.total_gpus + plan.total_spares,
        location=first_location(topology, plan),
        now=now,
        settings=settings,
    )


def _reclaim_for_admission(
    state: FleetState,
    run: Run,
    *,
    now: Instant,
    planner: Planner,
    settings: Settings,
    pack_error: PackError,
) -> Admission | None:
    """Reclaim Unfunded work once, and only if that makes this run fit (SPEC §B.8 step 13).

    The resolver draws Unfunded groups (phase 0 only) for the pack's shortfall; the run is then
    re-packed as if those leases were closed, covered and verified.  Only when all of that holds
    are the cuts applied - the reference reclaimed first and re-planned after, which could cut
    someone for a run that still did not fit.  Funded work is never touched here (F.1.10).
    """
    if not state.has_unfunded_actives(now):
        return None  # nothing Unfunded anywhere: phase 0 would draw nobody
    matched = state.matching(now)
    shortfall = sorted(pack_error.shortfall)
    scope = domain_location(shortfall[0]) if len(shortfall) == 1 else {}
    resolution = resolve(
        deficit=max(1, pack_error.deficit),
        flavor=run.flavor,
        scope=scope,
        seed_source=run.key,
        now=now,
        nodes=state.nodes,
        leases=list(state.open_leases.values()),
        runs=state.runs,
        owner_of=state.index.family.owner_of,
        classes=matched.funding_class,
        only_unfunded=True,
        exclude_runs={run.key},
        exclude_leases={p.lease for p in state.pending_preemptions()},
    )
    if not resolution.cuts:
        return None
    cut = {c.lease for c in resolution.cuts}
    released = {s for lid in cut for s in state.open_leases[lid].slots}
    try:
        topology, _, packed = plan_pack(state, run, planner, released=released)
    except TopologyError:
        return None
    if isinstance(packed, PackError):
        return None
    result = _cover(state, run, plan=packed, topology=topology, now=now, settings=settings)
    if isinstance(result, CoverFailure):
        return None
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, packed, segments, now)
    if verify_funded(state, run, leases, now, result.borrowed > 0, closing=cut):
        return None
    out = Admission(plan=packed, cover_result=result, note="reclaimed for admission")
    out.events = apply_resolution(
        state, resolution, beneficiary=run.key, source=run.key, now=now, settings=settings
    )
    waiting = awaiting_notices(state, run.key, out.events, now)
    if waiting is not None:
        out.events.append(waiting)
        out.note = WAITING_FOR_PREEMPTIONS
        return out
    out.events.extend(start_events(state, run, leases, now, "admitted"))
    out.started = True
    return out


def start_events(
    state: FleetState, run: Run, leases: Sequence[Lease], now: Instant, how: str
) -> list[Event]:
    events: list[Event] = [LeaseMinted(at=now, lease=lease) for lease in leases]
    active = sum(x.width for x in leases if x.role is LeaseRole.ACTIVE)
    spares = sum(x.width for x in leases if x.role is LeaseRole.SPARE)
    msg = f"{how} {active} GPUs" + (f" and {spares} spare GPUs" if spares else "")
    events.append(status_event(run.key, now, "Running", "GangBound", msg))
    events += release_reservations(state, run.key, now, "Superseded")
    return events
