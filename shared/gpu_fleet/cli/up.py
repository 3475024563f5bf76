"""``gpu-fleet up``: the whole stack on an embedded NATS server, as separate processes.

A small supervisor watches every child - nats-server and the four services alike - because the
ledger makes each of them restartable at any point: a child that dies is started again (NATS
on the same port and data directory, so the ledger and the services' reconnects find it), after
a delay that grows with each death in a row (``RESTART_DELAYS``).  A child that stayed up for
``HEALTHY_AFTER`` seconds before dying starts the sequence afresh: deaths hours apart are not a
crash loop (issue 19: the delay never reset, and a dead nats-server was never noticed at all).

Restarts are scheduled, not slept: one tick checks every child and starts those whose delay has
passed, so one child's back-off never delays noticing another's death, nor Ctrl-C.  SIGINT and
SIGTERM stop everything cleanly.  The clock is injected so the policy is tested without sleeping.

What to look at: every service serves ``/metrics``, ``/healthz`` and ``/readyz`` on a port of its
own (``--metrics-port`` is the first: manager, binder, forecaster, notifier in that order; 9101 to
9104 by default), and the live fleet map (``cli.live_map``) is served on ``--map-port`` (9100),
read afresh from the manager on every load.  ``up`` prints every URL; 0 turns either off.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from gpu_fleet.cli.live_map import DEFAULT_REFRESH, LiveMap, LiveMapThread
from gpu_fleet.cli.stack import SERVICES, ProcessStack
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.natsd import EmbeddedNats, NatsServerError
from gpu_fleet.runtime.natsd_cluster import NatsCluster
from gpu_fleet.runtime.stack_security import ServerTls

RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)
"""Seconds before restarting a child after its 1st, 2nd, ... death in a row (then the last)."""
HEALTHY_AFTER = 60.0
"""Seconds a child must have run before a death counts as the first of a new sequence."""
TICK = 0.5
"""Seconds between checks of the children."""
DEFAULT_MAP_PORT = 9100
"""The live fleet map's port."""
DEFAULT_METRICS_PORT = 9101
"""The manager's /metrics port; binder, forecaster and notifier take the next three."""


class Child(Protocol):
    """One supervised process: its name, whether it runs, how it exited, how to start it."""

    name: str

    def running(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def start(self) -> None: ...


class NatsChild:
    """An embedded nats-server (the only one, or one cluster member); ``start`` reuses its
    ports and JetStream directory."""

    def __init__(
        self, stack: ProcessStack, server: EmbeddedNats | None = None, name: str = "nats-server"
    ) -> None:
        if server is None:
            assert isinstance(stack.nats, EmbeddedNats)
            server = stack.nats
        self.server = server
        self.name = name

    def running(self) -> bool:
        proc = self.server.proc
        return proc is not None and proc.poll() is None

    def exit_code(self) -> int | None:
        proc = self.server.proc
        return proc.returncode if proc is not None else None

    def start(self) -> None:
        self.server.proc = None  # forget the dead process; start() then spawns a new one
        self.server.start()


class ServiceChild:
    """One service process of the stack."""

    def __init__(self, stack: ProcessStack, name: str) -> None:
        self.stack = stack
        self.name = name

    def running(self) -> bool:
        proc = self.stack.procs.get(self.name)
        return proc is not None and proc.poll() is None

    def exit_code(self) -> int | None:
        proc = self.stack.procs.get(self.name)
        return proc.returncode if proc is not None else None

    def start(self) -> None:
        self.stack.procs.pop(self.name, None)
        self.stack.spawn(self.name)


@dataclass
class _State:
    started_at: float
    deaths: int = 0  # deaths in a row (reset by a healthy run)
    restart_at: float | None = None  # when a dead child is due to start again


@dataclass
class Supervisor:
    """Restart dead children with a back-off that resets after a healthy run."""

    children: list[Child]
    clock: Callable[[], float] = time.monotonic
    delays: tuple[float, ...] = RESTART_DELAYS
    healthy_after: float = HEALTHY_AFTER
    out: TextIO = sys.stderr
    _states: dict[str, _State] = field(default_factory=dict)

    def __post_init__(self) -> None:
        now = self.clock()
        self._states = {c.name: _State(started_at=now) for c in self.children}

    def delay_after_death(self, name: str) -> float:
        """Count one more death of ``name`` and return how long to wait before restarting it."""
        state = self._states[name]
        if self.clock() - state.started_at >= self.healthy_after:
            state.deaths = 0  # it ran long enough: this is a new sequence, not a crash loop
        delay = self.delays[min(state.deaths, len(self.delays) - 1)]
        state.deaths += 1
        return delay

    def tick(self) -> list[str]:
        """Check every child once; start those due.  Returns the names (re)started."""
        started = []
        for child in self.children:  # nats-server first: the services need it
            state = self._states[child.name]
            if state.restart_at is None:
                if child.running():
                    continue
                delay = self.delay_after_death(child.name)
                state.restart_at = self.clock() + delay
                print(
                    f"{child.name} exited (code {child.exit_code()}); restarting in {delay:g}s",
                    file=self.out,
                    flush=True,
                )
            if self.clock() < state.restart_at:
                continue
            try:
                child.start()
            except (OSError, NatsServerError) as exc:
                delay = self.delay_after_death(child.name)
                state.restart_at = self.clock() + delay
                print(
                    f"{child.name} did not start ({exc}); retrying in {delay:g}s",
                    file=self.out,
                    flush=True,
                )
                continue
            state.started_at = self.clock()
            state.restart_at = None
            started.append(child.name)
            print(f"{child.name} restarted", file=self.out, flush=True)
        return started


def default_inventory() -> str | None:
    path = Path.cwd() / "examples" / "inventory.yaml"
    return str(path) if path.exists() else None


def supervisor_for(stack: ProcessStack) -> Supervisor:
    children: list[Child]
    if isinstance(stack.nats, NatsCluster):
        children = [NatsChild(stack, m, f"nats-server {m.name}") for m in stack.nats.members]
    else:
        children = [NatsChild(stack)]
    children += [ServiceChild(stack, name) for name in stack.services]
    return Supervisor(children)


def up(
    data_dir: str,
    inventory: str | None,
    port: int,
    log_level: str,
    *,
    kube_args: list[str] | None = None,
    secure: bool = True,
    tls: ServerTls | None = None,
    tls_ca: str | None = None,
    metrics_port: int = 0,
    map_port: int = 0,
    map_refresh: int = DEFAULT_REFRESH,
    nats_cluster: int = 1,
) -> int:
    stack = ProcessStack(
        data_dir,
        inventory=inventory,
        log_level=log_level,
        port=port,
        kube_args=kube_args,
        secure=secure,
        tls=tls,
        tls_ca=tls_ca,
        metrics_port=metrics_port,
        nats_cluster=nats_cluster,
    )
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    live: LiveMapThread | None = None
    if map_port:
        live = LiveMapThread(
            LiveMap(
                stack.admin_url,  # the operator's user: the map shows every team's runs
                map_port,
                refresh=map_refresh,
                auth=ClientAuth(tls_ca=tls_ca) if tls_ca else None,
            )
        )
        try:
            live.start()
        except OSError as exc:
            print(f"error: --map-port {map_port}: cannot listen: {exc.strerror}", file=sys.stderr)
            return 1
    stack.start()
    print(f"gpu-fleet is up: NATS at {stack.nats.url} (JetStream data in {data_dir}/nats)")
    if nats_cluster > 1:
        n = nats_cluster
        print(f"  cluster:  {n} JetStream servers, every stream at {n} replicas")
    print(f"  services: {', '.join(SERVICES)} (logs in {data_dir}/<service>.log)")
    if live is not None:
        print(f"  fleet map: {live.live.url} (live; reloads every {map_refresh} s)")
    for name, mport in stack.metrics_ports().items():
        print(f"  metrics:  {name:<10} http://127.0.0.1:{mport}/metrics  (/healthz, /readyz)")
    if kube_args:
        print(f"  kubernetes bridge: {' '.join(kube_args)} (manager: runs/budgets, binder: pods)")
    env_file = stack.admin_env_file()
    if env_file is None:
        print(f"  try:      export GPU_FLEET_NATS_URL={stack.nats.url}; kubectl runs get -A")
    else:
        print(f"  auth:     on; users and the ledger key in {env_file.parent}")
        print(f"  try:      source {env_file}; kubectl runs get -A")
        print(f"  teams:    gpu-fleet team add <team> --data-dir {data_dir}")
    print("  stop:     Ctrl-C", flush=True)
    supervisor = supervisor_for(stack)
    try:
        while not stop.wait(TICK):
            supervisor.tick()
    finally:
        print("stopping gpu-fleet ...", flush=True)
        stack.stop()
        if live is not None:
            live.stop()
    return 0
