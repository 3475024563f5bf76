"""What to say about a ledger event: pure functions of the folded state, no I/O.

The notifier actor (``service``) folds each ledger message into its own ``FleetState`` and asks
this module what the message announces, *before* folding it (a closure needs the lease as it was).
Everything here is deterministic in the state and the event, so it is tested without NATS, and a
notifier that re-derives after a restart says exactly what it said before (same ids).

Teams are derived owners: the owner of the run's namespace in the notifier's own fold
(``state.index.family.owner_of``), ``_unbound`` when the namespace has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gpu_fleet.core.forecast import ForecastError, ForecastResult, forecast
from gpu_fleet.core.ledger import (
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    ReservationReleased,
    RunStatusChanged,
)
from gpu_fleet.core.model import NOTIFICATION_EVENTS, Instant, Lease, MintReason, Severity
from gpu_fleet.messages import notify
from gpu_fleet.runtime.ledger_packing import event_address

UNBOUND = "_unbound"
PREEMPTION_REASONS = ("RandomPreempt", "ReclaimUnfunded", "Shrink", "DropSpare")
"""Closure reasons that mean "the resolver took this lease away" (DESIGN decision 3)."""

RUN_EVENTS = {"GangBound": "run-admitted", "Reserved": "run-reserved", "Unfunded": "run-unfunded"}
"""RunStatusChanged reasons worth a notification (Completed and Failed go by phase)."""

PREEMPTION_NOTICE = "LeasePreemptionScheduled"
"""The notice event, matched by class name so the notifier survives its evolution."""


def team_of(state: FleetState, run: str) -> str:
    """The derived owner of the run's namespace, ``_unbound`` when nobody owns it."""
    return state.index.family.owner_of(namespace_of(run)) or UNBOUND


def namespace_of(run: str) -> str:
    return run.split("/", 1)[0] if "/" in run else "default"


def make_note(
    state: FleetState,
    note_id: str,
    event: str,
    run: str,
    *,
    at: Instant,
    seq: int,
    detail: dict[str, Any],
    lease: str | None = None,
    envelope: str | None = None,
    reason: str = "",
    severity: Severity | None = None,
    due: Instant | None = None,
    team: str | None = None,
    namespace: str | None = None,
) -> notify.Notification:
    """A notification with every common field filled the one way (team, namespace, severity)."""
    return notify.Notification(
        id=note_id,
        team=team if team is not None else team_of(state, run),
        event=event,
        run=run,
        lease=lease,
        at=at,
        detail=detail,
        seq=seq,
        envelope=envelope,
        reason=reason,
        severity=severity or NOTIFICATION_EVENTS.get(event, "info"),
        due=due,
        namespace=namespace if namespace is not None else namespace_of(run),
    )


def _note(
    state: FleetState,
    where: tuple[int, int],
    event: str,
    run: str,
    *,
    at: Instant,
    detail: dict[str, Any],
    lease: str | None = None,
    envelope: str | None = None,
    reason: str = "",
    due: Instant | None = None,
) -> notify.Notification:
    """A notification caused by the ledger event at ``where`` (message, index): id
    ``<address>:<event>:<lease or run>``, the address ``<seq>`` or ``<seq>.<index>``
    (``event_address``: a packed message holds several events, which may each say the same
    thing about the same run)."""
    seq, index = where
    return make_note(
        state,
        f"{event_address(seq, index)}:{event}:{lease or run}",
        event,
        run,
        at=at,
        seq=seq,
        detail=detail,
        lease=lease,
        envelope=envelope,
        reason=reason,
        due=due,
    )


def _run_event(ev: RunStatusChanged) -> str | None:
    if ev.phase == "Failed":
        return "run-failed"
    if ev.phase == "Completed":
        return "run-completed"
    return RUN_EVENTS.get(ev.reason)


def lease_detail(lease: Lease) -> dict[str, Any]:
    payer = lease.minted_payer
    return {
        "node": lease.node,
        "slots": list(lease.slots),
        "role": lease.role.value,
        "group": lease.group,
        "start": lease.start,
        "end": lease.end,
        "mintedPayer": str(payer.key) if payer is not None else None,
    }


def _notice_detail(notice: object) -> dict[str, Any]:
    """The preemption notice's fields, read by name (the event type may still evolve)."""
    fields = {
        "deadline": "deadline",
        "closureReason": "reason",
        "kind": "kind",
        "seed": "seed",
        "conflictSet": "conflict_set",
        "beneficiary": "beneficiary",
        "source": "source",
    }
    out: dict[str, Any] = {}
    for wire, attr in fields.items():
        value = getattr(notice, attr, None)
        if value is not None:
            out[wire] = list(value) if isinstance(value, tuple) else value
    return out


def _payer_of(lease: Lease) -> str | None:
    return str(lease.minted_payer.key) if lease.minted_payer is not None else None


def derive(state: FleetState, seq: int, event: Event, index: int = 0) -> list[notify.Notification]:
    """Notifications for one ledger event, the ``index``-th of message ``seq``, in a fixed
    order; ``state`` is before the fold."""
    match event:
        case RunStatusChanged():
            name = _run_event(event)
            if name is None:
                return []
            detail: dict[str, Any] = {
                "phase": event.phase,
                "reason": event.reason,
                "message": event.message,
            }
            if event.detail:
                detail["statusDetail"] = dict(event.detail)
            res = state.pending_reservation(event.run) if name == "run-reserved" else None
            due = None
            if res is not None:
                detail.update(
                    reservation=res.name,
                    kind=res.kind,
                    earliestStart=res.earliest_start,
                    deficitGPUs=res.deficit_gpus,
                    confidence=res.confidence,
                )
                due = res.earliest_start
            return [
                _note(
                    state,
                    (seq, index),
                    name,
                    event.run,
                    at=event.at,
                    detail=detail,
                    reason=event.reason,
                    due=due,
                )
            ]
        case LeaseMinted(lease=lease):
            detail = {"reason": lease.reason.value, **lease_detail(lease)}
            notes = [
                _note(
                    state,
                    (seq, index),
                    "lease-started",
                    lease.run,
                    at=event.at,
                    detail=detail,
                    lease=lease.id,
                    envelope=_payer_of(lease),
                    reason=lease.reason.value,
                    due=lease.end,
                )
            ]
            if lease.reason is MintReason.SWAP:
                notes.append(
                    _note(
                        state,
                        (seq, index),
                        "run-swapped",
                        lease.run,
                        at=event.at,
                        detail=detail,
                        lease=lease.id,
                        envelope=_payer_of(lease),
                        reason="NodeFailure: the group moved onto its spares",
                    )
                )
            return notes
        case LeaseClosed(lease=lease_id, reason=reason):
            known = state.leases.get(lease_id)
            if known is None:
                return []  # the fold refuses it too; nothing truthful to say
            detail = {"closureReason": reason, **lease_detail(known)}
            common: dict[str, Any] = {
                "at": event.at,
                "lease": lease_id,
                "envelope": _payer_of(known),
                "reason": reason,
            }
            notes = [_note(state, (seq, index), "lease-closed", known.run, detail=detail, **common)]
            if reason == "Expired":
                notes.append(
                    _note(
                        state,
                        (seq, index),
                        "lease-expired",
                        known.run,
                        detail=detail,
                        due=known.end,
                        **common,
                    )
                )
            if reason.startswith(PREEMPTION_REASONS):
                preempted: dict[str, Any] = {"stage": "closed", "closureReason": reason}
                notice = getattr(state, "preemptions", {}).get(lease_id)
                if notice is not None:
                    preempted.update({**_notice_detail(notice), "closureReason": reason})
                notes.append(
                    _note(state, (seq, index), "preempted", known.run, detail=preempted, **common)
                )
            return notes
        case ReservationReleased(name=res_name, reason="Activated"):
            res = state.reservations.get(res_name)
            if res is None:
                return []
            detail = {
                "reservation": res.name,
                "kind": res.kind,
                "earliestStart": res.earliest_start,
                "createdAt": res.created_at,
            }
            return [
                _note(
                    state,
                    (seq, index),
                    "reservation-activated",
                    res.run,
                    at=event.at,
                    detail=detail,
                    reason="Activated",
                    due=res.earliest_start,
                )
            ]
        case _ if type(event).__name__ == PREEMPTION_NOTICE:
            lease_id = str(getattr(event, "lease", ""))
            held = state.leases.get(lease_id)
            run = str(getattr(event, "run", "") or (held.run if held is not None else ""))
            if not run:
                return []
            detail = {"stage": "notice", **_notice_detail(event)}
            deadline = getattr(event, "deadline", None)
            return [
                _note(
                    state,
                    (seq, index),
                    "preempted",
                    run,
                    at=event.at,
                    detail=detail,
                    lease=lease_id,
                    envelope=_payer_of(held) if held is not None else None,
                    reason=str(getattr(event, "reason", "")),
                    due=deadline if isinstance(deadline, int) else None,
                )
            ]
        case _:
            return []


ForecastKey = tuple[Instant | None, Instant | None, Instant | None, str]
"""What a team is told about a forecast: earliest start, P50, P90, confidence."""


def forecast_changes(
    state: FleetState, now: Instant, announced: Mapping[str, ForecastKey]
) -> list[ForecastResult]:
    """Forecasts of runs waiting on a reservation that differ from what was last announced.

    Only runs with a pending reservation are forecast (a start is promised to them); the
    remedies are skipped.  Every forecast at one ledger version and instant shares one play of
    its flavor's queue, so this costs one walk per flavor plus a little per run.
    """
    out: list[ForecastResult] = []
    for key in sorted(state.status):
        st = state.status[key]
        if st.phase != "Pending" or state.pending_reservation(key) is None:
            continue
        try:
            result = forecast(state, key, now, remedies=False)
        except ForecastError:
            continue  # nothing to say (a broken topology is reported by plan and explain)
        if announced.get(key) != forecast_key(result):
            out.append(result)
    return out


def forecast_key(result: ForecastResult) -> ForecastKey:
    return (result.earliest_start, result.p50, result.p90, result.confidence)


def forecast_note(
    state: FleetState, seq: int, result: ForecastResult, at: Instant
) -> notify.Notification:
    return _note(
        state,
        (seq, 0),
        "run-forecast",
        result.run,
        at=at,
        detail={
            "earliestStart": result.earliest_start,
            "p50": result.p50,
            "p90": result.p90,
            "confidence": result.confidence,
            "deficitGPUs": result.deficit_gpus,
            "basis": result.basis,
        },
    )
