"""Decisions: from the folded state and an instant to the ledger events that should follow.

Every public function here is a *decision*: it reads ``FleetState`` and returns events without
touching anything.  ``Fleet`` is the in-memory committer the scenario runner and the CLI's local
mode use; the manager service commits the same events to JetStream (with an expected-last-
sequence check) and folds them the same way.  Because decisions read only folded state and
the instant passed in, a replay of the ledger reproduces every one of them.

Order of work at one instant (scenario-format.md): what ends first (lease expiry), then
reservation activations (earliest start, then name), then admissions of pending runs (admission
time, then run key); a step scheduled at that instant comes after all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.cover import CoverFailure, CoverPlan, CoverReason, CoverRequest, cover
from gpu_fleet.core.envelopes import location_of
from gpu_fleet.core.funding import fill
from gpu_fleet.core.ledger import (
    BudgetApplied,
    BudgetDeleted,
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    NodeHealthChanged,
    NodeRegistered,
    Reservation,
    ReservationCreated,
    ReservationReleased,
    RunDeleted,
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
    fold,
)
from gpu_fleet.core.metering import Evaluation, evaluate
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
from gpu_fleet.core.pack import PackError, PackErrorKind, PackPlan, PackRequest, pack_greedy
from gpu_fleet.core.timeutil import format_instant, parse_duration
from gpu_fleet.core.topology import Topology, TopologyError, build_topology

Planner = Callable[[Topology, PackRequest], PackPlan]


@dataclass(frozen=True)
class Settings:
    """Cluster settings (seconds); defaults match scenario-format.md."""

    accounting_period: int = 86400
    preemption_grace: int = 0
    preemption_grace_max: int = 3600
    activation_lead: int = 900
    activation_lead_per_gpu: int = 30
    window_activation_delay: int = 10

    @property
    def period_hours(self) -> float:
        return self.accounting_period / 3600.0


TERMINAL = ("Completed", "Failed")


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


def _status(
    run: str, at: Instant, phase: str, reason: str, message: str, **detail: object
) -> RunStatusChanged:
    return RunStatusChanged(
        at=at,
        run=run,
        phase=phase,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        detail=dict(detail),
    )


def _reserved_slots(state: FleetState, run_key: str, topology: Topology) -> frozenset[str]:
    """Backfill protection (DESIGN decision 5): free slots inside other runs' intended slices.

    A run may not take them unless it is the reservation's own run.  Only capacity waits hold a
    slice; a budget-only wait has nothing to protect.
    """
    held: set[str] = set()
    for res in state.reservations.values():
        if res.state != "Pending" or res.kind != "capacity" or res.run == run_key:
            continue
        for node in res.nodes:
            held.update(topology.free_slots(node) if topology.has_node(node) else ())
    return frozenset(held)


def plan_pack(
    state: FleetState,
    run: Run,
    planner: Planner,
    *,
    width: int | None = None,
    spares: bool = True,
    protect_reservations: bool = True,
) -> tuple[Topology, PackRequest, PackPlan | PackError]:
    topology = build_topology(
        sorted(state.nodes.values(), key=lambda n: n.name), set(state.slot_holder), run.flavor
    )
    excluded = _reserved_slots(state, run.key, topology) if protect_reservations else frozenset()
    loc = run.spec.locality
    request = PackRequest(
        flavor=run.flavor,
        total_gpus=width if width is not None else run.spec.resources.total_gpus,
        group_gpus=loc.group_gpus if loc is not None else None,
        allow_cross_group_spread=loc.allow_cross_group_spread if loc is not None else True,
        spares_per_group=run.spec.spares_per_group if spares else 0,
        excluded_slots=excluded,
    )
    try:
        return topology, request, planner(topology, request)
    except PackError as exc:
        return topology, request, exc


def _first_location(topology: Topology, plan: PackPlan) -> dict[str, str] | None:
    if not plan.groups or not plan.groups[0].allocations:
        return None
    return location_of(topology.node_labels(plan.groups[0].allocations[0].node))


def mint_leases(
    state: FleetState,
    run: Run,
    plan: PackPlan,
    segments: Sequence[tuple[EnvelopeKey | None, str, int]],
    at: Instant,
    reason: MintReason = MintReason.START,
) -> list[Lease]:
    """Walk node allocations and payer segments as two cursors (SPEC §B.7).

    Each lease covers ``min(GPUs left on the node chunk, quantity left in the segment)`` so a
    lease never spans two nodes and is paid by exactly one segment.  Actives of every group
    first (group order), then spares.  ``segments`` are (envelope, owner, quantity); an
    envelope of ``None`` mints with no payer (an unfunded start).
    """
    index = state.index
    end = _scheduled_end(run, at)
    chunks: list[tuple[int, LeaseRole, str, tuple[str, ...]]] = []
    for g in plan.groups:
        chunks.extend((g.index, LeaseRole.ACTIVE, a.node, a.slots) for a in g.allocations)
    for g in plan.groups:
        chunks.extend((g.index, LeaseRole.SPARE, a.node, a.slots) for a in g.spare_allocations)
    seg_iter = iter(segments)
    seg_key, seg_owner, seg_left = next(seg_iter, (None, "", 0))
    counter = sum(1 for lease in state.leases.values() if lease.run == run.key)
    admitted = state.admitted.get(run.key, at)
    leases: list[Lease] = []
    for group, role, node, slots in chunks:
        pos = 0
        while pos < len(slots):
            if seg_left <= 0:
                seg_key, seg_owner, seg_left = next(seg_iter, (None, "", len(slots) - pos))
            take = min(seg_left, len(slots) - pos)
            payer = None
            if seg_key is not None:
                info = index.envelopes[seg_key]
                payer = info.payer
            leases.append(
                Lease(
                    id=f"{run.key}@{admitted}#{counter:03d}",
                    run=run.key,
                    node=node,
                    slots=tuple(slots[pos : pos + take]),
                    role=role,
                    group=group,
                    reason=reason,
                    minted_payer=payer,
                    start=at,
                    end=end,
                )
            )
            counter += 1
            pos += take
            seg_left -= take
    del seg_owner
    return leases


def _scheduled_end(run: Run, at: Instant) -> Instant | None:
    rt = run.spec.runtime
    if rt is None or rt.max_duration is None:
        return None
    return at + parse_duration(rt.max_duration)


def _verify_funded(
    state: FleetState, run: Run, new: Sequence[Lease], now: Instant, borrowed: bool
) -> str:
    """No born-unfunded work, and a loan never displaces anyone (DESIGN decision 9).

    Cover is a fast, conservative planner; this replays the matching with the new leases to be
    sure the ledger will agree with it.  Returns "" when fine, else the reason.
    """
    inputs = state.funding_inputs()
    view = state.meter.hours_view(inputs.index, inputs.period_hours)
    runs = dict(state.runs)
    runs[run.key] = run
    admitted = dict(state.admitted)
    admitted.setdefault(run.key, now)
    before = fill(inputs.index, inputs.leases, runs, admitted, inputs.node_labels, now, view)
    after = fill(
        inputs.index, [*inputs.leases, *new], runs, admitted, inputs.node_labels, now, view
    )
    unfunded = [x for x in new if after.payer.get(x.id) is None]
    if unfunded:
        return f"{sum(x.width for x in unfunded)} GPUs would be born unfunded"
    if borrowed:
        displaced = [
            lid for lid, env in before.payer.items() if env is not None and after.payer[lid] is None
        ]
        if displaced:
            return "a loan may only use free headroom"
    return ""


def admit(
    state: FleetState, run: Run, now: Instant, planner: Planner, settings: Settings
) -> Admission:
    """Try to start ``run`` now: follow gate, owner, pack, cover, verify, mint.

    On failure the returned events put the run into its waiting state (a reservation, or
    Unfunded/Unschedulable with the reason) unless it already has a pending reservation.
    """
    out = Admission()
    key = run.key
    gate = follow_gate(state, run, now)
    if gate is not None:
        out.events.extend(gate)
        out.note = "follow gate"
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
            _status(key, now, "Pending", "Unfunded", f"no funding principal: {why}; held, not cancelled")
        )
        return out
    try:
        topology, request, packed = plan_pack(state, run, planner)
    except TopologyError as exc:
        out.events.append(_status(key, now, "Pending", "Unschedulable", str(exc)))
        return out
    if isinstance(packed, PackError):
        out.pack_error = packed
        if packed.kind is PackErrorKind.INVALID_REQUEST:
            out.events.append(_status(key, now, "Pending", "Unschedulable", packed.message))
            return out
        out.events.extend(_reserve(state, run, now, settings, topology, None, packed, None))
        return out
    out.plan = packed
    ev = evaluate(state.meter, state.funding_inputs(), now)
    already_borrowed = ev.runs.get(key).borrowed if key in ev.runs else 0  # type: ignore[union-attr]
    quantity = packed.total_gpus + packed.total_spares
    creq = CoverRequest(
        run=run,
        quantity=quantity,
        location=_first_location(topology, packed),
        now=now,
        admitted=state.admitted.get(key, now),
        already_borrowed=already_borrowed,
    )
    hours = state.meter.hours_view(index, settings.period_hours)
    result = cover(
        index,
        ev,
        creq,
        remaining_hours=hours.remaining_envelope,
        remaining_cap_hours=hours.remaining_cap,
        period_hours=settings.period_hours,
    )
    out.cover_result = result
    if isinstance(result, CoverFailure):
        if result.reason is CoverReason.INVALID_REQUEST:
            out.events.append(_status(key, now, "Pending", "Unfunded", result.message))
            return out
        out.events.extend(_reserve(state, run, now, settings, topology, packed, None, result))
        return out
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, packed, segments, now)
    problem = _verify_funded(state, run, leases, now, result.borrowed > 0)
    if problem:
        failure = CoverFailure(
            CoverReason.INSUFFICIENT_CAPACITY, problem, quantity, 0, result.attempts
        )
        out.cover_result = failure
        out.events.extend(_reserve(state, run, now, settings, topology, packed, None, failure))
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
    events.append(_status(run.key, now, "Running", "GangBound", msg))
    for res in sorted(state.reservations.values(), key=lambda r: r.name):
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


def _reserve(
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
        nodes = ()
    else:
        domains = topology.domains()
        scope = domains[0].key if domains else ""
        nodes = ()
    if not scope and not nodes:
        why = pack_error.message if pack_error is not None else "no matching domain"
        return [_status(key, now, "Pending", "Unschedulable", f"no capacity in any matching domain: {why}")]
    scope_labels = dict(zip(("region", "cluster", "fabric.domain"), scope.split("/"), strict=False))
    candidates = [
        e
        for e in index.of_owner(owner, run.flavor)
        if all(v == "*" or scope_labels.get(k, v) == v for k, v in e.selector.items())
    ]
    candidates.sort(key=lambda e: e.key.envelope)
    paying = candidates[0] if candidates else None
    if paying is not None and paying.start is not None and paying.start > now and not (
        paying.pre_reservations
    ):
        return [
            _status(
                key,
                now,
                "Pending",
                "Unschedulable",
                f"reservation planning failed: envelope {paying.key} does not allow "
                "reservations before its window",
            )
        ]
    ev = evaluate(state.meter, state.funding_inputs(), now)
    confidence = "conservative"
    if pack_error is not None:
        kind = "capacity"
        deficit = max(1, pack_error.deficit) if pack_error.deficit else run.spec.resources.total_gpus
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
        _status(
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


def activate(
    state: FleetState, res: Reservation, now: Instant, planner: Planner, settings: Settings
) -> list[Event]:
    """A reservation fell due: start the run, start it unfunded, or keep waiting."""
    run = state.runs.get(res.run)
    status = state.status.get(res.run)
    if run is None:
        return [ReservationReleased(at=now, name=res.name, state="Failed", reason="run deleted")]
    if status is not None and status.phase in (*TERMINAL, "Running"):
        return [ReservationReleased(at=now, name=res.name, reason="Superseded")]
    attempt = admit(state, run, now, planner, settings)
    if attempt.started:
        return attempt.events
    if res.kind == "budget" and attempt.plan is not None and isinstance(
        attempt.cover_result, CoverFailure
    ):
        # Budget-only wait: capacity is there, the reachable envelopes are committed.  Start the
        # run unfunded, cutting nobody; it is re-funded by arithmetic when quota returns.
        env_key = _paying_key(state, res)
        owner = state.index.envelopes[env_key].owner if env_key is not None else ""
        quantity = attempt.plan.total_gpus + attempt.plan.total_spares
        leases = mint_leases(
            state, run, attempt.plan, [(env_key, owner, quantity)], now, MintReason.PROMISE
        )
        events = _start_events(state, run, leases, now, f"reservation {res.name} activated; started unfunded")
        return events
    return [ReservationReleased(at=now, name=res.name, reason="Superseded"), *attempt.events] if (
        any(isinstance(e, ReservationCreated) for e in attempt.events)
    ) else attempt.events


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
        return _fail_events(state, run.key, now, "FollowCycle", "follow cycle: " + " -> ".join(cycle))
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
            return _fail_events(state, run.key, now, "UpstreamFailed", f"upstream failed: {listing}")
        deadline_raw = current.detail.get("followDeadline") if current is not None else None
        deadline = (
            int(deadline_raw)  # type: ignore[call-overload]
            if deadline_raw is not None
            else now + parse_duration(follow.upstream_failure_grace)
        )
        if now >= deadline:
            return _fail_events(
                state, run.key, now, "UpstreamFailed", f"upstream failed and grace expired: {listing}"
            )
        msg = (
            f"waiting: upstream failed ({listing}); fails at {format_instant(deadline)} "
            "if unresolved"
        )
        if current is not None and current.message == msg:
            return []
        return [_status(run.key, now, "Waiting", "FollowWait", msg, followDeadline=deadline)]
    if pending:
        msg = "waiting for: " + ", ".join(pending)
        if current is not None and current.message == msg:
            return []
        return [_status(run.key, now, "Waiting", "FollowWait", msg)]
    return None


def _follow_cycle(state: FleetState, run: Run) -> list[str]:
    ns = run.metadata.namespace
    path: list[str] = []

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

    path = walk(run.metadata.name, ())
    return path


def _fail_events(
    state: FleetState, key: str, now: Instant, reason: str, message: str, closure: str = "RunFailed"
) -> list[Event]:
    events: list[Event] = [
        LeaseClosed(at=now, lease=lease.id, reason=closure)
        for lease in state.leases_of(key, open_only=True)
    ]
    events.append(_status(key, now, "Failed", reason, message))
    for res in sorted(state.reservations.values(), key=lambda r: r.name):
        if res.run == key and res.state == "Pending":
            events.append(ReservationReleased(at=now, name=res.name, reason="run failed"))
    return events


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
                for r in sorted(self.state.reservations.values(), key=lambda r: r.name)
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
            _status(key, at, "Completed", "AllSucceeded", "run completed: all active pods succeeded")
        )
        return self.commit(events) + self.reconcile(at)

    def fail(self, key: str, at: Instant) -> list[Event]:
        self._require_running(key)
        events = _fail_events(
            self.state, key, at, "WorkloadFailed", "workload failed; failing the gang", "WorkloadFailed"
        )
        return self.commit(events) + self.reconcile(at)

    def set_node_health(self, node: str, health: NodeHealth, at: Instant) -> list[Event]:
        if node not in self.state.nodes:
            raise CommandError(f"node {node} not found")
        return self.commit([NodeHealthChanged(at=at, node=node, health=health)]) + self.reconcile(at)

    def shrink(self, key: str, desired: int, at: Instant) -> list[Event]:
        run = self.state.runs.get(key)
        if run is None:
            raise CommandError(f"run {key} not found")
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
        """The earliest instant after ``after`` at which something falls due by itself."""
        times = [
            r.earliest_start
            for r in self.state.reservations.values()
            if r.state == "Pending" and r.earliest_start > after
        ]
        times += [
            x.end for x in self.state.open_leases.values() if x.end is not None and x.end > after
        ]
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
        """Everything due at ``now``: expiries, then activations, then pending admissions."""
        state = self.state
        done: list[Event] = []
        if now > state.clock:
            state.clock = now
        expired = sorted(
            (x for x in state.open_leases.values() if x.end is not None and x.end <= now),
            key=lambda x: x.id,
        )
        for run_key in sorted({x.run for x in expired}):
            done += self.commit(
                _fail_events(state, run_key, now, "Expired", "reached spec.runtime.maxDuration", "Expired")
            )
        due = sorted(
            (r for r in state.reservations.values() if r.state == "Pending" and r.earliest_start <= now),
            key=lambda r: (r.earliest_start, r.name),
        )
        for res in due:
            if state.reservations[res.name].state != "Pending":
                continue
            done += self.commit(activate(state, res, now, self.planner, self.settings))
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
        return done


def _same_status(state: FleetState, e: Event) -> bool:
    """Skip a status write that changes nothing (keeps the ledger free of no-op churn)."""
    if not isinstance(e, RunStatusChanged):
        return False
    cur = state.status.get(e.run)
    return cur is not None and (cur.phase, cur.reason, cur.message) == (e.phase, e.reason, e.message)
