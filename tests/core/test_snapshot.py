"""A snapshot plus the ledger tail is exactly a full replay (over every shared scenario)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import fold, fold_all, snapshot
from gpu_fleet.scenario.loader import load_scenario_file
from gpu_fleet.scenario.runner import run_scenario
from gpu_fleet.views import build_report

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"
OWN = Path(__file__).resolve().parents[1] / "scenarios" / "data"
FILES = sorted(SHARED.glob("*.yaml")) + sorted(OWN.glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_snapshot_then_tail_equals_full_replay(path: Path) -> None:
    """Cut the history in the middle, snapshot, restore, fold the rest: same report."""
    fleets: list[Fleet] = []
    run_scenario(load_scenario_file(path), on_step=lambda fleet, _: fleets.append(fleet))
    assert fleets, "the scenario has steps"
    state = fleets[-1].state
    history = state.history
    period = state.settings_period_hours
    for cut in (1, len(history) // 2, len(history)):
        restored = snapshot.restore(snapshot.take(fold_all(history[:cut], period), cut))
        assert restored is not None
        rebuilt, seq = restored
        assert seq == cut
        for event in history[cut:]:
            fold(rebuilt, event)
        full = fold_all(history, period)
        assert build_report(rebuilt, "x", state.clock) == build_report(full, "x", state.clock)
        assert rebuilt.open_leases == full.open_leases
        assert rebuilt.slot_holder == full.slot_holder


def test_unreadable_or_foreign_snapshot_is_ignored() -> None:
    """Snapshots only save time: a bad one is refused, and the caller replays from the start."""
    assert snapshot.restore(b"not msgpack at all") is None
    empty = fold_all([])
    data = snapshot.take(empty, 0)
    assert snapshot.restore(data) is not None
    foreign = msgspec.structs.replace(
        msgspec.msgpack.decode(data, type=snapshot.Snapshot), format=snapshot.FORMAT + 1
    )
    assert snapshot.restore(msgspec.msgpack.encode(foreign)) is None
