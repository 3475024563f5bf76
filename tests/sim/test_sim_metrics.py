"""Metrics on small timelines whose every number was computed by hand (see the comments)."""

from __future__ import annotations

import pytest

from gpu_fleet.sim.budgets import Window
from gpu_fleet.sim.jobs import Job
from gpu_fleet.sim.metrics import class_gpu_hours, percentile, summarize
from gpu_fleet.sim.timeline import ForecastRecord, Segment, Timeline

H = 3600.0


def hand_timeline() -> Timeline:
    """A 4-GPU fleet, teams a and b entitled to 2 GPUs each over [0, 100).

    j1 (a, 2 GPUs) arrives at 0 and runs [0, 10) on one node; j2 (a, 4 GPUs) arrives at 0 and
    runs [10, 20) on two nodes where one would do (min_nodes 1); j3 (b, 1
    GPU) arrives at 5 and runs [20, 25).  The simulation ends at 25; the last arrival is at 5.
    """
    jobs = [
        Job(submit=0, name="j1", team="a", gpus=2, duration=10),
        Job(submit=0, name="j2", team="a", gpus=4, duration=10),
        Job(submit=5, name="j3", team="b", gpus=1, duration=5),
    ]
    return Timeline(
        policy="hand",
        fleet_gpus=4,
        jobs=jobs,
        entitlements={"a": [Window(0, 100, 2)], "b": [Window(0, 100, 2)]},
        segments=[
            Segment("j1", 0, 10, 2, nodes=1, min_nodes=1, outcome="completed"),
            Segment("j2", 10, 20, 4, nodes=2, min_nodes=1, outcome="completed"),
            Segment("j3", 20, 25, 1, nodes=1, min_nodes=1, outcome="completed"),
        ],
        forecasts=[
            ForecastRecord("j2", 0, p50=8, p90=12, start=10),  # |err| 2, started by P90
            ForecastRecord("j3", 5, p50=25, p90=18, start=20),  # |err| 5, after its P90
        ],
        end=25,
    )


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([15, 0, 10], 50) == 10  # rank ceil(1.5) = 2
    assert percentile([15, 0, 10], 90) == 15  # rank ceil(2.7) = 3
    assert percentile([7], 1) == 7
    assert percentile([], 50) is None


def test_hand_computed_trace() -> None:
    m = summarize(hand_timeline())
    assert m["jobs"] == {"submitted": 3, "started": 3, "completed": 3}
    # arrival window [0, 5]: only j1 runs, 2 GPUs x 5 s of 4 x 5 GPU-s
    assert m["utilisation"] == pytest.approx(0.5)
    assert m["useful_utilisation"] == pytest.approx(0.5)  # nothing was preempted
    assert m["makespan_s"] == 25
    # delays 0 (j1), 10 (j2), 15 (j3); completions 10, 20, 20
    assert m["queue_delay_s"]["all"] == {"n": 3, "p50": 10.0, "p90": 15.0, "p99": 15.0}
    assert m["queue_delay_s"]["1"] == {"n": 1, "p50": 15.0, "p90": 15.0, "p99": 15.0}
    assert m["queue_delay_s"]["2-8"] == {"n": 2, "p50": 0.0, "p90": 10.0, "p99": 10.0}
    assert m["completion_time_s"]["all"] == {"n": 3, "p50": 20.0, "p90": 20.0, "p99": 20.0}
    # [5, 10): 2 GPUs free while j3 (1 GPU) waits -> 10 GPU-s stranded; [0, 5) j2 (4) cannot fit
    assert m["stranded"]["gpu_hours"] == pytest.approx(10 / H)
    assert m["stranded"]["mean_gpus"] == pytest.approx(10 / 25)
    # j2 spans 2 nodes where 1 would do; j1 and j3 none
    assert m["fragmentation"]["mean_span_excess"] == pytest.approx(1 / 3)
    assert m["fragmentation"]["share_with_excess"] == pytest.approx(1 / 3)
    assert m["fragmentation"]["mean_span_excess_multi_gpu"] == pytest.approx(0.5)
    # team a uses 4 GPUs over [10, 20) against 2 entitled: 20 GPU-s above
    assert m["budget"]["above_entitlement_gpu_hours"] == pytest.approx(20 / H)
    # within: 2 x 10 + 2 x 10 + 1 x 5 = 45 GPU-s; above 20 GPU-s
    assert m["budget"]["class_gpu_hours"] == pytest.approx({"above": 20 / H, "within": 45 / H})
    # a: got min(use, 2) = 40 GPU-s of min(demand, 2) = 40 -> 1.0;
    # b: demand 1 GPU over [5, 25) = 20 GPU-s owed, got 5 -> 0.25
    shares = m["fairness"]["team_share_of_entitled_demand"]
    assert shares == pytest.approx({"a": 1.0, "b": 0.25})
    assert m["fairness"]["jain"] == pytest.approx(1.25**2 / (2 * (1 + 0.0625)))
    assert m["preemptions"] == {
        "count": 0,
        "lost_gpu_hours": 0.0,
        "reclaimed": 0,
        "reclaimed_gpu_hours": 0.0,
    }
    f = m["forecast"]
    assert f["median_abs_error_s"] == 2.0  # errors [2, 5], rank ceil(1) = 1
    assert f["p90_abs_error_s"] == 5.0
    assert f["share_started_by_p90"] == pytest.approx(0.5)
    assert m["budget"]["funded_overdraft_gpus"] is None  # not a gpu-fleet timeline


def test_preemption_costs_and_waiting_again() -> None:
    """k1 (2 GPUs) runs [0, 4), is reclaimed for k2 (arrives at 4, runs [4, 6)), restarts at 6
    and completes at 10 on a 2-GPU fleet."""
    tl = Timeline(
        policy="hand",
        fleet_gpus=2,
        jobs=[Job(0, "k1", "a", 2, 4), Job(4, "k2", "b", 2, 2)],
        entitlements={"a": [Window(0, 100, 1)], "b": [Window(0, 100, 1)]},
        segments=[
            Segment("k1", 0, 4, 2, 1, 1, "reclaimed"),
            Segment("k2", 4, 6, 2, 1, 1, "completed"),
            Segment("k1", 6, 10, 2, 1, 1, "completed"),
        ],
        end=10,
    )
    m = summarize(tl)
    assert m["preemptions"] == {
        "count": 1,
        "lost_gpu_hours": pytest.approx(8 / H),
        "reclaimed": 1,
        "reclaimed_gpu_hours": pytest.approx(8 / H),
    }
    assert m["queue_delay_s"]["all"]["p99"] == 0.0  # both started on arrival
    # arrival window [0, 4]: k1 holds both GPUs, but that work is lost
    assert m["utilisation"] == pytest.approx(1.0)
    assert m["useful_utilisation"] == pytest.approx(0.0)
    assert m["completion_time_s"]["2-8"]["p50"] == 2.0  # k2: 2; k1: 10
    assert m["completion_time_s"]["2-8"]["p90"] == 10.0
    assert m["stranded"]["gpu_hours"] == 0.0  # the fleet is never idle while k1 waits
    # each team uses 2 GPUs against 1 entitled for its whole run: (4 + 2 + 4) s x 1 GPU above
    assert class_gpu_hours(tl) == pytest.approx({"above": 10 / H, "within": 10 / H})
