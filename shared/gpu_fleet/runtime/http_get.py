"""A tiny HTTP/1.1 GET server on asyncio: the metrics endpoints and the live fleet map.

Both serve a handful of GET routes on the process's own event loop, so a framework (and a
thread) would be all cost: one request per connection, headers read and ignored, the answer
computed by an async ``route(path)`` and written with ``Connection: close``.  A client that
stalls is dropped after ``timeout`` seconds, so one slow scraper cannot pile up connections.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

Answer = tuple[str, str, bytes]
"""Status line (``"200 OK"``), content type, body."""
Route = Callable[[str], Awaitable[Answer]]


class GetServer:
    """A listening server and the connections it is answering, so ``stop`` ends them all: a
    browser keeps idle connections open, and their handlers must not outlive the loop."""

    def __init__(self, route: Route, timeout: float) -> None:
        self.route = route
        self.timeout = timeout
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            # ``stop`` ended this connection.  Returning, not re-raising: asyncio's stream
            # callback would otherwise log the cancelled handler as an error.
            pass
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: nothing we need
                status, ctype, body = await _answer(self.route, request)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()


async def start_get_server(route: Route, host: str, port: int, timeout: float = 30.0) -> GetServer:
    """Listen on ``host:port`` and answer each GET (or HEAD) with ``route(path)``."""
    server = GetServer(route, timeout)
    server.server = await asyncio.start_server(server.serve, host, port)
    return server


async def _answer(route: Route, request: bytes) -> Answer:
    parts = request.decode("latin-1").split()
    if len(parts) < 2:
        return "400 Bad Request", "text/plain", b"bad request\n"
    method, path = parts[0], parts[1].split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    return await route(path)


async def stop_server(server: GetServer | None) -> None:
    if server is not None:
        await server.stop()
