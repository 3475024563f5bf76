"""Read models: what ``kubectl runs get|list|explain|leases|budgets`` show, built from state.

Pure functions of the folded ledger and an instant, shared by the manager (answering the API)
and the scenario runner (reports), so a user sees the same numbers everywhere.
"""

from __future__ import annotations

from typing import Any

from gpu_fleet.core.forecast import ForecastError, forecast
from gpu_fleet.core.ledger import FleetState, LeaseClosed, RunStatusChanged
from gpu_fleet.core.model import Instant
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.views.idle import idle_rows
from gpu_fleet.views.report import build_report


class NotFoundError(LookupError):
    """The named object does not exist."""


def _report(state: FleetState, at: Instant) -> dict[str, Any]:
    return build_report(state, "now", at)


def run_view(state: FleetState, key: str, at: Instant) -> dict[str, Any]:
    if key not in state.runs:
        raise NotFoundError(f"run {key} not found")
    report = _report(state, at)
    run: dict[str, Any] = next(r for r in report["runs"] if f"{r['namespace']}/{r['name']}" == key)
    res = state.pending_reservation(key)
    run["reservationDetail"] = (
        next(r for r in report["reservations"] if r["name"] == res.name) if res else None
    )
    run["leases"] = [x for x in report["leases"] if x["run"] == key]
    run["forecast"] = _forecast(state, key, at) if run["phase"] in ("Pending", "Waiting") else None
    return run


def _forecast(state: FleetState, key: str, at: Instant) -> dict[str, Any] | None:
    """The forecaster's answer, computed from the same folded state (a pure function of it)."""
    try:
        f = forecast(state, key, at)
    except ForecastError:
        return None
    return {
        "earliestStart": format_instant(f.earliest_start) if f.earliest_start else None,
        "p50": format_instant(f.p50) if f.p50 else None,
        "p90": format_instant(f.p90) if f.p90 else None,
        "confidence": f.confidence,
        "deficitGPUs": f.deficit_gpus,
        "basis": f.basis,
        "remedies": [
            {
                "action": r.action,
                "detail": r.detail,
                "start": format_instant(r.start) if r.start else None,
            }
            for r in f.remedies
        ],
    }


def list_runs(state: FleetState, at: Instant, namespace: str | None = None) -> list[dict[str, Any]]:
    report = _report(state, at)
    return [r for r in report["runs"] if namespace is None or r["namespace"] == namespace]


def leases(
    state: FleetState, at: Instant, namespace: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    report = _report(state, at)
    out = report["leases"]
    if namespace is not None and name is not None:
        key = f"{namespace}/{name}"
        if key not in state.runs:
            raise NotFoundError(f"run {key} not found")
        out = [x for x in out if x["run"] == key]
    elif namespace is not None:
        out = [x for x in out if x["run"].split("/", 1)[0] == namespace]
    return list(out)


def budgets(state: FleetState, at: Instant, namespace: str | None = None) -> list[dict[str, Any]]:
    report = _report(state, at)
    return [b for b in report["budgets"] if namespace is None or b["namespace"] == namespace]


def explain(state: FleetState, key: str, at: Instant) -> list[tuple[str, str]]:
    """Rows of (field, value) that say why a run is where it is (SPEC §C ``explain``)."""
    view = run_view(state, key, at)
    run = state.runs[key]
    st = state.status.get(key)
    rows: list[tuple[str, str]] = [
        ("Run", key),
        ("Phase", view["phase"]),
        ("Reason", view["reason"]),
        ("Message", view["message"]),
    ]
    owner = state.index.family.owner_of(run.metadata.namespace)
    conflict = state.index.family.conflicts.get(run.metadata.namespace)
    rows.append(
        ("Owner", owner or f"(none: {conflict.describe()})" if conflict else owner or "(none)")
    )
    if run.spec.follow is not None:
        rows.append(("Follows", ", ".join(run.spec.follow.after)))
    w = view["width"]
    rows.append(("Width", f"desired={w['desired']} allocated={w['allocated']} min={w['min']}"))
    f = view["funding"]
    rows.append(("OwnedGPUs", str(f["owned"])))
    for cls in ("shared", "borrowed", "unfunded"):
        if f[cls]:
            rows.append((f"{cls.capitalize()}GPUs", str(f[cls])))
    rows.extend(
        ("Lender", f"{lender['owner']} ({lender['gpus']} GPUs)") for lender in view["lenders"]
    )
    if st is not None:
        why = st.detail.get("why")
        if why:
            rows.append(("Why", str(why)))
        tried = st.detail.get("tried")
        if isinstance(tried, list):
            rows.extend(("Tried", str(t)) for t in tried)
    fc = view.get("forecast")
    if fc:
        rows.append(
            (
                "Forecast",
                f"P50 {fc['p50'] or 'unknown'}, P90 {fc['p90'] or 'unknown'} ({fc['confidence']})",
            )
        )
        rows.append(("ForecastBasis", str(fc["basis"])))
        rows.extend(("Remedy", f"{r['action']}: {r['detail']}") for r in fc["remedies"])
    res = view["reservationDetail"]
    if res is not None:
        rows.append(("PendingReservation", res["name"]))
        rows.append(("EarliestStart", res["earliestStart"]))
        rows.append(("ReservationDeficit", f"{res['deficitGPUs']} GPUs"))
        rows.append(("ReservationReason", res["reason"]))
        rows.append(("Confidence", res["confidence"]))
        if res["remedies"]:
            rows.append(("Remedies", "; ".join(res["remedies"])))
    rows.extend(idle_rows(state, key))
    for e in state.history:
        if isinstance(e, LeaseClosed):
            lease = state.leases.get(e.lease)
            if lease is not None and lease.run == key:
                rows.append(("Closed", f"{e.lease} at {format_instant(e.at)}: {e.reason}"))
        elif (
            isinstance(e, RunStatusChanged)
            and e.run == key
            and e.reason
            in (
                "EndedByResolver",
                "Shrunk",
                "Reclaimed",
            )
        ):
            rows.append(("Event", f"{format_instant(e.at)} {e.reason}: {e.message}"))
    return rows
