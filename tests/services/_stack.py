"""Test helpers for service tests: a real nats-server, the manager on a virtual clock, polling.

Tests never sleep for timing: they wait on conditions with ``wait_until``, which polls quickly
and gives up (failing the test with what it waited for) after a bound.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats
from nats.aio.client import Client

from gpu_fleet.cli.stack import READINESS_PROBE, call, wait_until_answers
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.runtime.actor import Actor
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.natsd import EmbeddedNats
from gpu_fleet.runtime.stack_security import StackSecurity
from gpu_fleet_binder.service import Binder, BinderConfig
from gpu_fleet_manager.service import Manager, ManagerConfig

T = TypeVar("T")

T0 = parse_instant("2026-03-02T00:00:00Z")
LABELS = {"region": "r", "cluster": "c", "fabric.domain": "f", "gpu.flavor": "H100"}


async def wait_until(
    probe: Callable[[], T | Awaitable[T]],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.02,
) -> T:
    """Poll ``probe`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def budget(namespace: str, owner: str, concurrency: int = 16) -> str:
    return f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: b, namespace: {namespace}}}
spec:
  owner: "{owner}"
  envelopes:
    - {{name: e, flavor: H100, selector: {{region: r}}, concurrency: {concurrency},
        start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}}
"""


def run(namespace: str, name: str, gpus: int, spec_extra: str = "") -> str:
    return f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {{name: {name}, namespace: {namespace}}}
spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}{spec_extra}}}
"""


async def _stop(actor: Actor) -> None:
    """Stop an actor; for the binder, first end its ledger follower while NATS is still up.

    Workaround for shared code: ``LedgerStream.follow`` unsubscribes its ordered consumer only
    after the actor drained the connection, which fails and leaves nats-py's heartbeat and
    flow-control tasks pending (the suite's leak guard then fails the test).  Cancelling the
    binder's root tasks before ``stop()`` lets the unsubscribe happen on a live connection.
    """
    if isinstance(actor, Binder):
        tasks = list(actor._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await actor.stop()


class Stack:
    """Embedded NATS + binder + manager (virtual clock from ``T0``) + a client connection.

    Extra actors (forecaster, notifier) are added with ``add`` and stopped, like the rest, in
    reverse order by ``stop``; every actor stops even when a test fails half-way.

    Authorization is on, as in every embedded stack: each service connects as its own user,
    the manager signs the ledger and the others verify it.  ``url`` is the *admin* URL (the
    operator a test plays); ``url_for(role)`` and ``keys_for(role)`` configure a service the
    test builds itself, and ``url_for("root")`` is an unrestricted user to play an attacker.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.security = StackSecurity.load_or_create(tmp_path / "security", root=True)
        self.nats = EmbeddedNats(tmp_path / "nats", security=self.security.server_config)
        self.actors: list[Actor] = []
        self.nc: Client | None = None

    @property
    def url(self) -> str:
        return self.url_for("admin")

    def url_for(self, role: str) -> str:
        return self.security.url_for(role, self.nats.url)

    def keys_for(self, role: str) -> LedgerKeys:
        return self.security.keys if role == "manager" else self.security.keys.reader()

    def manager_config(self, **kwargs: Any) -> ManagerConfig:
        """A manager of this stack (its user and the ledger's private key) on ``T0``."""
        kwargs.setdefault("clock", "virtual")
        kwargs.setdefault("start", T0)
        return ManagerConfig(
            nats_url=self.url_for("manager"), ledger_keys=self.keys_for("manager"), **kwargs
        )

    async def start(self) -> None:
        await asyncio.to_thread(self.nats.start)
        binder = BinderConfig(nats_url=self.url_for("binder"), ledger_keys=self.keys_for("binder"))
        await self.add(Binder(binder))
        await self.add(Manager(self.manager_config()))
        # TLS options (a test's CA) come from the environment, as for the services.
        self.nc = await nats.connect(self.url, **ClientAuth.from_env().connect_options())
        # The services started before this client connected: wait until each answers it, as
        # ``add`` does for the ones started later (a loaded machine once answered the first
        # request with "no responders").
        for actor in self.actors:
            probe = READINESS_PROBE.get(actor.name)
            if probe is not None:
                await wait_until_answers(self.nc, probe)

    async def add(self, actor: Actor) -> Actor:
        """Start ``actor``; once the client is connected, wait until its service answers (a
        restarted service's subscriptions can be unseen by another connection for a moment:
        ``wait_until_answers``)."""
        self.actors.append(actor)
        await actor.start()
        probe = READINESS_PROBE.get(actor.name)
        if self.nc is not None and probe is not None:
            await wait_until_answers(self.nc, probe)
        return actor

    async def remove(self, actor: Actor) -> None:
        self.actors.remove(actor)
        await _stop(actor)

    async def stop(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        while self.actors:
            await _stop(self.actors.pop())
        await asyncio.to_thread(self.nats.stop)

    @property
    def client(self) -> Client:
        assert self.nc is not None
        return self.nc

    async def api(self, endpoint: str, body: dict[str, Any]) -> Any:
        return await call(self.client, endpoint, body, timeout=20.0)

    async def node(self, name: str, gpus: int) -> None:
        node = {"name": name, "gpus": gpus, "labels": LABELS}
        await self.api("node", {"op": "register", "node": node})

    async def apply(self, documents: str) -> Any:
        return await self.api("apply", {"documents": documents})

    async def advance(self, to: int) -> None:
        await self.api("clock", {"advance_to": to})

    async def seq(self) -> int:
        result = await self.api("seq", {})
        return int(result["seq"])

    async def request(self, subject: str, body: dict[str, Any]) -> Any:
        """A raw request; returns (headers, decoded JSON body or None)."""
        msg = await self.client.request(subject, json.dumps(body).encode(), timeout=20.0)
        return msg.headers or {}, (json.loads(msg.data) if msg.data else None)
