"""The forecaster over NATS: a real server, the manager on a virtual clock, the binder.

The story: one 8-GPU node; ``blocker`` takes 6 GPUs for at most 10 minutes; ``waiter`` asks for 4
and must wait.  The forecaster must say "exactly when blocker's lease ends", within the
reservation's bound - and the clock, moved there, must prove it right.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from _stack import T0, Stack, budget, run

from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.messages import forecast as messages
from gpu_fleet.messages import subjects
from gpu_fleet_forecaster.service import Forecaster, ForecasterConfig

BLOCKER = ", runtime: {maxDuration: 10m}"


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.add(
            Forecaster(
                ForecasterConfig(
                    nats_url=stack.url_for("forecaster"),
                    clock="ledger",
                    ledger_keys=stack.keys_for("forecaster"),
                )
            )
        )
        await stack.node("n1", 8)
        await stack.apply(budget("team", "org:team"))
        yield stack
    finally:
        await stack.stop()


async def ask(stack: Stack, name: str, namespace: str = "team") -> messages.Forecast:
    """Forecast at the manager's current ledger sequence (read-your-writes)."""
    request = messages.ForecastRequest(namespace=namespace, name=name, seq=await stack.seq())
    reply = await stack.client.request(
        subjects.FORECAST_RUN, messages.ENCODER.encode(request), timeout=20.0
    )
    assert not reply.headers or "Nats-Service-Error" not in reply.headers, reply.headers
    return messages.REPLY_DECODER.decode(reply.data)


async def ask_error(stack: Stack, body: bytes) -> tuple[str, str]:
    reply = await stack.client.request(subjects.FORECAST_RUN, body, timeout=20.0)
    headers = reply.headers or {}
    return headers.get("Nats-Service-Error-Code", ""), headers.get("Nats-Service-Error", "")


@pytest.mark.asyncio
async def test_a_run_behind_a_bounded_lease_starts_exactly_when_it_ends(stack: Stack) -> None:
    """Earliest start = the blocking lease's scheduled end, exact, within the reservation bound."""
    await stack.apply(run("team", "blocker", 6, BLOCKER))
    await stack.apply(run("team", "waiter", 4))
    got = await ask(stack, "waiter")
    view = await stack.api("get", {"namespace": "team", "name": "waiter"})
    bound = view["reservationDetail"]["earliestStart"]

    assert got.earliest_start == T0 + 600
    assert got.p50 == got.p90 == got.earliest_start
    assert got.confidence == "exact"
    assert got.deficit_gpus == 2
    assert "team/blocker" in got.basis
    assert got.run == "team/waiter"
    assert got.at == T0
    assert got.earliest_start <= parse_instant(bound)


@pytest.mark.asyncio
async def test_the_forecast_comes_true_when_the_clock_reaches_it(stack: Stack) -> None:
    """Moving the virtual clock to the forecast start starts the run at that instant."""
    await stack.apply(run("team", "blocker", 6, BLOCKER))
    await stack.apply(run("team", "waiter", 4))
    predicted = (await ask(stack, "waiter")).earliest_start
    assert predicted is not None

    await stack.advance(predicted)
    after = await ask(stack, "waiter")

    assert after.confidence == "exact"
    assert after.basis.startswith("running since")
    assert after.earliest_start == predicted


@pytest.mark.asyncio
async def test_a_running_run_is_answered_with_its_start(stack: Stack) -> None:
    """No reservation because it runs: the answer is "runs now" (its start), not an error."""
    await stack.apply(run("team", "blocker", 6, BLOCKER))
    got = await ask(stack, "blocker")
    assert (got.earliest_start, got.p50, got.p90, got.confidence) == (T0, T0, T0, "exact")
    assert got.remedies == []


@pytest.mark.asyncio
async def test_a_pending_run_without_reservation_gets_no_promised_start(stack: Stack) -> None:
    """A run nobody funds has no reservation: no earliest start, and the basis says why."""
    await stack.apply(run("nobody", "orphan", 2))
    got = await ask(stack, "orphan", namespace="nobody")
    assert got.earliest_start is None
    assert got.p90 is None
    assert got.confidence == "conservative"
    assert "Unfunded" in got.basis
    assert "no reservation" in got.basis


@pytest.mark.asyncio
async def test_errors_name_the_problem(stack: Stack) -> None:
    """Unknown run -> 404; malformed request -> 400 naming the field; future seq -> 503."""
    missing = messages.ENCODER.encode(messages.ForecastRequest(name="ghost", namespace="team"))
    assert await ask_error(stack, missing) == ("404", "run team/ghost not found")

    code, text = await ask_error(stack, b'{"namespace": "team"}')
    assert code == "400"
    assert "missing required field `name`" in text

    far = messages.ForecastRequest(name="x", seq=10_000)
    code, text = await ask_error(stack, messages.ENCODER.encode(far))
    assert code == "503"
    assert "10000 not folded" in text


@pytest.mark.asyncio
async def test_the_service_answers_ping_with_its_name(stack: Stack) -> None:
    reply = await stack.client.request("$SRV.PING.gpu-fleet-forecaster", b"", timeout=5.0)
    assert msgspec.json.decode(reply.data)["name"] == "gpu-fleet-forecaster"


class TestMessages:
    """Evolution rules of the forecast family (see the module docstring)."""

    def test_a_reply_round_trips(self) -> None:
        reply = messages.Forecast(
            run="ns/r",
            earliest_start=10,
            p50=10,
            p90=20,
            confidence="bounded",
            deficit_gpus=2,
            basis="why",
            remedies=[messages.Remedy(action="shrink", detail="to 2", start=5)],
            seq=3,
            at=1,
        )
        assert messages.REPLY_DECODER.decode(messages.ENCODER.encode(reply)) == reply

    def test_an_old_decoder_reads_a_newer_reply(self) -> None:
        newer = b'{"run": "ns/r", "earliest_start": null, "p90": 5, "future_field": [1, 2]}'
        got = messages.REPLY_DECODER.decode(newer)
        assert (got.run, got.earliest_start, got.p90, got.remedies) == ("ns/r", None, 5, [])

    def test_a_request_without_a_name_is_refused_with_the_field(self) -> None:
        with pytest.raises(msgspec.ValidationError, match="Object missing required field `name`"):
            messages.REQUEST_DECODER.decode(b'{"namespace": "x"}')
