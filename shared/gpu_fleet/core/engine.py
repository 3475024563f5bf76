"""Decisions: from the folded state and an instant to the ledger events that should follow.

Every public function here is a *decision*: it reads ``FleetState`` and returns events without
touching anything.  ``Fleet`` is the in-memory committer the scenario runner and the CLI's local
mode use; the manager service commits the same events to JetStream (with an expected-last-
sequence check) and folds them the same way.  Because decisions read only folded state and
the instant passed in, a replay of the ledger reproduces every one of them.

Order of work at one instant (scenario-format.md): first what ends (lease expiry, preemption
deadlines, checkpoint deadlines), then reservation activations (earliest start, then name),
then admissions of pending runs (admission time, then run key), then elastic growth and
voluntary shrinks; a step scheduled at that instant comes after all of them.

A decision that frees capacity *now* for a reservation (the resolver with zero grace) returns
only the cuts, flagged ``Activation.retry``: the committer folds them and activates the same
reservation once more at the same instant, which then packs on the freed slots.  Splitting it
this way keeps every decision a function of folded state, whichever committer runs it.

The resolver, node-failure handling and elasticity live in ``resolver``, ``failures`` and
``elastic``; the building blocks they share with admission live in ``gang`` and are re-exported
here (``Settings``, ``Planner``, ``plan_pack``, ``mint_leases``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.elastic import elastic_step
from gpu_fleet.core.failures import handle_node_failure, top_up
from gpu_fleet.core.funding.cover import CoverFailure, CoverPlan, CoverReason
from gpu_fleet.core.funding.matching import fill
from gpu_fleet.core.funding.metering import Evaluation, evaluate
from gpu_fleet.core.gang import (
    TERMINAL,
    Planner,
    Settings,
    checkpoint_deadline,
    commentary,
    cover_run,
    fail_events,
    first_location,
    mint_leases,
    plan_pack,
    reserved_slots,
    scheduled_end,
    snapshot,
    status_event,
    verify_funded,
)
from gpu_fleet.core.ledger.events import (
    BudgetApplied,
    BudgetDeleted,
    Event,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    NodeHealthChanged,
    NodeRegistered,
    Reservation,
    ReservationCreated,
    ReservationReleased,
    RunDeleted,
    RunEtaReported,
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
)
from gpu_fleet.core.ledger.state import FleetState, fold
from gpu_fleet.core.model import (
    Budget,
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    MintReason,
    Node,
    NodeHealth,
    Run,
)
from gpu_fleet.core.placement.pack import PackError, PackErrorKind, PackPlan, groups, pack_greedy
from gpu_fleet.core.placement.topology import Topology, TopologyError, domain_location
from gpu_fleet.core.resolver import (
    apply_resolution,
    close_preempted,
    resolve,
    stale_preemptions,
    waiting_for_preemptions,
)
from gpu_fleet.core.timeutil import format_instant, parse_duration

__all__ = [
    "TERMINAL",
    "Activation",
    "Admission",
    "CommandError",
    "Fleet",
    "Planner",
    "Settings",
    "activate",
    "activate_reservation",
    "admit",
    "follow_gate",
    "mint_leases",
    "plan_pack",
]

# Names older callers imported from here before the building blocks moved to ``gang``.
_status = status_event
_fail_events = fail_events
_verify_funded = verify_funded
_first_location = first_location
_scheduled_end = scheduled_end
_reserved_slots = reserved_slots

WAITING_FOR_PREEMPTIONS = "waiting for preemptions in its favour"
UNFUNDED_DEMAND = "waiting for capacity: demand is currently unfunded and reclaims nothing"


# ------------------------------------------------------------------------------------------
# Admission
# ------------------------------------------------------------------------------------------


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
        out.events.extend(_reserve(state, run, now, settings, topology, None, packed, None))
        return out
    out.plan = packed
    result = _cover(state, run, plan=packed, topology=topology, now=now, settings=settings)
    out.cover_result = result
    if isinstance(result, CoverFailure):
        if result.reason is CoverReason.INVALID_REQUEST:
            out.events.append(status_event(key, now, "Pending", "Unfunded", result.message))
            return out
        out.events.extend(_reserve(state, run, now, settings, topology, packed, None, result))
        return out
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, packed, segments, now)
    problem = verify_funded(state, run, leases, now, result.borrowed > 0)
    if problem:
        failure = CoverFailure(
            CoverReason.INSUFFICIENT_CAPACITY, problem, result.quantity, 0, result.attempts
        )
        out.cover_result = failure
        out.events.extend(_reserve(state, run, now, settings, topology, packed, None, failure))
        return out
    out.events.extend(_start_events(state, run, leases, now, "admitted"))
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
    ev = state.evaluation(now)
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
        classes=ev.fill.funding_class,
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
    waiting = _awaiting_notices(state, run.key, out.events, now)
    if waiting is not None:
        out.events.append(waiting)
        out.note = WAITING_FOR_PREEMPTIONS
        return out
    out.events.extend(_start_events(state, run, leases, now, "admitted"))
    out.started = True
    return out


def _start_events(
    state: FleetState, run: Run, leases: Sequence[Lease], now: Instant, how: str
) -> list[Event]:
    events: list[Event] = [LeaseMinted(at=now, lease=lease) for lease in leases]
    active = sum(x.width for x in leases if x.role is LeaseRole.ACTIVE)
    spares = sum(x.width for x in leases if x.role is LeaseRole.SPARE)
    msg = f"{how} {active} GPUs" + (f" and {spares} spare GPUs" if spares else "")
    events.append(status_event(run.key, now, "Running", "GangBound", msg))
    for res in sorted(state.pending_reservations.values(), key=lambda r: r.name):
        if res.run == run.key and res.state == "Pending":
            events.append(ReservationReleased(at=now, name=res.name, reason="Superseded"))
    return events


# ------------------------------------------------------------------------------------------
# Reservations (SPEC §B.9 with DESIGN decision 4)
# ------------------------------------------------------------------------------------------


def _remedies(state: FleetState, run: Run, ev: Evaluation | None) -> tuple[str, ...]:
    out: list[str] = []
    if ev is not None:
        flavor_envs = [u for u in ev.envelopes.values() if u.flavor == run.flavor]
        unfunded = any(
            state.open_leases[lid].run != run.key
            and ev.lease_class(lid) is FundingClass.UNFUNDED
            and state.runs.get(state.open_leases[lid].run) is not None
            and state.runs[state.open_leases[lid].run].flavor == run.flavor
            for lid in ev.fill.funding_class
        )
        if unfunded:
            out.append("Reclaim unfunded capacity in scope")
        if any(u.spare > 0 for u in flavor_envs):
            out.append("Drop spares in scope")
    if any(
        r.spec.malleable is not None and r.key != run.key and r.flavor == run.flavor
        for r in state.runs.values()
    ):
        out.append("Shrink elastic runs by step size")
    out.append("Run fair lottery if deficit remains")
    return tuple(out)


def _reserve(  # noqa: PLR0917 - one positional call shape, shared with the forecaster's tests
    state: FleetState,
    run: Run,
    now: Instant,
    settings: Settings,
    topology: Topology,
    plan: PackPlan | None,
    pack_error: PackError | None,
    cover_failure: CoverFailure | None,
) -> list[Event]:
    """Write a reservation for a run that cannot start now (or keep the one it has)."""
    key = run.key
    existing = state.pending_reservation(key)
    if existing is not None and existing.earliest_start > now:
        return []  # a reservation is a promise with a bound: keep it stable until it is due
    index = state.index
    owner = index.family.owner_of(run.metadata.namespace)
    if plan is not None and plan.groups:
        scope = plan.groups[0].domain
        nodes = plan.nodes()
    elif pack_error is not None and pack_error.shortfall:
        scope = sorted(pack_error.shortfall.items(), key=lambda kv: (kv[1], kv[0]))[0][0]
        # The intended slice is the domain closest to fitting: its nodes are protected from
        # backfill until the reservation activates (DESIGN decision 5).
        nodes = topology.domain(scope).nodes if topology.has_domain(scope) else ()
    else:
        domains = topology.domains()
        scope = domains[0].key if domains else ""
        nodes = ()
    if not scope and not nodes:
        why = pack_error.message if pack_error is not None else "no matching domain"
        return [
            status_event(
                key, now, "Pending", "Unschedulable", f"no capacity in any matching domain: {why}"
            )
        ]
    scope_labels = domain_location(scope)
    candidates = [
        e
        for e in index.of_owner(owner, run.flavor)
        if all(v == "*" or scope_labels.get(k, v) == v for k, v in e.selector.items())
    ]
    candidates.sort(key=lambda e: e.key.envelope)
    paying = candidates[0] if candidates else None
    if (
        paying is not None
        and paying.start is not None
        and paying.start > now
        and not (paying.pre_reservations)
    ):
        return [
            status_event(
                key,
                now,
                "Pending",
                "Unschedulable",
                f"reservation planning failed: envelope {paying.key} does not allow "
                "reservations before its window",
            )
        ]
    ev = state.evaluation(now)
    confidence = "conservative"
    if pack_error is not None:
        kind = "capacity"
        deficit = (
            max(1, pack_error.deficit) if pack_error.deficit else run.spec.resources.total_gpus
        )
        if pack_error.kind is PackErrorKind.INSUFFICIENT_TOPOLOGY:
            reason = "no single domain satisfies run grouping"
        else:
            reason = f"cluster short by {deficit} GPUs in scope"
        lead = settings.activation_lead + settings.activation_lead_per_gpu * deficit
        earliest = now + max(60, lead)
    else:
        assert cover_failure is not None
        deficit = 0
        if cover_failure.reason is CoverReason.WINDOW_CLOSED and cover_failure.window_opens:
            kind = "window"
            confidence = "window-aligned"
            earliest = max(now + 1, cover_failure.window_opens + settings.window_activation_delay)
            reason = f"budget window opens at {format_instant(cover_failure.window_opens)}"
        else:
            kind = "budget"
            earliest = now + max(60, settings.activation_lead)
            reason = {
                CoverReason.INSUFFICIENT_CAPACITY: (
                    f"budget headroom short by {cover_failure.shortfall} GPUs"
                ),
                CoverReason.BORROW_LIMIT: "borrow limit exhausted for requested width",
                CoverReason.ACL_DENIED: "borrowing policy rejected request",
                CoverReason.HOURS_EXHAUSTED: "GPU-hours short for requested width",
                CoverReason.NO_ENVELOPE: "no eligible envelope available",
            }.get(cover_failure.reason, "reservation pending")
            if cover_failure.reason is CoverReason.NO_ENVELOPE:
                confidence = "window-aligned"
    name = f"{run.metadata.name}-res-{now}"
    if name in state.reservations:
        name = f"{name}-{sum(1 for r in state.reservations if r.startswith(name))}"
    res = Reservation(
        name=name,
        run=key,
        kind=kind,  # type: ignore[arg-type]
        domain=scope,
        nodes=tuple(nodes),
        paying_envelope=str(paying.key) if paying is not None else "",
        earliest_start=earliest,
        deficit_gpus=deficit,
        confidence=confidence,
        reason=reason,
        remedies=_remedies(state, run, ev),
        created_at=now,
    )
    events: list[Event] = []
    if existing is not None:
        events.append(ReservationReleased(at=now, name=existing.name, reason="Superseded"))
    events.append(ReservationCreated(at=now, reservation=res))
    attempts = cover_failure.attempts if cover_failure is not None else ()
    events.append(
        status_event(
            key,
            now,
            "Pending",
            "Reserved",
            f"reservation {name} scheduled for {format_instant(earliest)} (deficit {deficit} GPUs)",
            why=reason,
            tried=[a.describe() for a in attempts],
        )
    )
    return events


# ------------------------------------------------------------------------------------------
# Activation (SPEC §B.10 with DESIGN decisions 3 and 4)
# ------------------------------------------------------------------------------------------


@dataclass
class Activation:
    """What a due reservation decided.  ``retry``: the events free capacity at this very
    instant (the resolver's cuts); fold them and activate the reservation once more."""

    events: list[Event] = field(default_factory=list)
    retry: bool = False
    note: str = ""


def activate(
    state: FleetState, res: Reservation, now: Instant, planner: Planner, settings: Settings
) -> list[Event]:
    """A reservation fell due: start the run, make room for it, start it unfunded, or wait.

    Kept for callers that want only the events; ``activate_reservation`` also says whether to
    activate again after folding them.
    """
    return activate_reservation(state, res, now, planner, settings).events


def activate_reservation(
    state: FleetState,
    res: Reservation,
    now: Instant,
    planner: Planner,
    settings: Settings,
    *,
    make_room: bool = True,
) -> Activation:
    """Decide a due reservation (SPEC §B.10).

    * run gone → the reservation fails; run terminal or already Running → it is superseded
      (a stale reservation never resurrects a Failed run, F.1.11);
    * preemptions already noticed in the run's favour → wait for their deadline, cut no more;
    * the run starts normally → done;
    * budget-only wait (placeable, not fundable) → start unfunded, cutting nobody (F.1.10);
    * physical deficit with fundable demand → the resolver in the intended scope
      (``make_room``); its cuts are returned alone, with ``retry`` when they take effect now;
    * anything else → a fresh reservation, saying why nothing was cut.
    """
    run = state.runs.get(res.run)
    status = state.status.get(res.run)
    if run is None:
        return Activation(
            [ReservationReleased(at=now, name=res.name, state="Failed", reason="run deleted")]
        )
    if status is not None and status.phase in (*TERMINAL, "Running"):
        return Activation([ReservationReleased(at=now, name=res.name, reason="Superseded")])
    if waiting_for_preemptions(state, run.key):
        return Activation(note=WAITING_FOR_PREEMPTIONS)
    attempt = admit(state, run, now, planner, settings)
    if attempt.started:
        return Activation([_activated(e, res.name) for e in attempt.events], note=attempt.note)
    if attempt.note == WAITING_FOR_PREEMPTIONS:
        return Activation(attempt.events, note=attempt.note)
    if (
        res.kind == "budget"
        and attempt.plan is not None
        and isinstance(attempt.cover_result, CoverFailure)
    ):
        # Budget-only wait: capacity is there, the reachable envelopes are committed.  Start the
        # run unfunded, cutting nobody; it is re-funded by arithmetic when quota returns.
        env_key = _paying_key(state, res)
        owner = state.index.envelopes[env_key].owner if env_key is not None else ""
        quantity = attempt.plan.total_gpus + attempt.plan.total_spares
        leases = mint_leases(
            state, run, attempt.plan, [(env_key, owner, quantity)], now, MintReason.PROMISE
        )
        events = _start_events(
            state, run, leases, now, f"reservation {res.name} activated; started unfunded"
        )
        return Activation(events)
    note = ""
    if (
        make_room
        and attempt.pack_error is not None
        and attempt.pack_error.kind is not PackErrorKind.INVALID_REQUEST
        and state.index.family.owner_of(run.metadata.namespace)
    ):
        cuts, note = _make_room(state, res, run, now, settings)
        if cuts:
            closing = any(isinstance(e, LeaseClosed) for e in cuts)
            return Activation(cuts, retry=closing, note="resolver")
    events = attempt.events
    if note:
        events = [_with_reason(e, note) for e in events]
    if any(isinstance(e, ReservationCreated) for e in events) and not any(
        isinstance(e, ReservationReleased) and e.name == res.name for e in events
    ):
        events = [ReservationReleased(at=now, name=res.name, reason="Superseded"), *events]
    return Activation(events, note=note)


def _activated(e: Event, name: str) -> Event:
    """The reservation that started its run is released as ``Activated``, not superseded."""
    if isinstance(e, ReservationReleased) and e.name == name:
        return msgspec.structs.replace(e, reason="Activated")
    return e


def _with_reason(e: Event, reason: str) -> Event:
    if isinstance(e, ReservationCreated):
        return msgspec.structs.replace(
            e, reservation=msgspec.structs.replace(e.reservation, reason=reason)
        )
    return e


def _make_room(
    state: FleetState, res: Reservation, run: Run, now: Instant, settings: Settings
) -> tuple[list[Event], str]:
    """Run the resolver for a due reservation; (cuts, "") or ([], why nothing was cut).

    Fundability is judged by cover at the intended location with the run's own rank (run key
    passed, SPEC §B.5), and phase 0 trusts a *hypothetical* evaluation in which the run already
    holds its cover plan - so family work it outranks counts as Unfunded (owner recall) while
    nothing it does not outrank is reclaimed.  The deficit is what must still be freed in scope
    (``needed - free``; all of ``needed`` when free GPUs exist but are fragmented).
    """
    index = state.index
    scope = domain_location(res.domain)
    sizes = groups(run.spec.resources.total_gpus, run.group_gpus)
    needed = run.spec.resources.total_gpus + run.spec.spares_per_group * len(sizes)
    plan = cover_run(
        state,
        run,
        quantity=needed,
        location=scope or None,
        now=now,
        settings=settings,
        conservative=False,
    )
    if isinstance(plan, CoverFailure):
        return [], UNFUNDED_DEMAND
    try:
        topology = snapshot(state, run.flavor)
    except TopologyError as exc:
        return [], f"activation failed: {exc}"
    protected = reserved_slots(state, run.key, topology)
    free = sum(
        1
        for d in topology.domains()
        if all(d.labels.get(k) == v for k, v in scope.items())
        for node in d.nodes
        for s in topology.free_slots(node)
        if s not in protected
    )
    deficit = needed - free if needed > free else needed
    resolution = resolve(
        deficit=deficit,
        flavor=run.flavor,
        scope=scope,
        seed_source=res.name,
        now=now,
        nodes=state.nodes,
        leases=list(state.open_leases.values()),
        runs=state.runs,
        owner_of=index.family.owner_of,
        classes=_hypothetical_classes(state, run, plan, res, now),
        exclude_runs={run.key},
        exclude_leases={p.lease for p in state.pending_preemptions()},
    )
    if resolution.error:
        return [], f"activation failed: {resolution.error}"
    if not resolution.cuts:
        return [], "activation failed: nothing in scope to free"
    events = apply_resolution(
        state, resolution, beneficiary=run.key, source=res.name, now=now, settings=settings
    )
    waiting = _awaiting_notices(state, run.key, events, now)
    if waiting is not None:
        events.append(waiting)
    return events, ""


def _awaiting_notices(
    state: FleetState, run_key: str, events: Sequence[Event], now: Instant
) -> RunStatusChanged | None:
    """A commentary for a beneficiary whose room frees only when the notices run out."""
    deadlines = [e.deadline for e in events if isinstance(e, LeasePreemptionScheduled)]
    if not deadlines or max(deadlines) <= now:
        return None
    gpus = sum(
        state.leases[e.lease].width for e in events if isinstance(e, LeasePreemptionScheduled)
    )
    return commentary(
        state,
        run_key,
        now,
        f"waiting for {gpus} GPUs under preemption notice until {format_instant(max(deadlines))}",
    )


def _hypothetical_classes(
    state: FleetState, run: Run, plan: CoverPlan, res: Reservation, now: Instant
) -> Mapping[str, FundingClass]:
    """Funding classes as if ``run`` already held its cover plan in the intended slice."""
    nodes = [n for n in res.nodes if n in state.nodes] or sorted(
        n.name
        for n in state.nodes.values()
        if n.flavor == run.flavor
        and all(n.labels.get(k) == v for k, v in domain_location(res.domain).items())
    )
    inputs = state.funding_inputs()
    if not nodes:
        return evaluate(state.meter, inputs, now).fill.funding_class
    node = nodes[0]
    drafts = [
        Lease(
            id=f"{run.key}@hypothetical#{i:03d}",
            run=run.key,
            node=node,
            slots=tuple(f"{node}#h{i}.{j}" for j in range(seg.quantity)),
            role=LeaseRole.ACTIVE,
            group=0,
            minted_payer=seg.payer,
            start=now,
        )
        for i, seg in enumerate(plan.segments)
    ]
    runs = dict(state.runs)
    admitted = dict(state.admitted)
    admitted.setdefault(run.key, now)
    view = state.meter.hours_view(inputs.index, inputs.period_hours)
    result = fill(
        inputs.index, [*inputs.leases, *drafts], runs, admitted, inputs.node_labels, now, view
    )
    return result.funding_class


def _paying_key(state: FleetState, res: Reservation) -> EnvelopeKey | None:
    if not res.paying_envelope:
        return None
    ns, budget, env = res.paying_envelope.split("/", 2)
    key = EnvelopeKey(ns, budget, env)
    return key if key in state.index.envelopes else None


# ------------------------------------------------------------------------------------------
# Follow gate (SPEC §B.15)
# ------------------------------------------------------------------------------------------


def follow_gate(state: FleetState, run: Run, now: Instant) -> list[Event] | None:
    """None when the run may proceed; else the events that keep it waiting or fail it."""
    follow = run.spec.follow
    if follow is None:
        return None
    ns = run.metadata.namespace
    cycle = _follow_cycle(state, run)
    if cycle:
        return fail_events(
            state, run.key, now, "FollowCycle", "follow cycle: " + " -> ".join(cycle)
        )
    failed: list[str] = []
    pending: list[str] = []
    for name in follow.after:
        up = f"{ns}/{name}"
        st = state.status.get(up)
        if up not in state.runs:
            failed.append(f"{name} (deleted)")
        elif st is not None and st.phase == "Completed":
            continue
        elif st is not None and st.phase == "Failed":
            failed.append(name)
        else:
            pending.append(name)
    current = state.status.get(run.key)
    if failed:
        listing = ", ".join(failed)
        if follow.on_upstream_failure == "fail":
            return fail_events(state, run.key, now, "UpstreamFailed", f"upstream failed: {listing}")
        deadline_raw = current.detail.get("followDeadline") if current is not None else None
        deadline = (
            int(deadline_raw)  # type: ignore[call-overload]
            if deadline_raw is not None
            else now + parse_duration(follow.upstream_failure_grace)
        )
        if now >= deadline:
            return fail_events(
                state,
                run.key,
                now,
                "UpstreamFailed",
                f"upstream failed and grace expired: {listing}",
            )
        msg = (
            f"waiting: upstream failed ({listing}); fails at {format_instant(deadline)} "
            "if unresolved"
        )
        if current is not None and current.message == msg:
            return []
        return [status_event(run.key, now, "Waiting", "FollowWait", msg, followDeadline=deadline)]
    if pending:
        msg = "waiting for: " + ", ".join(pending)
        if current is not None and current.message == msg:
            return []
        return [status_event(run.key, now, "Waiting", "FollowWait", msg)]
    return None


def _follow_cycle(state: FleetState, run: Run) -> list[str]:
    ns = run.metadata.namespace

    def walk(name: str, seen: tuple[str, ...]) -> list[str]:
        if name in seen:
            return [*seen[seen.index(name) :], name]
        r = state.runs.get(f"{ns}/{name}")
        if r is None or r.spec.follow is None:
            return []
        for up in r.spec.follow.after:
            found = walk(up, (*seen, name))
            if found:
                return found
        return []

    return walk(run.metadata.name, ())


# ------------------------------------------------------------------------------------------
# The in-memory committer
# ------------------------------------------------------------------------------------------


class CommandError(ValueError):
    """A command that cannot apply (unknown run, wrong state); nothing was changed."""


class Fleet:
    """Folded state plus the decision loop; what the scenario runner and local CLI drive."""

    def __init__(self, settings: Settings | None = None, planner: Planner | None = None) -> None:
        self.settings = settings or Settings()
        self.planner: Planner = planner or pack_greedy
        self.state = FleetState(settings_period_hours=self.settings.period_hours)

    # -- committing ---------------------------------------------------------------------------
    def commit(self, events: Iterable[Event]) -> list[Event]:
        done: list[Event] = []
        for e in events:
            fold(self.state, e)
            done.append(e)
        return done

    # -- commands -----------------------------------------------------------------------------
    def register_node(self, node: Node, at: Instant) -> None:
        self.commit([NodeRegistered(at=at, node=node)])

    def apply(self, manifest: Budget | Run, at: Instant) -> list[Event]:
        if isinstance(manifest, Budget):
            events = self.commit([BudgetApplied(at=at, budget=manifest)])
        elif manifest.key in self.state.runs:
            events = self.commit([RunUpdated(at=at, run=manifest)])
        else:
            events = self.commit([RunSubmitted(at=at, run=manifest)])
        return events + self.reconcile(at)

    def delete(self, kind: str, namespace: str, name: str, at: Instant) -> list[Event]:
        key = f"{namespace}/{name}"
        if kind == "Budget":
            if key not in self.state.budgets:
                raise CommandError(f"budget {key} not found")
            events = self.commit([BudgetDeleted(at=at, namespace=namespace, name=name)])
        else:
            if key not in self.state.runs:
                raise CommandError(f"run {key} not found")
            closing: list[Event] = [
                LeaseClosed(at=at, lease=x.id, reason="RunDeleted")
                for x in self.state.leases_of(key, open_only=True)
            ]
            closing += [
                ReservationReleased(at=at, name=r.name, state="Failed", reason="run deleted")
                for r in sorted(self.state.pending_reservations.values(), key=lambda r: r.name)
                if r.run == key and r.state == "Pending"
            ]
            events = self.commit([*closing, RunDeleted(at=at, run=key)])
        return events + self.reconcile(at)

    def complete(self, key: str, at: Instant) -> list[Event]:
        self._require_running(key)
        events: list[Event] = [
            LeaseClosed(at=at, lease=x.id, reason="Completed")
            for x in self.state.leases_of(key, open_only=True)
        ]
        events.append(
            status_event(
                key, at, "Completed", "AllSucceeded", "run completed: all active pods succeeded"
            )
        )
        return self.commit(events) + self.reconcile(at)

    def fail(self, key: str, at: Instant) -> list[Event]:
        self._require_running(key)
        events = fail_events(
            self.state,
            key,
            at,
            "WorkloadFailed",
            "workload failed; failing the gang",
            "WorkloadFailed",
        )
        return self.commit(events) + self.reconcile(at)

    def set_node_health(self, node: str, health: NodeHealth, at: Instant) -> list[Event]:
        """Record a node's health; a node newly *fenced* has failed (SPEC §B.13).

        Cordoning only stops new work landing there (topology offers no free slot on it); the
        leases on a cordoned node are untouched - cordon is not failure (DESIGN decision 7).
        """
        if node not in self.state.nodes:
            raise CommandError(f"node {node} not found")
        before = self.state.nodes[node].health
        events = self.commit([NodeHealthChanged(at=at, node=node, health=health)])
        if health is NodeHealth.FENCED and before is not NodeHealth.FENCED:
            events += self.commit(handle_node_failure(self.state, node, at, self.settings))
        return events + self.reconcile(at)

    def report_eta(self, key: str, eta: Instant, at: Instant) -> list[Event]:
        """Record a run's expected completion (the forecaster plans with it)."""
        self._require_running(key)
        if eta < at:
            raise CommandError(f"eta {format_instant(eta)} is in the past")
        return self.commit([RunEtaReported(at=at, run=key, eta=eta)])

    def require_run(self, key: str) -> Run:
        """The run ``key``, or a ``CommandError`` a caller can show as it is."""
        run = self.state.runs.get(key)
        if run is None:
            raise CommandError(f"run {key} not found")
        return run

    def shrink(self, key: str, desired: int, at: Instant) -> list[Event]:
        run = self.require_run(key)
        m = run.spec.malleable
        if m is None:
            raise CommandError(f"run {key} is not malleable")
        if not m.min_total_gpus <= desired <= m.max_total_gpus:
            raise CommandError(
                f"desired GPUs {desired} must be within [{m.min_total_gpus}, {m.max_total_gpus}]"
            )
        updated = msgspec.structs.replace(
            run,
            spec=msgspec.structs.replace(
                run.spec, malleable=msgspec.structs.replace(m, desired_total_gpus=desired)
            ),
        )
        return self.commit([RunUpdated(at=at, run=updated)]) + self.reconcile(at)

    def _require_running(self, key: str) -> None:
        st = self.state.status.get(key)
        if key not in self.state.runs or st is None:
            raise CommandError(f"run {key} not found")
        if st.phase in TERMINAL:
            raise CommandError(f"run {key} is already {st.phase}")

    # -- time ---------------------------------------------------------------------------------
    def next_due(self, after: Instant) -> Instant | None:
        """The earliest instant after ``after`` at which something falls due by itself:
        a reservation, a lease's scheduled end, a preemption deadline, a checkpoint deadline."""
        state = self.state
        times = [
            r.earliest_start
            for r in state.pending_reservations.values()
            if r.state == "Pending" and r.earliest_start > after
        ]
        times += [x.end for x in state.open_leases.values() if x.end is not None and x.end > after]
        times += [p.deadline for p in state.pending_preemptions() if p.deadline > after]
        for key in state.status:
            deadline = checkpoint_deadline(state, key)
            if deadline is not None and deadline > after:
                times.append(deadline)
        return min(times) if times else None

    def advance_to(self, until: Instant) -> list[Event]:
        """Run everything that falls due up to and including ``until``, in time order."""
        events: list[Event] = []
        while True:
            t = self.next_due(self.state.clock)
            if t is None or t > until:
                break
            events += self.reconcile(t)
        if until > self.state.clock:
            events += self.reconcile(until)
        return events

    def reconcile(self, now: Instant) -> list[Event]:
        """Everything due at ``now``: what ends (expiries, preemption and checkpoint deadlines),
        then activations, then pending admissions, then elastic growth and shrinks."""
        state = self.state
        done: list[Event] = []
        state.clock = max(state.clock, now)
        expired = sorted(
            (x for x in state.open_leases.values() if x.end is not None and x.end <= now),
            key=lambda x: x.id,
        )
        for run_key in sorted({x.run for x in expired}):
            done += self.commit(
                fail_events(
                    state, run_key, now, "Expired", "reached spec.runtime.maxDuration", "Expired"
                )
            )
        done += self.commit(stale_preemptions(state, now))
        due_cuts = [p for p in state.pending_preemptions() if p.deadline <= now]
        if due_cuts:
            done += self.commit(close_preempted(state, due_cuts, now))
        for key in sorted(state.status):
            deadline = checkpoint_deadline(state, key)
            if deadline is not None and deadline <= now and state.status[key].phase == "Pending":
                done += self.commit(
                    fail_events(
                        state,
                        key,
                        now,
                        "CheckpointExpired",
                        f"checkpoint grace expired at {format_instant(deadline)}",
                    )
                )
        done += self._activate_due(now)
        pending = sorted(
            (
                k
                for k, st in state.status.items()
                if st.phase in ("Pending", "Waiting") and k in state.runs
            ),
            key=lambda k: (state.admitted.get(k, 0), k),
        )
        for key in pending:
            st = state.status[key]
            if st.phase not in ("Pending", "Waiting"):
                continue
            attempt = admit(state, state.runs[key], now, self.planner, self.settings)
            events = [e for e in attempt.events if not _same_status(state, e)]
            done += self.commit(events)
        done += self._elastic(now)
        return done

    def _activate_due(self, now: Instant) -> list[Event]:
        state = self.state
        done: list[Event] = []
        due = sorted(
            (
                r
                for r in state.pending_reservations.values()
                if r.state == "Pending" and r.earliest_start <= now
            ),
            key=lambda r: (r.earliest_start, r.name),
        )
        for res in due:
            if state.reservations[res.name].state != "Pending":
                continue
            act = activate_reservation(state, res, now, self.planner, self.settings)
            done += self.commit([e for e in act.events if not _same_status(state, e)])
            current = state.reservations[res.name]
            if act.retry and current.state == "Pending":
                again = activate_reservation(
                    state, current, now, self.planner, self.settings, make_room=False
                )
                done += self.commit([e for e in again.events if not _same_status(state, e)])
        return done

    def _elastic(self, now: Instant) -> list[Event]:
        state = self.state
        done: list[Event] = []
        running = sorted(
            (
                k
                for k, st in state.status.items()
                if st.phase == "Running" and k in state.runs and state.runs[k].spec.malleable
            ),
            key=lambda k: (state.admitted.get(k, 0), k),
        )
        for key in running:
            run = state.runs[key]
            m = run.spec.malleable
            assert m is not None
            for _ in range(2 + m.max_total_gpus // max(1, m.step_gpus)):
                step = elastic_step(state, state.runs[key], now, self.planner, self.settings)
                done += self.commit([e for e in step.events if not _same_status(state, e)])
                if not step.progressed:
                    break
        return done


def _same_status(state: FleetState, e: Event) -> bool:
    """Skip a status write that changes nothing (keeps the ledger free of no-op churn)."""
    if not isinstance(e, RunStatusChanged):
        return False
    cur = state.status.get(e.run)
    return cur is not None and (cur.phase, cur.reason, cur.message) == (
        e.phase,
        e.reason,
        e.message,
    )
