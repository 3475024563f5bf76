"""Start the whole stack on an embedded NATS server: ``gpu-fleet up``, the demo and the tests.

Two modes: separate OS processes (the default for ``up`` and ``make demo``, as in production),
or in-process actors (one event loop; used by ``scenario run --via-nats`` and the tests, where a
virtual clock must be shared with the runner).  Either way the services talk only over NATS.

Both run with NATS authorization on (``secure=True``, the default): each service connects as
its own user with least-privilege permissions, the manager signs the ledger and the others
verify it (``runtime.stack_security``); the stacks' own client connects as ``admin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import nats
from nats.aio.client import Client

from gpu_fleet.core.model import Instant, Node
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.natsd import EmbeddedNats
from gpu_fleet.runtime.natsd_cluster import STREAM_REPLICAS_ENV, NatsCluster
from gpu_fleet.runtime.stack_security import ServerTls, StackSecurity

SERVICES = ("manager", "binder", "forecaster", "notifier")


class ApiCallError(RuntimeError):
    """The fleet API answered with an error (code, message, field errors)."""

    def __init__(self, code: str, message: str, errors: list[dict[str, str]] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.errors = errors or []


async def call(
    nc: Client,
    endpoint: str,
    body: dict[str, Any],
    timeout: float = 30.0,
    team: str | None = None,
) -> Any:
    """One fleet API request; raises ``ApiCallError`` for an error reply.

    With ``team`` the request goes to ``fleet.api.team.<team>.<endpoint>``, the only API
    subjects a team's NATS user may publish on; the manager authorizes by that subject.
    """
    prefix = f"fleet.api.team.{team}" if team else "fleet.api"
    msg = await nc.request(f"{prefix}.{endpoint}", json.dumps(body).encode(), timeout=timeout)
    reply = json.loads(msg.data) if msg.data else {}
    if not reply.get("ok"):
        err = reply.get("error") or {}
        raise ApiCallError(
            err.get("code", "internal"),
            err.get("message") or (msg.headers or {}).get("Nats-Service-Error", "error"),
            err.get("errors"),
        )
    return reply.get("result")


async def wait_for_services(nc: Client, names: tuple[str, ...], timeout: float = 60.0) -> None:
    """Poll ``$SRV.PING.<service>`` until every service answers (readiness, not timing)."""
    deadline = time.monotonic() + timeout
    for name in names:
        while True:
            try:
                await nc.request(f"$SRV.PING.gpu-fleet-{name}", b"", timeout=1.0)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service gpu-fleet-{name} did not answer") from None
                await asyncio.sleep(0.05)


READINESS_PROBE = {
    "manager": ("fleet.api.seq", b"{}"),
    "binder": ("$SRV.PING.gpu-fleet-binder", b""),
    "forecaster": ("$SRV.PING.gpu-fleet-forecaster", b""),
    "notifier": ("$SRV.PING.gpu-fleet-notifier", b""),
}


async def wait_until_answers(nc: Client, probe: tuple[str, bytes], timeout: float = 30.0) -> None:
    """Poll ``probe`` (subject, payload) until something answers (readiness, not timing).

    A service's subscriptions are flushed before its ``start()`` returns, yet another connection
    can, rarely, still see "no responders" for a few milliseconds; callers that restart a
    service and use it at once wait here instead of failing.
    """
    subject, payload = probe
    deadline = time.monotonic() + timeout
    while True:
        try:
            await nc.request(subject, payload, timeout=1.0)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers on {subject}") from None
            await asyncio.sleep(0.01)


class InProcessStack:
    """Embedded NATS plus the four service actors on the current event loop."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        virtual_start: Instant | None = None,
        inventory: list[Node] | None = None,
        services: tuple[str, ...] = SERVICES,
        settings: Any = None,
        secure: bool = True,
        root: bool = False,
    ) -> None:
        self.security = (
            StackSecurity.load_or_create(Path(data_dir) / "security", root=root) if secure else None
        )
        self.nats = EmbeddedNats(
            Path(data_dir) / "nats",
            security=self.security.server_config if self.security is not None else None,
        )
        self.virtual_start = virtual_start
        self.inventory = inventory or []
        self.services = services
        self.settings = settings
        self.actors: dict[str, Actor] = {}
        self.nc: Client | None = None

    def url_for(self, role: str) -> str:
        """The server URL with ``role``'s credentials (the bare URL without security)."""
        if self.security is None:
            return self.nats.url
        return self.security.url_for(role, self.nats.url)

    @property
    def admin_url(self) -> str:
        return self.url_for("admin")

    def keys_for(self, role: str) -> LedgerKeys | None:
        """The manager signs; every other reader only verifies."""
        if self.security is None:
            return None
        return self.security.keys if role == "manager" else self.security.keys.reader()

    def make(self, name: str) -> Actor:
        url = self.url_for(name)
        keys = self.keys_for(name)
        if name == "manager":
            from gpu_fleet_manager.service import Manager, ManagerConfig  # noqa: PLC0415 - load a service only when the stack starts it

            cfg = ManagerConfig(
                nats_url=url,
                clock="virtual" if self.virtual_start is not None else "wall",
                start=self.virtual_start,
                inventory=self.inventory,
                ledger_keys=keys,
            )
            if self.settings is not None:
                cfg.settings = self.settings
            return Manager(cfg)
        if name == "binder":
            from gpu_fleet_binder.service import Binder, BinderConfig  # noqa: PLC0415 - load a service only when the stack starts it

            return Binder(BinderConfig(nats_url=url, ledger_keys=keys))
        # On a virtual clock the followers must read time from the ledger, not the wall.
        clock: Literal["wall", "ledger"] = "ledger" if self.virtual_start is not None else "wall"
        if name == "forecaster":
            from gpu_fleet_forecaster.service import build as build_forecaster  # noqa: PLC0415 - load a service only when the stack starts it

            return build_forecaster(url, clock=clock, ledger_keys=keys)
        if name == "notifier":
            from gpu_fleet_notifier.service import build as build_notifier  # noqa: PLC0415 - load a service only when the stack starts it

            return build_notifier(url, clock=clock, ledger_keys=keys)
        raise ValueError(f"unknown service {name}")

    async def start(self) -> None:
        await asyncio.to_thread(self.nats.start)
        # The binder first: the manager plans through it from its first command.
        for name in sorted(self.services, key=lambda n: (n != "binder", n != "manager", n)):
            await self.start_service(name)
        self.nc = await nats.connect(self.admin_url)
        for name in self.services:
            await wait_until_answers(self.nc, READINESS_PROBE[name])

    async def start_service(self, name: str) -> Actor:
        actor = self.make(name)
        await actor.start()
        self.actors[name] = actor
        if self.nc is not None:  # a restart: wait until its endpoints answer other clients
            await wait_until_answers(self.nc, READINESS_PROBE[name])
        return actor

    async def stop_service(self, name: str) -> None:
        actor = self.actors.pop(name, None)
        if actor is not None:
            await actor.stop()

    async def stop(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        for name in ("notifier", "forecaster", "manager", "binder"):
            await self.stop_service(name)
        await asyncio.to_thread(self.nats.stop)

    async def __aenter__(self) -> InProcessStack:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class ProcessStack:
    """Embedded NATS plus each service as its own OS process (``gpu-fleet up``)."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        inventory: str | None = None,
        log_level: str = "info",
        services: tuple[str, ...] = SERVICES,
        port: int | None = None,
        kube_args: list[str] | None = None,
        secure: bool = True,
        tls: ServerTls | None = None,
        tls_ca: str | None = None,
        metrics_port: int = 0,
        nats_cluster: int = 1,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.metrics_port = metrics_port  # the first of len(SERVICES) ports; 0: none
        self.kube_args = list(kube_args or [])  # --kube-url/--kubeconfig for manager and binder
        self.security = StackSecurity.load_or_create(self.data_dir / "security") if secure else None
        self.tls_ca = tls_ca  # what the services verify the server's certificate with
        if self.security is not None:
            self.security.tls = tls
        security = self.security.server_config if self.security is not None else None
        # One server, or a routed JetStream cluster whose streams keep a copy on every member.
        self.nats: EmbeddedNats | NatsCluster = (
            NatsCluster(self.data_dir / "nats", nats_cluster, port=port, security=security)
            if nats_cluster > 1
            else EmbeddedNats(self.data_dir / "nats", port=port, security=security)
        )
        self.nats_cluster = nats_cluster
        self.inventory = inventory
        self.log_level = log_level
        self.services = services
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def admin_url(self) -> str:
        """The server URL with the admin's credentials (the bare URL without security)."""
        if self.security is None:
            return self.nats.url
        return self.security.url_for("admin", self.nats.url)

    @property
    def reader_keys(self) -> LedgerKeys | None:
        """What a client verifies ledger events with (the public key)."""
        return self.security.keys.reader() if self.security is not None else None

    def admin_env_file(self) -> Path | None:
        """Write ``security/admin.env`` (export lines for the operator's shell); its path."""
        if self.security is None:
            return None
        path = self.security.folder / "admin.env"
        text = (
            f"export GPU_FLEET_NATS_URL={self.nats.url}\n"
            "export GPU_FLEET_NATS_USER=admin\n"
            f"export GPU_FLEET_NATS_PASSWORD={self.security.passwords['admin']}\n"
        )
        if self.tls_ca:
            text += f"export GPU_FLEET_NATS_TLS_CA={self.tls_ca}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path

    def child_env(self, name: str) -> dict[str, str]:
        """The environment of a service: its own NATS user and its ledger key (never argv,
        which ``ps`` shows to every local user)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_FLEET_NATS_")}
        if self.nats_cluster > 1:
            env[STREAM_REPLICAS_ENV] = str(self.nats_cluster)  # every stream on every member
        env.pop("GPU_FLEET_LEDGER_KEY", None)
        env.pop("GPU_FLEET_LEDGER_PUBLIC_KEY", None)
        if self.security is not None:
            env["GPU_FLEET_NATS_USER"] = name
            env["GPU_FLEET_NATS_PASSWORD"] = self.security.passwords[name]
            if self.tls_ca:
                env["GPU_FLEET_NATS_TLS_CA"] = self.tls_ca
            if name == "manager":
                env["GPU_FLEET_LEDGER_KEY"] = str(self.security.private_key_file)
            else:
                env["GPU_FLEET_LEDGER_PUBLIC_KEY"] = str(self.security.public_key_file)
        return env

    def metrics_ports(self) -> dict[str, int]:
        """Each service's /metrics port: ``metrics_port`` + its index in ``SERVICES`` (so a
        restarted service gets its port back), or nothing when ``metrics_port`` is 0."""
        if not self.metrics_port:
            return {}
        return {name: self.metrics_port + SERVICES.index(name) for name in self.services}

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        args = [
            sys.executable,
            "-m",
            f"gpu_fleet_{name}",
            "--nats-url",
            self.nats.url,
            "--log-level",
            self.log_level,
        ]
        if name == "manager" and self.inventory:
            args += ["--inventory", self.inventory]
        if name in ("manager", "binder"):
            args += self.kube_args
        # Always explicit, so a GPU_FLEET_METRICS_PORT in the caller's environment cannot make
        # four children fight for one port; local metrics stay on the loopback interface.
        args += ["--metrics-port", str(self.metrics_ports().get(name, 0))]
        log_path = self.data_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.child_env(name), "GPU_FLEET_METRICS_HOST": "127.0.0.1"},
            )
        self.procs[name] = proc
        return proc

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.nats.start()
        for name in self.services:
            self.spawn(name)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_service(self, name: str, timeout: float = 20.0) -> int | None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop(self) -> None:
        for name in ("notifier", "forecaster", "manager", "binder"):
            with contextlib.suppress(Exception):
                self.stop_service(name)
        self.nats.stop()

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is not None]
