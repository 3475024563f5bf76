"""Real HTTP receivers for webhook tests: aiohttp servers on free local ports.

A ``Receiver`` records every request (headers and the exact body bytes) and answers from a
script: a list of responses used in order, then its steady ``mode``.  Modes: ``ok`` (200),
``fail`` (500), ``slow`` (holds the request until ``release`` is set - a receiver that never
answers within the notifier's timeout), ``throttle`` (429 with ``Retry-After``), ``refuse``
(404: a permanent refusal).  ``stop`` / ``start`` take it down and up on the same port.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    mode: str = "ok"
    script: list[str] = field(default_factory=list)
    retry_after: str = "120"
    port: int = field(default_factory=free_port)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        self.seen.append(Seen(request.path, dict(request.headers), await request.read()))
        mode = self.script.pop(0) if self.script else self.mode
        if mode == "ok":
            return web.Response(text="ok")
        if mode == "fail":
            return web.Response(status=500, text="boom")
        if mode == "refuse":
            return web.Response(status=404, text="no such hook")
        if mode == "throttle":
            return web.Response(
                status=429, text="slow down", headers={"Retry-After": self.retry_after}
            )
        if mode == "slow":
            await self.release.wait()
            return web.Response(text="late")
        raise AssertionError(f"unknown mode {mode}")

    def ids(self) -> list[str]:
        return [s.headers.get("GPU-Fleet-Id", "") for s in self.seen]
