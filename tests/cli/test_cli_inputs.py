"""Files users hand to the CLIs: one loader, one set of rules, one line per problem (issue 19).

``kubectl runs submit -f``, ``gpu-fleet validate`` and ``gpu-fleet scenario run`` read files
through ``gpu_fleet.core.manifests.load_source``.  A binary file, an alias bomb, an empty file
and a file of only ``---`` separators each exit 2 with one line naming the file and the reason,
never a traceback.  ``submit`` refuses them before sending anything; it gets a real NATS server
anyway, so that the same test also shows what the code before the fix did with them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_fleet.cli import main as gpu_fleet
from gpu_fleet.cli import runs

# Ten aliases of ten aliases ... six levels deep: 10**6 leaves from about 300 bytes.  (Big
# enough to be refused, small enough that the pre-fix code only struggled with it instead of
# exhausting the machine, which a 9**9 bomb does.)
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)
)

INPUTS = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8 text (invalid byte at offset 0)"),
    "empty": (b"", "the file is empty"),
    "separators": (b"---\n---\n# nothing\n", "no documents (only comments, '---' separators"),
    "bomb": (BOMB.encode(), "documents[0]: more than 100000 nodes once aliases are expanded"),
}


def submit(path: Path, url: str) -> int:
    return runs.main(["submit", "-f", str(path), "--nats-url", url])


def validate(path: Path, url: str) -> int:
    del url
    return gpu_fleet.main(["validate", str(path)])


def scenario(path: Path, url: str) -> int:
    del url
    return gpu_fleet.main(["scenario", "run", str(path)])


@pytest.mark.timeout(60)  # a hang guard (the bomb once hung submit), not a timing assertion
@pytest.mark.parametrize("command", [submit, validate, scenario], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kind", sorted(INPUTS))
def test_bad_files_exit_2_with_one_line_naming_the_file_and_the_reason(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    nats_server: Any,
    command: Callable[[Path, str], int],
    kind: str,
) -> None:
    """Breaks 3, 4 and 5: a traceback, a hang, exit 0 with nothing done, ``items[0]``."""
    data, reason = INPUTS[kind]
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(data)
    code = command(path, nats_server.url)
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ")
    assert reason in lines[0]
    assert "Traceback" not in err + out
    assert "items[" not in err


def test_submit_from_stdin_reads_bytes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-f -`` goes through the same loader: binary stdin is one line, exit 2."""

    class Stdin:
        class buffer:  # noqa: N801 - mimics sys.stdin.buffer
            @staticmethod
            def read() -> bytes:
                return b"\xff\xfe\x00"

    monkeypatch.setattr("sys.stdin", Stdin)
    assert runs.main(["--nats-url", "nats://127.0.0.1:1", "submit", "-f", "-"]) == 2
    _, err = capsys.readouterr()
    assert err.strip() == (
        "error: -: not UTF-8 text (invalid byte at offset 0); YAML and JSON files must be UTF-8"
    )


def test_validate_names_documents_with_the_file_and_refuses_a_parent_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Positions say ``documents[i]`` after the file name; a cycle across files is named."""
    header = "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\n"
    envelope = (
        "  envelopes: [{name: e, flavor: H100, selector: {region: r}, concurrency: 1,"
        ' start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}]\n'
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        f"{header}metadata: {{name: a, namespace: a}}\nspec:\n  owner: org:a\n{envelope}"
        f"---\n{header}metadata: {{name: b, namespace: b}}\nspec:\n  owner: org:b\n  bogus: 1\n"
        f"{envelope}"
    )
    assert gpu_fleet.main(["validate", str(bad)]) == 2
    _, err = capsys.readouterr()
    assert err.strip() == f"error: {bad}: documents[1].spec.bogus: unknown field"
    a = tmp_path / "a.yaml"
    a.write_text(
        f"{header}metadata: {{name: a, namespace: a}}\nspec:\n  owner: org:a\n"
        f'  parents: ["org:b"]\n{envelope}'
    )
    b = tmp_path / "b.yaml"
    b.write_text(
        f"{header}metadata: {{name: b, namespace: b}}\nspec:\n  owner: org:b\n"
        f'  parents: ["org:a"]\n{envelope}'
    )
    assert gpu_fleet.main(["validate", str(a), str(b)]) == 2
    _, err = capsys.readouterr()
    assert err.strip() == (
        "error: Budget b/b: spec.parents: parents form a cycle: org:b -> org:a -> org:b"
    )


def test_help_is_plain_text_and_every_up_option_has_a_help_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No reStructuredText double backticks on a terminal; no silent ``gpu-fleet up`` option."""
    for main, argv in (
        (runs.main, ["--help"]),
        (runs.main, ["submit", "--help"]),
        (gpu_fleet.main, ["--help"]),
        (gpu_fleet.main, ["up", "--help"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        out, _ = capsys.readouterr()
        assert "``" not in out, argv
    parser = gpu_fleet.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    up = sub.choices["up"]  # type: ignore[attr-defined]
    for action in up._actions:
        assert action.help, action.option_strings
