"""``gpu-fleet scenario run``: exit codes and what a refused step looks like (issue 9).

A scenario file either runs (exit 0, whatever its outcome, refused steps listed) or is invalid
(exit 2, one line per problem naming the field path).  Neither ever ends in a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_fleet.cli import main

REJECTING = (
    Path(__file__).resolve().parents[1]
    / "scenarios"
    / "data"
    / ("rejected-steps-are-reported.yaml")
)


def gpu_fleet(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("via_nats", [False, True], ids=["in-process", "via-nats"])
def test_a_refused_step_is_reported_and_the_scenario_goes_on(
    capsys: pytest.CaptureFixture[str], via_nats: bool
) -> None:
    """Completing a Failed run is refused: exit 0, the refusal in the report, Failed kept."""
    flags = ["--via-nats"] if via_nats else []
    code, out, err = gpu_fleet(
        capsys, "scenario", "run", *flags, "--check", "-o", "json", str(REJECTING)
    )
    assert (code, err) == (0, "")
    final = json.loads(out)["reports"][-1]
    assert final["rejections"][0] == {
        "step": 1,
        "at": "2026-03-02T00:20:00Z",
        "action": "complete",
        "target": "a/train",
        "reason": "cannot complete run a/train: it is already Failed, which is terminal",
    }
    phases = {f"{r['namespace']}/{r['name']}": r["phase"] for r in final["runs"]}
    assert phases == {"a/eval": "Completed", "a/train": "Failed"}


def test_the_table_lists_refused_steps(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = gpu_fleet(capsys, "scenario", "run", str(REJECTING))
    assert code == 0
    assert "Rejected steps (4; nothing changed, the scenario went on)" in out
    assert "steps[1]  2026-03-02T00:20:00Z  complete  a/train" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not text", "not UTF-8 text (invalid byte at offset 0)"),
        (
            b'name: x\nstart: "2026-03-02T00:00:00Z"\nsteps:\n  - {at: "+1m", complete: {}}\n',
            "steps[0].complete.name: required",
        ),
    ],
    ids=["not-utf8", "missing-field"],
)
def test_an_invalid_file_exits_2_naming_the_problem(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    code, out, err = gpu_fleet(capsys, "scenario", "run", str(path))
    assert code == 2
    assert out == ""
    assert message in err
    assert "Traceback" not in err
    assert all(line.startswith("error: ") for line in err.splitlines())
