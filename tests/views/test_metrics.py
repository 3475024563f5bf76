"""The metric definitions and their pure sources: gauges of folded state, tallies of decisions."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_fleet_map import example_fleet

from gpu_fleet.core.ledger import (
    LeaseClosed,
    LeasePreemptionScheduled,
    RunStatusChanged,
)
from gpu_fleet.core.model import NodeHealth
from gpu_fleet.views import fleet_map
from gpu_fleet.views.metrics import METRICS, SPECS, GaugeFamily, Increment, fleet_gauges, tally

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
WORKLOAD_LABELS = {"run", "lease", "reservation", "name", "namespace", "slot", "node", "team"}


def gauges(families: list[GaugeFamily]) -> dict[str, dict[tuple[str, ...], float]]:
    return {f.name: f.samples for f in families}


def test_names_follow_prometheus_conventions_and_labels_stay_bounded() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"gpu_fleet_[a-z0-9_]+", m.name), m.name
        assert m.name.endswith("_total") == (m.kind == "counter"), m.name
        assert not set(m.labels) & WORKLOAD_LABELS, f"{m.name}: unbounded label"
        assert not re.search(r"_(hours|minutes|milliseconds|ms)(_|$)", m.name), "base units"
        assert m.help
        assert (m.kind == "histogram") == bool(m.buckets)


def test_every_metric_is_documented() -> None:
    text = DOCS.read_text()
    missing = [m.name for m in METRICS if f"`{m.name}`" not in text]
    assert missing == []


def test_fleet_gauges_agree_with_the_fleet_map() -> None:
    fleet, at = example_fleet()
    g = gauges(fleet_gauges(fleet.state, at))
    picture = fleet_map(fleet.state, at)
    by_state = dict.fromkeys(picture["counts"], 0.0)
    for (flavor, state), value in g["gpu_fleet_gpus"].items():
        assert flavor == "H100"
        by_state[state] += value
    assert by_state == {k: float(v) for k, v in picture["counts"].items()}
    assert g["gpu_fleet_nodes"] == {("Ready",): 4.0, ("Cordoned",): 0.0, ("Fenced",): 0.0}
    assert g["gpu_fleet_runs"][("Running",)] == 3.0
    assert g["gpu_fleet_runs"][("Pending",)] == 1.0
    assert g["gpu_fleet_reservations_pending"][("capacity",)] == 1.0
    (res,) = fleet.state.pending_reservations.values()
    assert g["gpu_fleet_reservation_oldest_wait_seconds"][()] == at - res.created_at
    # sweep-6 (H100) waits while H100 slots stand free: those are stranded.
    assert g["gpu_fleet_gpus_stranded"][("H100",)] == picture["counts"]["free"] > 0
    assert g["gpu_fleet_ledger_clock_seconds"][()] == fleet.state.clock


def test_envelope_gauges_in_gpus_and_gpu_seconds() -> None:
    fleet, at = example_fleet()
    g = gauges(fleet_gauges(fleet.state, at))
    labels = ("rai/rai/h100", "org:ai:rai", "H100")
    assert g["gpu_fleet_envelope_concurrency_gpus"][labels] == 12.0
    funded = sum(
        g["gpu_fleet_envelope_gpus"][(*labels, c)] for c in ("owned", "shared", "borrowed")
    )
    assert funded + g["gpu_fleet_envelope_headroom_gpus"][labels] == 12.0
    used = fleet.state.evaluation(at).envelopes
    key = next(k for k in used if str(k) == "rai/rai/h100")
    assert g["gpu_fleet_envelope_used_gpu_seconds"][labels] == pytest.approx(
        used[key].gpu_hours_used * 3600, abs=1e-3
    )
    assert labels not in g["gpu_fleet_envelope_allowance_gpu_seconds"], "no gpuHours set"
    for family in fleet_gauges(fleet.state, at):
        spec = SPECS[family.name]
        assert all(len(k) == len(spec.labels) for k in family.samples), family.name


def test_cordoned_node_counts_its_free_slots_unavailable() -> None:
    fleet, at = example_fleet()
    fleet.set_node_health("b1", NodeHealth.CORDONED, at)
    g = gauges(fleet_gauges(fleet.state, at))
    assert g["gpu_fleet_nodes"][("Cordoned",)] == 1.0
    picture = fleet_map(fleet.state, at)
    assert g["gpu_fleet_gpus"][("H100", "unavailable")] == picture["counts"]["unavailable"]


def test_tally_counts_decisions_once_and_keeps_seeds_out_of_labels() -> None:
    fleet, at = example_fleet()
    state = fleet.state
    running = "rai/train-8"
    waiting = "rai/sweep-6"
    lease = state.leases_of(running, open_only=True)[0]
    same = RunStatusChanged(at=at, run=running, phase="Running", reason="GangBound", message="x")
    admitted = RunStatusChanged(at=at, run=waiting, phase="Running", reason="GangBound")
    notice = LeasePreemptionScheduled(
        at=at,
        lease=lease.id,
        run=running,
        deadline=at,
        reason="RandomPreempt(0xabc)",
        kind="Lottery",
        seed="0xabc",
    )
    closed = LeaseClosed(at=at, lease=lease.id, reason="RandomPreempt(0xabc)")
    out = tally(state, [same, notice, closed, admitted])
    res = state.pending_reservation(waiting)
    assert res is not None
    wait = at - state.admitted[waiting]
    assert out == [
        Increment("gpu_fleet_preemption_notices_total", ("Lottery",)),
        Increment("gpu_fleet_leases_closed_total", ("RandomPreempt",)),
        Increment("gpu_fleet_resolver_actions_total", ("RandomPreempt",)),
        Increment("gpu_fleet_admissions_total", ("admitted",)),
        Increment("gpu_fleet_admission_wait_seconds", (), float(wait)),
        Increment("gpu_fleet_reservation_wait_seconds", (), float(wait)),
        Increment(
            "gpu_fleet_reservation_starts_total",
            ("true" if at <= res.earliest_start else "false",),
        ),
        Increment(
            "gpu_fleet_reservation_lateness_seconds", (), float(max(0, at - res.earliest_start))
        ),
    ]
    for item in out:
        spec = SPECS[item.name]
        assert len(item.labels) == len(spec.labels)
        assert spec.kind in ("counter", "histogram")
