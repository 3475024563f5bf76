"""Reservations: the promise, with a bound, made to a run that cannot start now (SPEC §B.9 with
DESIGN decision 4).

A reservation names the run's intended slice (its scope and nodes, protected from backfill), the
envelope that will pay, the kind of wait (capacity, window, budget), the deficit and the
earliest start at which it activates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpu_fleet.core.engine.gang import Settings, cover_run, plan_pack, status_event
from gpu_fleet.core.funding.cover import CoverFailure, CoverReason
from gpu_fleet.core.funding.envelopes import EnvelopeInfo
from gpu_fleet.core.ledger.events import (
    Event,
    Reservation,
    ReservationCreated,
    ReservationReleased,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    Instant,
    LeaseRole,
    Run,
    slot,
)
from gpu_fleet.core.placement.pack import PackError, PackErrorKind, PackPlan, groups, pack_greedy
from gpu_fleet.core.placement.topology import Topology, TopologyError, domain_location
from gpu_fleet.core.timeutil import format_instant


def _remedies(state: FleetState, run: Run, now: Instant) -> tuple[str, ...]:
    """What could free room for ``run`` now, in the resolver's order, read from the matching.

    What the reservation says, as a full evaluation's summaries would say it (issue 11: a
    submission into a full fleet read a whole ``FleetState.evaluation`` for these lines, and
    every reservation changes the state it is cached on - 3 ms of 5 at 1k nodes): unfunded
    capacity is an open lease of another run of the flavor that the matching leaves unfunded;
    spares are a spare lease of some width that an envelope of the flavor funds.  The first
    reads the leases the matching leaves unfunded (``FleetState.unfunded_leases``, shared with
    the resolver; the matching covers every open lease), the second is one pass over the open
    leases that stops at the first that qualifies: none of the summaries' per-envelope,
    per-cap and per-run bookkeeping.  Checked against the summaries over generated states
    (``tests/core/test_reservation_remedies.py``) and every scenario
    (``tests/scenarios/test_scenario_remedies.py``).
    """
    out: list[str] = []
    leases, runs, flavor = state.open_leases, state.runs, run.flavor
    for lid in state.unfunded_leases(now):
        holder = leases.get(lid)
        if holder is None or holder.run == run.key:
            continue
        other = runs.get(holder.run)
        if other is not None and other.flavor == flavor:
            out.append("Reclaim unfunded capacity in scope")
            break
    envelopes, spare, payers = state.index.envelopes, LeaseRole.SPARE, state.matching(now).payer
    for lease in leases.values():
        if lease.role is not spare or not lease.slots:
            continue
        payer = payers.get(lease.id)  # a payer only for a lease the matching funds
        if payer is not None and envelopes[payer].flavor == flavor:
            out.append("Drop spares in scope")
            break
    if any(key != run.key for key in state.malleable_runs.get(run.flavor, ())):
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


@dataclass(frozen=True)
class _Wait:
    """What a run waits for: the kind, the GPUs still to free, when it activates, and why."""

    kind: str
    deficit: int
    earliest: Instant
    confidence: str
    reason: str


_BUDGET_REASONS = {
    CoverReason.INSUFFICIENT_CAPACITY: "budget headroom short by {shortfall} GPUs",
    CoverReason.BORROW_LIMIT: "borrow limit exhausted for requested width",
    CoverReason.ACL_DENIED: "borrowing policy rejected request",
    CoverReason.HOURS_EXHAUSTED: "GPU-hours short for requested width",
    CoverReason.NO_ENVELOPE: "no eligible envelope available",
}


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
    """Write a reservation for a run that cannot start now (or keep the one it has).

    Four steps, each its own function: the intended slice (scope and nodes), the envelope that
    will pay, the wait (kind, deficit, earliest start, reason), then the events.
    """
    existing = state.pending_reservation(run.key)
    if existing is not None and existing.earliest_start > now:
        return []  # a reservation is a promise with a bound: keep it stable until it is due
    scope, nodes = _intended_slice(topology, plan, pack_error)
    if not scope and not nodes:
        why = pack_error.message if pack_error is not None else "no matching domain"
        return [
            status_event(
                run.key,
                now,
                "Pending",
                "Unschedulable",
                f"no capacity in any matching domain: {why}",
            )
        ]
    paying = _paying_envelope(state, run, scope)
    if (
        paying is not None
        and paying.start is not None
        and paying.start > now
        and not paying.pre_reservations
    ):
        return [
            status_event(
                run.key,
                now,
                "Pending",
                "Unschedulable",
                f"reservation planning failed: envelope {paying.key} does not allow "
                "reservations before its window",
            )
        ]
    if pack_error is not None:
        wait = _capacity_wait(
            state, run, pack_error, scope=scope, nodes=nodes, now=now, settings=settings
        )
    else:
        assert cover_failure is not None
        wait = _budget_wait(cover_failure, now, settings)
    return _reservation_events(
        state,
        run,
        existing=existing,
        scope=scope,
        nodes=nodes,
        paying=paying,
        wait=wait,
        cover_failure=cover_failure,
        now=now,
    )


def _intended_slice(
    topology: Topology, plan: PackPlan | None, pack_error: PackError | None
) -> tuple[str, tuple[str, ...]]:
    """The domain the run is promised, and its nodes (protected from backfill, DESIGN 5)."""
    if plan is not None and plan.groups:
        return plan.groups[0].domain, tuple(plan.nodes())
    if pack_error is not None and pack_error.shortfall:
        # The intended slice is the domain closest to fitting: its nodes are protected from
        # backfill until the reservation activates (DESIGN decision 5).
        scope = sorted(pack_error.shortfall.items(), key=lambda kv: (kv[1], kv[0]))[0][0]
        return scope, tuple(topology.domain(scope).nodes) if topology.has_domain(scope) else ()
    domains = topology.domains()
    return (domains[0].key if domains else ""), ()


def _paying_envelope(state: FleetState, run: Run, scope: str) -> EnvelopeInfo | None:
    """The owner's first envelope (by name) of the run's flavor whose selector admits the scope."""
    index = state.index
    owner = index.family.owner_of(run.metadata.namespace)
    scope_labels = domain_location(scope)
    candidates = [
        e
        for e in index.of_owner(owner, run.flavor)
        if all(v == "*" or scope_labels.get(k, v) == v for k, v in e.selector.items())
    ]
    return min(candidates, key=lambda e: e.key.envelope) if candidates else None


def _capacity_wait(
    state: FleetState,
    run: Run,
    pack_error: PackError,
    *,
    scope: str,
    nodes: Sequence[str],
    now: Instant,
    settings: Settings,
) -> _Wait:
    """Short of GPUs: activate at the sooner of the natural start and the lead bound, or at the
    window's opening when a window not yet open is all that keeps the demand unfunded."""
    deficit = max(1, pack_error.deficit) if pack_error.deficit else run.spec.resources.total_gpus
    if pack_error.kind is PackErrorKind.INSUFFICIENT_TOPOLOGY:
        reason = "no single domain satisfies run grouping"
    else:
        reason = f"cluster short by {deficit} GPUs in scope"
    lead = settings.activation_lead + settings.activation_lead_per_gpu * deficit
    bound = now + max(60, lead)
    opens = _window_opens(state, run, scope, now, settings)
    if opens is not None:
        # A window wait activates when the window opens, whatever else it waits for: the
        # demand is fundable from then on, so the resolver makes room then (DESIGN 4).
        return _Wait(
            "window",
            deficit,
            max(now + 1, opens + settings.window_activation_delay),
            "window-aligned",
            f"budget window opens at {format_instant(opens)}; {reason}",
        )
    natural = _natural_start(state, run, nodes, now, bound)
    if natural is not None:
        return _Wait(
            "capacity",
            deficit,
            natural,
            "exact",
            f"{reason}; scheduled lease ends free it at {format_instant(natural)}",
        )
    return _Wait("capacity", deficit, bound, "conservative", reason)


def _budget_wait(cover_failure: CoverFailure, now: Instant, settings: Settings) -> _Wait:
    """Capacity is there but no envelope pays: a window wait, or a budget-only wait that
    activates at the lead bound and cuts nobody (DESIGN 4)."""
    opens = cover_failure.window_opens
    if cover_failure.reason is CoverReason.WINDOW_CLOSED and opens:
        return _Wait(
            "window",
            0,
            max(now + 1, opens + settings.window_activation_delay),
            "window-aligned",
            f"budget window opens at {format_instant(opens)}",
        )
    reason = _BUDGET_REASONS.get(cover_failure.reason, "reservation pending").format(
        shortfall=cover_failure.shortfall
    )
    confidence = (
        "window-aligned" if cover_failure.reason is CoverReason.NO_ENVELOPE else "conservative"
    )
    return _Wait("budget", 0, now + max(60, settings.activation_lead), confidence, reason)


def _reservation_events(
    state: FleetState,
    run: Run,
    *,
    existing: Reservation | None,
    scope: str,
    nodes: Sequence[str],
    paying: EnvelopeInfo | None,
    wait: _Wait,
    cover_failure: CoverFailure | None,
    now: Instant,
) -> list[Event]:
    """The new reservation (superseding the old one) and the run's Reserved status."""
    name = f"{run.metadata.name}-res-{now}"
    if name in state.reservations:
        name = f"{name}-{sum(1 for r in state.reservations if r.startswith(name))}"
    res = Reservation(
        name=name,
        run=run.key,
        kind=wait.kind,  # type: ignore[arg-type]
        domain=scope,
        nodes=tuple(nodes),
        paying_envelope=str(paying.key) if paying is not None else "",
        earliest_start=wait.earliest,
        deficit_gpus=wait.deficit,
        confidence=wait.confidence,
        reason=wait.reason,
        remedies=_remedies(state, run, now),
        created_at=now,
    )
    events: list[Event] = []
    if existing is not None:
        events.append(ReservationReleased(at=now, name=existing.name, reason="Superseded"))
    events.append(ReservationCreated(at=now, reservation=res))
    attempts = cover_failure.attempts if cover_failure is not None else ()
    events.append(
        status_event(
            run.key,
            now,
            "Pending",
            "Reserved",
            f"reservation {name} scheduled for {format_instant(wait.earliest)} "
            f"(deficit {wait.deficit} GPUs)",
            why=wait.reason,
            tried=[a.describe() for a in attempts],
        )
    )
    return events
