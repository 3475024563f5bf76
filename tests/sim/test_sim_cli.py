"""``gpu-fleet simulate`` end to end on the shipped sample, and its one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_fleet.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "sim"
BASE = [
    "simulate",
    "--fleet",
    str(SAMPLE / "inventory.yaml"),
    "--budgets",
    str(SAMPLE / "budgets.yaml"),
    "--trace",
    str(SAMPLE / "trace.csv"),
]


def test_simulate_writes_summary_report_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main([*BASE, "--set", "budget.vision.envelopes.h100.concurrency=40", "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Policies side by side (baseline budgets)" in printed
    assert "## baseline against what-if" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["results"]) == ["baseline", "what-if"]
    assert list(summary["results"]["baseline"]) == [
        "gpu-fleet",
        "fifo",
        "quota-borrowing",
        "easy-backfill",
    ]
    for metrics in summary["results"]["baseline"].values():
        assert metrics["jobs"]["submitted"] == 40
    assert summary["results"]["baseline"]["gpu-fleet"]["budget"]["funded_overdraft_gpus"] == 0
    assert summary["results"]["baseline"]["gpu-fleet"]["forecast"]["forecasts"] > 0
    assert (out / "report.md").read_text() == printed
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert "utilisation-baseline.png" in plots
    assert "queue-delay-cdf-what-if.png" in plots
    assert "funding-classes-baseline.png" in plots
    assert "team-share-baseline.png" in plots
    assert "forecast-error-baseline.png" in plots
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def _summary(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, object]:
    assert main([*BASE, "--json", *extra]) == 0
    summary = json.loads(capsys.readouterr().out)
    summary.pop("wall_s")
    return summary


def test_same_input_same_summary(capsys: pytest.CaptureFixture[str]) -> None:
    extra = ("--scale", "gpus=2,declared=0.5,seed=3")
    assert _summary(capsys, *extra) == _summary(capsys, *extra)


def test_synthetic_workload_when_no_trace(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "simulate",
            "--fleet",
            "4x8",
            "--budgets",
            str(SAMPLE / "budgets.yaml"),
            "--flavor",
            "H100",
            "--synthetic-jobs",
            "30",
            "--policy",
            "fifo",
            "--policy",
            "easy-backfill",
            "--json",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inputs"]["trace"].startswith("synthetic")
    assert list(summary["results"]["baseline"]) == ["fifo", "easy-backfill"]


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err
    return err


def test_bad_trace_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("name,submit,team,gpus,duration\nj1,0,rai,-1,10\n")
    argv = [*BASE[:-1], str(trace)]
    assert "t.csv: line 2: gpus: must be >= 1, got -1" in _error(capsys, argv)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "budget.nobody.envelopes.h100.concurrency=1"], "no budget named 'nobody'"),
        (["--set", "budget.rai.envelopes.a100.concurrency=1"], "has no envelope 'a100'"),
        (["--set", "budget.rai.envelopes.h100.concurrency=-3"], "concurrency"),
        (["--set", "rai=3"], "expected budget.<name>.envelopes"),
        (["--scale", "time=0"], "--scale: time: must be > 0"),
        (["--scale", "speed=2"], "--scale: 'speed=2'"),
        (["--format", "alibaba"], "header: missing column"),
        (["--drain", "soon"], "--drain"),
        (["--flavor", "A100"], "no node of flavor 'A100'"),
    ],
)
def test_bad_options_exit_2(
    capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert message in _error(capsys, [*BASE, *extra])


def test_missing_files_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert "nope.yaml" in _error(capsys, ["simulate", "--fleet", missing, *BASE[3:]])
    assert "nope.yaml" in _error(capsys, [*BASE[:4], missing, *BASE[5:]])
    assert "nope.yaml" in _error(capsys, [*BASE[:6], missing])


def test_a_run_manifest_is_not_a_budget(capsys: pytest.CaptureFixture[str]) -> None:
    runs = ROOT / "examples" / "manifests" / "02-single-domain.yaml"
    assert "expected kind Budget" in _error(capsys, [*BASE[:4], str(runs), *BASE[5:]])
