"""The fold: how each ledger event changes ``FleetState``, the checks that refuse an event
which would break an invariant (changing nothing), and ``check_invariants`` over a whole state.

Every state change is an event; nothing else mutates state.  The manager and the scenario runner
both call ``fold`` and so cannot disagree.  ``check_invariants`` is callable by tests and by
services after every commit.  (``state`` holds what is folded, and the caches and indexes
the fold keeps current.)
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from gpu_fleet.core.funding.metering import (
    advance_meter,
)
from gpu_fleet.core.ledger.events import (
    BudgetApplied,
    BudgetDeleted,
    ChannelApplied,
    ChannelDeleted,
    Event,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionCanceled,
    LeasePreemptionScheduled,
    NodeHealthChanged,
    NodeRegistered,
    ReservationCreated,
    ReservationReleased,
    RunDeleted,
    RunEtaReported,
    RunRestarted,
    RunRetried,
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
)
from gpu_fleet.core.ledger.state import FleetState, LedgerError, RunStatus, _ordinal
from gpu_fleet.core.model import (
    EnvelopeKey,
    Instant,
)


def _advance_clock(state: FleetState, at: Instant) -> None:
    """Charge GPU-hours up to ``at`` with the funding as it stood, then move the clock."""
    if at < state.clock:
        raise LedgerError(f"event at {at} is earlier than the ledger clock {state.clock}")
    if state.metered and at > state.meter.t:
        if state.open_leases:
            first = state.current_fill(state.meter.t)
            last = advance_meter(state.meter, state.funding_inputs(), at, first=first)
            # The matching of the last piece holds at ``at`` too if nothing moves funding in
            # between but the hours it charged: keep it, made under the meter at the piece's
            # start, so the next decision and advance start from it (shown first to hold under
            # the meter moved on, where GPU-hours are set) instead of matching again.
            if (
                last is not None
                and state.incremental
                and state._nothing_changes_between(last[0], at)
            ):
                state._remember(at, last[1], advanced=False, meter_t=last[0])
        state.meter.t = float(at)
    state.clock = at


def fold(state: FleetState, event: Event) -> None:
    """Apply one event; raise ``LedgerError`` (changing nothing) if it breaks an invariant."""
    _check(state, event)
    _advance_clock(state, event.at)
    match event:
        case NodeRegistered(node=node):
            state.nodes[node.name] = node
            state._nodes_changed()
        case NodeHealthChanged(node=name, health=health):
            state.nodes[name] = msgspec.structs.replace(state.nodes[name], health=health)
            state._nodes_changed()
        case BudgetApplied(budget=budget):
            if budget.key not in state.budgets:
                state._object_count(budget.key, 1)
            state.budgets[budget.key] = budget
            state._index = None
            state._waiting_line = None  # who may fund whom changed: every run is re-filed
        case BudgetDeleted(namespace=ns, name=name):
            if state.budgets.pop(f"{ns}/{name}", None) is not None:
                state._object_count(f"{ns}/{name}", -1)
            state._index = None
            state._waiting_line = None
        case RunSubmitted(run=run):
            before = state.runs.get(run.key)
            if before is None:
                state._object_count(run.key, 1)
            state.runs[run.key] = run
            state.admitted[run.key] = event.at
            state.status[run.key] = RunStatus()
            state.retries.pop(run.key, None)
            state.restarts.pop(run.key, None)
            state._index_run(run.key, before)
        case RunUpdated(run=run):
            before = state.runs.get(run.key)
            if before is None:
                state._object_count(run.key, 1)
            state.runs[run.key] = run
            state._index_run(run.key, before)
        case RunEtaReported(run=key, eta=eta):
            state.etas[key] = eta
        case RunDeleted(run=key):
            before = state.runs.pop(key, None)
            if before is not None:
                state._object_count(key, -1)
            state.status.pop(key, None)
            state.etas.pop(key, None)
            state.retries.pop(key, None)
            state.restarts.pop(key, None)
            state._index_run(key, before)
        case RunStatusChanged(run=key, phase=phase, reason=reason, message=msg, detail=detail):
            state.status[key] = RunStatus(phase, reason, msg, dict(detail))
            state._index_run(key)
        case LeaseMinted(lease=lease):
            state.leases[lease.id] = lease
            state.open_leases[lease.id] = lease
            state._open_tuple = None
            state._run_leases[lease.run].append(lease.id)
            state._open_by_run[lease.run][lease.id] = lease
            if lease.end is not None:
                bisect.insort(state._scheduled_ends, (lease.end, lease.id))
            held = state.held_by_node.setdefault(lease.node, set())
            for s in lease.slots:
                state.slot_holder[s] = lease.id
                held.add(_ordinal(s))
            state._slots_changed(lease.node)
        case LeaseClosed(lease=lease_id, reason=reason):
            closed = msgspec.structs.replace(
                state.leases[lease_id], closed_at=event.at, closure_reason=reason
            )
            state.leases[lease_id] = closed
            del state.open_leases[lease_id]
            state._open_tuple = None
            state._pending_preemptions.pop(lease_id, None)
            if closed.end is not None:
                ends = state._scheduled_ends
                i = bisect.bisect_left(ends, (closed.end, lease_id))
                if i < len(ends) and ends[i] == (closed.end, lease_id):
                    del ends[i]
            still_open = state._open_by_run.get(closed.run)
            if still_open is not None:
                still_open.pop(lease_id, None)
                if not still_open:
                    del state._open_by_run[closed.run]
            for s in closed.slots:
                if state.slot_holder.get(s) == lease_id:
                    del state.slot_holder[s]
                    state.held_by_node.get(closed.node, set()).discard(_ordinal(s))
            state._slots_changed(closed.node)
        case ReservationCreated(reservation=res):
            state.reservations[res.name] = res
            if res.state == "Pending":
                was = state.pending_reservations.get(res.name)
                if was is not None:  # overwritten in place: it keeps its place in line
                    seq = state._promise[res.name]
                    state._drop_pending(was)
                    state._promise[res.name] = seq
                state.pending_reservations[res.name] = res
                state._add_pending(res)
            state.reservations_epoch += 1
        case ReservationReleased(name=name, state=new_state, reason=reason):
            old = state.reservations[name]
            state.reservations[name] = msgspec.structs.replace(
                old, state=new_state, released_at=event.at, reason=reason or old.reason
            )
            was = state.pending_reservations.pop(name, None)
            if was is not None:
                state._drop_pending(was)
            state.reservations_epoch += 1
        case LeasePreemptionScheduled(lease=lease_id):
            state.preemptions[lease_id] = event
            state._pending_preemptions[lease_id] = event
        case LeasePreemptionCanceled(lease=lease_id):
            state.preemptions.pop(lease_id, None)
            state._pending_preemptions.pop(lease_id, None)
        case RunRetried(run=key):
            state.retries[key] = event
        case RunRestarted(run=key, attempt=attempt):
            state.restarts[key] = attempt
        case ChannelApplied(channel=channel):
            if channel.key not in state.channels:
                state._object_count(channel.key, 1)
            state.channels[channel.key] = channel
        case ChannelDeleted(namespace=ns, name=name):
            if state.channels.pop(f"{ns}/{name}", None) is not None:
                state._object_count(f"{ns}/{name}", -1)
    if state._waiting_line is not None:
        touched = run_touched(state, event)
        if touched is not None:
            state._waiting_line.dirty.add(touched)
    state.history.append(event)
    state.version += 1
    if not isinstance(event, _NEUTRAL) or (
        isinstance(event, RunSubmitted) and state.leases_of(event.run.key, open_only=True)
    ):
        state.funding_epoch += 1
        if state._known is not None:
            log = state._funding_log
            if isinstance(event, LeaseMinted):
                log.append((state.funding_epoch, "mint", event.lease))
            elif isinstance(event, LeaseClosed):
                log.append((state.funding_epoch, "close", state.leases[event.lease]))
            else:
                log.append((state.funding_epoch, "other", None))
            if len(log) > _LOG_LIMIT:
                state._known = None
                state._funding_log = []


def run_touched(state: FleetState, event: Event) -> str | None:
    """The run whose spec, status, open leases or pending reservations ``event`` changes (or
    would, folded on ``state``): what the waiting line and the reconcile loop's order read of
    a run.  Every such change names its run; the Budgets, the other thing they read, are
    handled by dropping the line.  ``None`` also for a lease or reservation ``state`` does not
    know yet (asked before a batch that makes it is folded: the event making it names the run).
    """
    of = _RUN_OF.get(type(event))  # one lookup per event: the fold asks it for every event
    return of(state, event) if of is not None else None


def _closing(state: FleetState, e: LeaseClosed) -> str | None:
    lease = state.leases.get(e.lease)
    return lease.run if lease is not None else None


def _releasing(state: FleetState, e: ReservationReleased) -> str | None:
    res = state.reservations.get(e.name)
    return res.run if res is not None else None


_RUN_OF: dict[type, Callable[[FleetState, Any], str | None]] = {
    RunSubmitted: lambda _, e: e.run.key,
    RunUpdated: lambda _, e: e.run.key,
    RunDeleted: lambda _, e: e.run,
    RunStatusChanged: lambda _, e: e.run,
    LeaseMinted: lambda _, e: e.lease.run,
    LeaseClosed: _closing,
    ReservationCreated: lambda _, e: e.reservation.run,
    ReservationReleased: _releasing,
}


_LOG_LIMIT = 4096  # changes replayed on a known matching at most; beyond, match afresh

_NEUTRAL = (
    RunEtaReported,
    RunSubmitted,  # a new run holds no lease yet, so nobody's funding can change
    RunStatusChanged,
    ReservationCreated,
    ReservationReleased,
    LeasePreemptionScheduled,
    LeasePreemptionCanceled,
    ChannelApplied,
    ChannelDeleted,
    RunRetried,
    RunRestarted,
)
"""Events that never change who pays for an open lease."""


def _check(state: FleetState, event: Event) -> None:
    """Invariants that a single event could break, checked before anything changes."""
    match event:
        case LeaseMinted(lease=lease):
            if lease.id in state.leases:
                raise LedgerError(f"lease {lease.id} already exists")
            if lease.run not in state.runs:
                raise LedgerError(f"lease {lease.id}: run {lease.run} does not exist")
            if state.status.get(lease.run, RunStatus()).phase in ("Completed", "Failed"):
                raise LedgerError(f"lease {lease.id}: run {lease.run} is terminal")
            if not lease.slots:
                raise LedgerError(f"lease {lease.id}: holds no slot")
            node = state.nodes.get(lease.node)
            if node is None:
                raise LedgerError(f"lease {lease.id}: unknown node {lease.node}")
            for s in lease.slots:
                n, _, ordinal = s.rpartition("#")
                if n != lease.node or not ordinal.isdigit() or int(ordinal) >= node.gpus:
                    raise LedgerError(f"lease {lease.id}: slot {s} is not a GPU of {lease.node}")
                holder = state.slot_holder.get(s)
                if holder is not None:
                    raise LedgerError(f"lease {lease.id}: slot {s} is held by lease {holder}")
        case RunEtaReported(run=key):
            if key not in state.runs:
                raise LedgerError(f"eta for run {key}: run does not exist")
        case RunRetried(run=key) | RunRestarted(run=key):
            if key not in state.runs:
                raise LedgerError(f"retry of run {key}: run does not exist")
        case LeaseClosed(lease=lease_id):
            known = state.leases.get(lease_id)
            if known is None:
                raise LedgerError(f"lease {lease_id} does not exist")
            if known.closure_reason is not None:
                raise LedgerError(f"lease {lease_id} is already closed ({known.closure_reason})")
        case NodeHealthChanged(node=name):
            if name not in state.nodes:
                raise LedgerError(f"unknown node {name}")
        case ReservationReleased(name=name):
            if name not in state.reservations:
                raise LedgerError(f"unknown reservation {name}")
        case LeasePreemptionScheduled(lease=lease_id, deadline=deadline):
            if lease_id not in state.open_leases:
                raise LedgerError(f"lease {lease_id} is not open; it cannot be preempted")
            if deadline < event.at:
                raise LedgerError(f"lease {lease_id}: preemption deadline before its notice")
            if lease_id in state.preemptions:
                raise LedgerError(f"lease {lease_id} already has a preemption scheduled")
        case LeasePreemptionCanceled(lease=lease_id):
            if lease_id not in state.preemptions or lease_id not in state.open_leases:
                raise LedgerError(f"lease {lease_id} has no pending preemption to cancel")
        case _:
            pass


def fold_all(events: Iterable[Event], period_hours: float = 24.0) -> FleetState:
    state = FleetState(settings_period_hours=period_hours)
    for e in events:
        fold(state, e)
    return state


# ------------------------------------------------------------------------------------------
# Invariant checker: callable by tests and by services after every commit
# ------------------------------------------------------------------------------------------


def check_invariants(state: FleetState) -> list[str]:
    """Every violated invariant, as a sentence; empty means healthy."""
    problems: list[str] = []
    seen: dict[str, str] = {}
    for lease in sorted(state.open_leases.values(), key=lambda x: x.id):
        for s in lease.slots:
            if s in seen:
                problems.append(f"slot {s} held by both {seen[s]} and {lease.id}")
            seen[s] = lease.id
        run_status = state.status.get(lease.run)
        if lease.run not in state.runs:
            problems.append(f"open lease {lease.id} belongs to missing run {lease.run}")
        elif run_status is not None and run_status.phase in ("Completed", "Failed"):
            problems.append(f"open lease {lease.id} belongs to terminal run {lease.run}")
    for lease in state.leases.values():
        if (lease.closure_reason is None) != (lease.closed_at is None):
            problems.append(f"lease {lease.id} closure is half-stamped")
    if state.open_leases or state.budgets:
        ev = state.evaluation(state.clock)
        for key, usage in sorted(ev.envelopes.items()):
            if usage.funded > usage.concurrency:
                problems.append(
                    f"envelope {key} funds {usage.funded} GPUs over its concurrency "
                    f"{usage.concurrency}"
                )
            if usage.gpu_hours is not None and usage.gpu_hours_used > usage.gpu_hours + 1e-6:
                problems.append(
                    f"envelope {key} consumed {usage.gpu_hours_used:.4f} GPU-hours over its "
                    f"allowance {usage.gpu_hours}"
                )
        for cap_id, cap in sorted(ev.caps.items()):
            if cap.max_concurrency is not None and cap.funded > cap.max_concurrency:
                problems.append(
                    f"aggregate cap {cap_id} funds {cap.funded} over {cap.max_concurrency}"
                )
            if cap.gpu_hours is not None and cap.gpu_hours_used > cap.gpu_hours + 1e-6:
                problems.append(f"aggregate cap {cap_id} overdrawn on GPU-hours")
        lent: dict[EnvelopeKey, int] = {}
        for lease_id, paying in ev.fill.payer.items():
            if paying is None or ev.lease_class(lease_id).value != "borrowed":
                continue
            lent[paying] = lent.get(paying, 0) + state.open_leases[lease_id].width
        for lender, width in sorted(lent.items()):
            info = state.index.envelopes[lender]
            if info.lending_max is not None and width > info.lending_max:
                problems.append(f"envelope {lender} lends {width} over {info.lending_max}")
    return problems
