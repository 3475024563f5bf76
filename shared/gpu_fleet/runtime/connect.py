"""One way to connect to NATS: reconnect forever with back-off, and say when the link is gone.

A NATS client has two ways of losing its server, and a service must treat them differently:

* **Disconnected**: the socket dropped (server restart, network blip, an operator's kick).
  nats-py reconnects by itself and replays the subscriptions.  We let it try forever
  (``max_reconnect_attempts=-1``) while the process is meant to live, waiting longer after each
  failed attempt (``ReconnectBackoff``: 0.25 s doubling to 5 s, with jitter so four services do
  not knock in step) and starting again from the shortest wait once connected.
* **Closed**: the client gave up for good.  nats-py closes after any ``-ERR`` from the server
  (a publish over ``max_payload``, an authorization change): it never reconnects and every
  later call fails.  A service in that state is a zombie (issue 19: the manager logged
  ``reconcile.failed ConnectionClosedError`` every second and answered nothing), so
  ``on_closed`` is called and the actor exits non-zero at once: ``gpu-fleet up``, compose's
  ``restart:`` and Kubernetes then start a fresh process, which rebuilds from the ledger.

Client events go through structlog (otherwise connect retries print raw tracebacks).

Credentials and TLS come from ``auth`` (``runtime.client_auth``), by default from the
``GPU_FLEET_NATS_*`` environment; a user and password may also ride in the URL.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.natsd_cluster import split_userinfo

log = structlog.get_logger("gpu_fleet.nats")


@dataclass
class ReconnectBackoff:
    """The wait before each reconnect attempt: ``first`` doubling up to ``most``, jittered."""

    first: float = 0.25
    most: float = 5.0
    jitter: float = 0.2  # +-20 %
    failures: int = 0

    def next_wait(self) -> float:
        base = min(self.most, self.first * 2.0 ** min(self.failures, 16))
        self.failures += 1
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> float:
        self.failures = 0
        return self.first


async def connect(
    url: str,
    name: str,
    *,
    on_closed: Callable[[str], None] | None = None,
    backoff: ReconnectBackoff | None = None,
    auth: ClientAuth | None = None,
) -> Client:
    """Connect with endless, backed-off reconnects; ``on_closed(reason)`` when the client closes.

    ``on_closed`` also fires after our own ``drain``/``close`` at shutdown; the actor ignores
    it then (see ``Actor.abort``).
    """
    policy = backoff or ReconnectBackoff()
    holder: list[Client] = []

    async def error_cb(exc: Exception) -> None:
        nc = holder[0] if holder else None
        if nc is not None and nc.is_reconnecting:
            wait = policy.next_wait()
            nc.options["reconnect_time_wait"] = wait  # read before the next attempt
            log.warning(
                "nats.reconnect_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                attempt=policy.failures,
                retry_in=round(wait, 3),
            )
            return
        log.warning("nats.error", error=str(exc), error_type=type(exc).__name__)

    async def disconnected_cb() -> None:
        log.warning("nats.disconnected")

    async def reconnected_cb() -> None:
        if holder:
            holder[0].options["reconnect_time_wait"] = policy.reset()
        log.info("nats.reconnected")

    async def closed_cb() -> None:
        nc = holder[0] if holder else None
        reason = str(nc.last_error) if nc is not None and nc.last_error else "closed"
        log.info("nats.closed", reason=reason)
        if on_closed is not None:
            on_closed(reason)

    bare, credentials = split_userinfo(url)  # a URL's credentials reach every server
    options = {**credentials, **(auth or ClientAuth.from_env()).connect_options()}
    nc: Client = await nats.connect(
        servers=bare,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=policy.first,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=error_cb,
        disconnected_cb=disconnected_cb,
        reconnected_cb=reconnected_cb,
        closed_cb=closed_cb,
        **options,
    )
    holder.append(nc)
    return nc


async def drain(nc: Client | None) -> None:
    """Drain at shutdown: flush what is pending, then close; quiet if already closed."""
    if nc is None or nc.is_closed:
        return
    with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError):
        await nc.drain()


async def abandon(nc: Client) -> None:
    """Close a client whose ``connect`` failed (refused credentials, say): nats-py leaves its
    socket open then, which a short-lived CLI's closing event loop reports as a leak."""
    with contextlib.suppress(Exception):
        await nc.close()
    transport = getattr(nc, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
            await transport.wait_closed()
