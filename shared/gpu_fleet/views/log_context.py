"""The context a decision's log line carries: run, lease, envelope, reservation, reason.

The manager logs one ``ledger.event`` line per event it appends, with the ledger sequence and
what this function extracts, so an operator can ``grep`` a run's or a lease's whole story in
the logs and match each line to the ledger.  Pure and total: an event type without a rule
still yields its type (the caller adds ``seq``).
"""

from __future__ import annotations

from typing import Any

from gpu_fleet.core.ledger import (
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
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
)


def event_context(event: Event) -> dict[str, Any]:
    """Key fields of one ledger event for a structured log line."""
    out: dict[str, Any] = {"type": type(event).__name__, "at": event.at}
    match event:
        case RunSubmitted(run=run) | RunUpdated(run=run):
            out.update(run=run.key, gpus=run.desired_width)
        case RunDeleted(run=key) | RunEtaReported(run=key):
            out["run"] = key
        case RunStatusChanged(run=key, phase=phase, reason=reason):
            out.update(run=key, phase=phase, reason=reason)
        case LeaseMinted(lease=lease):
            payer = lease.minted_payer
            out.update(
                run=lease.run,
                lease=lease.id,
                node=lease.node,
                gpus=lease.width,
                role=lease.role.value,
                envelope=str(payer.key) if payer is not None else None,
            )
        case LeaseClosed(lease=lease_id, reason=reason):
            out.update(lease=lease_id, reason=reason)
        case LeasePreemptionScheduled():
            out.update(
                run=event.run,
                lease=event.lease,
                kind=event.kind,
                reason=event.reason,
                deadline=event.deadline,
                seed=event.seed,
                beneficiary=event.beneficiary,
            )
        case LeasePreemptionCanceled(lease=lease_id, reason=reason):
            out.update(lease=lease_id, reason=reason)
        case ReservationCreated(reservation=r):
            out.update(
                run=r.run,
                reservation=r.name,
                kind=r.kind,
                earliest_start=r.earliest_start,
                deficit_gpus=r.deficit_gpus,
                envelope=r.paying_envelope or None,
            )
        case ReservationReleased(name=name, state=state, reason=reason):
            out.update(reservation=name, state=state, reason=reason)
        case BudgetApplied(budget=budget):
            out.update(budget=budget.key, owner=budget.spec.owner)
        case BudgetDeleted(namespace=ns, name=name):
            out["budget"] = f"{ns}/{name}"
        case NodeRegistered(node=node):
            out.update(node=node.name, gpus=node.gpus)
        case NodeHealthChanged(node=name, health=health):
            out.update(node=name, health=health.value)
        case ChannelApplied(channel=channel):
            out.update(channel=channel.key, format=channel.spec.format)
        case ChannelDeleted(namespace=ns, name=name):
            out["channel"] = f"{ns}/{name}"
    return {k: v for k, v in out.items() if v is not None}
