"""Metrics and health over HTTP for one service: ``/metrics``, ``/healthz``, ``/readyz``.

Each service owns one ``Observer``: its own prometheus_client registry (so the four services can
share a process in tests and in ``scenario run --via-nats`` without clashing) and a tiny asyncio
HTTP server on the service's event loop (no thread, no framework: three GET routes).

* ``/healthz`` answers 200 whenever the event loop answers at all: the process is alive.  A
  service whose loop is wedged stops answering and the kubelet restarts it.
* ``/readyz`` answers 200 only when the service's readiness probe says so - NATS connected and
  the folded ledger within ``max_lag`` messages of the stream - else 503 with the reason, so a
  restarted follower takes no traffic until it has caught up.
* ``/metrics`` first refreshes the scrape-time gauges (the service's ``gauges`` callback, e.g.
  the manager's ``views.metrics.fleet_gauges`` under its command lock, and the ledger position
  from the probe), then renders the registry in the Prometheus text format.

Counters and histograms are created from ``views.metrics.METRICS`` (the one list the docs are
checked against); services record with ``inc``/``observe``/``record``.  Port 0 turns the HTTP
server off (a service's own default, and the tests that do not scrape); ``gpu-fleet up`` gives
each of its services a port of its own (9101 to 9104).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gpu_fleet.runtime.http_get import Answer, GetServer, start_get_server, stop_server
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet.views.metrics import SPECS, GaugeFamily, Increment

log = structlog.get_logger("gpu_fleet.observe")

DEFAULT_MAX_LAG = 1000
"""Ledger events a service may be behind the stream and still be ready."""


@dataclass(frozen=True)
class Health:
    """One readiness check: ready or not (and why), and where the service is in the ledger."""

    ready: bool
    reason: str = ""
    connected: bool = True
    seq: int | None = None
    stream_seq: int | None = None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """``--metrics-port`` and ``--ready-max-lag`` (env ``GPU_FLEET_METRICS_PORT`` and
    ``GPU_FLEET_READY_MAX_LAG``), the same on every service's command line."""
    env = os.environ.get
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env("GPU_FLEET_METRICS_PORT", "0")),
        help="serve /metrics, /healthz and /readyz on this port (0: off)",
    )
    parser.add_argument(
        "--ready-max-lag",
        type=int,
        default=int(env("GPU_FLEET_READY_MAX_LAG", str(DEFAULT_MAX_LAG))),
        help="ledger messages this service may be behind the stream and still be ready",
    )


Probe = Callable[[], Awaitable[Health]]
GaugeSource = Callable[[], Awaitable[Iterable[GaugeFamily]]]


async def ledger_health(
    connected: bool, ledger: LedgerStream | None, seq: int | None, max_lag: int
) -> Health:
    """The common readiness rule: connected, the stream answers, and ``seq`` is close to it.

    ``seq=None`` means the service has not folded anything yet (still starting): not ready.
    """
    if not connected or ledger is None:
        return Health(False, "NATS not connected", connected=False, seq=seq)
    try:
        stream_seq = await ledger.last_seq()
    except Exception as exc:  # any failure to read the stream means "not ready", with why
        return Health(False, f"ledger stream unavailable: {type(exc).__name__}", seq=seq)
    if seq is None:
        return Health(False, "ledger not folded yet", stream_seq=stream_seq)
    lag = stream_seq - seq
    if lag > max_lag:
        return Health(
            False, f"{lag} ledger messages behind (bound {max_lag})", seq=seq, stream_seq=stream_seq
        )
    return Health(True, "", seq=seq, stream_seq=stream_seq)


class _ScrapeGauges:
    """A collector that yields the gauges computed by the last refresh."""

    def __init__(self) -> None:
        self.families: list[GaugeFamily] = []

    def collect(self) -> Iterable[Metric]:
        for family in self.families:
            spec = SPECS[family.name]
            metric = GaugeMetricFamily(family.name, spec.help, labels=list(spec.labels))
            for labels, value in sorted(family.samples.items()):
                metric.add_metric(list(labels), value)
            yield metric

    def describe(self) -> Iterable[Metric]:
        return []


class Observer:
    def __init__(self, service: str, port: int = 0, host: str | None = None) -> None:
        """``host`` defaults to ``GPU_FLEET_METRICS_HOST``, else every interface: in a pod the
        kubelet probes the pod IP (``gpu-fleet up`` sets 127.0.0.1 for its children)."""
        self.service = service
        self.port = port
        self.host = host or os.environ.get("GPU_FLEET_METRICS_HOST") or "0.0.0.0"
        self.registry = CollectorRegistry()
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        # Each labelled series once looked up: ``labels()`` validates and locks on every
        # call, and the manager counts several times per admission (issue 11).  It holds no
        # series the metric itself does not hold already (and series are never removed).
        self._children: dict[tuple[str, tuple[str, ...]], Any] = {}
        for spec in SPECS.values():
            if service not in spec.exported_by:
                continue
            if spec.kind == "counter":
                base = spec.name.removesuffix("_total")
                self._counters[spec.name] = Counter(
                    base, spec.help, list(spec.labels), registry=self.registry
                )
            elif spec.kind == "histogram":
                self._histograms[spec.name] = Histogram(
                    spec.name,
                    spec.help,
                    list(spec.labels),
                    registry=self.registry,
                    buckets=spec.buckets,
                )
        self._scraped = _ScrapeGauges()
        self.registry.register(self._scraped)
        self.probe: Probe | None = None
        self.gauges: GaugeSource | None = None
        self._server: GetServer | None = None

    # -- recording ---------------------------------------------------------------------------
    def inc(self, name: str, *labels: str, value: float = 1.0) -> None:
        child = self._children.get((name, labels)) or self._child(self._counters, name, labels)
        child.inc(value)

    def observe(self, name: str, value: float, *labels: str) -> None:
        child = self._children.get((name, labels)) or self._child(self._histograms, name, labels)
        child.observe(value)

    def _child(
        self, family: Mapping[str, Counter | Histogram], name: str, labels: tuple[str, ...]
    ) -> Any:
        """The series ``labels`` of metric ``name``, looked up once (``_children``)."""
        metric = family[name]
        child = self._children[name, labels] = metric.labels(*labels) if labels else metric
        return child

    def record(self, increments: Iterable[Increment]) -> None:
        """Apply ``views.metrics.tally``'s output (counters and histogram observations)."""
        for item in increments:
            if item.name in self._histograms:
                self.observe(item.name, item.value, *item.labels)
            else:
                self.inc(item.name, *item.labels, value=item.value)

    # -- scraping ----------------------------------------------------------------------------
    async def health(self) -> Health:
        if self.probe is None:
            return Health(True)
        try:
            return await self.probe()
        except Exception as exc:  # a broken probe must say so, not kill the server
            log.warning("observe.probe_failed", error=type(exc).__name__)
            return Health(False, f"probe failed: {type(exc).__name__}")

    async def refresh(self) -> None:
        """Recompute the scrape-time gauges: the service's own, then the ledger position."""
        families: list[GaugeFamily] = []
        if self.gauges is not None:
            try:
                families.extend(await self.gauges())
            except Exception as exc:  # keep serving the counters; say what went wrong
                log.warning("observe.gauges_failed", error=type(exc).__name__)
        h = await self.health()
        families.append(GaugeFamily("gpu_fleet_nats_connected", {(): float(h.connected)}))
        families.append(GaugeFamily("gpu_fleet_ready", {(): float(h.ready)}))
        if h.seq is not None:
            families.append(GaugeFamily("gpu_fleet_ledger_sequence", {(): float(h.seq)}))
        if h.stream_seq is not None:
            families.append(GaugeFamily("gpu_fleet_ledger_stream_sequence", {(): h.stream_seq}))
        if h.seq is not None and h.stream_seq is not None:
            lag = float(max(0, h.stream_seq - h.seq))
            families.append(GaugeFamily("gpu_fleet_ledger_lag_events", {(): lag}))
        self._scraped.families = families

    async def metrics_text(self) -> bytes:
        await self.refresh()
        return generate_latest(self.registry)

    # -- HTTP ----------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.port or self._server is not None:
            return
        self._server = await start_get_server(self._route, self.host, self.port)
        log.info("observe.listening", service=self.service, host=self.host, port=self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        await stop_server(server)

    async def _route(self, path: str) -> Answer:
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, await self.metrics_text()
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            h = await self.health()
            if h.ready:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", f"not ready: {h.reason}\n".encode()
        return "404 Not Found", "text/plain", b"not found: /metrics, /healthz, /readyz\n"
