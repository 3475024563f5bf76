"""Webhook delivery end to end: channels applied through the fleet API, notices derived from
the ledger, signed requests to real local HTTP receivers, retries, dead letters, history.

The stack is real (nats-server with JetStream, manager on a virtual clock, binder); the
notifier runs on the ledger clock, so deadlines are a function of the ledger, and its delivery
clock is scaled (one real millisecond per second), so a Retry-After of 120 s or a backoff of a
minute is honoured as recorded while the test waits a fraction of a second.  Waiting is polling
on conditions with a bound, never a timing assertion.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from _receivers import Receiver
from _stack import T0, Stack, budget, run, wait_until
from nats.aio.msg import Msg

from gpu_fleet.messages import notify, subjects
from gpu_fleet_notifier import signing
from gpu_fleet_notifier.dispatch import DeliveryConfig
from gpu_fleet_notifier.policy import Backoff
from gpu_fleet_notifier.service import Notifier, NotifierConfig

pytestmark = pytest.mark.asyncio

SECRET = "s3cr3t-for-tests"
H = 3600

DELIVERY = DeliveryConfig(
    max_attempts=4,
    attempt_timeout=2.0,
    breaker_threshold=1000,  # the breaker has its own test
    backoff=Backoff(base=2.0, cap=60.0),
    fetch_timeout=0.2,
    stop_grace=1.0,
    seed=13,
)
CONFIG = NotifierConfig(
    nats_url="",
    clock="ledger",
    ack_wait=3.0,
    fetch_timeout=0.2,
    delivery=DELIVERY,
    time_scale=0.001,
)


def notifier_for(stack: Stack, **overrides: Any) -> Notifier:
    return Notifier(
        dataclasses.replace(
            CONFIG,
            nats_url=stack.url_for("notifier"),
            ledger_keys=stack.keys_for("notifier"),
            **overrides,
        )
    )


def hook(name: str, url: str, extra: str = "", namespace: str = "team") -> str:
    return f"""
apiVersion: rq.davidlangworthy.io/v1
kind: NotificationChannel
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  target: {{webhook: "{url}"}}
  secretRef: {{env: TEAM_HOOK_SECRET}}
  {extra}
"""


def hours_budget(gpu_hours: float) -> str:
    return f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: b, namespace: team}}
spec:
  owner: "org:team"
  envelopes:
    - {{name: e, flavor: H100, selector: {{region: r}}, concurrency: 16, gpuHours: {gpu_hours},
        start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}}
"""


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("TEAM_HOOK_SECRET", SECRET)
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n1", 8)
        await stack.apply(budget("other", "org:other"))
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(name="receivers")
async def _receivers() -> AsyncIterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for r in started:
        await r.stop()


async def receiver(receivers: list[Receiver], **kwargs: Any) -> Receiver:
    r = Receiver(**kwargs)
    await r.start()
    receivers.append(r)
    return r


async def tick(stack: Stack, at: int, name: str) -> None:
    """Move the ledger clock: advance the manager's clock, then record any event at it."""
    await stack.advance(at)
    await stack.apply(run("other", name, 1))


async def history(stack: Stack, **body: Any) -> list[notify.DeliveryRecord]:
    reply = await stack.client.request(
        "fleet.notifier.history", json.dumps(body).encode(), timeout=20.0
    )
    return [msgspec_record(r) for r in json.loads(reply.data)]


def msgspec_record(raw: dict[str, Any]) -> notify.DeliveryRecord:
    return notify.RECORD_DECODER.decode(json.dumps(raw).encode())


def verify(notifier: Notifier, seen: Any) -> int:
    """Check a request as a receiver does (its clock in step with the sender's)."""
    return signing.verify(
        SECRET.encode(),
        seen.headers[signing.SIGNATURE_HEADER],
        seen.body,
        now=notifier.delivery_clock.now(),
        tolerance=10**6,  # the scaled clock runs 1000x: a real second is ~17 minutes
    )


class Inbox:
    def __init__(self) -> None:
        self.items: list[notify.Notification] = []

    async def receive(self, msg: Msg) -> None:
        self.items.append(notify.DECODER.decode(msg.data))


# --------------------------------------------------------------------------------------------


async def test_a_team_gets_slack_notices_before_a_lease_ends_and_before_its_hours_run_out(
    stack: Stack, receivers: list[Receiver]
) -> None:
    """The issue's "done when": apply a channel, get a Slack-formatted signed notice 10 minutes
    before a lease expires, and another 10 minutes before the GPU-hours run out."""
    slack = await receiver(receivers)
    notifier = await stack.add(notifier_for(stack))
    assert isinstance(notifier, Notifier)
    await stack.apply(hours_budget(100))
    applied = await stack.apply(
        hook(
            "slack",
            slack.url,
            "format: slack\n  leadTimes: [10m]\n"
            "  filter: {events: [lease-expiring, funding-expiring]}",
        )
    )
    assert applied == [
        {"kind": "NotificationChannel", "namespace": "team", "name": "slack", "action": "created"}
    ]
    await stack.apply(run("team", "train", 2, ", runtime: {maxDuration: 1h}"))
    await stack.apply(run("team", "long", 2))

    await tick(stack, T0 + 50 * 60, "t1")
    await wait_until(lambda: slack.seen, "the lease-expiring notice")
    first = slack.seen[0]
    assert first.headers[signing.EVENT_HEADER] == "lease-expiring"
    assert first.headers["Content-Type"] == "application/json"
    verify(notifier, first)
    text = json.loads(first.body)["text"]
    assert text.startswith(":hourglass_flowing_sand: *Lease expiring in 10m*: lease `team/train@")
    assert "ends at 2026-03-02T01:00:00Z" in text

    # train expires at 1h; long then burns alone: 100 - ~4 used = ~96 hours at 2 GPUs = 48h.
    await stack.advance(T0 + H)
    await tick(stack, T0 + 49 * H - 600, "t2")
    await wait_until(lambda: len(slack.seen) >= 2, "the funding-expiring notice")
    second = slack.seen[1]
    assert second.headers[signing.EVENT_HEADER] == "funding-expiring"
    verify(notifier, second)
    text = json.loads(second.body)["text"]
    assert text.startswith(":money_with_wings: *Funding expiring in 10m*: lease `team/long@")
    assert "GPU-hours run out at the current burn" in text
    assert [s.headers[signing.EVENT_HEADER] for s in slack.seen] == [
        "lease-expiring",
        "funding-expiring",
    ]
    records = await history(stack, namespace="team", channel="slack")
    assert [(r.event, r.attempt, r.outcome, r.status) for r in records] == [
        ("lease-expiring", 1, "delivered", 200),
        ("funding-expiring", 1, "delivered", 200),
    ]


async def test_a_broken_receiver_is_retried_with_backoff_then_dead_lettered(
    stack: Stack, receivers: list[Receiver]
) -> None:
    """500 every time: attempts 1-3 are retries (each with its next instant), the 4th is the
    dead letter, reported on the team's NATS subject; a healthy channel is unaffected."""
    broken = await receiver(receivers, mode="fail")
    healthy = await receiver(receivers)
    team = Inbox()
    await stack.client.subscribe("fleet.notify.org_team.delivery-dead-lettered", cb=team.receive)
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("broken", broken.url, "filter: {events: [run-admitted]}"))
    await stack.apply(hook("healthy", healthy.url, "filter: {events: [run-admitted]}"))
    await stack.apply(run("team", "train", 2))

    await wait_until(lambda: team.items, "the dead letter on NATS")
    assert len(broken.seen) == 4
    assert len({s.headers[signing.ID_HEADER] for s in broken.seen}) == 1  # one notice, 4 tries
    assert [s.headers[signing.ATTEMPT_HEADER] for s in broken.seen] == ["1", "2", "3", "4"]
    assert len(healthy.seen) == 1
    records = await history(stack, namespace="team", channel="broken")
    assert [(r.attempt, r.outcome, r.status) for r in records] == [
        (1, "retry", 500),
        (2, "retry", 500),
        (3, "retry", 500),
        (4, "dead", 500),
    ]
    gaps = [r.next_at - r.at for r in records if r.next_at is not None]
    assert [round(g) >= lo for g, lo in zip(gaps, (1, 2, 4), strict=True)] == [True] * 3
    (dead,) = team.items
    assert dead.detail["channel"] == "team/broken"
    assert dead.detail["attempts"] == 4
    assert dead.detail["failedEvent"] == "run-admitted"


async def test_429_with_retry_after_is_honoured(stack: Stack, receivers: list[Receiver]) -> None:
    throttled = await receiver(receivers, script=["throttle"], retry_after="120")
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("hook", throttled.url, "filter: {events: [run-admitted]}"))
    await stack.apply(run("team", "train", 2))

    await wait_until(lambda: len(throttled.seen) >= 2, "the retry after the 429")
    records = await history(stack, namespace="team", channel="hook")
    assert [(r.attempt, r.outcome, r.status, r.retry_after) for r in records] == [
        (1, "retry", 429, 120.0),
        (2, "delivered", 200, None),
    ]
    first = records[0]
    assert first.next_at is not None
    assert first.next_at - first.at >= 120  # never sooner than the receiver asked
    assert records[1].at >= first.next_at - 0.5
    assert throttled.ids()[0] == throttled.ids()[1]  # the same idempotency id on the retry


async def test_a_slow_receiver_never_delays_another(
    stack: Stack, receivers: list[Receiver]
) -> None:
    """One receiver holds every request past the timeout; the other gets its notices while the
    first is still hanging (one worker and one consumer per channel)."""
    slow = await receiver(receivers, mode="slow")
    fast = await receiver(receivers)
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("slow", slow.url, "filter: {events: [lease-started]}"))
    await stack.apply(hook("fast", fast.url, "filter: {events: [lease-started]}"))
    for i in range(3):
        await stack.apply(run("team", f"r{i}", 1))

    await wait_until(lambda: len(fast.seen) == 3, "the fast receiver's three notices")
    assert slow.seen  # the slow one is being tried...
    assert not slow.release.is_set()  # ...and has answered nothing
    await wait_until(lambda: history(stack, namespace="team", channel="slow"), "a recorded timeout")
    records = await history(stack, namespace="team", channel="slow")
    assert records[0].outcome == "retry"
    assert records[0].error == "timed out after 2s"


async def test_a_permanent_refusal_is_dead_lettered_at_once(
    stack: Stack, receivers: list[Receiver]
) -> None:
    gone = await receiver(receivers, mode="refuse")
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("gone", gone.url, "filter: {events: [run-admitted]}"))
    await stack.apply(run("team", "train", 2))
    await wait_until(lambda: _outcomes(stack, "gone"), "the dead letter of a 404")
    assert await _outcomes(stack, "gone") == [(1, "dead", 404)]
    assert len(gone.seen) == 1


async def _outcomes(stack: Stack, channel: str) -> list[tuple[int, str, int | None]]:
    return [
        (r.attempt, r.outcome, r.status)
        for r in await history(stack, namespace="team", channel=channel)
    ]


async def test_the_breaker_opens_and_spares_attempts_until_a_trial_succeeds(
    stack: Stack, receivers: list[Receiver]
) -> None:
    """Threshold 2: after two failures the breaker opens; deliveries wait in the outbox (no
    attempts spent) until the cooldown lets a trial through, which succeeds and closes it."""
    flaky = await receiver(receivers, script=["fail", "fail"])
    delivery = dataclasses.replace(DELIVERY, breaker_threshold=2, breaker_cooldown=300.0)
    notifier = await stack.add(notifier_for(stack, delivery=delivery))
    assert isinstance(notifier, Notifier)
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("flaky", flaky.url, "filter: {events: [run-admitted]}"))
    await stack.apply(run("team", "a", 1))
    await stack.apply(run("team", "b", 1))

    async def delivered() -> bool:
        outcomes = await _outcomes(stack, "flaky")
        return sum(o == "delivered" for _, o, _ in outcomes) == 2

    await wait_until(delivered, "both notices delivered after the breaker closed")
    records = await history(stack, namespace="team", channel="flaky")
    failures = [r for r in records if r.outcome == "retry"]
    assert len(failures) == 2
    first_success = min(r.at for r in records if r.outcome == "delivered")
    assert first_success - max(r.at for r in failures) >= 300 - 1  # waited out the cooldown
    assert len(flaky.seen) == 4  # two failures, the trial, the other notice: nothing wasted
    ep = next(iter(notifier.dispatcher.endpoints.values())) if notifier.dispatcher else None
    assert ep is not None
    assert ep.breaker.state(notifier.delivery_clock.now()) == "closed"


async def test_channels_list_test_and_history_endpoints(
    stack: Stack, receivers: list[Receiver]
) -> None:
    ok = await receiver(receivers)
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(hook("hook", ok.url, "format: slack\n  leadTimes: [1h, 10m]"))
    await stack.apply(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        "metadata: {name: bus, namespace: team}\nspec: {target: {nats: true}}\n"
    )
    seq = await stack.seq()

    async def listed() -> Any:
        reply = await stack.client.request("fleet.notifier.status", b"", timeout=10)
        if notify.STATUS_DECODER.decode(reply.data).seq < seq:
            return None
        reply = await stack.client.request(
            "fleet.notifier.channels", b'{"namespace": "team"}', timeout=10
        )
        return json.loads(reply.data)

    channels = await wait_until(listed, "the notifier to know both channels")
    assert [(c["channel"], c["target"], c["lead_times"]) for c in channels] == [
        ("team/bus", "nats fleet.channel.team.bus.<event>", [900]),
        ("team/hook", f"webhook http://127.0.0.1:{ok.port}/…", [3600, 600]),
    ]
    reply = await stack.client.request(
        "fleet.notifier.test", b'{"namespace": "team", "name": "hook"}', timeout=20
    )
    answer = json.loads(reply.data)
    assert (answer["delivered"], answer["status"], answer["body"]) == (True, 200, "ok")
    assert answer["signature"].startswith("t=")
    (sample,) = ok.seen
    assert sample.headers[signing.EVENT_HEADER] == "channel-test"
    assert json.loads(sample.body)["text"].startswith(":wave: *Test* from gpu-fleet")
    records = await history(stack, namespace="team", channel="hook")
    assert [(r.event, r.outcome, r.test) for r in records] == [("channel-test", "delivered", True)]
    missing = await stack.client.request(
        "fleet.notifier.test", b'{"namespace": "team", "name": "nope"}', timeout=10
    )
    assert json.loads(missing.data) == {
        "error": "notification channel team/nope not found",
        "code": "not_found",
    }


async def test_a_nats_only_channel_gets_its_own_subject_signed_when_asked(
    stack: Stack,
) -> None:
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await stack.client.subscribe(f"{subjects.CHANNEL_PREFIX}.team.bus.>", cb=keep)
    await stack.add(notifier_for(stack))
    await stack.apply(budget("team", "org:team"))
    await stack.apply(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        "metadata: {name: bus, namespace: team}\n"
        "spec: {target: {nats: true}, secretRef: {env: TEAM_HOOK_SECRET},"
        " filter: {events: [run-admitted]}}\n"
    )
    await stack.apply(run("team", "train", 2))
    await wait_until(lambda: got, "the NATS channel's delivery")
    (msg,) = got
    assert msg.subject == "fleet.channel.team.bus.run-admitted"
    headers = msg.headers or {}
    assert signing.verify(
        SECRET.encode(),
        headers[signing.SIGNATURE_HEADER],
        msg.data,
        now=float(headers[signing.SIGNATURE_HEADER].split(",")[0][2:]),
    )
    assert notify.DECODER.decode(msg.data).event == "run-admitted"
