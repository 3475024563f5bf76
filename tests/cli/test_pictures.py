"""``kubectl runs top`` and ``kubectl runs viz`` against a real manager over NATS."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _background import EXAMPLES, BackgroundStack, background_stack

from gpu_fleet.cli import pictures, runs
from gpu_fleet.views import CLASS_COLOURS


@pytest.fixture(name="fleet", scope="module")
def _fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundStack]:
    """The example fleet with every example manifest submitted."""
    with background_stack(tmp_path_factory.mktemp("stack")) as bg:
        for path in sorted((EXAMPLES / "manifests").glob("*.yaml")):
            bg.call("apply", {"documents": path.read_text(), "source": path.name})
        yield bg


def kubectl(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = runs.main([*argv, "--nats-url", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_top_draws_one_bar_per_domain_with_its_runs(
    fleet: BackgroundStack, capsys: pytest.CaptureFixture[str]
) -> None:
    data = fleet.call("fleetmap", {})
    code, out, err = kubectl(capsys, fleet.url, "top", "--color", "never")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"Fleet at {data['at']['iso']}: 32 GPUs")
    for d in data["domains"]:
        (row,) = [line for line in lines if line.startswith(d["key"])]
        bar = re.search(r"\[([^\]]*)\]", row)
        assert bar is not None
        # One character per GPU (16 per domain): the characters say the states.
        cells = bar.group(1)
        assert len(cells) == d["gpus"]
        for state, ch in pictures.BAR_CHARS.items():
            assert cells.count(ch) == d["counts"][state], (d["key"], state)
        runs_line = lines[lines.index(row) + 1]
        for r in d["runs"]:
            assert f"{r['run']} ({r['gpus']})" in runs_line
    assert "# owned" in lines[-1]
    assert "\033[" not in out, "no colour when asked for none"


def test_top_wide_adds_a_bar_per_node(
    fleet: BackgroundStack, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = kubectl(capsys, fleet.url, "top", "-o", "wide", "--color", "always")
    assert code == 0
    for name in ("a1", "a2", "b1", "b2"):
        assert re.search(rf"^    {name}\s+\[", out, re.MULTILINE), name
    assert "\033[32m" in out  # owned GPUs in green


def test_top_json_and_yaml_carry_the_counts_without_slots(
    fleet: BackgroundStack, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = kubectl(capsys, fleet.url, "top", "-o", "json")
    assert code == 0
    data = json.loads(out)
    assert data["gpus"] == 32
    assert sum(d["gpus"] for d in data["domains"]) == 32
    assert all("slots" not in n for d in data["domains"] for n in d["nodes"])
    code, out, _ = kubectl(capsys, fleet.url, "top", "-o", "yaml")
    assert yaml.safe_load(out) == data


def test_viz_writes_the_page_of_the_fleet(
    fleet: BackgroundStack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    target = tmp_path / "out" / "fleet.html"
    code, out, err = kubectl(capsys, fleet.url, "viz", "-o", str(target))
    assert code == 0, err
    assert str(target) in out
    page = target.read_text()
    assert page.startswith("<!doctype html>")
    fills = re.findall(r'<rect class="slot[^"]*"[^>]*fill="([^"]+)"', page)
    assert len(fills) == 32
    assert set(fills) <= set(CLASS_COLOURS.values())
    code, out, _ = kubectl(capsys, fleet.url, "viz", "-o", "-")
    assert code == 0
    assert out.count('<rect class="slot') == 32


def test_viz_to_an_unwritable_place_is_one_line(
    fleet: BackgroundStack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = kubectl(capsys, fleet.url, "viz", "-o", str(blocker / "fleet.html"))
    assert code == 1
    assert err.startswith("error: ")
    assert "Traceback" not in err


def test_scaled_bars_keep_the_total_and_every_present_state() -> None:
    counts = {"owned": 90, "shared": 1, "borrowed": 0, "unfunded": 9, "free": 0, "unavailable": 0}
    cells = pictures.scaled(counts, 48)
    assert sum(cells.values()) == 48
    assert cells["shared"] == 1
    assert cells["borrowed"] == 0
    assert pictures.scaled({"owned": 3, "free": 5}, 48) == {"owned": 3, "free": 5}
