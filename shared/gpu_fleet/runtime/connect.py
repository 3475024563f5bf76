"""One way to connect to NATS: retry forever, log connection events through structlog."""

from __future__ import annotations

import nats
import structlog
from nats.aio.client import Client

log = structlog.get_logger("gpu_fleet.nats")


async def connect(url: str, name: str) -> Client:
    """Connect with reconnects enabled; client events become structured log lines."""

    async def error_cb(exc: Exception) -> None:
        log.warning("nats.error", error=str(exc), error_type=type(exc).__name__)

    async def disconnected_cb() -> None:
        log.warning("nats.disconnected")

    async def reconnected_cb() -> None:
        log.info("nats.reconnected")

    nc: Client = await nats.connect(
        servers=[url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
    )
    return nc
