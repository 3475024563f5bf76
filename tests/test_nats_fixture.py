"""The ``nats_server`` fixture runs a real JetStream server whose files survive a restart."""

from __future__ import annotations

from typing import TYPE_CHECKING

import nats
import pytest
from nats.js.api import StorageType, StreamConfig

if TYPE_CHECKING:
    from conftest import NatsServer


@pytest.mark.asyncio
async def test_jetstream_message_survives_a_server_restart(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(name="PROBE", subjects=["probe.>"], storage=StorageType.FILE)
        )
        ack = await js.publish("probe.one", b"kept")
        assert (ack.stream, ack.seq) == ("PROBE", 1)
        assert (await js.get_msg("PROBE", 1)).data == b"kept"
    finally:
        await nc.close()

    nats_server.restart()

    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.jetstream().get_msg("PROBE", 1)
        assert (msg.subject, msg.data) == ("probe.one", b"kept")
    finally:
        await nc.close()


def test_fixture_describes_the_server(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.store_dir.is_dir()
    assert nats_server.running
    nats_server.kill()
    assert not nats_server.running
