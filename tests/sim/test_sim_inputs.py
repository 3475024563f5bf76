"""Trace readers, scaling, Helios budgets, what-if overrides and team assignment."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_fleet.sim.budgets import (
    BudgetError,
    Window,
    apply_overrides,
    assign_teams,
    entitlements,
    helios_budgets,
    load_budgets_file,
)
from gpu_fleet.sim.jobs import Job, size_class
from gpu_fleet.sim.scaling import Scaling, ScalingError, apply_scaling, parse_scaling
from gpu_fleet.sim.traces import TraceError, read_alibaba_pods, read_simple_csv, synthetic

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT.parent / "shared" / "traces"
ORIGIN = 1_767_225_600

ALIBABA = """name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,\
creation_time,deletion_time,scheduled_time
openb-pod-0001,6000,12288,1,460,,LS,Running,100,700,100
openb-pod-0000,12000,16384,0,0,,BE,Running,0,500,0
openb-pod-0002,12000,24576,8,1000,,BE,Failed,50,60,55
openb-pod-0003,12000,24576,2,1000,,BE,Pending,70,,
"""


def test_alibaba_reader_keeps_gpu_pods_with_a_lifetime(tmp_path: Path) -> None:
    path = tmp_path / "pods.csv"
    path.write_text(ALIBABA)
    jobs = read_alibaba_pods(path)
    assert [(j.name, j.submit, j.gpus, j.duration, j.qos) for j in jobs] == [
        ("openb-pod-0002", 50, 8, 10, "BE"),
        ("openb-pod-0001", 100, 1, 600, "LS"),
    ]
    assert all(not j.team and not j.declared for j in jobs)


def test_simple_csv_reader(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(
        "# comment\nsubmit,team,gpus,group_gpus,duration,declared,name\n"
        "5,vision,16,8,60,yes,b\n0,rai,1,,30,,a\n"
    )
    assert read_simple_csv(path) == [
        Job(0, "a", "rai", 1, 30, declared=False),
        Job(5, "b", "vision", 16, 60, declared=True, group_gpus=8),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("submit,team,gpus\n", "header: missing column 'duration'"),
        ("submit,team,gpus,duration\nx,rai,1,5\n", "line 2: submit: expected an integer"),
        ("submit,team,gpus,duration,declared\n0,rai,1,5,maybe\n", "line 2: declared"),
        ("submit,team,gpus,duration\n0,Rai,1,5\n", "line 2: team"),
        ("name,submit,team,gpus,duration\na,0,rai,1,5\na,1,rai,1,5\n", "line 3: name: duplicate"),
        ("", "empty file"),
    ],
)
def test_simple_csv_errors_name_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(TraceError, match=message):
        read_simple_csv(path)


def test_scaling_is_stated_and_applied_in_order() -> None:
    jobs = [Job(100 + 10 * i, f"j{i}", "", 1 + (i % 2), 50) for i in range(6)]
    s = parse_scaling(["skip=1,limit=4", "time=10", "gpus=8", "group=8", "declared=1"])
    out = apply_scaling(jobs, s)
    assert [(j.name, j.submit, j.gpus, j.group_gpus, j.declared) for j in out] == [
        ("j1", 0, 16, 8, True),
        ("j2", 1, 1, None, True),
        ("j3", 2, 16, 8, True),
        ("j4", 3, 1, None, True),
    ]
    assert s.describe() == (
        "jobs 1..5; arrivals compressed x10, durations as traced; multi-GPU jobs widened x8 in "
        "groups of 8; 100% of jobs declare their duration (seed 7)"
    )
    sampled = apply_scaling(synthetic(200, 1), Scaling(sample=0.5))
    assert 60 < len(sampled) < 140
    assert sampled == apply_scaling(synthetic(200, 1), Scaling(sample=0.5))


def test_scaling_errors() -> None:
    with pytest.raises(ScalingError, match="sample: must be in"):
        parse_scaling(["sample=2"])
    with pytest.raises(ScalingError, match="expected a number"):
        parse_scaling(["time=fast"])


def test_size_classes() -> None:
    sizes = [size_class(g) for g in (1, 2, 8, 9, 64, 65)]
    assert sizes == ["1", "2-8", "2-8", "9-64", "9-64", ">64"]


HELIOS = "date,vcA,vcB,vcC,total\n2020-04-01,10,0,30,40\n2020-04-02,30,10,60,100\n"


def test_helios_quotas_become_budgets_scaled_to_the_fleet(tmp_path: Path) -> None:
    path = tmp_path / "vc.csv"
    path.write_text(HELIOS)
    hb = helios_budgets(path, fleet_gpus=20, flavor="G2", origin=ORIGIN)
    assert [(b.metadata.namespace, b.spec.envelopes[0].concurrency) for b in hb.budgets] == [
        ("vca", 6),
        ("vcb", 2),
        ("vcc", 12),
    ]
    assert all(b.spec.parents == ("org:helios",) for b in hb.budgets)
    assert "2020-04-02" in hb.description
    first = helios_budgets(path, fleet_gpus=8, flavor="G2", origin=ORIGIN, day="2020-04-01")
    assert [b.spec.envelopes[0].concurrency for b in first.budgets] == [2, 6]  # vcB had none
    ent = entitlements(first.budgets, "G2", ORIGIN)
    assert ent["vca"] == [Window(-86_400, 10 * 365 * 86_400, 2)]
    with pytest.raises(BudgetError, match="no row for '2021-01-01'"):
        helios_budgets(path, fleet_gpus=8, flavor="G2", origin=ORIGIN, day="2021-01-01")


def test_overrides_revalidate_the_budget() -> None:
    budgets = load_budgets_file(ROOT / "examples" / "sim" / "budgets.yaml")
    changed = apply_overrides(
        budgets,
        [
            "budget.vision.envelopes.h100.concurrency=96",
            "budget.vision.envelopes.h100.lending.maxConcurrency=48",
        ],
    )
    vision = next(b for b in changed if b.metadata.name == "vision")
    env = vision.spec.envelopes[0]
    assert env.concurrency == 96
    assert env.lending is not None
    assert env.lending.max_concurrency == 48
    assert [b for b in changed if b.metadata.name != "vision"] == [
        b for b in budgets if b.metadata.name != "vision"
    ]
    with pytest.raises(BudgetError, match="concurrency"):
        apply_overrides(budgets, ["budget.rai.envelopes.h100.concurrency=lots"])


def test_teams_follow_entitlement_and_are_stable() -> None:
    ent = {"big": [Window(0, 100, 9)], "small": [Window(0, 100, 1)], "none": []}
    jobs = [Job(i, f"j{i}", "", 1, 10) for i in range(400)]
    teams = [j.team for j in assign_teams(jobs, ent, seed=7)]
    assert set(teams) == {"big", "small"}
    assert 300 < teams.count("big") < 390
    assert teams == [j.team for j in assign_teams(jobs, ent, seed=7)]
    assert assign_teams([Job(0, "x", "mine", 1, 1)], ent, 7)[0].team == "mine"


@pytest.mark.skipif(not (TRACES / "alibaba-gpu-v2023-pods.csv").exists(), reason="no traces")
def test_the_real_alibaba_file_reads() -> None:
    jobs = read_alibaba_pods(TRACES / "alibaba-gpu-v2023-pods.csv")
    assert len(jobs) == 7064  # 8,152 pods less 1,088 without GPUs (all have a deletion time)
    assert max(j.gpus for j in jobs) == 8
