"""``scenario run --via-nats`` gives exactly the in-process report, for every shared scenario.

The via-NATS report is folded from the JetStream ledger written by the real manager and binder,
so equality proves the services decide exactly as the core does and that the ledger alone
reproduces every decision (times, lease ids and payers included).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_fleet.cli.via_nats import run_via_nats
from gpu_fleet.core.placement import plan_placement
from gpu_fleet.scenario.loader import load_scenario_file
from gpu_fleet.scenario.runner import run_scenario

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"
OWN = Path(__file__).resolve().parents[1] / "scenarios" / "data"
FILES = sorted(SHARED.glob("*.yaml")) + sorted(OWN.glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
async def test_via_nats_report_equals_in_process(path: Path) -> None:
    """Both runner modes produce the same report for the same file."""
    scenario = load_scenario_file(path)
    expected = run_scenario(scenario, planner=plan_placement)
    assert await run_via_nats(scenario) == expected


def test_there_are_scenarios_to_compare() -> None:
    """The comparison above is not vacuous."""
    assert len(FILES) >= 40 or not SHARED.exists()
