"""The fleet map: what a person wants to *look at* - every GPU slot, who holds it, who pays.

Three pictures share this one read model, so the HTML page (``views.fleet_page``), ``kubectl runs
top`` and the manager's ``fleet.api.fleetmap`` endpoint can never disagree:

* **map**: fabric domains x nodes x physical slots (DESIGN decision 6), each slot with the run,
  lease, role, funding class and payer that hold it *now*, or ``free`` / ``unavailable`` (a free
  slot of a cordoned or fenced node: it exists but takes no new work);
* **timeline**: one row per run with its leases over time (open ones to "now"), its reservation
  from creation to earliest start, and, while it waits, the forecast's P50 and P90;
* **burn**: per team, GPUs held and cumulative GPU-hours over the window, against the
  concurrency and GPU-hour allowances of the envelopes the team owns.

Funding classes are the derived ones (the stable matching at ``at``), so the map shows exactly
what ``kubectl runs leases`` and ``budgets`` say.  Burn counts the GPUs a team's runs physically
held, whoever paid (spares included): it is what the team consumed, while the envelope rows say
what each envelope was charged.  Everything is JSON-able plain data; instants are given both as
Unix seconds (for drawing) and as RFC 3339 text (for reading).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from gpu_fleet.core.forecast import ForecastError, forecast
from gpu_fleet.core.funding import EnvelopeInfo, EnvelopeUsage, Evaluation, evaluate
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import (
    LOCATION_KEYS,
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    Node,
    NodeHealth,
)
from gpu_fleet.core.timeutil import format_instant

CLASSES: tuple[str, ...] = tuple(c.value for c in FundingClass)
"""Funding classes in display order: owned, shared, borrowed, unfunded."""

FREE, UNAVAILABLE = "free", "unavailable"
SLOT_STATES: tuple[str, ...] = (*CLASSES, FREE, UNAVAILABLE)
"""Every value a slot's ``state`` may take (a class, or free, or unavailable)."""

UNLABELLED = "(unlabelled)"
"""Domain key of nodes missing a location label (the binder refuses to plan on them)."""

UNBOUND_TEAM = "(unbound)"
"""Team of runs whose namespace no Budget owns."""

WAITING_PHASES = ("Pending", "Waiting")


def domain_key(node: Node) -> str:
    """``region/cluster/fabric.domain`` as the binder keys domains; UNLABELLED if incomplete."""
    parts = [node.labels.get(k, "") for k in LOCATION_KEYS]
    return "/".join(parts) if all(parts) else UNLABELLED


def team_of(state: FleetState, run: str) -> str:
    """The derived owner of the run's namespace, or UNBOUND_TEAM."""
    namespace = run.split("/", 1)[0] if "/" in run else "default"
    return state.index.family.owner_of(namespace) or UNBOUND_TEAM


def _counts() -> dict[str, int]:
    return dict.fromkeys(SLOT_STATES, 0)


def _time(t: Instant | None) -> dict[str, Any] | None:
    return None if t is None else {"unix": t, "iso": format_instant(t)}


def fleet_map(state: FleetState, at: Instant) -> dict[str, Any]:
    """The whole picture at ``at`` (see the module docstring for the three parts)."""
    ev = evaluate(state.meter, state.funding_inputs(), at)
    domains = _domains(state, ev)
    summary = _counts()
    for d in domains:
        for k, v in d["counts"].items():
            summary[k] += v
    gpus = sum(d["gpus"] for d in domains)
    return {
        "at": _time(at),
        "gpus": gpus,
        "counts": summary,
        "classes": list(CLASSES),
        "domains": domains,
        "runs": _runs(state, ev),
        "timeline": _timeline(state, ev, at),
        "burn": _burn(state, ev, at),
    }


# -- map -------------------------------------------------------------------------------------


def _slot(state: FleetState, ev: Evaluation, node: Node, i: int) -> dict[str, Any]:
    name = f"{node.name}#{i}"
    lease_id = state.slot_holder.get(name)
    lease = state.open_leases.get(lease_id) if lease_id is not None else None
    if lease is None:
        ready = node.health is NodeHealth.READY
        return {"slot": name, "index": i, "state": FREE if ready else UNAVAILABLE}
    cls = ev.lease_class(lease.id).value
    payer = ev.lease_payer(lease.id)
    notice = state.preemptions.get(lease.id)
    return {
        "slot": name,
        "index": i,
        "state": cls,
        "class": cls,
        "run": lease.run,
        "team": team_of(state, lease.run),
        "lease": lease.id,
        "role": lease.role.value,
        "group": lease.group,
        "payer": str(payer) if payer is not None else None,
        "start": _time(lease.start),
        "end": _time(lease.end),
        "preemption": (
            {"deadline": _time(notice.deadline), "reason": notice.reason, "kind": notice.kind}
            if notice is not None
            else None
        ),
    }


def _domains(state: FleetState, ev: Evaluation) -> list[dict[str, Any]]:
    by_domain: dict[str, list[Node]] = defaultdict(list)
    for node in state.nodes.values():
        by_domain[domain_key(node)].append(node)
    out = []
    for key in sorted(by_domain, key=lambda k: (k == UNLABELLED, k)):
        nodes: list[dict[str, Any]] = []
        counts = _counts()
        runs: dict[str, int] = {}
        for node in sorted(by_domain[key], key=lambda n: n.name):
            slots = [_slot(state, ev, node, i) for i in range(node.gpus)]
            node_counts = _counts()
            for s in slots:
                node_counts[s["state"]] += 1
                if "run" in s:
                    runs[s["run"]] = runs.get(s["run"], 0) + 1
            for k, v in node_counts.items():
                counts[k] += v
            nodes.append(
                {
                    "name": node.name,
                    "gpus": node.gpus,
                    "flavor": node.flavor,
                    "health": node.health.value,
                    "counts": node_counts,
                    "runs": sorted({s["run"] for s in slots if "run" in s}),
                    "slots": slots,
                }
            )
        out.append(
            {
                "key": key,
                "flavors": sorted({n["flavor"] for n in nodes}),
                "gpus": sum(n["gpus"] for n in nodes),
                "counts": counts,
                "runs": [{"run": r, "gpus": g} for r, g in sorted(runs.items())],
                "nodes": nodes,
            }
        )
    return out


def _runs(state: FleetState, ev: Evaluation) -> list[dict[str, Any]]:
    out = []
    for key in sorted(state.runs):
        st = state.status.get(key)
        rf = ev.runs.get(key)
        open_ = state.leases_of(key, open_only=True)
        out.append(
            {
                "run": key,
                "team": team_of(state, key),
                "phase": st.phase if st else "Pending",
                "reason": st.reason if st else "",
                "gpus": sum(x.width for x in open_ if x.role is LeaseRole.ACTIVE),
                "spares": sum(x.width for x in open_ if x.role is LeaseRole.SPARE),
                "funding": {c: (getattr(rf, c) if rf else 0) for c in CLASSES},
            }
        )
    return out


# -- timeline --------------------------------------------------------------------------------


def _forecast(state: FleetState, key: str, at: Instant) -> dict[str, Any] | None:
    try:
        f = forecast(state, key, at, remedies=False)
    except ForecastError:
        return None
    return {
        "earliestStart": _time(f.earliest_start),
        "p50": _time(f.p50),
        "p90": _time(f.p90),
        "confidence": f.confidence,
    }


def _lease_row(lease: Lease, ev: Evaluation, at: Instant) -> dict[str, Any]:
    end = lease.effective_end()
    return {
        "lease": lease.id,
        "node": lease.node,
        "gpus": lease.width,
        "role": lease.role.value,
        "start": _time(lease.start),
        # Where the bar stops: its end or closure if already past, else "now" (still running).
        "until": _time(min(end, at) if end is not None else at),
        "scheduledEnd": _time(lease.end),
        "open": lease.is_open,
        "class": ev.lease_class(lease.id).value if lease.is_open else None,
        "closureReason": lease.closure_reason,
    }


def _timeline(state: FleetState, ev: Evaluation, at: Instant) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}

    def row(run: str) -> dict[str, Any]:
        if run not in rows:
            st = state.status.get(run)
            rows[run] = {
                "run": run,
                "team": team_of(state, run),
                "phase": st.phase if st else "Pending",
                "leases": [],
                "reservations": [],
                "forecast": None,
            }
        return rows[run]

    for lease in sorted(state.leases.values(), key=lambda x: (x.start, x.id)):
        row(lease.run)["leases"].append(_lease_row(lease, ev, at))
    for r in sorted(state.reservations.values(), key=lambda r: (r.created_at, r.name)):
        row(r.run)["reservations"].append(
            {
                "name": r.name,
                "kind": r.kind,
                "state": r.state,
                "createdAt": _time(r.created_at),
                "earliestStart": _time(r.earliest_start),
                "releasedAt": _time(r.released_at),
                "deficitGPUs": r.deficit_gpus,
            }
        )
    for key in sorted(state.runs):
        st = state.status.get(key)
        if (st.phase if st else "Pending") in WAITING_PHASES:
            row(key)["forecast"] = _forecast(state, key, at)
    instants = [at]
    for item in rows.values():
        instants += [x["start"]["unix"] for x in item["leases"]]
        instants += [x["createdAt"]["unix"] for x in item["reservations"]]
        # A released reservation's promise no longer matters: only pending ones widen the view.
        instants += [
            x["earliestStart"]["unix"] for x in item["reservations"] if x["releasedAt"] is None
        ]
        instants += [x["releasedAt"]["unix"] for x in item["reservations"] if x["releasedAt"]]
        f = item["forecast"]
        if f is not None:
            instants += [f[k]["unix"] for k in ("earliestStart", "p50", "p90") if f[k] is not None]
    ordered = sorted(
        rows.values(),
        key=lambda r: (_first(r), r["run"]),
    )
    return {"start": _time(min(instants)), "end": _time(max(instants)), "rows": ordered}


def _first(row: dict[str, Any]) -> int:
    starts = [x["start"]["unix"] for x in row["leases"]]
    starts += [x["createdAt"]["unix"] for x in row["reservations"]]
    return min(starts) if starts else 2**62


# -- burn ------------------------------------------------------------------------------------


def held_series(leases: Iterable[Lease], at: Instant) -> list[tuple[Instant, int, float]]:
    """``(t, GPUs held from t, GPU-hours consumed up to t)`` at every change up to ``at``.

    A step function of the leases' widths over their live intervals (open leases count until
    ``at``), integrated exactly: the hours column is the area under the GPU column.
    """
    deltas: dict[Instant, int] = defaultdict(int)
    for lease in leases:
        end = lease.effective_end()
        if lease.start > at or (end is not None and end <= lease.start):
            continue
        deltas[lease.start] += lease.width
        if end is not None and end <= at:
            deltas[end] -= lease.width
    out: list[tuple[Instant, int, float]] = []
    held, hours, prev = 0, 0.0, None
    for t in sorted(deltas):
        if prev is not None:
            hours += held * (t - prev) / 3600.0
        held += deltas[t]
        out.append((t, held, round(hours, 6)))
        prev = t
    if prev is not None and prev < at:
        out.append((at, held, round(hours + held * (at - prev) / 3600.0, 6)))
    return out


def _burn(state: FleetState, ev: Evaluation, at: Instant) -> list[dict[str, Any]]:
    leases_by_team: dict[str, list[Lease]] = defaultdict(list)
    for lease in state.leases.values():
        leases_by_team[team_of(state, lease.run)].append(lease)
    envelopes_by_team: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for key, info in sorted(state.index.envelopes.items()):
        usage = ev.envelopes.get(key)
        envelopes_by_team[info.owner or UNBOUND_TEAM].append(_envelope(key, info, usage, at))
    out = []
    for team in sorted(set(leases_by_team) | set(envelopes_by_team)):
        series = held_series(leases_by_team.get(team, []), at)
        envs = envelopes_by_team.get(team, [])
        active = [e for e in envs if e["active"]]
        hours_caps = [e["gpuHours"] for e in active if e["gpuHours"] is not None]
        out.append(
            {
                "team": team,
                "series": [{"t": t, "gpus": g, "gpuHours": h} for t, g, h in series],
                "gpusHeld": series[-1][1] if series else 0,
                "gpuHoursConsumed": series[-1][2] if series else 0.0,
                "concurrency": sum(e["concurrency"] for e in active),
                "gpuHoursAllowance": sum(hours_caps) if hours_caps else None,
                "gpuHoursCharged": round(sum(e["gpuHoursUsed"] for e in envs), 6),
                "envelopes": envs,
            }
        )
    return out


def _envelope(
    key: EnvelopeKey, info: EnvelopeInfo, usage: EnvelopeUsage | None, at: Instant
) -> dict[str, Any]:
    start, end = info.start, info.end
    active = (start is None or start <= at) and (end is None or at < end)
    return {
        "envelope": str(key),
        "flavor": info.flavor,
        "concurrency": info.concurrency,
        "inUse": usage.funded if usage is not None else 0,
        "headroom": usage.headroom if usage is not None else info.concurrency,
        "gpuHours": info.gpu_hours,
        "gpuHoursUsed": round(usage.gpu_hours_used, 6) if usage is not None else 0.0,
        "start": _time(start),
        "end": _time(end),
        "active": active,
    }
