"""Replies that cannot outgrow a connection, pages, reconnect back-off, actor exit codes."""

from __future__ import annotations

import asyncio
import json

import pytest

from gpu_fleet.messages import api
from gpu_fleet.runtime import paging
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.connect import ReconnectBackoff
from gpu_fleet.runtime.replies import (
    FIELD_ERRORS_MAX,
    HEADER_MAX,
    HEADER_ROOM,
    ApiLimits,
    error_out,
    header_text,
    reply_budget,
)


def test_a_header_value_is_printable_ascii_on_one_line_and_short() -> None:
    """A CR or LF in ``Nats-Service-Error`` would corrupt the protocol stream."""
    text = header_text("run default/\r\nX-Evil: 1\x00é" + "x" * 10_000)
    assert "\r" not in text
    assert "\n" not in text
    assert text.isascii()
    assert text.isprintable()
    assert len(text) <= HEADER_MAX + 40


def test_an_error_body_does_not_grow_with_its_input() -> None:
    errors = [api.FieldErrorOut("p" * 10_000, "m" * 10_000) for _ in range(1000)]
    out = error_out("validation", "x" * 100_000, errors)
    assert len(api.ENCODER.encode(out)) < 200_000
    assert len(out.errors) == FIELD_ERRORS_MAX + 1
    assert out.errors[-1] == api.FieldErrorOut("<more>", "and 900 more error(s)")


def test_the_reply_budget_is_the_smaller_bound_less_room_for_headers() -> None:
    assert reply_budget(1024 * 1024, ApiLimits()) == 1024 * 1024 - HEADER_ROOM
    assert reply_budget(64 * 1024, ApiLimits()) == 64 * 1024 - HEADER_ROOM
    assert reply_budget(1024 * 1024, ApiLimits(max_reply_bytes=8192)) == 8192 - HEADER_ROOM


def items(n: int) -> list[dict[str, str]]:
    return [{"namespace": "ns", "name": f"r{i:03d}", "pad": "x" * 100} for i in range(n)]


def key(item: dict[str, str]) -> paging.Key:
    return (f"{item['namespace']}/{item['name']}",)


def encode(value: object) -> bytes:
    return json.dumps(value).encode()


def test_pages_respect_both_the_limit_and_the_byte_budget_and_cover_everything() -> None:
    seen: list[str] = []
    token: str | None = None
    while True:
        page = paging.page(
            "runs", items(50), key, limit=20, token=token, budget=2000, encode=encode
        )
        body = encode({"items": page.items})
        assert len(page.items) <= 20
        assert len(body) <= 2000
        seen += [i["name"] for i in page.items]
        token = page.metadata.continue_ or None
        if token is None:
            assert page.metadata.remaining_item_count is None
            break
        assert page.metadata.remaining_item_count == 50 - len(seen)
    assert seen == [f"r{i:03d}" for i in range(50)]


def test_a_page_holds_one_item_even_over_the_budget_so_clients_always_progress() -> None:
    page = paging.page("runs", items(3), key, limit=10, token=None, budget=10, encode=encode)
    assert len(page.items) == 1


@pytest.mark.parametrize(
    "token",
    [
        "!!!",
        "bm90IGpzb24",
        paging.encode_token("leases", ("x",)),
        "eyJsIjoicnVucyIsImEiOlsxLFtdXX0",
    ],
)
def test_a_token_from_elsewhere_is_refused(token: str) -> None:
    with pytest.raises(paging.ContinueTokenError):
        paging.page("runs", items(3), key, limit=1, token=token, budget=10_000, encode=encode)


def test_a_forged_key_of_the_wrong_shape_is_refused_not_a_crash() -> None:
    token = paging.encode_token("runs", (1, 2))
    with pytest.raises(paging.ContinueTokenError):
        paging.page("runs", items(3), key, limit=1, token=token, budget=10_000, encode=encode)


def test_reconnect_waits_double_to_a_ceiling_and_reset_after_a_reconnect() -> None:
    backoff = ReconnectBackoff(jitter=0.0)
    waits = [backoff.next_wait() for _ in range(8)]
    assert waits == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert backoff.reset() == 0.25
    assert backoff.next_wait() == 0.25
    jittered = ReconnectBackoff()
    assert 0.2 <= jittered.next_wait() <= 0.3


class Crashing(Actor):
    name = "crashing"

    async def _on_start(self) -> None:
        self.spawn("doomed", self._doomed())

    async def _doomed(self) -> None:
        raise RuntimeError("boom")


@pytest.mark.asyncio
async def test_an_actor_whose_root_task_dies_exits_1() -> None:
    actor = Crashing()
    await asyncio.wait_for(actor.run(), 30)
    assert actor.exit_code == 1


@pytest.mark.asyncio
async def test_abort_during_a_requested_stop_is_not_a_failure() -> None:
    """Our own drain at shutdown closes the connection too: that is no failure."""
    actor = Actor()
    await actor.start()
    actor.request_stop()
    stopping = asyncio.create_task(actor.stop())
    await asyncio.sleep(0)
    actor.abort("closed")
    await stopping
    assert (actor.exit_code, actor.failure) == (0, None)
    other = Actor()
    await other.start()
    other.abort("nats: maximum payload violation")
    await other.run()
    assert (other.exit_code, other.failure) == (1, "nats: maximum payload violation")


class Stubborn(Actor):
    """A root task that swallows its first cancellation and carries on, as a task cancelled
    inside nats-py's flush does; ``swallowing``: swallow every one."""

    name = "stubborn"

    def __init__(self, *, swallowing: bool = False) -> None:
        super().__init__()
        self.swallowing = swallowing
        self.swallowed = 0
        self.waiting = asyncio.Event()

    async def _on_start(self) -> None:
        self.spawn("loop", self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                self.waiting.set()
                await asyncio.Event().wait()  # never set: only a cancellation gets it out
            except asyncio.CancelledError:
                self.swallowed += 1
                if self.swallowed > 1 and not self.swallowing:
                    raise


@pytest.mark.asyncio
async def test_stop_cancels_again_a_root_task_that_swallowed_a_cancellation() -> None:
    actor = Stubborn()
    await actor.start()
    await actor.waiting.wait()
    await asyncio.wait_for(actor.stop(), 30)  # hung for good before: stop waited unbounded
    assert actor.swallowed == 2
    assert not actor._tasks


@pytest.mark.asyncio
async def test_stop_leaves_a_root_task_that_never_ends_after_its_budget() -> None:
    actor = Stubborn(swallowing=True)
    actor.shutdown_budget = 0.0  # no time to spend: cancelled once, then left
    await actor.start()
    await actor.waiting.wait()
    loop = actor._tasks[0]
    await asyncio.wait_for(actor.stop(), 30)  # returns: the task is logged and left
    assert not loop.done()
    actor.swallowing = False  # end it for the suite's leak guard
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
