"""GPULease and Reservation objects: read-only mirrors of the ledger's open leases and pending
reservations (SPEC §A.3, §A.4, §A.6).  Pure.

The ledger is the one truth; these objects exist so ``kubectl get gpuleases,reservations -A``
shows what it holds.  The bridge keeps exactly one object per open lease and per pending
reservation, and deletes the object when the lease closes or the reservation is released
(the closure itself stays in the ledger and in the Run's Events): a mirror of history would
grow without bound, and the API server is not where history is kept.

Names are Kubernetes names derived from ledger names, so a re-created mirror (after a crash,
or a deleted object) gets the same name and a second create is ``AlreadyExists``:

* a lease id ``<ns>/<run>@<admitted>#<counter>`` becomes ``<run>-<admitted>-<counter>``
  (the admission instant is the incarnation nonce; the counter is the run's lease count);
* a reservation keeps its ledger name (``<run>-res-<unix seconds>``, already a DNS name).

``spec`` is the immutable fact (the CRD forbids changing it); everything that changes - the
funding class, the reservation's state and forecast - is ``status``, written through the
status subresource.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.ledger.events import Reservation
from gpu_fleet.core.model import API_VERSION, FundingClass, Lease
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.kube.objects import (
    A_LEASE,
    A_RESERVATION,
    L_GROUP,
    L_ROLE,
    L_RUN,
    MANAGED_BY,
    MANAGER_NAME,
    Obj,
    name_of,
    uid_of,
)

L_COHORT = "rq.davidlangworthy.io/cohort"


@dataclass(frozen=True)
class Mirror:
    """One object the ledger calls for: its manifest (without status) and its status."""

    namespace: str
    name: str
    body: Obj
    status: Obj


def lease_object_name(lease_id: str) -> str:
    """``<ns>/<run>@<admitted>#<counter>`` -> ``<run>-<admitted>-<counter>`` (a DNS name)."""
    _, _, rest = lease_id.partition("/")
    run, _, tail = rest.partition("@")
    admitted, _, counter = tail.partition("#")
    return f"{run}-{admitted}-{counter}".lower()


def _owner(run_obj: Obj | None) -> list[Obj]:
    """An owner reference to the Run object (when the run came from Kubernetes): deleting the
    Run garbage-collects its mirrors even if the bridge is down."""
    if not run_obj:
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "name": name_of(run_obj),
            "uid": uid_of(run_obj),
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]


def sanitised_reason(reason: str) -> str:
    """SPEC §A.6: a closure reason as a condition reason (``RandomPreempt(0x..)`` ->
    ``RandomPreempt``): letters first, then letters, digits, ``_ , :``; fallback ``Closed``."""
    out = ""
    for ch in reason:
        if (ch.isascii() and ch.isalpha()) or (out and (ch.isdigit() or ch in "_,:")):
            out += ch
        else:
            break
    out = out.rstrip(",:")
    return out or "Closed"


def _condition(kind: str, status: bool, reason: str, message: str, now: str) -> Obj:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    }


def keep_transitions(previous: Obj | None, want: Obj) -> Obj:
    """``want`` with each condition's ``lastTransitionTime`` kept from ``previous`` when its
    ``status`` did not change (API conventions), so an unchanged state writes nothing."""
    before = {
        str(c.get("type")): c
        for c in (previous or {}).get("conditions") or []
        if isinstance(c, dict)
    }
    conds = []
    for c in want.get("conditions") or []:
        old = before.get(str(c.get("type")))
        kept = c
        if old is not None and old.get("status") == c.get("status"):
            kept = {
                **c,
                "lastTransitionTime": old.get("lastTransitionTime", c["lastTransitionTime"]),
            }
        conds.append(kept)
    return {**want, "conditions": conds}


def lease_mirror(
    state: FleetState,
    lease: Lease,
    *,
    run_obj: Obj | None,
    funding: FundingClass | None,
    now: str,
) -> Mirror:
    ns, _, rest = lease.run.partition("/")
    run_name = rest
    payer = lease.minted_payer
    spec: Obj = {
        "owner": payer.owner if payer else "unknown",
        "runRef": {"name": run_name, "namespace": ns},
        "slice": {"nodes": list(lease.slots), "role": lease.role.value},
        "interval": {"start": format_instant(lease.start)},
        "paidByEnvelope": payer.envelope if payer else "none",
        "reason": lease.reason.value,
    }
    if lease.end is not None:
        spec["interval"]["end"] = format_instant(lease.end)
    if payer is not None:
        spec["paidByBudgetNamespace"] = payer.namespace
        spec["paidByBudget"] = payer.budget
    name = lease_object_name(lease.id)
    labels = {
        L_RUN: run_name,
        L_ROLE: lease.role.value,
        L_GROUP: str(lease.group),
        L_COHORT: str(lease.cohort),
        MANAGED_BY: MANAGER_NAME,
    }
    status: Obj = {
        "closed": False,
        "node": lease.node,
        "gpus": lease.width,
        "fundingClass": funding.value if funding is not None else "",
        "conditions": [
            _condition("Active", True, "Minted", f"{lease.width} GPUs on {lease.node}", now),
            _condition("Closed", False, "Minted", "", now),
        ],
    }
    notice = state.preemptions.get(lease.id)
    if notice is not None and lease.id in state.open_leases:
        status["preemptionDeadline"] = format_instant(notice.deadline)
    body: Obj = {
        "apiVersion": API_VERSION,
        "kind": "GPULease",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels,
            "annotations": {A_LEASE: lease.id},
            "ownerReferences": _owner(run_obj),
        },
        "spec": spec,
    }
    return Mirror(ns, name, body, status)


def reservation_mirror(res: Reservation, run_obj: Obj | None, now: str) -> Mirror:
    ns, _, run_name = res.run.partition("/")
    intended: Obj = {}
    if res.domain:
        intended["domain"] = _domain(res.domain)
    if res.nodes:
        intended["nodes"] = sorted(set(res.nodes))
    if not intended:
        intended["domain"] = {"scope": "fleet"}
    spec: Obj = {
        "runRef": {"name": run_name, "namespace": ns},
        "intendedSlice": intended,
        "payingEnvelope": res.paying_envelope or "none",
        "earliestStart": format_instant(res.earliest_start),
    }
    forecast: Obj = {
        "deficitGPUs": res.deficit_gpus,
        "scope": res.kind,
        "remedies": list(res.remedies),
        "confidence": res.confidence,
    }
    countdown = res.earliest_start - res.created_at
    status: Obj = {
        "state": res.state,
        "reason": res.reason,
        "forecast": forecast,
        "conditions": [
            _condition("Forecast", True, "EarliestStartKnown", res.reason, now),
            _condition("Activated", False, "Pending", "", now),
        ],
    }
    if countdown > 0:
        status["countdownSeconds"] = countdown
    body: Obj = {
        "apiVersion": API_VERSION,
        "kind": "Reservation",
        "metadata": {
            "name": res.name,
            "namespace": ns,
            "labels": {L_RUN: run_name, MANAGED_BY: MANAGER_NAME},
            "annotations": {A_RESERVATION: res.name},
            "ownerReferences": _owner(run_obj),
        },
        "spec": spec,
    }
    return Mirror(ns, res.name, body, status)


def _domain(domain: str) -> Obj:
    """A reservation's domain key (``region/cluster/fabric``, or any ``/``-joined location) as
    the CRD's location map; unknown shapes keep the whole text under ``fabric.domain``."""
    parts = domain.split("/")
    if len(parts) == 3:
        return {"region": parts[0], "cluster": parts[1], "fabric.domain": parts[2]}
    return {"fabric.domain": domain[:63]}


Mirrors = dict[tuple[str, str], Mirror]


def mirrors(state: FleetState, run_objs: dict[str, Obj], now: str) -> tuple[Mirrors, Mirrors]:
    """Every GPULease and Reservation mirror the ledger calls for, by (namespace, name)."""
    out: Mirrors = {}
    reservations: Mirrors = {}
    fill = state.matching(state.clock) if state.open_leases else None
    classes = fill.funding_class if fill is not None else {}
    for lease in state.open_leases.values():
        m = lease_mirror(
            state,
            lease,
            run_obj=run_objs.get(lease.run),
            funding=classes.get(lease.id),
            now=now,
        )
        out[(m.namespace, m.name)] = m
    for res in state.pending_reservations.values():
        m = reservation_mirror(res, run_objs.get(res.run), now)
        reservations[(m.namespace, m.name)] = m
    return out, reservations
