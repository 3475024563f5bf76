"""One way to connect to NATS: retry forever, log connection events through structlog."""

from __future__ import annotations

import contextlib

import nats
import nats.errors
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


async def drain(nc: Client | None) -> None:
    """Drain at shutdown: flush what is pending, then close; quiet if already closed."""
    if nc is None or nc.is_closed:
        return
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError):
        await nc.drain()
