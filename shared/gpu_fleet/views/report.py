"""The report: one JSON-able picture of the fleet at an instant (scenario-format.md).

Nodes, budgets with their envelope use, runs with phase and funding, leases, reservations and the
event history, all built from folded state.  The scenario runner prints it, the manager serves it
(``fleet.api.report``) and the run views read from it, so a user sees the same numbers everywhere.
"""

from __future__ import annotations

from typing import Any

from gpu_fleet.core.funding import Evaluation, evaluate
from gpu_fleet.core.ledger import (
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    ReservationCreated,
    ReservationReleased,
    RunStatusChanged,
)
from gpu_fleet.core.model import EnvelopeKey, Instant, Lease, LeaseRole, MintReason
from gpu_fleet.core.timeutil import format_instant


def _payer_json(state: FleetState, key: EnvelopeKey | None) -> dict[str, str] | None:
    if key is None:
        return None
    info = state.index.envelopes.get(key)
    return {
        "namespace": key.namespace,
        "budget": key.budget,
        "envelope": key.envelope,
        "owner": info.owner if info is not None else "",
    }


def _lease_json(state: FleetState, lease: Lease, ev: Evaluation) -> dict[str, Any]:
    open_ = lease.is_open
    minted = lease.minted_payer
    return {
        "id": lease.id,
        "run": lease.run,
        "node": lease.node,
        "slots": list(lease.slots),
        "role": lease.role.value,
        "group": lease.group,
        "reason": lease.reason.value,
        "payer": _payer_json(state, ev.lease_payer(lease.id)) if open_ else None,
        "mintedPayer": (
            {
                "namespace": minted.namespace,
                "budget": minted.budget,
                "envelope": minted.envelope,
                "owner": minted.owner,
            }
            if minted is not None
            else None
        ),
        "class": ev.lease_class(lease.id).value if open_ else None,
        "start": format_instant(lease.start),
        "end": format_instant(lease.end) if lease.end is not None else None,
        "closedAt": format_instant(lease.closed_at) if lease.closed_at is not None else None,
        "closureReason": lease.closure_reason,
    }


def build_report(state: FleetState, label: str, at: Instant) -> dict[str, Any]:
    ev = evaluate(state.meter, state.funding_inputs(), at)
    runs = []
    for key in sorted(state.runs):
        run = state.runs[key]
        st = state.status.get(key)
        open_leases = state.leases_of(key, open_only=True)
        allocated = sum(x.width for x in open_leases if x.role is LeaseRole.ACTIVE)
        spares = sum(x.width for x in open_leases if x.role is LeaseRole.SPARE)
        rf = ev.runs.get(key)
        res = state.pending_reservation(key)
        m = run.spec.malleable
        runs.append(
            {
                "namespace": run.metadata.namespace,
                "name": run.metadata.name,
                "phase": st.phase if st else "Pending",
                "reason": st.reason if st else "",
                "message": st.message if st else "",
                "width": {
                    "min": run.min_width,
                    "max": m.max_total_gpus if m else run.spec.resources.total_gpus,
                    "desired": run.desired_width,
                    "allocated": allocated,
                },
                "spares": spares,
                "funding": {
                    "owned": rf.owned if rf else 0,
                    "shared": rf.shared if rf else 0,
                    "borrowed": rf.borrowed if rf else 0,
                    "unfunded": rf.unfunded if rf else 0,
                },
                "lenders": [
                    {"owner": o, "gpus": g} for o, g in sorted((rf.lenders if rf else {}).items())
                ],
                "gpuHours": {
                    c.value: round(h, 6) for c, h in sorted((rf.hours if rf else {}).items())
                },
                "eta": format_instant(state.etas[key]) if key in state.etas else None,
                "reservation": res.name if res else None,
                "earliestStart": format_instant(res.earliest_start) if res else None,
            }
        )
    leases = [
        _lease_json(state, lease, ev)
        for lease in sorted(state.leases.values(), key=lambda x: (x.start, x.id))
    ]
    reservations = [
        {
            "name": r.name,
            "run": r.run,
            "kind": r.kind,
            "state": r.state,
            "earliestStart": format_instant(r.earliest_start),
            "deficitGPUs": r.deficit_gpus,
            "confidence": r.confidence,
            "reason": r.reason,
            "remedies": list(r.remedies),
            "payingEnvelope": r.paying_envelope,
            "intendedSlice": {"domain": r.domain, "nodes": list(r.nodes)},
            "createdAt": format_instant(r.created_at),
            "releasedAt": format_instant(r.released_at) if r.released_at is not None else None,
        }
        for r in sorted(state.reservations.values(), key=lambda r: (r.created_at, r.name))
    ]
    budgets = []
    for bkey in sorted(state.budgets):
        b = state.budgets[bkey]
        ns, name = b.metadata.namespace, b.metadata.name
        envs = []
        for e in b.spec.envelopes:
            u = ev.envelopes[EnvelopeKey(ns, name, e.name)]
            envs.append(
                {
                    "name": e.name,
                    "flavor": e.flavor,
                    "concurrency": u.concurrency,
                    "headroom": u.headroom,
                    "owned": u.owned,
                    "shared": u.shared,
                    "borrowed": u.borrowed,
                    "unfunded": u.unfunded,
                    "spare": u.spare,
                    "gpuHoursUsed": round(u.gpu_hours_used, 6),
                    "gpuHours": u.gpu_hours,
                }
            )
        caps = []
        for c in b.spec.aggregate_caps:
            cu = ev.caps[f"{ns}/{name}/{c.name}"]
            caps.append(
                {
                    "name": c.name,
                    "flavor": c.flavor,
                    "maxConcurrency": c.max_concurrency,
                    "funded": cu.funded,
                    "headroom": cu.headroom,
                    "gpuHoursUsed": round(cu.gpu_hours_used, 6),
                }
            )
        budgets.append(
            {
                "namespace": ns,
                "name": name,
                "owner": b.spec.owner,
                "envelopes": envs,
                "aggregateCaps": caps,
            }
        )
    return {
        "label": label,
        "at": format_instant(at),
        "runs": runs,
        "leases": leases,
        "reservations": reservations,
        "budgets": budgets,
        "events": [e for x in state.history for e in _event_json(state, x)],
    }


def _event_json(state: FleetState, e: Event) -> list[dict[str, Any]]:
    """The report rows one ledger event contributes (none, one, or two for a preemption)."""
    match e:
        case LeaseClosed(lease=lease_id, reason=reason):
            lease = state.leases.get(lease_id)
            first: dict[str, Any] = {
                "at": format_instant(e.at),
                "type": "LeaseClosed",
                "run": lease.run if lease else None,
                "detail": {"lease": lease_id, "closureReason": reason},
            }
            notice = state.preemptions.get(lease_id)
            rows: list[dict[str, Any]] = [first]
            if notice is not None and notice.reason == reason:
                # The preemption as the owner is told about it (DESIGN decisions 3 and 8): the
                # attested seed and the conflict set come from the notice on the ledger.
                rows.append(
                    {
                        "at": format_instant(e.at),
                        "type": "Preempted",
                        "run": notice.run,
                        "detail": {
                            "lease": lease_id,
                            "closureReason": reason,
                            "kind": notice.kind,
                            "seed": notice.seed,
                            "conflictSet": list(notice.conflict_set),
                            "beneficiary": notice.beneficiary,
                            "source": notice.source,
                        },
                    }
                )
            return rows
        case _:
            row = _single_event_json(state, e)
            return [row] if row is not None else []


def _single_event_json(state: FleetState, e: Event) -> dict[str, Any] | None:
    match e:
        case RunStatusChanged(run=run, reason=reason, message=msg, phase=phase):
            return {
                "at": format_instant(e.at),
                "type": reason,
                "run": run,
                "detail": {"phase": phase, "message": msg},
            }
        case LeasePreemptionScheduled() if e.deadline > e.at:
            return {
                "at": format_instant(e.at),
                "type": "PreemptionScheduled",
                "run": e.run,
                "detail": {
                    "lease": e.lease,
                    "closureReason": e.reason,
                    "deadline": format_instant(e.deadline),
                    "kind": e.kind,
                    "seed": e.seed,
                    "conflictSet": list(e.conflict_set),
                    "beneficiary": e.beneficiary,
                },
            }
        case LeaseMinted(lease=lease) if lease.reason is MintReason.SWAP:
            return {
                "at": format_instant(e.at),
                "type": "NodeFailureSwap",
                "run": lease.run,
                "detail": {
                    "lease": lease.id,
                    "node": lease.node,
                    "slots": list(lease.slots),
                    "group": lease.group,
                },
            }
        case ReservationCreated(reservation=r):
            return {
                "at": format_instant(e.at),
                "type": "ReservationCreated",
                "run": r.run,
                "detail": {
                    "reservation": r.name,
                    "earliestStart": format_instant(r.earliest_start),
                },
            }
        case ReservationReleased(name=name, state=st, reason=reason):
            res = state.reservations.get(name)
            return {
                "at": format_instant(e.at),
                "type": "ReservationReleased",
                "run": res.run if res else None,
                "detail": {"reservation": name, "state": st, "reason": reason},
            }
        case _:
            return None
