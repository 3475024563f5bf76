"""``kubectl runs`` end to end against a real manager over NATS: output, exit codes, errors."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from gpu_fleet.cli import runs
from gpu_fleet.cli.stack import InProcessStack, call
from gpu_fleet.core.manifests import parse_inventory
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime import logs

T0 = parse_instant("2026-03-02T00:00:00Z")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(name="url")
def _url(tmp_path: Path) -> Iterator[str]:
    """A manager + binder on a background event loop thread (the CLI runs its own loop)."""
    logs.configure("test", "error", io.StringIO())  # keep service logs out of captured output
    loop = asyncio.new_event_loop()
    stack = InProcessStack(tmp_path, virtual_start=T0, services=("binder", "manager"))
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(stack.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(60)
    inventory = (EXAMPLES / "inventory.yaml").read_text()

    async def seed() -> None:
        assert stack.nc is not None
        for node in parse_inventory(inventory):
            await call(
                stack.nc,
                "node",
                {
                    "op": "register",
                    "node": {"name": node.name, "gpus": node.gpus, "labels": node.labels},
                },
            )

    asyncio.run_coroutine_threadsafe(seed(), loop).result(60)
    yield stack.admin_url
    asyncio.run_coroutine_threadsafe(stack.stop(), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def kubectl(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = runs.main([*argv, "--nats-url", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_submit_examples_then_read_everything(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Submitting the examples admits the co-funded run; get/leases/budgets/explain agree."""
    for path in sorted((EXAMPLES / "manifests").glob("*.yaml")):
        code, out, err = kubectl(capsys, url, "submit", "-f", str(path))
        assert code == 0, err
    code, out, _ = kubectl(capsys, url, "get", "eval-4", "-n", "partner", "-o", "json")
    view = json.loads(out)
    funding = view["funding"]
    assert (view["phase"], funding["owned"], funding["borrowed"]) == ("Running", 2, 2)
    code, out, _ = kubectl(capsys, url, "explain", "eval-4", "-n", "partner")
    assert code == 0
    assert "Lender" in out
    assert "org:ai:vision (2 GPUs)" in out
    code, out, _ = kubectl(capsys, url, "budgets", "-A", "-o", "yaml")
    assert code == 0
    assert "envelopes:" in out
    code, out, _ = kubectl(capsys, url, "leases", "eval-4", "-n", "partner")
    assert code == 0
    assert out.startswith("Run Leases")


def test_invalid_manifest_exits_2_naming_the_field(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A validation error exits 2 and names the file, the field path and rule, one line each."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: x}\n"
        "spec: {resources: {gpuType: H100, totalGPUs: 4}, malleable: {minTotalGPUs: 2,"
        " maxTotalGPUs: 8, stepGPUs: 0}}\n"
    )
    code, _, err = kubectl(capsys, url, "submit", "-f", str(bad))
    assert code == 2
    assert f"error: {bad}: spec.malleable.stepGPUs: must be >= 1" in err
    assert "Traceback" not in err


def test_unknown_run_exits_1_with_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing run is a one-line error with exit code 1."""
    code, _, err = kubectl(capsys, url, "explain", "ghost")
    assert code == 1
    assert err.strip() == "error: run default/ghost not found"


def test_shrink_requires_positive_by(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Usage errors exit 2 before anything is sent."""
    code, _, err = kubectl(capsys, url, "shrink", "x", "--by", "0")
    assert code == 2
    assert "--by must be > 0" in err


def test_unreachable_nats_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No stack running: a clear hint, exit 1, no traceback."""
    code = runs.main(["get", "--nats-url", "nats://127.0.0.1:1"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "cannot reach NATS" in err


def test_completions_cover_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    """Completion scripts list the real commands; an unknown shell exits 2."""
    assert runs.main(["completions", "bash"]) == 0
    out, _ = capsys.readouterr()
    for word in ("submit", "plan", "explain", "leases", "budgets", "sponsors", "shrink"):
        assert word in out
    assert runs.main(["completions", "tcsh"]) == 2


def test_eta_is_recorded_and_a_bad_time_names_the_field(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``kubectl runs eta`` records the run's ETA; an unparsable time exits 2 naming ``eta``."""
    for path in sorted((EXAMPLES / "manifests").glob("0[12]-*.yaml")):
        assert kubectl(capsys, url, "submit", "-f", str(path))[0] == 0
    code, out, err = kubectl(capsys, url, "eta", "train-8", "2026-03-02T06:00:00Z", "-n", "rai")
    assert code == 0, err
    assert "2026-03-02T06:00:00Z" in out
    code, out, _ = kubectl(capsys, url, "get", "train-8", "-n", "rai", "-o", "json")
    assert json.loads(out)["eta"] == "2026-03-02T06:00:00Z"
    code, _, err = kubectl(capsys, url, "eta", "train-8", "tomorrow", "-n", "rai")
    assert code == 2
    assert "error: eta:" in err


def test_complete_of_a_failed_run_says_why_and_exits_1(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failed is terminal (DESIGN decision 7): a late ``complete`` is refused in one line, exit
    1 (the request was fine; the run's state refuses it), and the run stays Failed."""
    for path in sorted((EXAMPLES / "manifests").glob("0[12]-*.yaml")):
        assert kubectl(capsys, url, "submit", "-f", str(path))[0] == 0
    assert kubectl(capsys, url, "fail", "train-8", "-n", "rai")[0] == 0
    code, out, err = kubectl(capsys, url, "complete", "train-8", "-n", "rai")
    assert code == 1
    assert out == ""
    assert (
        err == "error: cannot complete run rai/train-8: it is already Failed, which is terminal\n"
    )
    code, out, _ = kubectl(capsys, url, "get", "train-8", "-n", "rai", "-o", "json")
    assert json.loads(out)["phase"] == "Failed"


def test_global_options_before_the_verb_are_kept(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Break 2: ``kubectl runs --nats-url URL get -A`` dialled the default URL (the subcommand's
    default overwrote the global flag).  Every global option now works before the verb, and
    one given after the verb still wins."""
    monkeypatch.setenv("GPU_FLEET_NATS_URL", "nats://127.0.0.1:1")  # the default: unreachable
    for path in sorted((EXAMPLES / "manifests").glob("0[12]-*.yaml")):
        assert runs.main(["--nats-url", url, "submit", "-f", str(path)]) == 0
    capsys.readouterr()
    argv = ["--nats-url", url, "-n", "rai", "-o", "json", "--timeout", "20", "get", "train-8"]
    assert runs.main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["name"] == "train-8", err
    assert runs.main(["--nats-url", url, "-o", "yaml", "get", "-A"]) == 0
    out, _ = capsys.readouterr()
    assert "name: train-8" in out
    assert runs.main(["--nats-url", "nats://127.0.0.1:1", "budgets", "-A", "--nats-url", url]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("Budget Usage")


def test_lists_are_read_page_by_page(
    url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI follows ``continue`` until the last page and prints the list whole."""
    manifest = tmp_path / "paged.yaml"
    manifest.write_text(
        "---\n".join(
            "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
            f"metadata: {{name: p{i}, namespace: paged}}\n"
            "spec: {resources: {gpuType: H100, totalGPUs: 1}}\n"
            for i in range(5)
        )
    )
    assert runs.main(["--nats-url", url, "submit", "-f", str(manifest)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(runs, "PAGE_LIMIT", 2)  # three pages of 2, 2 and 1
    assert runs.main(["--nats-url", url, "-o", "json", "-n", "paged", "get"]) == 0
    names = [v["name"] for v in json.loads(capsys.readouterr()[0])]
    assert names == [f"p{i}" for i in range(5)]


@pytest.fixture(name="silent_fleet")
def _silent_fleet(nats_server: Any) -> Iterator[str]:
    """A NATS server where something takes every ``fleet.api.*`` request and never answers:
    what a client sees when the manager dies after receiving a request (applied or not)."""
    loop = asyncio.new_event_loop()
    holder: list[Any] = []

    async def swallow() -> None:
        nc = await nats.connect(nats_server.url)
        holder.append(nc)

        async def ignore(_: Any) -> None:
            return None

        await nc.subscribe("fleet.api.>", cb=ignore)
        await nc.flush()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(swallow(), loop).result(30)
    yield nats_server.url
    asyncio.run_coroutine_threadsafe(holder[0].close(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)
    loop.close()


def test_a_timed_out_submit_says_the_outcome_is_unknown_and_how_to_check(
    silent_fleet: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Break 8: a submit the manager received but never answered was reported as failed,
    although it may have been committed.  Now it says so, and how to check."""
    path = EXAMPLES / "manifests" / "02-single-domain.yaml"
    argv = ["submit", "-f", str(path), "--nats-url", silent_fleet, "--timeout", "0.5"]
    code = runs.main(argv)
    _, err = capsys.readouterr()
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: outcome unknown: {path}: no answer within 0.5s")
    assert "may or may not have been applied (Run rai/train-8)" in lines[0]
    assert lines[0].endswith("check with: kubectl runs get rai/train-8")


@pytest.mark.parametrize(
    ("argv", "check"),
    [
        (["complete", "train"], "kubectl runs get default/train"),
        (["shrink", "rai/train", "--by", "2"], "kubectl runs get rai/train"),
        (["delete", "x"], "kubectl runs get default/x (not found once deleted)"),
        (["node", "cordon", "a1"], "kubectl runs node cordon a1 again"),
        (["get", "x"], None),
    ],
)
def test_every_change_that_times_out_is_an_unknown_outcome_a_read_is_not(
    silent_fleet: str, capsys: pytest.CaptureFixture[str], argv: list[str], check: str | None
) -> None:
    code = runs.main([*argv, "--nats-url", silent_fleet, "--timeout", "0.3"])
    _, err = capsys.readouterr()
    assert code == 1
    if check is None:
        assert err == "error: the manager did not answer within 0.3s\n"
    else:
        assert err.startswith("error: outcome unknown: no answer within 0.3s;")
        assert f"check with: {check}" in err
