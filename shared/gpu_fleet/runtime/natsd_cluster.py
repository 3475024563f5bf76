"""A JetStream cluster of embedded nats-servers on loopback, and the knobs clients need for it.

One NATS server holds the ledger on one disk: lose the machine and the fleet stops (and may lose
the tail of the ledger).  A 3-server cluster with every stream at 3 replicas keeps answering
while any one server is down, because JetStream commits a message only once a majority (2 of
3) stored it; an acknowledged ledger append therefore survives the loss of any single server.

This module is deliberately separate from ``natsd`` (one server) so that the security work on
the server's configuration (auth, TLS) and the cluster topology merge without touching each
other: a member is an ``EmbeddedNats`` whose ``extra_args`` add the routes.

* ``NatsCluster`` - N members, each with its own client, route and monitoring ports and its own
  JetStream directory, all routed to each other on 127.0.0.1 (``gpu-fleet up --nats-cluster 3``
  and the tests).
* ``servers`` - a ``--nats-url`` may list several servers separated by commas; clients connect
  to any and fail over to the others.
* ``stream_replicas`` - how many copies of each stream (ledger, snapshots, notifier streams) a
  service creates: env ``GPU_FLEET_STREAM_REPLICAS`` (default 1; the chart and ``up`` set it to
  the cluster size).  It only matters when a stream is created; an existing stream keeps its
  replicas (change them with ``nats stream edit``).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from gpu_fleet.runtime.natsd import EmbeddedNats, NatsServerError, free_port

STREAM_REPLICAS_ENV = "GPU_FLEET_STREAM_REPLICAS"
MAX_REPLICAS = 5
"""JetStream's own ceiling for a stream's replicas."""
CLUSTER_NAME = "gpu-fleet"


def stream_replicas(environ: dict[str, str] | None = None) -> int:
    """Replicas for a stream a service creates: ``GPU_FLEET_STREAM_REPLICAS``, 1 to 5.

    A value that is not a whole number from 1 to 5 is an error naming the variable, not a
    silent default: a cluster that thinks its ledger has 3 copies while it has 1 is worse than
    a service that refuses to start.
    """
    env = os.environ if environ is None else environ
    raw = env.get(STREAM_REPLICAS_ENV, "").strip()
    if not raw:
        return 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_REPLICAS:
        raise ValueError(
            f"{STREAM_REPLICAS_ENV}: must be a whole number from 1 to {MAX_REPLICAS}"
            f" (got {raw[:40]!r})"
        )
    return value


def servers(url: str) -> list[str]:
    """The server URLs in a ``--nats-url`` (comma-separated; blanks ignored)."""
    found = [part.strip() for part in url.split(",") if part.strip()]
    return found or [url]


def split_userinfo(url: str) -> tuple[list[str], dict[str, str]]:
    """(``servers(url)`` without credentials, the credentials as ``nats.connect`` options).

    Every client connects through this.  Why not leave credentials in the URL: nats-py adds
    a server a cluster announces (``connect_urls``, a bare ``host:port``) as one of its own
    unless an equal netloc is listed, so ``user:pw@host:port`` and ``host:port`` count as two,
    and a reconnect to the bare one carries no credentials and is refused (Authorization
    Violation).  Options apply to every server.  ``user@`` alone is a token, as for nats-py.
    """
    bare, options = [], {}
    for one in servers(url):
        parts = urlsplit(one)
        if "@" not in parts.netloc:
            bare.append(one)
            continue
        userinfo, host = parts.netloc.rsplit("@", 1)
        user, colon, password = userinfo.partition(":")
        options = {"user": user, "password": password} if colon else {"token": user}
        bare.append(urlunsplit(parts._replace(netloc=host)))
    return bare, options


class ClusterMember(EmbeddedNats):
    """One server of the cluster: a name, a route port, routes to every member, a monitor port."""

    def __init__(
        self,
        store_dir: str | os.PathLike[str],
        name: str,
        routes: list[str],
        port: int | None = None,
        security: Callable[[], str] | None = None,
    ) -> None:
        super().__init__(store_dir, port=port, security=security)
        self.name = name
        self.route_port = free_port()
        self.monitor_port = free_port()
        self.routes = routes  # filled by the cluster once every member has its route port

    @property
    def security_file(self) -> Path:
        """One config for every member, where a single server keeps it (``<data>/...``), so
        ``gpu-fleet team add`` rewrites it once for the whole cluster."""
        return self.store_dir.parent.parent / "nats-security.conf"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"  # one per member; team add HUPs them all

    @property
    def route_url(self) -> str:
        return f"nats-route://127.0.0.1:{self.route_port}"

    def extra_args(self) -> list[str]:
        return [
            "--name",
            self.name,
            "--cluster_name",
            CLUSTER_NAME,
            "--cluster",
            self.route_url,
            "--routes",
            ",".join(self.routes),
            "-m",
            str(self.monitor_port),
        ]

    def healthy(self) -> bool:
        """``/healthz`` says 200: JetStream is up and this server knows the meta leader."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1.0
            ) as reply:
                body = json.loads(reply.read() or b"{}")
                return bool(reply.status == 200 and body.get("status") == "ok")
        except (OSError, ValueError, urllib.error.URLError):
            return False


class NatsCluster:
    """``size`` routed JetStream servers on 127.0.0.1, each with its own store directory.

    Duck-types ``EmbeddedNats`` where the stacks use it (``url``, ``start``, ``stop``, ``kill``)
    so ``ProcessStack`` and the tests take either; ``url`` lists every member.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        size: int = 3,
        port: int | None = None,
        security: Callable[[], str] | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"nats cluster size must be at least 1 (got {size})")
        self.data_dir = Path(data_dir)
        routes: list[str] = []
        self.members: list[ClusterMember] = []
        for i in range(size):
            member_port = port + i if port is not None else None
            member = ClusterMember(
                self.data_dir / f"s{i + 1}", f"s{i + 1}", routes, member_port, security
            )
            self.members.append(member)
        routes += [m.route_url for m in self.members]

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def url(self) -> str:
        return ",".join(m.url for m in self.members)

    def start(self, ready_timeout: float = 120.0) -> None:
        """Start every member, then wait until each reports JetStream healthy."""
        for member in self.members:
            member.start()
        self.wait_healthy(ready_timeout)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Wait until every running member reports healthy (a meta leader is elected)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.proc is None:
                continue
            while not member.healthy():
                if time.monotonic() > deadline:
                    raise NatsServerError(
                        f"nats-server {member.name} not healthy within {timeout}s;"
                        f" see {member.store_dir}/nats-server.log"
                    )
                time.sleep(0.05)

    def start_member(self, index: int, ready_timeout: float = 120.0) -> None:
        """(Re)start one member on its old ports and store; wait until it is healthy."""
        member = self.members[index]
        member.proc = None
        member.start()
        deadline = time.monotonic() + ready_timeout
        while not member.healthy():
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server {member.name} not healthy after restart")
            time.sleep(0.05)

    def kill_member(self, index: int) -> None:
        """SIGKILL one member, as the loss of its machine would."""
        self.members[index].kill()

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def reload(self) -> None:
        """Every member re-reads the security config (new team users, docs/security.md)."""
        for member in self.members:
            member.reload()
