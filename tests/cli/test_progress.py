"""Progress bars: drawn on a terminal, quiet in CI, in a pipe and under JSON output.

The bar's clock is a fake one and the "terminal" a StringIO that says it is one, so what a
person would see is asserted character by character, with no waiting.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from gpu_fleet.cli import main
from gpu_fleet.cli.progress import PLAIN_INTERVAL, ProgressBar, progress_wanted

DATA = Path(__file__).resolve().parents[1] / "scenarios" / "data"
FILES = [str(DATA / n) for n in ("budget-status-numbers.yaml", "eta-reported-by-the-workload.yaml")]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_when_a_bar_is_wanted() -> None:
    tty, pipe = Terminal(), io.StringIO()
    assert progress_wanted(stream=tty, env={})
    assert not progress_wanted(stream=pipe, env={})  # piped or redirected: quiet
    assert not progress_wanted(stream=tty, env={"CI": "true"})  # CI: quiet
    assert progress_wanted(stream=tty, env={"CI": "0"})
    assert progress_wanted(stream=tty, env={"CI": "false"})
    assert not progress_wanted(stream=tty, env={}, json_output=True)  # -o json: quiet
    assert progress_wanted(stream=pipe, env={"CI": "1"}, json_output=True, force=True)


def test_a_terminal_bar_redraws_in_place_throttled_and_ends_with_a_newline() -> None:
    out, clock = Terminal(), Clock()
    bar = ProgressBar(out, "work", clock)
    bar.tick(0, 4)
    bar.tick(1, 4)  # same instant: not redrawn
    clock.now += 0.25
    bar.tick(2, 4)
    bar.tick(4, 4)  # the end is always drawn
    bar.tick(4, 4)  # and only once
    label = f"{'work':<32}"
    assert out.getvalue() == (
        f"\r{label} [{'.' * 30}] 0/4"
        f"\r{label} [{'#' * 15}{'.' * 15}] 2/4"
        f"\r{label} [{'#' * 30}] 4/4\n"
    )


def test_clear_wipes_a_partial_bar_before_other_output() -> None:
    out = Terminal()
    bar = ProgressBar(out, "work", Clock())
    bar.tick(1, 3)
    bar.clear()
    assert out.getvalue().endswith("\r\033[K")
    bar.clear()  # nothing drawn since: nothing to wipe
    assert out.getvalue().count("\033[K") == 1


def test_a_forced_bar_in_a_log_writes_whole_lines_every_ten_seconds() -> None:
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(out, "work", clock)
    bar.tick(1, 10)
    clock.now += PLAIN_INTERVAL - 1
    bar.tick(5, 10)
    clock.now += 1
    bar.tick(6, 10)
    bar.tick(10, 10)
    lines = out.getvalue().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines] == ["1/10", "6/10", "10/10"]
    assert "\r" not in out.getvalue()


def run_scenarios(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *argv: str, ci: str = ""
) -> tuple[int, str, str]:
    """``gpu-fleet scenario run`` with stderr on a (fake) terminal."""
    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("CI", ci)
    code = main.main(["scenario", "run", *argv])
    return code, capsys.readouterr().out, tty.getvalue()


def test_scenario_batches_show_a_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_scenarios(monkeypatch, capsys, *FILES)
    assert code == 0
    assert err.startswith("\r" + f"{'scenario run':<32} [")
    assert err.endswith(f"[{'#' * 30}] 2/2\n")
    assert "\033[K" in err  # wiped before each report is printed
    assert out.count("Scenario ") == 2


@pytest.mark.parametrize(
    ("argv", "ci"),
    [
        ((*FILES, "-o", "json"), ""),  # JSON output: quiet
        (tuple(FILES), "true"),  # CI: quiet
        (tuple(FILES[:1]), ""),  # one file: nothing to count
    ],
    ids=["json", "ci", "one-file"],
)
def test_scenario_runs_stay_quiet_in_ci_under_json_and_for_one_file(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: tuple[str, ...],
    ci: str,
) -> None:
    code, out, err = run_scenarios(monkeypatch, capsys, *argv, ci=ci)
    assert code == 0
    assert err == ""
    assert out


def test_progress_forces_the_bar_even_in_ci(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_scenarios(monkeypatch, capsys, *FILES, "--progress", ci="true")
    assert code == 0
    assert err.endswith("2/2\n")
