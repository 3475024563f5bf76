"""Every scenario in ../shared/scenarios runs through the core and meets its machine expectations.

Scenarios whose capability has not landed yet are marked expected-to-fail (strict), naming the
capability they wait for; none is skipped silently, and a strict xfail turns red the day the
capability lands without its mark being removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_fleet.scenario.expectations import check_expectations
from gpu_fleet.scenario.loader import load_scenario_file
from gpu_fleet.scenario.runner import run_scenario

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "scenarios"
OWN = Path(__file__).resolve().parent / "data"

# A scenario whose capability has not landed yet goes here as ``file name -> reason``, e.g.
# "x.yaml": "waits for ... (issue: ...)".  The resolver at activation, node-failure handling
# and elastic grow/shrink have landed, so nothing waits today.
PENDING_CAPABILITY: dict[str, str] = {}


def _cases(folder: Path) -> list[object]:
    out: list[object] = []
    for path in sorted(folder.glob("*.yaml")):
        marks = []
        if path.name in PENDING_CAPABILITY:
            marks.append(pytest.mark.xfail(strict=True, reason=PENDING_CAPABILITY[path.name]))
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def _assert_expectations(path: Path) -> None:
    scenario = load_scenario_file(path)
    report = run_scenario(scenario)
    failed = [o.message for o in check_expectations(report, scenario.expectations) if not o.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/scenarios is not beside this checkout")
@pytest.mark.parametrize("path", _cases(SHARED) if SHARED.is_dir() else [])
def test_shared_scenario_meets_expectations(path: Path) -> None:
    """A shared scenario's machine expectations all hold."""
    _assert_expectations(path)


@pytest.mark.parametrize("path", _cases(OWN))
def test_own_scenario_meets_expectations(path: Path) -> None:
    """One of the project's own scenarios meets its machine expectations."""
    _assert_expectations(path)


def test_pending_capability_list_names_real_files() -> None:
    """Every expected-to-fail entry names a file that exists (no stale marks)."""
    if not SHARED.is_dir():
        pytest.fail("../shared/scenarios is missing; CI always has it")
    names = {p.name for p in SHARED.glob("*.yaml")}
    assert set(PENDING_CAPABILITY) <= names


def test_same_scenario_same_report() -> None:
    """Determinism: running a scenario twice gives byte-identical reports."""
    path = SHARED / "golden-borrow-sponsor-runs.yaml"
    if not path.exists():
        pytest.fail("shared scenario missing")
    scenario = load_scenario_file(path)
    assert run_scenario(scenario) == run_scenario(scenario)
