"""A reservation's remedies, read from the matching, say what the full summaries say (issue 11).

``reservation._remedies`` used to read a whole ``FleetState.evaluation`` - per-envelope, per-cap
and per-run summaries over every open lease - for two yes/no lines; it now reads the matching
alone.  Here every reservation of every scenario (the shared ones and the project's own) is
checked against the summaries' answer, as the old code computed it
(``tests/core/reference_remedies.py``).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

from gpu_fleet.core.engine import reservation
from gpu_fleet.core.funding.metering import summarize
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant, Run
from gpu_fleet.scenario.loader import load_scenario_file
from gpu_fleet.scenario.runner import run_scenario

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from reference_remedies import reference_remedies

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"
OWN = Path(__file__).resolve().parent / "data"
CASES = sorted([*SHARED.glob("*.yaml"), *OWN.glob("*.yaml")])
SEEN: Counter[str] = Counter()


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> None:
    production = reservation._remedies

    def both(state: FleetState, run: Run, now: Instant) -> tuple[str, ...]:
        got = production(state, run, now)
        ev = summarize(state.meter, state.funding_inputs(), state.matching(now), now)
        assert got == reference_remedies(state, run, ev)
        SEEN.update(got)
        return got

    monkeypatch.setattr(reservation, "_remedies", both)


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_every_reservations_remedies_are_the_summaries_answer(path: Path, checked: None) -> None:
    run_scenario(load_scenario_file(path))


def test_the_remedies_compared_include_unfunded_and_spares(checked: None) -> None:
    """Guard against a vacuous pass: the scenarios do reach both lines (run after the rest)."""
    if not SEEN:
        for path in CASES:
            run_scenario(load_scenario_file(path))
    assert SEEN["Reclaim unfunded capacity in scope"] > 0
    assert SEEN["Drop spares in scope"] > 0
    assert SEEN["Run fair lottery if deficit remains"] > SEEN["Drop spares in scope"]
