"""A real stack on a background event loop, for tests of CLI commands (which run their own loop).

Embedded nats-server on a free port, the binder and the manager on a virtual clock at ``T0``,
seeded with the example inventory.  ``call`` runs a fleet API request on the stack's loop.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from gpu_fleet.cli.stack import InProcessStack
from gpu_fleet.cli.stack import call as api_call
from gpu_fleet.core.manifests import parse_inventory
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime import logs

T = TypeVar("T")
T0 = parse_instant("2026-03-02T00:00:00Z")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
READY = 60.0  # a bound on start-up, never an assertion on speed


class BackgroundStack:
    def __init__(self, stack: InProcessStack, loop: asyncio.AbstractEventLoop) -> None:
        self.stack = stack
        self.loop = loop

    @property
    def url(self) -> str:
        return self.stack.admin_url

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(READY)

    def call(self, endpoint: str, body: dict[str, Any]) -> Any:
        assert self.stack.nc is not None
        return self.run(api_call(self.stack.nc, endpoint, body))


@contextmanager
def background_stack(data_dir: Path) -> Iterator[BackgroundStack]:
    logs.configure("test", "error", io.StringIO())  # keep service logs out of captured output
    loop = asyncio.new_event_loop()
    stack = InProcessStack(data_dir, virtual_start=T0, services=("binder", "manager"))
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(stack.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(READY)
    bg = BackgroundStack(stack, loop)
    try:
        for node in parse_inventory((EXAMPLES / "inventory.yaml").read_text()):
            bg.call(
                "node",
                {
                    "op": "register",
                    "node": {"name": node.name, "gpus": node.gpus, "labels": node.labels},
                },
            )
        yield bg
    finally:
        bg.run(stack.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(READY)
        loop.close()
