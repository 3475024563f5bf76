"""Activation: a due reservation starts its run, making room with the resolver if it must (SPEC
§B.10 with DESIGN decisions 3 and 4).

A decision that frees capacity *now* for a reservation (the resolver with zero grace) returns
only the cuts, flagged ``Activation.retry``: the committer folds them and activates the same
reservation once more at the same instant, which then packs on the freed slots.  Splitting it
this way keeps every decision a function of folded state, whichever committer runs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.engine.admission import admit, start_events
from gpu_fleet.core.engine.gang import (
    TERMINAL,
    Settings,
    cover_run,
    mint_leases,
    reserved_slots,
    snapshot,
)
from gpu_fleet.core.engine.resolver import (
    WAITING_FOR_PREEMPTIONS,
    apply_resolution,
    awaiting_notices,
    resolve,
    waiting_for_preemptions,
)
from gpu_fleet.core.funding.cover import CoverFailure, CoverPlan
from gpu_fleet.core.funding.matching import fill
from gpu_fleet.core.funding.metering import evaluate
from gpu_fleet.core.ledger.events import (
    Event,
    LeaseClosed,
    Reservation,
    ReservationCreated,
    ReservationReleased,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    MintReason,
    Run,
)
from gpu_fleet.core.placement.pack import PackErrorKind, Planner, groups
from gpu_fleet.core.placement.topology import TopologyError, domain_location

UNFUNDED_DEMAND = "waiting for capacity: demand is currently unfunded and reclaims nothing"


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
        events = start_events(
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
    waiting = awaiting_notices(state, run.key, events, now)
    if waiting is not None:
        events.append(waiting)
    return events, ""


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
