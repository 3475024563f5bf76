"""Run and Budget ``status`` as the ledger says it is, in Kubernetes API conventions.  Pure.

Conditions (SPEC §A.6): the six Run condition types are always written; the state's reason
names which are True; the others are False with ``NotApplicable``, except ``Admitted`` for the
two not-admitted states, which carries their reason.  ``lastTransitionTime`` changes only when a
condition's ``status`` changes (kept from the object's previous status otherwise), so writing
the same state twice changes nothing and the bridge does not patch.
"""

from __future__ import annotations

from typing import Any

from gpu_fleet.core.engine.gang import checkpoint_deadline
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import Budget, EnvelopeKey, LeaseRole
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.kube.objects import Obj

RUN_CONDITIONS = ("Admitted", "Scheduled", "Running", "Completed", "Failed", "Blocked")
NOT_ADMITTED = ("Unschedulable", "Unfunded", "InvalidSpec")


def merge_patch_to(previous: Obj | None, want: Obj) -> Obj:
    """A JSON merge patch that turns ``previous`` into ``want``: fields ``want`` no longer has
    are sent as ``null`` (a merge patch keeps what it does not mention)."""
    out: Obj = dict(want)
    for k, v in (previous or {}).items():
        if k not in want:
            out[k] = None
        elif isinstance(v, dict) and isinstance(want[k], dict):
            out[k] = merge_patch_to(v, want[k])
    return out


def true_conditions(phase: str, reason: str) -> tuple[str, ...]:
    """Which Run conditions a state turns on (SPEC §A.6 table)."""
    if phase == "Running":
        return ("Admitted", "Scheduled", "Running")
    if phase == "Completed":
        return ("Admitted", "Completed")
    if phase == "Failed":
        return ("Failed",)
    if phase == "Waiting":
        return ("Blocked",)
    if reason in NOT_ADMITTED or not reason:
        return ()
    if reason == "CheckpointGrace":
        return ("Admitted", "Blocked")
    return ("Admitted",)


def conditions(
    phase: str,
    reason: str,
    message: str,
    *,
    generation: int,
    previous: list[Obj] | None,
    now: str,
    types: tuple[str, ...] = RUN_CONDITIONS,
) -> list[Obj]:
    """The full condition list, transition times kept where ``status`` did not change."""
    on = true_conditions(phase, reason)
    before = {str(c.get("type")): c for c in previous or [] if isinstance(c, dict)}
    out: list[Obj] = []
    for t in types:
        is_on = t in on
        carries = is_on or (t == "Admitted" and reason in NOT_ADMITTED)
        status = "True" if is_on else "False"
        old = before.get(t)
        out.append(
            {
                "type": t,
                "status": status,
                "reason": (reason or "Pending") if carries else "NotApplicable",
                "message": message if carries else "",
                "observedGeneration": generation,
                "lastTransitionTime": (
                    old["lastTransitionTime"]
                    if old is not None
                    and old.get("status") == status
                    and old.get("lastTransitionTime")
                    else now
                ),
            }
        )
    return out


def run_status(
    state: FleetState,
    key: str,
    *,
    generation: int,
    previous: Obj | None,
    now: str,
    forecast: dict[str, Any] | None = None,
) -> Obj:
    """The Run's status from folded ledger state (``generation``: the one the ledger holds)."""
    run = state.runs[key]
    st = state.status.get(key)
    phase = st.phase if st else "Pending"
    reason = st.reason if st else ""
    message = st.message if st else ""
    open_leases = state.leases_of(key, open_only=True)
    allocated = sum(x.width for x in open_leases if x.role is LeaseRole.ACTIVE)
    spares = sum(x.width for x in open_leases if x.role is LeaseRole.SPARE)
    m = run.spec.malleable
    width: Obj = {
        "min": run.min_width,
        "max": m.max_total_gpus if m else run.spec.resources.total_gpus,
        "desired": run.desired_width,
        "allocated": allocated,
        "spares": spares,
    }
    if phase in ("Pending", "Waiting") and allocated < run.min_width:
        width["pending"] = f"Assemble to {run.min_width}"
    out: Obj = {
        "phase": phase,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions(
            phase,
            reason,
            message,
            generation=generation,
            previous=(previous or {}).get("conditions"),
            now=now,
        ),
        "width": width,
        "nodes": sorted({x.node for x in open_leases}),
    }
    rf = state.evaluation(state.clock).runs.get(key) if open_leases else None
    if rf is not None and (rf.owned or rf.shared or rf.borrowed or rf.unfunded):
        out["funding"] = {
            "ownedGPUs": rf.owned,
            "sharedGPUs": rf.shared,
            "borrowedGPUs": rf.borrowed,
            "unfundedGPUs": rf.unfunded,
            "lenders": [{"owner": o, "gpus": g} for o, g in sorted(rf.lenders.items())],
        }
    res = state.pending_reservation(key)
    if res is not None:
        out["pendingReservation"] = res.name
        out["earliestStart"] = format_instant(res.earliest_start)
    if forecast:
        out["forecast"] = forecast
        if "earliestStart" not in out and forecast.get("earliestStart"):
            out["earliestStart"] = forecast["earliestStart"]
    follow = st.detail.get("followDeadline") if st is not None else None
    if phase == "Waiting" and isinstance(follow, int) and not isinstance(follow, bool):
        out["followDeadline"] = format_instant(follow)  # waiting on an upstream that failed
    grace = checkpoint_deadline(state, key)
    if grace is not None:
        out["checkpointDeadline"] = format_instant(grace)
    retry = state.retries.get(key)
    if retry is not None:
        out["failedAttempts"] = retry.attempt
        if state.restarts.get(key, 0) < retry.attempt:
            out["retryAfter"] = format_instant(retry.retry_after)
    if key in state.etas:
        out["eta"] = {"estimatedCompletion": format_instant(state.etas[key]), "source": "job"}
    return out


def rejected_status(why: str, generation: int, previous: Obj | None, now: str) -> Obj:
    """Status of a Run whose spec the fleet refused (nothing of it is in the ledger)."""
    return {
        "phase": "Pending",
        "reason": "InvalidSpec",
        "message": why,
        "observedGeneration": generation,
        "conditions": conditions(
            "Pending",
            "InvalidSpec",
            why,
            generation=generation,
            previous=(previous or {}).get("conditions"),
            now=now,
        ),
    }


def budget_status(
    state: FleetState, budget: Budget, generation: int, previous: Obj | None, now: str
) -> Obj:
    """Headroom and usage per envelope, aggregate headroom, and the Healthy condition."""
    ev = state.evaluation(state.clock)
    ns, name = budget.metadata.namespace, budget.metadata.name
    headroom: list[Obj] = []
    usage: list[Obj] = []
    for e in budget.spec.envelopes:
        u = ev.envelopes.get(EnvelopeKey(ns, name, e.name))
        if u is None:
            continue
        headroom.append({"name": e.name, "flavor": e.flavor, "concurrency": u.headroom})
        usage.append(
            {
                "name": e.name,
                "flavor": e.flavor,
                "ownedGPUs": u.owned,
                "sharedGPUs": u.shared,
                "borrowedGPUs": u.borrowed,
                "unfundedGPUs": u.unfunded,
                "spareGPUs": u.spare,
                "consumedGPUHours": round(u.gpu_hours_used, 6),
            }
        )
    caps = []
    for c in budget.spec.aggregate_caps:
        cu = ev.caps.get(f"{ns}/{name}/{c.name}")
        if cu is not None:
            caps.append({"name": c.name, "flavor": c.flavor, "concurrency": cu.headroom})
    healthy = all(h["concurrency"] >= 0 for h in headroom)
    before = {
        str(c.get("type")): c
        for c in (previous or {}).get("conditions") or []
        if isinstance(c, dict)
    }
    status = "True" if healthy else "False"
    old = before.get("Healthy")
    cond = {
        "type": "Healthy",
        "status": status,
        "reason": "Healthy" if healthy else "Overcommitted",
        "message": "",
        "observedGeneration": generation,
        "lastTransitionTime": (
            old["lastTransitionTime"]
            if old is not None and old.get("status") == status and old.get("lastTransitionTime")
            else now
        ),
    }
    totals = {
        k: sum(int(u[k]) for u in usage)
        for k in ("ownedGPUs", "sharedGPUs", "borrowedGPUs", "unfundedGPUs", "spareGPUs")
    }
    return {
        "observedGeneration": generation,
        "totals": totals,
        "headroom": headroom,
        "aggregateHeadroom": caps,
        "usage": usage,
        "conditions": [cond],
    }
