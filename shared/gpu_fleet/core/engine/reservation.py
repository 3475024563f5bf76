"""Reservations: the promise, with a bound, made to a run that cannot start now (SPEC §B.9 with
DESIGN decision 4).

A reservation names the run's intended slice (its scope and nodes, protected from backfill), the
envelope that will pay, the kind of wait (capacity, window, budget), the deficit and the
earliest start at which it activates.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_fleet.core.engine.gang import Settings, cover_run, plan_pack, status_event
from gpu_fleet.core.funding.cover import CoverFailure, CoverReason
from gpu_fleet.core.funding.metering import Evaluation
from gpu_fleet.core.ledger.events import (
    Event,
    Reservation,
    ReservationCreated,
    ReservationReleased,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    FundingClass,
    Instant,
    Run,
    slot,
)
from gpu_fleet.core.placement.pack import PackError, PackErrorKind, PackPlan, groups, pack_greedy
from gpu_fleet.core.placement.topology import Topology, TopologyError, domain_location
from gpu_fleet.core.timeutil import format_instant


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


def _window_opens(
    state: FleetState, run: Run, scope: str, now: Instant, settings: Settings
) -> Instant | None:
    """When the run's budget window opens, if only a window not yet open keeps it unfunded.

    Asked for a run that is also short of GPUs: such a wait is a *window* wait all the same
    (DESIGN decision 4), so it activates at the opening rather than at a lead bound that would
    find the demand unfunded and start the lead over again.
    """
    sizes = groups(run.spec.resources.total_gpus, run.group_gpus)
    result = cover_run(
        state,
        run,
        quantity=run.spec.resources.total_gpus + run.spec.spares_per_group * len(sizes),
        location=domain_location(scope) or None,
        now=now,
        settings=settings,
    )
    if isinstance(result, CoverFailure) and result.reason is CoverReason.WINDOW_CLOSED:
        return result.window_opens
    return None


def _natural_start(
    state: FleetState, run: Run, nodes: Sequence[str], now: Instant, bound: Instant
) -> Instant | None:
    """The first scheduled lease end before ``bound`` after which ``run`` packs in ``nodes``.

    DESIGN decision 4: a reservation's earliest start is the sooner of this natural start and
    its activation bound.  Only scheduled ends count (``Lease.end``, from ``maxDuration``): the
    engine closes those leases then, so the room is certain; estimated ends are the
    forecaster's and never move a promise.  The search stays in the intended slice, which is
    protected from backfill until then, and other reservations' slices stay closed at every
    instant, so the start found here takes no room already promised.  The greedy packer
    decides (as in the forecast), so every committer finds the same instant.  The full play of
    the queue is the forecaster's (``forecast.queue_play``), above the engine; this may be
    later than its answer, never earlier than what happens.
    """
    inside = set(nodes)
    ending = sorted(
        (
            x
            for x in state.open_leases.values()
            if x.end is not None and now < x.end < bound and x.node in inside
        ),
        key=lambda x: (x.end or 0, x.id),
    )
    if not ending:
        return None
    closed = {
        slot(node.name, i)
        for node in state.nodes.values()
        if node.flavor == run.flavor
        for i in range(node.gpus)
        if node.name not in inside
    }
    for slice_nodes, entries in state.protected_slices().items():
        if any(e.run != run.key for e in entries):
            closed.update(
                slot(n, i)
                for n in slice_nodes
                if n in state.nodes
                for i in range(state.nodes[n].gpus)
            )
    sizes = groups(run.spec.resources.total_gpus, run.group_gpus)
    needed = run.spec.resources.total_gpus + run.spec.spares_per_group * len(sizes)
    free = sum(
        1
        for n in inside
        if n in state.nodes
        for i in range(state.nodes[n].gpus)
        if slot(n, i) not in closed and slot(n, i) not in state.slot_holder
    )
    released: list[str] = []
    for i, lease in enumerate(ending):
        released.extend(lease.slots)
        free += sum(1 for s in lease.slots if s not in closed)
        if free < needed or (i + 1 < len(ending) and ending[i + 1].end == lease.end):
            continue  # too few GPUs yet, or more leases end at this same instant
        try:
            _, _, packed = plan_pack(
                state,
                run,
                pack_greedy,
                protect_reservations=False,
                released=released,
                excluded=closed,
            )
        except TopologyError:
            return None
        if isinstance(packed, PackPlan):
            return lease.end
    return None


def reserve(  # noqa: PLR0917 - one positional call shape, shared with the forecaster's tests
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
        opens = _window_opens(state, run, scope, now, settings)
        if opens is not None:
            # A window wait activates when the window opens, whatever else it waits for: the
            # demand is fundable from then on, so the resolver makes room then (DESIGN 4).
            kind = "window"
            confidence = "window-aligned"
            earliest = max(now + 1, opens + settings.window_activation_delay)
            reason = f"budget window opens at {format_instant(opens)}; {reason}"
        else:
            natural = _natural_start(state, run, nodes, now, earliest)
            if natural is not None:
                earliest = natural
                confidence = "exact"
                reason = f"{reason}; scheduled lease ends free it at {format_instant(natural)}"
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
