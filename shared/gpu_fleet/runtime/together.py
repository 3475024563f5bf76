"""Run several actors in one process as one unit (a service plus its Kubernetes bridge).

Each actor keeps its own contract (``run()`` = start, wait for a stop request, stop).  When one
of them ends - a signal, or a crashed root task - the others are asked to stop too: a manager
whose bridge died is restarted whole by its supervisor rather than left half working.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from gpu_fleet.runtime.actor import Actor


async def run_together(*actors: Actor, signals: bool = True) -> int:
    """Run ``actors`` until one ends; return the exit code (1 if any of them failed)."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        for a in actors:
            a.request_stop()

    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop_all)
    tasks = [asyncio.create_task(a.run(), name=f"run {a.name}") for a in actors]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_all()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    if any(isinstance(r, BaseException) for r in results):
        return 1
    return max((a.exit_code for a in actors), default=0)
