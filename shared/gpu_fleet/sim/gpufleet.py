"""The gpu-fleet policy: the real core (``core.engine.Fleet``) on a virtual clock.

Nothing here decides anything: jobs become ``Run`` manifests of their team's namespace
(``maxDuration`` when declared, ``groupGPUs`` when they have groups), budgets are applied as they
are, and the loop only moves the clock and tells the engine what the world did:

* at a job's arrival, ``RunSubmitted``; at its completion (start + duration), its leases close
  ``Completed`` and the run turns ``Completed``;
* between those, ``Fleet.next_due`` says when the engine has work of its own (reservation
  activations, preemption deadlines, lease expiry), and ``Fleet.reconcile`` does it.

Order at one instant (as bench/forecast.py and production): completions, then arrivals, then one
reconcile.  A run the resolver ends (``EndedByResolver``) is resubmitted at once as a fresh run
(``<name>-r<n>``) that starts from scratch; one reclaimed as unfunded stays Pending and the
engine re-admits it.  Either way the lost work is counted.  The forecast is taken at arrival for
every run that does not start at once (``core.forecast.forecast``, no remedies).
"""

from __future__ import annotations

import heapq
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.forecast import ForecastError, forecast
from gpu_fleet.core.ledger import Event, LeaseClosed, RunStatusChanged, RunSubmitted
from gpu_fleet.core.manifests import validate_manifest
from gpu_fleet.core.model import API_VERSION, Budget, LeaseRole, Node, Run
from gpu_fleet.sim.budgets import Window
from gpu_fleet.sim.cluster import min_nodes
from gpu_fleet.sim.harness import Progress
from gpu_fleet.sim.jobs import Job
from gpu_fleet.sim.timeline import ForecastRecord, Outcome, Segment, Timeline


def run_manifest(job: Job, flavor: str, name: str) -> Run:
    """The Run a user would submit for ``job`` (validated like any manifest)."""
    spec: dict[str, object] = {"resources": {"gpuType": flavor, "totalGPUs": job.gpus}}
    if job.group_gpus is not None:
        spec["locality"] = {"groupGPUs": job.group_gpus}
    if job.declared:
        spec["runtime"] = {"maxDuration": f"{job.duration}s"}
    run = validate_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "metadata": {"name": name, "namespace": job.team},
            "spec": spec,
        }
    )
    assert isinstance(run, Run)
    return run


@dataclass
class _Live:
    job: Job
    start: int
    gpus: int
    nodes: int


class GpuFleetPolicy:
    """Replays jobs through ``Fleet``; see the module docstring."""

    name = "gpu-fleet"

    def __init__(
        self,
        nodes: Sequence[Node],
        flavor: str,
        budgets: Sequence[Budget],
        origin: int,
        *,
        settings: Settings | None = None,
        forecast_every: int = 1,
    ) -> None:
        self.nodes = list(nodes)
        self.flavor = flavor
        self.budgets = list(budgets)
        self.origin = origin
        self.settings = settings or Settings()
        self.forecast_every = forecast_every
        self.node_sizes = [n.gpus for n in nodes if n.flavor == flavor]

    def run(
        self,
        jobs: Sequence[Job],
        entitlements: dict[str, list[Window]],
        drain_limit: int,
        progress: Progress | None = None,
    ) -> Timeline:
        t_wall = time.perf_counter()
        t0 = self.origin
        fleet = Fleet(self.settings)
        for node in sorted(self.nodes, key=lambda n: n.name):
            fleet.register_node(node, t0 - 60)
        for b in sorted(self.budgets, key=lambda b: b.key):
            fleet.apply(b, t0 - 60)
        tl = Timeline(
            policy=self.name,
            fleet_gpus=sum(self.node_sizes),
            jobs=sorted(jobs),
            entitlements={k: list(v) for k, v in entitlements.items()},
        )
        subs: list[tuple[int, str, int]] = []  # (instant, run name, attempt)
        by_run: dict[str, Job] = {}  # run key -> its job
        by_name = {j.name: j for j in tl.jobs}
        attempts: dict[str, int] = defaultdict(int)
        for job in tl.jobs:
            heapq.heappush(subs, (t0 + job.submit, job.name, 0))
        total = len(subs)
        arrived = 0
        live: dict[str, _Live] = {}
        ends: list[tuple[int, str, int]] = []  # (instant, run key, start)
        forecasts: dict[str, ForecastRecord] = {}
        waited = 0
        overdraft = 0
        hours_over = 0.0
        limit = t0 + drain_limit

        def observe(events: Sequence[Event]) -> None:
            closures: dict[str, str] = {}
            for e in events:
                if isinstance(e, LeaseClosed):
                    lease = fleet.state.leases.get(e.lease)
                    if lease is not None:
                        closures.setdefault(lease.run, e.reason)
                if not isinstance(e, RunStatusChanged):
                    continue
                key = e.run
                if e.phase == "Running" and key not in live:
                    job = by_run[key]
                    actives = [
                        x
                        for x in fleet.state.leases_of(key, open_only=True)
                        if x.role is LeaseRole.ACTIVE
                    ]
                    gpus = sum(x.width for x in actives)
                    live[key] = _Live(job, e.at, gpus, len({x.node for x in actives}))
                    heapq.heappush(ends, (e.at + job.duration, key, e.at))
                    rec = forecasts.get(key)
                    if rec is not None and rec.start is None:
                        forecasts[key] = ForecastRecord(
                            rec.job, rec.submit, rec.p50, rec.p90, e.at - t0
                        )
                elif e.phase != "Running" and key in live:
                    item = live.pop(key)
                    outcome: Outcome
                    if e.phase == "Completed":
                        outcome = "completed"
                    elif e.reason == "Expired":
                        outcome = "expired"
                    elif e.reason == "Reclaimed" or closures.get(key, "").startswith("Reclaim"):
                        outcome = "reclaimed"
                    else:
                        outcome = "preempted"
                    tl.segments.append(
                        Segment(
                            job=item.job.name,
                            start=item.start - t0,
                            end=e.at - t0,
                            gpus=item.gpus,
                            nodes=item.nodes,
                            min_nodes=min_nodes(self.node_sizes, item.gpus),
                            outcome=outcome,
                        )
                    )
                    if e.phase == "Failed" and outcome in ("preempted", "reclaimed"):
                        attempts[item.job.name] += 1
                        heapq.heappush(subs, (e.at, item.job.name, attempts[item.job.name]))

        sampled_version = [-1]

        def sample(at: int) -> None:
            """Funding classes and adherence after an instant's work.  Skipped when the ledger
            did not change (a full funding evaluation is the engine's dearest call); a class
            change by time alone (a window closing, hours running out) shows at the next event."""
            nonlocal overdraft, hours_over
            if fleet.state.version == sampled_version[0]:
                return
            sampled_version[0] = fleet.state.version
            ev = fleet.state.evaluation(at)
            counts: dict[str, int] = defaultdict(int)
            for x in fleet.state.open_leases.values():
                if x.role is LeaseRole.ACTIVE:
                    counts[ev.lease_class(x.id).value] += x.width
            tl.record_classes(at - t0, counts)
            for usage in ev.envelopes.values():
                overdraft = max(overdraft, usage.funded - usage.concurrency)
                if usage.gpu_hours is not None:
                    hours_over = max(hours_over, usage.gpu_hours_used - usage.gpu_hours)

        while subs or ends:
            t_ext = min(subs[0][0] if subs else limit + 1, ends[0][0] if ends else limit + 1)
            t_int = fleet.next_due(fleet.state.clock)
            if t_int is not None and t_int < t_ext and t_int <= limit:
                observe(fleet.reconcile(t_int))
                sample(t_int)
                continue
            if t_ext > limit:
                break
            t = t_ext
            closing: list[Event] = []
            while ends and ends[0][0] == t:
                _, key, started = heapq.heappop(ends)
                item = live.get(key)
                if item is None or item.start != started:
                    continue  # preempted meanwhile
                closing += [
                    LeaseClosed(at=t, lease=x.id, reason="Completed")
                    for x in fleet.state.leases_of(key, open_only=True)
                ]
                closing.append(
                    RunStatusChanged(
                        at=t, run=key, phase="Completed", reason="AllSucceeded", message="done"
                    )
                )
            observe(fleet.commit(closing))
            new: list[str] = []
            while subs and subs[0][0] == t:
                _, name, attempt = heapq.heappop(subs)
                job = by_name[name]
                run_name = name if attempt == 0 else f"{name}-r{attempt}"
                run = run_manifest(job, self.flavor, run_name)
                by_run[run.key] = job
                fleet.commit([RunSubmitted(at=t, run=run)])
                if attempt == 0:
                    new.append(run.key)
                    arrived += 1
            observe(fleet.reconcile(t))
            for key in new:
                if key in live:
                    continue
                waited += 1
                if self.forecast_every and (waited - 1) % self.forecast_every == 0:
                    forecasts[key] = _forecast(fleet, key, t, t0, by_run[key])
            sample(t)
            if progress is not None:
                progress(arrived, total)
        end = limit if live else max(fleet.state.clock, t0)
        for key in sorted(live):
            item = live[key]
            tl.segments.append(
                Segment(
                    job=item.job.name,
                    start=item.start - t0,
                    end=end - t0,
                    gpus=item.gpus,
                    nodes=item.nodes,
                    min_nodes=min_nodes(self.node_sizes, item.gpus),
                    outcome="running",
                )
            )
        tl.end = end - t0
        tl.segments.sort(key=lambda s: (s.start, s.job))
        tl.forecasts = sorted(forecasts.values(), key=lambda r: (r.submit, r.job))
        tl.funded_overdraft_gpus = overdraft
        tl.hours_overdraft = hours_over
        unstarted = sum(1 for j in tl.jobs if j.name not in {s.job for s in tl.segments})
        if unstarted:
            tl.notes.append(f"{unstarted} jobs never started (drain limit or no room)")
        still = sum(1 for s in tl.segments if s.outcome == "running")
        if still:
            tl.notes.append(f"{still} jobs still running when the drain limit stopped the run")
        tl.wall_s = time.perf_counter() - t_wall
        return tl


def _forecast(fleet: Fleet, key: str, now: int, t0: int, job: Job) -> ForecastRecord:
    try:
        fc = forecast(fleet.state, key, now, remedies=False)
    except ForecastError:
        return ForecastRecord(job.name, now - t0, None, None)
    return ForecastRecord(
        job.name,
        now - t0,
        fc.p50 - t0 if fc.p50 is not None else None,
        fc.p90 - t0 if fc.p90 is not None else None,
    )
