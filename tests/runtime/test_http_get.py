"""The tiny GET server under /metrics and the live map: routes, refusals, and a clean stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from gpu_fleet.runtime.http_get import Answer, start_get_server
from gpu_fleet.runtime.natsd import free_port


async def route(path: str) -> Answer:
    return "200 OK", "text/plain", f"you asked for {path}\n".encode()


async def exchange(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.asyncio
async def test_get_answers_with_the_route_and_other_methods_are_refused() -> None:
    port = free_port()
    server = await start_get_server(route, "127.0.0.1", port)
    try:
        answer = await exchange(port, b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 17\r\n" in head
        assert b"Cache-Control: no-store" in head
        assert body == b"you asked for /a\n"  # the query string is not part of the path
        refused = await exchange(port, b"POST / HTTP/1.1\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 405 Method Not Allowed")
        garbage = await exchange(port, b"\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 Bad Request")
    finally:
        await server.stop()


@pytest.mark.asyncio
async def test_stop_ends_idle_connections_instead_of_waiting_for_their_timeout() -> None:
    """A browser keeps connections open without a request; ``stop`` must end their handlers
    (they would otherwise wait an hour here, and outlive the event loop)."""
    port = free_port()
    server = await start_get_server(route, "127.0.0.1", port, timeout=3600)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(_until(lambda: bool(server._handlers)), 60)  # accepted
    async with asyncio.timeout(60):  # a bound far below the handler's own 3600 s
        await server.stop()
    assert server._handlers == set()
    assert await reader.read() == b""  # the server closed the connection
    writer.close()
    await writer.wait_closed()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)
