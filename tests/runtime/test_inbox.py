"""``Inbox``: a subscription's messages, in order, without a task per message, and with the
back-pressure ``next_msg`` had (``runtime/inbox.py``)."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest
from nats.aio.msg import Msg

from gpu_fleet.runtime.inbox import Inbox


def msg(i: int) -> Msg:
    return Msg(_client=None, subject=f"s.{i}", data=str(i).encode())  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_messages_come_out_in_order_and_an_empty_inbox_times_out() -> None:
    inbox = Inbox()
    for i in range(3):
        await inbox.put(msg(i))
    assert [(await inbox.get(timeout=0)).subject for _ in range(3)] == ["s.0", "s.1", "s.2"]
    with pytest.raises(nats.errors.TimeoutError):
        await inbox.get(timeout=0)


@pytest.mark.asyncio
async def test_a_reader_waiting_gets_the_next_message_put() -> None:
    inbox = Inbox()
    reader = asyncio.create_task(inbox.get(timeout=60))
    await asyncio.sleep(0)  # the reader waits on the empty inbox
    assert not reader.done()
    await inbox.put(msg(7))
    assert (await reader).subject == "s.7"


@pytest.mark.asyncio
async def test_the_subscription_waits_past_the_limit_until_half_is_taken() -> None:
    """Past ``limit`` held, ``put`` does not return: nats-py's task stops taking messages, and
    the server's flow control (which counts what the callback took) pauses delivery."""
    inbox = Inbox(limit=4)
    for i in range(3):
        await inbox.put(msg(i))
    blocked = asyncio.create_task(inbox.put(msg(3)))  # the fourth: the limit
    await asyncio.sleep(0)
    assert not blocked.done()
    assert len(inbox) == 4  # held, in order
    await inbox.get(timeout=0)
    await asyncio.sleep(0)
    assert not blocked.done()  # three still held: more than half
    await inbox.get(timeout=0)
    await asyncio.sleep(0)
    assert blocked.done()  # two: room again
    assert [(await inbox.get(timeout=0)).subject for _ in range(2)] == ["s.2", "s.3"]
