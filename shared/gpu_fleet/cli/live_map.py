"""The live fleet map: the page ``kubectl runs viz`` writes, served over HTTP by ``gpu-fleet up``.

Every load asks the manager for ``fleet.api.fleetmap`` (its fold of the ledger) and renders the
same self-contained page (``views.fleet_page``) with a ``refresh`` so an open tab keeps up with
the ledger: nothing is cached here, so the page can never show a state the ledger did not reach.

Routes: ``/`` the page, ``/fleetmap.json`` the data behind it, ``/healthz`` this server alive.
When the manager does not answer (not started yet, restarting, NATS down) the page is a 503 that
says so and reloads itself, so a tab left open recovers on its own once the manager is back.

``LiveMap`` runs on an event loop; ``LiveMapThread`` gives it a loop of its own beside
``gpu-fleet up``'s supervisor (which is a plain blocking loop).
"""

from __future__ import annotations

import asyncio
import html
import json
import signal
import threading
from typing import Any

import nats
import nats.errors
import structlog
from nats.aio.client import Client

from gpu_fleet.cli.stack import ApiCallError, call
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.http_get import Answer, GetServer, start_get_server, stop_server
from gpu_fleet.runtime.natsd_cluster import split_userinfo
from gpu_fleet.runtime.stack_security import redact
from gpu_fleet.views.fleet_page import render_page

log = structlog.get_logger("gpu_fleet.live_map")

DEFAULT_REFRESH = 5
"""Seconds between reloads of an open page."""
HTML = "text/html; charset=utf-8"
JSON = "application/json"


async def _quiet(exc: Exception) -> None:
    """NATS client errors: the page says what matters; the details go to the debug log."""
    log.debug("live_map.nats_error", error=type(exc).__name__)


class UnavailableError(Exception):
    """The fleet map could not be read; the message says why (for the 503 page)."""


class LiveMap:
    """Serve the fleet map of the NATS at ``nats_url`` on ``host:port``."""

    def __init__(
        self,
        nats_url: str,
        port: int,
        *,
        host: str = "127.0.0.1",
        refresh: int = DEFAULT_REFRESH,
        timeout: float = 10.0,
        auth: ClientAuth | None = None,
    ) -> None:
        self.nats_url = nats_url
        # Shown on the 503 page and in logs: never the password a URL may carry.
        self.shown_url = redact(nats_url)
        self.auth = auth or ClientAuth()  # authorization is on by default (docs/security.md)
        self.port = port
        self.host = host
        self.refresh = refresh
        self.timeout = timeout
        self.nc: Client | None = None
        self._server: GetServer | None = None
        self._connecting = asyncio.Lock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    async def start(self) -> None:
        """Listen (an ``OSError`` if the port is taken); NATS is connected on first use."""
        self._server = await start_get_server(self.route, self.host, self.port)
        log.info("live_map.listening", url=self.url)

    async def stop(self) -> None:
        server, self._server = self._server, None
        await stop_server(server)
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            await nc.close()

    async def _client(self) -> Client:
        async with self._connecting:
            if self.nc is None or self.nc.is_closed:
                try:
                    # Two attempts (nats-py retries a first connect for as long as it would
                    # reconnect); once connected, reconnect forever across NATS restarts.
                    # Credentials as options, not in the URL, so servers a cluster announces
                    # get them too (split_userinfo); flags and environment win over the URL.
                    bare, options = split_userinfo(self.nats_url)
                    options.update(self.auth.connect_options())
                    nc = await nats.connect(
                        servers=bare,
                        name="gpu-fleet-live-map",
                        connect_timeout=2,
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0.5,
                        error_cb=_quiet,
                        **options,
                    )
                except (OSError, nats.errors.Error) as exc:
                    raise UnavailableError(f"NATS at {self.shown_url} does not answer") from exc
                nc.options["max_reconnect_attempts"] = -1
                self.nc = nc
            return self.nc

    async def fleetmap(self) -> dict[str, Any]:
        """The manager's ``fleet.api.fleetmap`` now, or ``UnavailableError`` saying why."""
        nc = await self._client()
        try:
            data: dict[str, Any] = await call(nc, "fleetmap", {}, timeout=self.timeout)
        except nats.errors.NoRespondersError as exc:
            raise UnavailableError("the manager does not answer (no responders)") from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise UnavailableError(f"the manager did not answer in {self.timeout:g} s") from exc
        except nats.errors.Error as exc:
            raise UnavailableError(f"NATS: {type(exc).__name__}") from exc
        except ApiCallError as exc:
            raise UnavailableError(f"the manager answered {exc.code}: {exc.message}") from exc
        return data

    async def route(self, path: str) -> Answer:
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path not in ("/", "/index.html", "/fleetmap.json"):
            return "404 Not Found", "text/plain", b"not found: /, /fleetmap.json, /healthz\n"
        try:
            data = await self.fleetmap()
        except UnavailableError as exc:
            log.info("live_map.unavailable", reason=str(exc))
            if path == "/fleetmap.json":
                body = json.dumps({"ok": False, "error": str(exc)}).encode()
                return "503 Service Unavailable", JSON, body
            return "503 Service Unavailable", HTML, self.unavailable_page(str(exc)).encode()
        if path == "/fleetmap.json":
            return "200 OK", JSON, json.dumps(data).encode()
        return "200 OK", HTML, render_page(data, refresh=self.refresh).encode()

    def unavailable_page(self, reason: str) -> str:
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{self.refresh}">'
            '<link rel="icon" href="data:,">'
            "<title>gpu-fleet fleet map: manager unavailable</title></head><body>"
            "<h1>gpu-fleet fleet map</h1>"
            f'<p id="unavailable">The fleet map is unavailable: {html.escape(reason)}.</p>'
            f"<p>This page tries again every {self.refresh} s.</p></body></html>\n"
        )


class LiveMapThread:
    """A ``LiveMap`` on an event loop of its own, in a daemon thread."""

    def __init__(self, live: LiveMap) -> None:
        self.live = live
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        """Start listening; raises ``OSError`` (port taken) in the caller's thread."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.live.start(), self.loop).result(30)

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.live.stop(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()


async def serve_until_signalled(live: LiveMap) -> int:
    """``gpu-fleet map``: serve until SIGINT or SIGTERM (compose and chart run it this way)."""
    await live.start()
    print(f"fleet map of {live.shown_url}: {live.url} (reloads every {live.refresh} s)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await live.stop()
    return 0
