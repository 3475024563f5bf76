"""The notifier: ledger events to team subjects, at least once, never stored twice.

Service tests run a real nats-server, the manager on a virtual clock and the binder; the
notifier runs with ``clock="ledger"`` so lease-expiring is a function of the ledger (no sleeps).
The derivation rules (which event says what) are also tested directly on folded state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
import pytest_asyncio
from _stack import T0, Stack, budget, run, wait_until
from nats.aio.msg import Msg

from gpu_fleet.core.ledger import (
    EVENT_ENCODER,
    BudgetApplied,
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    NodeRegistered,
    RunStatusChanged,
    RunSubmitted,
    fold,
)
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Budget, Lease, LeaseRole, Node, Run
from gpu_fleet.messages import notify, subjects
from gpu_fleet.runtime.clock import VirtualClock
from gpu_fleet_notifier.derive import derive
from gpu_fleet_notifier.expiring import expiring, expiring_note
from gpu_fleet_notifier.service import Notifier, NotifierConfig

LEDGER_CLOCK = NotifierConfig(nats_url="", clock="ledger", ack_wait=3.0, fetch_timeout=0.2)


def notifier_for(stack: Stack, **overrides: Any) -> Notifier:
    return Notifier(
        dataclasses.replace(
            LEDGER_CLOCK,
            nats_url=stack.url_for("notifier"),
            ledger_keys=stack.keys_for("notifier"),
            **overrides,
        )
    )


class Inbox:
    """A core NATS subscription that collects decoded notifications."""

    def __init__(self) -> None:
        self.items: list[notify.Notification] = []

    async def receive(self, msg: Msg) -> None:
        self.items.append(notify.DECODER.decode(msg.data))

    def events(self, run: str | None = None) -> list[str]:
        return [n.event for n in self.items if run is None or n.run == run]


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n1", 8)
        await stack.apply(budget("team", "org:team"))
        await stack.apply(budget("other", "org:other"))
        yield stack
    finally:
        await stack.stop()


async def status(stack: Stack) -> notify.NotifierStatus:
    reply = await stack.client.request("fleet.notifier.status", b"", timeout=10.0)
    return notify.STATUS_DECODER.decode(reply.data)


async def caught_up(stack: Stack) -> notify.NotifierStatus:
    """Wait until the notifier handled every ledger message the manager appended so far."""
    target = await stack.seq()

    async def probe() -> notify.NotifierStatus | None:
        try:
            current = await status(stack)
        except nats.errors.NoRespondersError:
            return None
        return current if current.seq >= target else None

    return await wait_until(probe, f"the notifier to handle ledger sequence {target}")


async def stored(stack: Stack) -> list[tuple[str, notify.Notification]]:
    """Every message in NOTIFY as (Nats-Msg-Id, notification), in stream order."""
    js = stack.client.jetstream()
    info = await js.stream_info(subjects.NOTIFY_STREAM)
    out = []
    for seq in range(1, info.state.last_seq + 1):
        raw = await js.get_msg(subjects.NOTIFY_STREAM, seq)
        assert raw.data is not None
        out.append(((raw.headers or {}).get("Nats-Msg-Id", ""), notify.DECODER.decode(raw.data)))
    return out


@pytest.mark.asyncio
async def test_a_team_hears_about_its_run_and_no_other_team_does(stack: Stack) -> None:
    """run-admitted and lease-started reach fleet.notify.org_team.>; org_other hears nothing."""
    team, other = Inbox(), Inbox()
    await stack.client.subscribe("fleet.notify.org_team.>", cb=team.receive)
    await stack.client.subscribe("fleet.notify.org_other.>", cb=other.receive)
    await stack.add(notifier_for(stack))

    await stack.apply(run("team", "train", 4))
    await caught_up(stack)
    await wait_until(lambda: "lease-started" in team.events(), "lease-started on the team subject")
    await stack.client.flush()

    assert team.events("team/train")[:1] == ["lease-started"]
    assert "run-admitted" in team.events("team/train")
    assert {n.team for n in team.items} == {"org:team"}
    assert all(n.run == "team/train" for n in team.items)
    assert other.items == []
    admitted = next(n for n in team.items if n.event == "run-admitted")
    assert admitted.detail["reason"] == "GangBound"
    assert admitted.at == T0


@pytest.mark.asyncio
async def test_lease_closed_says_completed_after_the_api_completes_the_run(stack: Stack) -> None:
    team = Inbox()
    await stack.client.subscribe("fleet.notify.org_team.>", cb=team.receive)
    await stack.add(notifier_for(stack))
    await stack.apply(run("team", "train", 4))

    await stack.api("complete", {"namespace": "team", "name": "train"})
    await wait_until(lambda: "run-completed" in team.events(), "run-completed")

    closed = [n for n in team.items if n.event == "lease-closed"]
    assert closed
    assert {n.detail["closureReason"] for n in closed} == {"Completed"}
    assert all(n.lease is not None and n.id.endswith(f":lease-closed:{n.lease}") for n in closed)
    # One ledger message at a time, in ledger order: the closures precede the status change.
    assert team.events()[-1] == "run-completed"


@pytest.mark.asyncio
async def test_a_restarted_notifier_stores_no_duplicate(stack: Stack) -> None:
    """Restart resumes after the ack floor; a full replay (consumer gone) is all duplicates."""
    first = await stack.add(notifier_for(stack))
    await stack.apply(run("team", "train", 4))
    await stack.apply(run("other", "eval", 2))
    await caught_up(stack)
    before = await stored(stack)
    assert before
    await stack.remove(first)

    second = await stack.add(notifier_for(stack))
    await caught_up(stack)
    assert await stored(stack) == before
    assert (await status(stack)).delivered == 0  # nothing was handled twice

    await stack.api("complete", {"namespace": "team", "name": "train"})
    await caught_up(stack)
    after = await stored(stack)
    new = after[len(before) :]
    assert after[: len(before)] == before
    assert {n.event for _, n in new} == {"lease-closed", "run-completed"}

    # Forget the consumer: the next notifier re-derives everything from ledger sequence 1.
    await stack.remove(second)
    await stack.client.jetstream().delete_consumer("FLEET", "notifier")
    await stack.add(notifier_for(stack))
    replayed = await caught_up(stack)

    assert await stored(stack) == after
    assert (replayed.delivered, replayed.deduplicated) == (0, len(after))
    ids = [msg_id for msg_id, _ in after]
    assert len(set(ids)) == len(ids)
    assert all(msg_id == n.id for msg_id, n in after)


@pytest.mark.asyncio
async def test_a_lease_nearing_its_end_is_announced_once_ahead_of_it(stack: Stack) -> None:
    """With the ledger clock: the first event within the lead of the end triggers the warning."""
    team = Inbox()
    await stack.client.subscribe("fleet.notify.org_team.>", cb=team.receive)
    await stack.add(notifier_for(stack))
    await stack.apply(run("team", "train", 4, ", runtime: {maxDuration: 1h}"))
    await stack.advance(T0 + 50 * 60)
    await stack.apply(run("other", "tick", 1))  # any ledger event moves the ledger clock
    await stack.advance(T0 + 55 * 60)
    await stack.apply(run("other", "tock", 1))
    await caught_up(stack)
    await wait_until(lambda: "lease-expiring" in team.events(), "lease-expiring")

    warned = [n for n in team.items if n.event == "lease-expiring"]
    assert len(warned) == 1
    assert warned[0].detail["end"] == T0 + 3600
    assert warned[0].detail["remainingSeconds"] == 600
    assert warned[0].id == f"lease-expiring:{warned[0].lease}:{T0 + 3600}:900"
    assert (warned[0].due, warned[0].severity, warned[0].detail["lead"]) == (
        T0 + 3600,
        "warning",
        900,
    )

    await stack.advance(T0 + 3600)
    await wait_until(lambda: "run-failed" in team.events(), "the expiry to be reported")
    reasons = {n.detail.get("closureReason") for n in team.items if n.event == "lease-closed"}
    assert reasons == {"Expired"}


@pytest.mark.asyncio
async def test_a_waiting_run_hears_its_forecast_and_again_when_it_changes(stack: Stack) -> None:
    """run-forecast: a reserved run is told when it will start (P50/P90, confidence), and
    told again when the world changes the answer - here a run queued ahead of it is deleted."""
    team = Inbox()
    await stack.client.subscribe("fleet.notify.org_team.>", cb=team.receive)
    await stack.add(notifier_for(stack))
    await stack.apply(run("other", "blocker", 8, ", runtime: {maxDuration: 10m}"))
    await stack.apply(run("team", "ahead", 8, ", runtime: {maxDuration: 5m}"))
    await stack.apply(run("team", "waiter", 8, ", runtime: {maxDuration: 5m}"))
    await caught_up(stack)

    def forecasts(name: str) -> list[notify.Notification]:
        return [n for n in team.items if n.event == "run-forecast" and n.run == f"team/{name}"]

    await wait_until(lambda: forecasts("waiter") or None, "the waiter's first forecast")
    first = forecasts("waiter")[-1]
    assert (first.detail["p50"], first.detail["confidence"]) == (T0 + 15 * 60, "exact")
    assert first.detail["p90"] == first.detail["earliestStart"] == T0 + 15 * 60
    assert forecasts("ahead")[-1].detail["p50"] == T0 + 10 * 60

    await stack.api("delete", {"kind": "Run", "namespace": "team", "name": "ahead"})
    await caught_up(stack)
    await wait_until(lambda: len(forecasts("waiter")) > 1 or None, "a changed forecast")
    changed = forecasts("waiter")[-1]
    assert changed.detail["p50"] == T0 + 10 * 60  # the blocker's end, now that nobody is ahead
    assert changed.id == f"{changed.seq}:run-forecast:team/waiter"
    count = len(forecasts("waiter"))

    await stack.apply(run("other", "tick", 1))  # a change that leaves the answer alone
    await caught_up(stack)
    await stack.client.flush()
    assert len(forecasts("waiter")) == count


@pytest.mark.asyncio
async def test_with_the_wall_clock_expiry_is_checked_between_ledger_messages(stack: Stack) -> None:
    """Wall mode warns from its clock, with no ledger event needed (the clock is injected)."""
    team = Inbox()
    await stack.client.subscribe("fleet.notify.org_team.>", cb=team.receive)
    notifier = notifier_for(stack, clock="wall")
    notifier.wall = VirtualClock(T0 + 50 * 60)
    await stack.add(notifier)
    await stack.apply(run("team", "train", 4, ", runtime: {maxDuration: 1h}"))

    await wait_until(lambda: "lease-expiring" in team.events(), "lease-expiring")
    (warned,) = [n for n in team.items if n.event == "lease-expiring"]
    assert (warned.at, warned.detail["remainingSeconds"]) == (T0 + 50 * 60, 600)


@pytest.mark.asyncio
async def test_the_service_answers_ping_and_status(stack: Stack) -> None:
    await stack.add(notifier_for(stack))
    reply = await stack.client.request("$SRV.PING.gpu-fleet-notifier", b"", timeout=5.0)
    assert msgspec.json.decode(reply.data)["name"] == "gpu-fleet-notifier"
    got = await caught_up(stack)
    assert got.seq == await stack.seq()


@pytest.mark.asyncio
async def test_names_that_are_not_kubernetes_names_are_refused_naming_the_field(
    stack: Stack,
) -> None:
    """Issue 12's fuzzing: a 512 KiB namespace became a subject filter the server refused by
    closing the notifier's connection (the notifier exited); ``*`` would match every team."""
    notifier = await stack.add(notifier_for(stack))
    both = ("history", "channels")
    cases = [
        (both, b'{"namespace": "*"}', "namespace: "),
        (("history",), b'{"namespace": "team", "channel": "a.>"}', "channel: "),
        (("history",), b'{"run": "team"}', "run: must be namespace/name"),
        (("test",), b'{"namespace": "team", "name": "a b"}', "name: "),
        (both, b'{"namespace": "' + b"x" * 600_000 + b'"}', "the limit is 524288"),
    ]
    for endpoints, body, expected in cases:
        for endpoint in endpoints:
            reply = await stack.client.request(f"fleet.notifier.{endpoint}", body, timeout=10.0)
            answer = msgspec.json.decode(reply.data)
            assert answer["code"] == "bad_request", (endpoint, answer)
            assert expected in answer["error"], (endpoint, answer)
    assert isinstance(notifier, Notifier)
    assert notifier.nc is not None
    assert not notifier.nc.is_closed
    await caught_up(stack)  # and it still answers


# --------------------------------------------------------------------------------------------
# Derivation rules on folded state (pure, synchronous)
# --------------------------------------------------------------------------------------------

NODE = Node(
    name="n1",
    gpus=8,
    labels={"region": "r", "cluster": "c", "fabric.domain": "f", "gpu.flavor": "H100"},
)


def _manifest(text: str) -> Budget | Run:
    (m,) = parse_manifests(text, source="test")
    return m


def _state(*events: Event) -> FleetState:
    state = FleetState()
    base: list[Event] = [
        NodeRegistered(at=T0, node=NODE),
        BudgetApplied(at=T0, budget=_manifest(budget("team", "org:team"))),  # type: ignore[arg-type]
        RunSubmitted(at=T0, run=_manifest(run("team", "train", 2))),  # type: ignore[arg-type]
        RunSubmitted(at=T0, run=_manifest(run("loose", "stray", 1))),  # type: ignore[arg-type]
    ]
    for e in (*base, *events):
        fold(state, e)
    return state


def _lease(run_key: str = "team/train", end: int | None = None) -> Lease:
    return Lease(
        id=f"{run_key}@0#000",
        run=run_key,
        node="n1",
        slots=("n1#0", "n1#1"),
        role=LeaseRole.ACTIVE,
        group=0,
        start=T0,
        end=end,
    )


class TestDerive:
    def test_a_preemption_closure_is_reported_with_its_notice(self) -> None:
        """Closure by the resolver: lease-closed then preempted, carrying seed and conflict set."""
        lease = _lease()
        notice = LeasePreemptionScheduled(
            at=T0 + 5,
            lease=lease.id,
            run=lease.run,
            deadline=T0 + 65,
            reason="RandomPreempt(0xabc)",
            kind="Lottery",
            seed="0xabc",
            conflict_set=(lease.id, "x/y@0#000"),
            beneficiary="team/other",
        )
        state = _state(LeaseMinted(at=T0, lease=lease))
        announced = derive(state, 7, notice)
        fold(state, notice)
        closing = derive(
            state, 8, LeaseClosed(at=T0 + 65, lease=lease.id, reason="RandomPreempt(0xabc)")
        )

        assert [(n.event, n.detail["stage"]) for n in announced] == [("preempted", "notice")]
        assert announced[0].detail["deadline"] == T0 + 65
        assert announced[0].detail["conflictSet"] == [lease.id, "x/y@0#000"]
        assert announced[0].id == f"7:preempted:{lease.id}"
        assert [n.event for n in closing] == ["lease-closed", "preempted"]
        assert closing[1].detail["seed"] == "0xabc"
        assert closing[1].detail["stage"] == "closed"
        assert {n.team for n in closing} == {"org:team"}

    def test_run_statuses_map_to_events_and_unbound_namespaces_to_unbound(self) -> None:
        state = _state()

        def one(reason: str, phase: str = "Pending", run_key: str = "team/train") -> list[str]:
            ev = RunStatusChanged(at=T0, run=run_key, phase=phase, reason=reason)  # type: ignore[arg-type]
            return [f"{n.team}:{n.event}" for n in derive(state, 1, ev)]

        assert one("GangBound", "Running") == ["org:team:run-admitted"]
        assert one("Reserved") == ["org:team:run-reserved"]
        assert one("Unfunded", run_key="loose/stray") == ["_unbound:run-unfunded"]
        assert one("WorkloadFailed", "Failed") == ["org:team:run-failed"]
        assert one("AllSucceeded", "Completed") == ["org:team:run-completed"]
        assert one("FollowWait", "Waiting") == []

    def test_an_unbound_team_publishes_on_the_unbound_subject(self) -> None:
        assert subjects.notify("_unbound", "run-unfunded") == "fleet.notify._unbound.run-unfunded"
        assert subjects.notify("org:team", "lease-started") == "fleet.notify.org_team.lease-started"

    def test_expiry_is_announced_inside_the_lead_and_never_after_the_end(self) -> None:
        lease = _lease(end=T0 + 3600)
        state = _state(LeaseMinted(at=T0, lease=lease))

        assert expiring(state, T0 + 2699, [900], {}) == []
        assert expiring(state, T0 + 2700, [900], {}) == [(lease, 900)]
        assert expiring(state, T0 + 2700, [900], {(lease.id, 900): T0 + 3600}) == []
        assert expiring(state, T0 + 3600, [900], {}) == []
        note = expiring_note(state, lease, 900, T0 + 3000, 9)
        assert (note.team, note.detail["remainingSeconds"]) == ("org:team", 600)

    def test_an_unknown_event_type_is_skipped_not_fatal(self) -> None:
        notifier = Notifier(LEDGER_CLOCK)
        future = b'{"type": "FromTheFuture", "at": 1}'
        assert notifier._derive(5, "fleet.ledger.FromTheFuture", future, at_head=True) == []
        assert notifier.seq == 5

    def test_a_packed_message_announces_each_event_on_the_state_just_before_it(self) -> None:
        """Several events in one ledger message (``runtime.ledger_packing``): each is derived
        after the ones before it are folded, the notifier passes the message's sequence once,
        an unknown event among them is skipped, and two events saying the same thing about the
        same run keep distinct ids (``<seq>`` for the first, ``<seq>.<index>`` after)."""
        notifier = Notifier(LEDGER_CLOCK)
        notifier.state = _state()
        first = _lease("team/train")
        second = msgspec.structs.replace(_lease("loose/stray"), slots=("n1#2",))
        reserved = RunStatusChanged(at=T0, run="team/train", phase="Pending", reason="Reserved")
        packed = (
            b"["
            + b",".join(
                [
                    EVENT_ENCODER.encode(reserved),
                    EVENT_ENCODER.encode(LeaseMinted(at=T0, lease=first)),
                    b'{"type": "FromTheFuture", "at": 1}',
                    EVENT_ENCODER.encode(LeaseMinted(at=T0, lease=second)),
                    EVENT_ENCODER.encode(
                        LeaseClosed(at=T0 + 1, lease=first.id, reason="Completed")
                    ),
                    EVENT_ENCODER.encode(reserved),
                ]
            )
            + b"]"
        )
        notes = notifier._derive(7, "fleet.ledger.Events", packed, at_head=False)

        assert [(n.id, n.seq) for n in notes] == [
            ("7:run-reserved:team/train", 7),
            (f"7.1:lease-started:{first.id}", 7),
            (f"7.3:lease-started:{second.id}", 7),
            (f"7.4:lease-closed:{first.id}", 7),  # found: minted earlier in the same message
            ("7.5:run-reserved:team/train", 7),
        ]
        assert notifier.seq == 7
        assert set(notifier.state.leases) == {first.id, second.id}
        assert notifier.state.leases[first.id].closed_at == T0 + 1


class TestMessages:
    def test_a_notification_round_trips(self) -> None:
        n = notify.Notification(
            id="1:run-admitted:a/b",
            team="org:t",
            event="run-admitted",
            run="a/b",
            at=5,
            detail={"k": [1, 2]},
            seq=1,
        )
        assert notify.DECODER.decode(notify.ENCODER.encode(n)) == n

    def test_an_old_decoder_reads_a_newer_notification(self) -> None:
        newer = (
            b'{"id": "x", "team": "t", "event": "lease-started", "run": "a/b", "at": 1,'
            b' "signature": "sha256=..."}'
        )
        got = notify.DECODER.decode(newer)
        assert (got.lease, got.detail, got.seq) == (None, {}, 0)

    def test_a_notification_without_an_id_is_refused_with_the_field(self) -> None:
        with pytest.raises(msgspec.ValidationError, match="Object missing required field `id`"):
            notify.DECODER.decode(b'{"team": "t", "event": "e", "run": "r", "at": 1}')
