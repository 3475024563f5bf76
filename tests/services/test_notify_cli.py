"""``kubectl runs submit -f channel.yaml`` and ``kubectl runs notify list | test | history |
delete`` against a real stack, a real notifier and real HTTP receivers.

The CLI runs in a worker thread (it owns its event loop, as it does in a terminal) while the
stack runs in the test's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from _receivers import Receiver
from _stack import Stack, budget, run, wait_until

from gpu_fleet.cli import runs
from gpu_fleet_notifier.dispatch import DeliveryConfig
from gpu_fleet_notifier.policy import Backoff
from gpu_fleet_notifier.service import Notifier, NotifierConfig

pytestmark = pytest.mark.asyncio

CONFIG = NotifierConfig(
    nats_url="",
    clock="ledger",
    ack_wait=3.0,
    fetch_timeout=0.2,
    delivery=DeliveryConfig(
        max_attempts=3,
        attempt_timeout=2.0,
        breaker_threshold=1000,
        backoff=Backoff(base=2.0, cap=60.0),
        fetch_timeout=0.2,
        stop_grace=1.0,
        seed=5,
    ),
    time_scale=0.001,
)


def channel_doc(name: str, url: str) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{target: {{webhook: '{url}'}}, format: slack, secretRef: {{env: HOOK_SECRET}},"
        " leadTimes: [1h, 10m], filter: {events: [run-admitted, channel-test]}}\n"
    )


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("HOOK_SECRET", "cli-secret")
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n1", 8)
        await stack.apply(budget("team", "org:team"))
        await stack.add(
            Notifier(
                dataclasses.replace(
                    CONFIG,
                    nats_url=stack.url_for("notifier"),
                    ledger_keys=stack.keys_for("notifier"),
                )
            )
        )
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(name="receivers")
async def _receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    ok, broken = Receiver(), Receiver(mode="fail")
    await ok.start()
    await broken.start()
    yield ok, broken
    await ok.stop()
    await broken.stop()


async def kubectl(
    capsys: pytest.CaptureFixture[str], stack: Stack, *argv: str
) -> tuple[int, str, str]:
    code = await asyncio.to_thread(runs.main, [*argv, "--nats-url", stack.url, "-n", "team"])
    out, err = capsys.readouterr()
    return code, _without_logs(out), _without_logs(err)


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")


def _without_logs(text: str) -> str:
    """The stack in this process logs to the same stdout the CLI prints to: keep the CLI's."""
    return "".join(line for line in text.splitlines(keepends=True) if not _LOG_LINE.match(line))


async def test_a_team_manages_and_inspects_its_channels_from_the_cli(
    stack: Stack,
    receivers: tuple[Receiver, Receiver],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    ok, broken = receivers
    (tmp_path / "ok.yaml").write_text(channel_doc("ok-hook", ok.url))
    (tmp_path / "broken.yaml").write_text(channel_doc("broken", broken.url))
    for name in ("ok", "broken"):
        code, out, err = await kubectl(
            capsys, stack, "submit", "-f", str(tmp_path / f"{name}.yaml")
        )
        assert code == 0, err
        assert "NotificationChannel  created" in out

    await stack.apply(run("team", "train", 2))
    await wait_until(lambda: len(broken.seen) == 3, "three attempts at the broken receiver")

    async def dead_recorded() -> Any:
        code, out, _ = await kubectl(capsys, stack, "notify", "history", "broken", "-o", "json")
        rows = json.loads(out) if code == 0 else []
        return rows if rows and rows[-1]["outcome"] == "dead" else None

    rows = await wait_until(dead_recorded, "the dead letter in notify history")
    assert [(r["event"], r["attempt"], r["outcome"], r["status"]) for r in rows] == [
        ("run-admitted", 1, "retry", 500),
        ("run-admitted", 2, "retry", 500),
        ("run-admitted", 3, "dead", 500),
    ]

    code, out, err = await kubectl(capsys, stack, "notify", "history", "broken")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Delivery History"
    assert lines[1].split() == [
        "Time",
        "Channel",
        "Event",
        "Run",
        "Attempt",
        "Outcome",
        "Status",
        "Detail",
    ]
    assert [line.split()[4:7] for line in lines[2:]] == [
        ["1", "retry", "500"],
        ["2", "retry", "500"],
        ["3", "dead", "500"],
    ]
    assert "HTTP 500; next " in lines[2]

    code, out, _ = await kubectl(capsys, stack, "notify", "history", "--run", "train", "-o", "json")
    both = json.loads(out)
    assert {r["channel"] for r in both} == {"team/ok-hook", "team/broken"}
    assert all(r["run"] == "team/train" for r in both)

    code, out, err = await kubectl(capsys, stack, "notify", "list")
    assert code == 0, err
    listed = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert set(listed) == {"team/broken", "team/ok-hook"}
    assert listed["team/ok-hook"][1:5] == [
        "webhook",
        f"http://127.0.0.1:{ok.port}/…",
        "slack",
        "1h,10m",
    ]
    assert listed["team/broken"][-1] == "1"  # one dead letter

    code, out, err = await kubectl(capsys, stack, "notify", "test", "ok-hook")
    assert code == 0, err
    fields = dict(line.split(None, 1) for line in out.splitlines()[2:] if " " in line.strip())
    assert (fields["Delivered"], fields["Status"], fields["Answer"]) == ("yes", "200", "ok")
    assert fields["Signature"].startswith("t=")
    assert json.loads(ok.seen[-1].body)["text"].startswith(":wave: *Test*")

    code, out, err = await kubectl(capsys, stack, "notify", "test", "broken")
    assert code == 1
    assert "Status     500" in out

    code, _, err = await kubectl(capsys, stack, "notify", "test", "ghost")
    assert (code, err) == (1, "error: notification channel team/ghost not found\n")

    code, out, err = await kubectl(capsys, stack, "notify", "delete", "broken")
    assert (code, out.strip()) == (0, "deleted notification channel team/broken"), err
    seq = await stack.seq()

    async def gone() -> bool:
        reply = await stack.client.request("fleet.notifier.status", b"", timeout=10)
        if json.loads(reply.data)["seq"] < seq:
            return False
        code, out, _ = await kubectl(capsys, stack, "notify", "list", "-o", "json")
        return code == 0 and [c["channel"] for c in json.loads(out)] == ["team/ok-hook"]

    await wait_until(gone, "the deleted channel to leave the list")


async def test_a_bad_channel_is_refused_naming_each_field_and_nothing_is_applied(
    stack: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        "metadata: {name: hook}\n"
        "spec: {target: {webhook: 'ftp://x/y'}, format: teams, leadTimes: [0s]}\n"
    )
    code, _, err = await kubectl(capsys, stack, "submit", "-f", str(bad))
    assert code == 2
    assert err.splitlines() == [
        f"error: {bad}: spec.format: must be one of 'json', 'slack', got 'teams'",
        f"error: {bad}: spec.target.webhook: must be an http or https URL, got scheme 'ftp'",
        f"error: {bad}: spec.secretRef: required with target.webhook: every webhook is signed",
        f"error: {bad}: spec.leadTimes[0]: must be > 0",
    ]
    code, out, _ = await kubectl(capsys, stack, "notify", "list", "-o", "json")
    assert (code, json.loads(out)) == (0, [])
