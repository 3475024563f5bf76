"""The chaos campaign (bench/chaos.py) as CI runs it: a short seeded campaign, and its audit.

``make chaos`` runs the long campaign; this runs two trials, every step with a fault (kill -9
of a random service process or of nats-server, restarted after a random delay), and requires
zero violations.  The audit itself is shown to catch each broken promise on a crafted ledger,
so a campaign that reports 0 violations means something.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import pytest

from gpu_fleet.core.ledger import FleetState, LeaseClosed, RunStatusChanged

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    name = "gpu_fleet_bench_chaos"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "chaos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load()


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(900)
async def test_a_short_seeded_campaign_finds_no_violation(tmp_path: Path) -> None:
    out = io.StringIO()
    figures = await chaos.campaign(
        tmp_path, trials=2, max_seconds=10_000, seed=7, fault_rate=1.0, out=out
    )
    print(out.getvalue())
    print(f"chaos (CI): {figures.line()}")
    assert figures.violations == []
    assert figures.trials == 2
    injected = sum(v for k, v in figures.faults.items() if "exited" not in k)
    assert injected >= 6  # every one of the 3-6 steps of each trial killed a process
    assert figures.acked > 0
    assert figures.hung == 0


def test_the_audit_reports_lost_decisions() -> None:
    acks = chaos.Acks(submitted={"t0/a"}, deleted={"t0/b"}, completed={"t0/c"})
    problems = chaos.audit(FleetState(), acks)
    assert "acknowledged submit of t0/a is not in the ledger" in problems
    assert "acknowledged delete of t0/b is not in the ledger" in problems
    assert "acknowledged complete of t0/c left it none" in problems


def test_the_audit_reports_closures_that_are_not_final() -> None:
    state = FleetState()
    state.history += [
        LeaseClosed(at=1, lease="l1", reason="Completed"),
        LeaseClosed(at=2, lease="l1", reason="Completed"),
        RunStatusChanged(at=3, run="t0/r", phase="Completed", reason="Completed"),
        RunStatusChanged(at=4, run="t0/r", phase="Running", reason="Started"),
    ]
    problems = chaos.audit(state, chaos.Acks())
    assert "lease l1 closed twice" in problems
    assert "terminal run t0/r went back to Running" in problems


def test_the_replay_check_reports_a_phase_the_manager_disagrees_on() -> None:
    views = [{"namespace": "t0", "name": "ghost", "phase": "Running"}]
    assert chaos.replay_differences(FleetState(), views) == [
        "replay: t0/ghost is None in the fold, Running in the manager"
    ]
    assert chaos.replay_differences(FleetState(), []) == []
