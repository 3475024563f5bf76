"""Nothing lost, nothing sent twice, across a notifier SIGKILL and restart.

The notifier runs as its own OS process (``python -m gpu_fleet_notifier``) beside an in-process
stack; the receiver is a real HTTP server that is down while the notifier is killed.  After
the restart every notice reaches the receiver exactly once, the attempt numbers continue from
the history the killed process recorded, and a second kill-and-restart with everything already
delivered re-sends nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from _receivers import Receiver
from _stack import Stack, budget, run, wait_until

from gpu_fleet.cli.stack import wait_until_answers
from gpu_fleet.messages import notify
from gpu_fleet_notifier import signing

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

SECRET = "restart-secret"


class NotifierProcess:
    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "gpu_fleet_notifier",
            "--nats-url",
            self.url,
            "--clock",
            "ledger",
            "--time-scale",
            "0.001",
            "--max-attempts",
            "1000",
            "--backoff-base",
            "2s",
            "--backoff-cap",
            "5m",
            "--attempt-timeout",
            "2s",
            "--breaker-threshold",
            "1000",
            "--ack-wait",
            "3s",
            "--delivery-ack-wait",
            "3s",
            "--log-level",
            "info",
        ]
        env = {**os.environ, "TEAM_HOOK_SECRET": SECRET}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n1", 8)
        await stack.apply(budget("team", "org:team"))
        yield stack
    finally:
        await stack.stop()


@pytest.fixture(name="notifier")
def _notifier(stack: Stack, tmp_path: Path) -> Iterator[NotifierProcess]:
    proc = NotifierProcess(stack.url, tmp_path / "notifier.log")
    yield proc
    proc.stop()


async def history(stack: Stack) -> list[notify.DeliveryRecord]:
    reply = await stack.client.request(
        "fleet.notifier.history",
        b'{"namespace": "team", "channel": "hook", "limit": 10000}',
        timeout=20.0,
    )
    return [notify.RECORD_DECODER.decode(json.dumps(r).encode()) for r in json.loads(reply.data)]


async def ready(stack: Stack) -> None:
    await wait_until_answers(stack.client, ("$SRV.PING.gpu-fleet-notifier", b""), timeout=60)


async def test_a_receiver_down_across_a_notifier_sigkill_gets_everything_once(
    stack: Stack, notifier: NotifierProcess
) -> None:
    receiver = Receiver()  # down: nothing listens on its port yet
    try:
        notifier.start()
        await ready(stack)
        await stack.apply(
            "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
            "metadata: {name: hook, namespace: team}\n"
            f"spec: {{target: {{webhook: '{receiver.url}'}}, secretRef: {{env: TEAM_HOOK_SECRET}},"
            " filter: {events: [run-admitted, lease-started]}}\n"
        )
        for i in range(3):
            await stack.apply(run("team", f"r{i}", 1))

        async def all_retrying() -> bool:
            records = await history(stack)
            return len({r.delivery for r in records if r.outcome == "retry"}) == 6

        await wait_until(all_retrying, "six deliveries failing against the receiver that is down")
        notifier.kill()
        before = await history_offline(stack)
        assert len({r.delivery for r in before}) == 6  # durable: readable with no notifier
        await receiver.start()
        notifier.start()
        await ready(stack)

        async def all_delivered() -> bool:
            records = await history(stack)
            return len({r.delivery for r in records if r.outcome == "delivered"}) == 6

        await wait_until(all_delivered, "all six delivered after the restart", timeout=60)
        ids = receiver.ids()
        assert len(ids) == 6
        assert len(set(ids)) == 6  # each notice once
        for seen in receiver.seen:
            signing.verify(
                SECRET.encode(),
                seen.headers[signing.SIGNATURE_HEADER],
                seen.body,
                now=float(seen.headers[signing.SIGNATURE_HEADER].split(",")[0][2:]),
            )
        records = await history(stack)
        for delivery in {r.delivery for r in records}:
            attempts = [r.attempt for r in records if r.delivery == delivery]
            assert attempts == list(range(1, len(attempts) + 1)), attempts  # continued
            assert [r.outcome for r in records if r.delivery == delivery][-1] == "delivered"
        assert {r.delivery for r in before} <= {r.delivery for r in records}

        # Everything delivered: a second crash and restart sends nothing again.
        notifier.kill()
        notifier.start()
        await ready(stack)
        await stack.apply(run("team", "after", 1))
        await wait_until(lambda: len(receiver.seen) == 8, "the two new notices")
        # The old deliveries were acknowledged after their outcome was recorded: the restarted
        # notifier's consumers hand out only the new ones, so the receiver saw no repeat.
        assert len(set(receiver.ids())) == len(receiver.ids()) == 8
    finally:
        await receiver.stop()


async def history_offline(stack: Stack) -> list[notify.DeliveryRecord]:
    """The history straight from its stream (no notifier running): it is durable."""
    js = stack.client.jetstream()
    sub = await js.pull_subscribe("fleet.delivery.>", stream="NOTIFY_HISTORY")
    out: list[notify.DeliveryRecord] = []
    try:
        left = (await sub.consumer_info()).num_pending or 0
        while len(out) < left:
            msgs = await sub.fetch(left - len(out), timeout=5)
            out += [notify.RECORD_DECODER.decode(m.data) for m in msgs]
        return out
    finally:
        await sub.unsubscribe()
