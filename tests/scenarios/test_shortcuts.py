"""Every scenario decides the same with the engine's shortcuts as without them (issue 11).

The shortcuts - skipping admission attempts that provably change nothing, extending a known
funding matching, reusing it in the meter - are checked here exhaustively over the shared
scenarios and the project's own: the same events in the same order and byte-identical
reports, with every skipped attempt run anyway and shown to emit nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import Event
from gpu_fleet.scenario.loader import load_scenario_file
from gpu_fleet.scenario.runner import run_scenario

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from test_incremental import check_reservation_views

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"
OWN = Path(__file__).resolve().parent / "data"
CASES = sorted([*SHARED.glob("*.yaml"), *OWN.glob("*.yaml")])


def _run(path: Path, *, shortcuts: bool) -> tuple[str, list[Event], int]:
    fleets: list[Fleet] = []

    def configure(fleet: Fleet) -> None:
        fleet.state.incremental = shortcuts
        fleet.check_shortcuts = shortcuts
        fleets.append(fleet)

    def on_step(fleet: Fleet, _: object) -> None:
        if shortcuts:
            check_reservation_views(fleet.state)

    report = run_scenario(load_scenario_file(path), configure=configure, on_step=on_step)
    (fleet,) = fleets
    return json.dumps(report, sort_keys=True), list(fleet.state.history), fleet.skipped_attempts


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_same_events_and_report_with_and_without_shortcuts(path: Path) -> None:
    fast_report, fast_events, _ = _run(path, shortcuts=True)
    ref_report, ref_events, skipped = _run(path, shortcuts=False)
    assert skipped == 0
    assert fast_events == ref_events
    assert fast_report == ref_report


def test_the_shortcuts_are_taken_somewhere() -> None:
    """Guard against a vacuous pass: some scenario does skip attempts."""
    assert CASES, "no scenarios found"
    assert sum(_run(p, shortcuts=True)[2] for p in CASES) > 0
