"""What the services export to Prometheus, as pure functions: no prometheus_client here.

Two kinds of numbers, kept apart on purpose:

* **Gauges of folded state** (``fleet_gauges``): GPUs by state, envelope use and allowances,
  runs by phase, reservations, nodes by health, stranded GPUs.  They are computed from the
  ledger's fold *at scrape time*, so they can never drift from what ``kubectl runs`` shows, and a
  restarted manager exports the same values at once.  Only the manager exports them (the single
  writer; followers would export the same numbers again and sums would double).
* **Counters and histograms of decisions** (``tally``): admissions by outcome, admission
  wait, resolver actions, preemption notices, leases minted and closed, reservation waits and
  promises kept.  (The forecaster counts its own accuracy: ``views.forecast_accuracy``.)
  They count ledger events as the manager commits them, so each decision counts once,
  and a restart starts them afresh as Prometheus counters expect (``rate()`` handles the reset).

Names follow Prometheus conventions: the ``gpu_fleet_`` prefix, base units (seconds, and
GPU-seconds for GPU time: divide by 3600 for GPU-hours), ``_total`` for counters.  Labels are
bounded by the fleet's configuration (flavor, envelope, owner, phase, health, kind), never by
its workload: no run, lease or reservation name is ever a label value.

``METRICS`` lists every metric with its type, help and labels; the runtime creates them from it
and ``docs/observability.md`` documents each (a test keeps the two in step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from gpu_fleet.core.funding import evaluate
from gpu_fleet.core.ledger import (
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    ReservationCreated,
    RunStatusChanged,
)
from gpu_fleet.core.model import FundingClass, Instant, NodeHealth
from gpu_fleet.views.fleet_map import FREE, UNAVAILABLE

Kind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    exported_by: tuple[str, ...] = ("manager",)


@dataclass(frozen=True)
class GaugeFamily:
    """One gauge's samples: label values (in the spec's label order) -> value."""

    name: str
    samples: dict[tuple[str, ...], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Increment:
    """A counter increment (``value``) or a histogram observation, with its label values."""

    name: str
    labels: tuple[str, ...] = ()
    value: float = 1.0


SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WAIT_BUCKETS = (0.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 3 * 3600.0, 6 * 3600.0, 86400.0)
ALL = ("manager", "binder", "forecaster", "notifier")

METRICS: tuple[MetricSpec, ...] = (
    # -- gauges of folded state (manager, computed at scrape) ----------------------------
    MetricSpec(
        "gpu_fleet_gpus",
        "gauge",
        "GPU slots by flavor and state: a funding class (owned, shared, borrowed, unfunded) for "
        "held slots, free, or unavailable (free slots of cordoned or fenced nodes)",
        ("flavor", "state"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_gpus",
        "gauge",
        "GPUs an envelope pays for now, by funding class (unfunded: width whose minted payer "
        "names this envelope but that no envelope funds)",
        ("envelope", "owner", "flavor", "class"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_concurrency_gpus",
        "gauge",
        "An envelope's concurrency (0 outside its window)",
        ("envelope", "owner", "flavor"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_headroom_gpus",
        "gauge",
        "An envelope's concurrency not yet spent on funded claims",
        ("envelope", "owner", "flavor"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_used_gpu_seconds",
        "gauge",
        "GPU time charged to an envelope so far (GPU-seconds; /3600 for GPU-hours)",
        ("envelope", "owner", "flavor"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_allowance_gpu_seconds",
        "gauge",
        "An envelope's GPU-hour allowance in GPU-seconds (only envelopes that set gpuHours)",
        ("envelope", "owner", "flavor"),
    ),
    MetricSpec(
        "gpu_fleet_envelope_remaining_gpu_seconds",
        "gauge",
        "Allowance minus charged GPU time, never below 0 (only envelopes that set gpuHours)",
        ("envelope", "owner", "flavor"),
    ),
    MetricSpec("gpu_fleet_runs", "gauge", "Runs by phase", ("phase",)),
    MetricSpec(
        "gpu_fleet_reservations_pending",
        "gauge",
        "Pending reservations by kind (capacity, window, budget)",
        ("kind",),
    ),
    MetricSpec(
        "gpu_fleet_reservation_oldest_wait_seconds",
        "gauge",
        "How long the oldest pending reservation has waited (0 when none waits)",
    ),
    MetricSpec(
        "gpu_fleet_preemptions_pending",
        "gauge",
        "Leases noticed for preemption whose deadline has not closed them yet",
    ),
    MetricSpec(
        "gpu_fleet_nodes", "gauge", "Nodes by health (Ready, Cordoned, Fenced)", ("health",)
    ),
    MetricSpec(
        "gpu_fleet_gpus_stranded",
        "gauge",
        "Free GPUs on Ready nodes of a flavor while a run of that flavor waits on a reservation: "
        "capacity idle yet unable to start the queue (fragmentation, domain or budget limits)",
        ("flavor",),
    ),
    MetricSpec(
        "gpu_fleet_ledger_clock_seconds",
        "gauge",
        "The ledger's clock: the time of the latest folded event (Unix seconds)",
    ),
    # -- decisions, counted as the manager commits them -----------------------------------
    MetricSpec(
        "gpu_fleet_admissions_total",
        "counter",
        "Admission decisions by outcome: admitted (gang bound), reserved, unfunded, "
        "unschedulable (counted when a run's state changes, not on message-only updates)",
        ("outcome",),
    ),
    MetricSpec(
        "gpu_fleet_admission_wait_seconds",
        "histogram",
        "Ledger time from a run's submission to its first admission (gang bound)",
        buckets=WAIT_BUCKETS,
    ),
    MetricSpec(
        "gpu_fleet_resolver_actions_total",
        "counter",
        "Leases the resolver closed, by kind (ReclaimUnfunded, DropSpare, Shrink, RandomPreempt)",
        ("kind",),
    ),
    MetricSpec(
        "gpu_fleet_preemption_notices_total",
        "counter",
        "Preemption notices given, by kind (ReclaimUnfunded, DropSpare, Shrink, Lottery)",
        ("kind",),
    ),
    MetricSpec(
        "gpu_fleet_leases_minted_total",
        "counter",
        "Leases minted, by reason (Start, Grow, Swap, Promise)",
        ("reason",),
    ),
    MetricSpec(
        "gpu_fleet_leases_closed_total",
        "counter",
        "Leases closed, by closure reason without its seed (Completed, Expired, RandomPreempt...)",
        ("reason",),
    ),
    MetricSpec(
        "gpu_fleet_reservation_starts_total",
        "counter",
        "Runs admitted after a reservation, by whether they started by its earliestStart "
        "(on_time=true) or later",
        ("on_time",),
    ),
    MetricSpec(
        "gpu_fleet_reservation_wait_seconds",
        "histogram",
        "Ledger time from submission to first admission (gang bound) of the runs that queued "
        "on a reservation",
        buckets=WAIT_BUCKETS,
    ),
    MetricSpec(
        "gpu_fleet_reservation_lateness_seconds",
        "histogram",
        "How long after its reservation's earliestStart a run started (0 when on time)",
        buckets=WAIT_BUCKETS,
    ),
    MetricSpec(
        "gpu_fleet_api_request_duration_seconds",
        "histogram",
        "Fleet API requests (fleet.api.<endpoint>) by endpoint and outcome, wall time",
        ("endpoint", "outcome"),
        SECONDS_BUCKETS,
    ),
    MetricSpec(
        "gpu_fleet_manager_plans_total",
        "counter",
        "Placements the manager's decisions used, by who planned them: manager (no CP-SAT "
        "search needed, so the binder was not asked), binder (the binder's search), ahead (the "
        "group's earlier decisions are not on the ledger yet, so the manager searched itself), "
        "inline (the decision was made on the event loop, which cannot wait for the binder, "
        "so the manager searched itself) or fallback (the binder was unavailable or its plan "
        "did not fit)",
        ("by",),
        exported_by=("manager",),
    ),
    # -- binder ------------------------------------------------------------------------
    MetricSpec(
        "gpu_fleet_placements_total",
        "counter",
        "Placement requests answered, by the solver whose plan won (greedy when CP-SAT was not "
        "needed, found nothing better or ran out of time; cp-sat), error (cannot be placed "
        "now) or not_folded (the asked-for ledger sequence was not reached in time)",
        ("solver",),
        exported_by=("binder",),
    ),
    MetricSpec(
        "gpu_fleet_placement_duration_seconds",
        "histogram",
        "Wall time to answer a placement request, waiting for the ledger sequence included",
        ("solver",),
        SECONDS_BUCKETS,
        exported_by=("binder",),
    ),
    # -- forecaster --------------------------------------------------------------------
    MetricSpec(
        "gpu_fleet_forecasts_total",
        "counter",
        "Forecast requests answered, by outcome (ok, not_found, terminal, topology, "
        "not_folded, bad_request, internal)",
        ("outcome",),
        exported_by=("forecaster",),
    ),
    MetricSpec(
        "gpu_fleet_forecast_duration_seconds",
        "histogram",
        "Wall time to answer a forecast request",
        buckets=SECONDS_BUCKETS,
        exported_by=("forecaster",),
    ),
    MetricSpec(
        "gpu_fleet_forecast_starts_total",
        "counter",
        "Runs that started after waiting, by forecast quantile (p50, p90) of the forecast when "
        "the wait began, and whether they started by it (hit=true)",
        ("quantile", "hit"),
        exported_by=("forecaster",),
    ),
    MetricSpec(
        "gpu_fleet_forecast_error_seconds",
        "histogram",
        "How far a waiting run's start was from its forecast quantile (p50, p90) made when the "
        "wait began, either way (ledger seconds)",
        ("quantile",),
        WAIT_BUCKETS,
        exported_by=("forecaster",),
    ),
    # -- notifier ----------------------------------------------------------------------
    MetricSpec(
        "gpu_fleet_notifications_total",
        "counter",
        "Notifications by event (run-admitted, lease-expiring, preempted...) and outcome: "
        "stored, duplicate (de-duplicated by NOTIFY), failed (publish failed; retried)",
        ("event", "outcome"),
        exported_by=("notifier",),
    ),
    # -- every service -----------------------------------------------------------------
    MetricSpec(
        "gpu_fleet_ledger_sequence",
        "gauge",
        "The last ledger sequence this service has folded",
        exported_by=ALL,
    ),
    MetricSpec(
        "gpu_fleet_ledger_stream_sequence",
        "gauge",
        "The ledger stream's last sequence, read at scrape time",
        exported_by=ALL,
    ),
    MetricSpec(
        "gpu_fleet_ledger_lag_events",
        "gauge",
        "Stream sequence minus folded sequence: how far behind the ledger this service is,"
        " in ledger messages (one per append)",
        exported_by=ALL,
    ),
    MetricSpec(
        "gpu_fleet_nats_connected",
        "gauge",
        "1 while the service's NATS connection is up",
        exported_by=ALL,
    ),
    MetricSpec(
        "gpu_fleet_ready",
        "gauge",
        "1 while /readyz answers ready (connected and caught up within the bound)",
        exported_by=ALL,
    ),
)

SPECS = {m.name: m for m in METRICS}


def _envelope_labels(key: object, owner: str, flavor: str) -> tuple[str, str, str]:
    return str(key), owner, flavor


def fleet_gauges(state: FleetState, at: Instant) -> list[GaugeFamily]:
    """Every gauge of folded state at ``at`` (see the module docstring)."""
    ev = evaluate(state.meter, state.funding_inputs(), at)
    out: dict[str, dict[tuple[str, ...], float]] = {
        m.name: {} for m in METRICS if m.kind == "gauge" and m.exported_by == ("manager",)
    }

    gpus = out["gpu_fleet_gpus"]
    for node in state.nodes.values():
        for state_name in (*(c.value for c in FundingClass), FREE, UNAVAILABLE):
            gpus.setdefault((node.flavor, state_name), 0.0)
        held = state.held_by_node.get(node.name, set())
        free = node.gpus - len([i for i in held if i < node.gpus])
        gone = FREE if node.health is NodeHealth.READY else UNAVAILABLE
        gpus[(node.flavor, gone)] += free
    for lease in state.open_leases.values():
        holder = state.nodes.get(lease.node)
        flavor = holder.flavor if holder is not None else ""
        label = (flavor, ev.lease_class(lease.id).value)
        gpus[label] = gpus.get(label, 0.0) + lease.width

    for key, info in state.index.envelopes.items():
        usage = ev.envelopes.get(key)
        labels = _envelope_labels(key, info.owner, info.flavor)
        for cls in FundingClass:
            value = float(getattr(usage, cls.value)) if usage is not None else 0.0
            out["gpu_fleet_envelope_gpus"][(*labels, cls.value)] = value
        active = (info.start is None or info.start <= at) and (info.end is None or at < info.end)
        out["gpu_fleet_envelope_concurrency_gpus"][labels] = float(
            info.concurrency if active else 0
        )
        headroom = usage.headroom if usage is not None else info.concurrency
        out["gpu_fleet_envelope_headroom_gpus"][labels] = float(headroom if active else 0)
        used = (usage.gpu_hours_used if usage is not None else 0.0) * 3600.0
        out["gpu_fleet_envelope_used_gpu_seconds"][labels] = round(used, 3)
        if info.gpu_hours is not None:
            allowance = info.gpu_hours * 3600.0
            out["gpu_fleet_envelope_allowance_gpu_seconds"][labels] = allowance
            out["gpu_fleet_envelope_remaining_gpu_seconds"][labels] = round(
                max(0.0, allowance - used), 3
            )

    phases = Counter(st.phase for st in state.status.values())
    for phase in ("Pending", "Waiting", "Running", "Completed", "Failed"):
        out["gpu_fleet_runs"][(phase,)] = float(phases.get(phase, 0))

    pending = list(state.pending_reservations.values())
    kinds = Counter(r.kind for r in pending)
    for kind in ("capacity", "window", "budget"):
        out["gpu_fleet_reservations_pending"][(kind,)] = float(kinds.get(kind, 0))
    oldest = min((r.created_at for r in pending), default=at)
    out["gpu_fleet_reservation_oldest_wait_seconds"][()] = float(max(0, at - oldest))
    out["gpu_fleet_preemptions_pending"][()] = float(len(state.pending_preemptions()))

    health = Counter(n.health.value for n in state.nodes.values())
    for h in NodeHealth:
        out["gpu_fleet_nodes"][(h.value,)] = float(health.get(h.value, 0))

    waiting_flavors = {state.runs[r.run].flavor for r in pending if r.run in state.runs}
    for flavor in sorted({n.flavor for n in state.nodes.values()}):
        idle = gpus.get((flavor, FREE), 0.0)
        out["gpu_fleet_gpus_stranded"][(flavor,)] = idle if flavor in waiting_flavors else 0.0
    out["gpu_fleet_ledger_clock_seconds"][()] = float(state.clock)
    return [GaugeFamily(name, samples) for name, samples in out.items()]


def _reason_kind(reason: str) -> str:
    """``RandomPreempt(0x1f...)`` -> ``RandomPreempt``: the seed is not a label value."""
    return reason.split("(", 1)[0].strip() or "unknown"


ADMISSION_OUTCOMES = {
    "GangBound": "admitted",
    "Reserved": "reserved",
    "Unfunded": "unfunded",
    "Unschedulable": "unschedulable",
}
RESOLVER_KINDS = ("ReclaimUnfunded", "DropSpare", "Shrink", "RandomPreempt")


def tally(state: FleetState, events: Sequence[Event]) -> list[Increment]:
    """Counter increments and histogram observations for one batch of ledger events.

    ``state`` is the fold *before* the batch: a status counts only when the run's reason
    changes (re-stating the same reason with a new message is not a new decision), and the
    admission wait needs the submission time the fold keeps.
    """
    out: list[Increment] = []
    reasons: dict[str, str] = {}
    reservations: dict[str, Instant] = {}
    for event in events:
        match event:
            case RunStatusChanged(run=run, reason=reason):
                before = reasons.get(run)
                if before is None:
                    st = state.status.get(run)
                    before = st.reason if st is not None else ""
                reasons[run] = reason
                outcome = ADMISSION_OUTCOMES.get(reason)
                if outcome is None or before == reason:
                    continue
                out.append(Increment("gpu_fleet_admissions_total", (outcome,)))
                if reason == "GangBound":
                    out.extend(_admitted(state, run, event.at, reservations))
            case ReservationCreated(reservation=r):
                reservations[r.run] = r.earliest_start
            case LeaseMinted(lease=lease):
                out.append(Increment("gpu_fleet_leases_minted_total", (lease.reason.value,)))
            case LeaseClosed(reason=reason):
                kind = _reason_kind(reason)
                out.append(Increment("gpu_fleet_leases_closed_total", (kind,)))
                if kind in RESOLVER_KINDS:
                    out.append(Increment("gpu_fleet_resolver_actions_total", (kind,)))
            case LeasePreemptionScheduled(kind=kind):
                out.append(Increment("gpu_fleet_preemption_notices_total", (kind,)))
            case _:
                pass
    return out


def _admitted(
    state: FleetState, run: str, at: Instant, created: dict[str, Instant]
) -> Iterable[Increment]:
    submitted = state.admitted.get(run)
    first = None if submitted is None or state.leases_of(run) else submitted
    if first is not None:
        yield Increment("gpu_fleet_admission_wait_seconds", (), float(max(0, at - first)))
    res = state.pending_reservation(run)
    promised = res.earliest_start if res is not None else created.get(run)
    if promised is not None:
        if first is not None:  # a run that queued: its whole wait (re-plans supersede reservations)
            yield Increment("gpu_fleet_reservation_wait_seconds", (), float(max(0, at - first)))
        on_time = at <= promised
        yield Increment("gpu_fleet_reservation_starts_total", ("true" if on_time else "false",))
        yield Increment("gpu_fleet_reservation_lateness_seconds", (), float(max(0, at - promised)))
