"""Forecast accuracy benchmark: replay a GPU trace through the core and score start forecasts.

Run: ``.venv/bin/python bench/forecast.py [--quick]``.

A workload is replayed through ``gpu_fleet.core.engine.Fleet`` on a virtual clock (pure,
in-process, no services).  Source: ``shared/traces/alibaba-gpu-v2023-pods.csv`` when present
(every pod with ``num_gpu >= 1``), else a seeded synthetic workload shaped like it; both are read
and widened by the simulator's own code (``gpu_fleet.sim``: ``read_alibaba_pods``, ``synthetic``,
``apply_scaling``), so this benchmark and ``gpu-fleet simulate`` see the same jobs.

Scaling (said again in the report):

* **width**: 1-GPU pods (GPU-sharing ones included, ``gpu_milli < 1000``) ask for 1 GPU; pods of
  2, 4 or 8 GPUs are multiplied by 8 (16, 32, 64 GPUs) with ``groupGPUs: 8`` (each 8-GPU group in
  one fabric domain), to exercise multi-node gangs the trace lacks;
* **time**: submissions are compressed by ``--compress`` (inter-arrival gaps divided by it),
  durations are kept as they are (``deletion_time - creation_time``, at least 1 s), so the
  offered load is ``compress`` times the trace's and the fleet has real capacity waits;
* **fleet**: ``--nodes`` 8-GPU nodes of one flavor (the trace's dominant G2) in fabric domains of
  16 nodes, over two regions; one Budget per synthetic team (team = hash of the pod name), each
  with concurrency equal to the whole fleet, so every wait is a capacity wait, never a budget one.

Each run is submitted at its (compressed) creation time and completed (``Fleet.complete``) when
its actual duration has elapsed after its actual start.  When a run does not start at submission
the forecast is taken at that instant with the pure ``gpu_fleet.core.forecast.forecast`` (P50,
P90, confidence) together with its reservation's ``earliest_start``; the actual start is the
instant its status turns Running.  The baseline, measured at the same instant, is
``now + (sum of GPU-seconds of the runs queued ahead) / fleet GPUs``.

Two variants: **declared** - every run sets ``runtime.maxDuration`` = its actual duration; and
**partial** - only ``--declared-share`` of runs (seeded draw) declare it, so the forecaster must
estimate the other leases' ends from the history it has folded (``gpu_fleet.core.history``: a
censored survival curve of similar runs, conditioned on each lease's age).
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import load_line, machine_line, median, pct
from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.forecast import ForecastError, forecast
from gpu_fleet.core.ledger import Event, LeaseClosed, RunStatusChanged, RunSubmitted
from gpu_fleet.core.manifests import validate_manifest
from gpu_fleet.core.model import API_VERSION, Budget, Node, Run
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.sim import Job, Scaling, apply_scaling, read_alibaba_pods
from gpu_fleet.sim import synthetic as sim_synthetic

TRACE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
TRACE_FILE = "alibaba-gpu-v2023-pods.csv"
FLAVOR = "G2"
GPUS_PER_NODE = 8
NODES_PER_DOMAIN = 16
REGIONS = ("cn-north", "cn-east")
TEAMS = 2
MULTI_GPU_SCALE = 8
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z: the virtual clock's origin
ERR_GOAL = 0.25  # median |P50 error| <= 25 % of the (median) actual wait
WIDEN = Scaling(gpus=MULTI_GPU_SCALE, group=GPUS_PER_NODE)  # 2/4/8-GPU pods x8, groups of 8


@dataclass
class Record:
    """One waited run: what was forecast at submission and what happened."""

    key: str
    submit: int
    gpus: int
    declared: bool
    p50: int | None
    p90: int | None
    confidence: str
    earliest: int | None  # the reservation's earliest_start at submission
    baseline: int
    start: int | None = None


@dataclass
class Replay:
    variant: str
    runs: int = 0
    immediate: int = 0
    records: dict[str, Record] = field(default_factory=dict)
    preempted: int = 0
    expired: int = 0
    never_started: int = 0
    forecast_errors: int = 0
    forecast_ms: list[float] = field(default_factory=list)  # wall time of each forecast
    wall_s: float = 0.0
    end_clock: int = 0


# ------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------


def load_trace(path: Path) -> list[Job]:
    """The trace, read and widened by the simulator's own reader (``gpu_fleet.sim``)."""
    return apply_scaling(read_alibaba_pods(path), WIDEN)


def synthetic(n: int, seed: int) -> list[Job]:
    """The simulator's seeded stand-in shaped like the trace, widened the same way."""
    return apply_scaling(sim_synthetic(n, seed), WIDEN)


def team_of(name: str) -> str:
    return f"team-{int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % TEAMS}"


# ------------------------------------------------------------------------------------------
# The fleet
# ------------------------------------------------------------------------------------------


def build_fleet(n_nodes: int) -> Fleet:
    fleet = Fleet()
    for i in range(n_nodes):
        domain = i // NODES_PER_DOMAIN
        labels = {
            "region": REGIONS[domain % len(REGIONS)],
            "cluster": f"c{domain % len(REGIONS)}",
            "fabric.domain": f"d{domain:02d}",
            "gpu.flavor": FLAVOR,
        }
        fleet.register_node(Node(name=f"n{i:04d}", gpus=GPUS_PER_NODE, labels=labels), T0)
    for t in range(TEAMS):
        doc = {
            "apiVersion": API_VERSION,
            "kind": "Budget",
            "metadata": {"name": f"team-{t}", "namespace": f"team-{t}"},
            "spec": {
                "owner": f"org:trace:team-{t}",
                "parents": ["org:trace"],
                "envelopes": [
                    {
                        "name": "g2",
                        "flavor": FLAVOR,
                        "selector": {"region": "*"},
                        "concurrency": n_nodes * GPUS_PER_NODE,
                        "start": format_instant(T0),
                        "end": format_instant(T0 + 400 * 86_400),
                    }
                ],
            },
        }
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        fleet.apply(budget, T0)
    return fleet


def run_manifest(job: Job, declare: bool) -> Run:
    spec: dict[str, object] = {"resources": {"gpuType": FLAVOR, "totalGPUs": job.gpus}}
    if job.gpus > GPUS_PER_NODE:
        spec["locality"] = {"groupGPUs": GPUS_PER_NODE}
    if declare:
        spec["runtime"] = {"maxDuration": f"{job.duration}s"}
    doc = {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {"name": job.name, "namespace": team_of(job.name)},
        "spec": spec,
    }
    run = validate_manifest(doc)
    assert isinstance(run, Run)
    return run


# ------------------------------------------------------------------------------------------
# History for the baseline (the core forecaster keeps its own, from the ledger)
# ------------------------------------------------------------------------------------------


class History:
    """Durations of completed runs by class (width class, QoS): the baseline's run lengths."""

    def __init__(self) -> None:
        self.by_class: dict[tuple[bool, str], list[int]] = defaultdict(list)
        self.all: list[int] = []

    def add(self, job: Job) -> None:
        self.by_class[(job.gpus > 1, job.qos)].append(job.duration)
        self.all.append(job.duration)

    def expected(self, job: Job) -> int:
        past = self.by_class.get((job.gpus > 1, job.qos)) or self.all
        return int(median(past)) if past else 600


# ------------------------------------------------------------------------------------------
# Replay
# ------------------------------------------------------------------------------------------


def replay(
    jobs: Sequence[Job],
    *,
    n_nodes: int,
    compress: float,
    declared_share: float,
    seed: int,
    variant: str,
) -> Replay:
    t_wall = time.perf_counter()
    out = Replay(variant)
    rng = random.Random(seed)
    fleet = build_fleet(n_nodes)
    fleet_gpus = n_nodes * GPUS_PER_NODE
    c0 = jobs[0].submit
    by_key: dict[str, Job] = {}
    declared: dict[str, bool] = {}
    subs: list[tuple[int, str, Run]] = []
    for job in jobs:
        dec = declared_share >= 1.0 or rng.random() < declared_share
        run = run_manifest(job, dec)
        by_key[run.key] = job
        declared[run.key] = dec
        subs.append((T0 + 60 + int((job.submit - c0) / compress), run.key, run))
    subs.reverse()  # pop from the end
    out.runs = len(subs)
    completions: list[tuple[int, str]] = []  # (end, run key)
    starts: dict[str, int] = {}
    queued: dict[str, int] = {}  # pending run key -> submission instant (admission order)
    hist = History()

    def expected_duration(key: str) -> int:
        return by_key[key].duration if declared[key] else hist.expected(by_key[key])

    def note(events: Sequence[Event]) -> None:
        for e in events:
            if not isinstance(e, RunStatusChanged):
                continue
            if e.phase == "Running" and e.run not in starts:
                starts[e.run] = e.at
                queued.pop(e.run, None)
                heapq.heappush(completions, (e.at + by_key[e.run].duration, e.run))
                rec = out.records.get(e.run)
                if rec is not None:
                    rec.start = e.at
            elif e.phase == "Failed":
                queued.pop(e.run, None)
                if e.reason == "Expired":
                    out.expired += 1
                else:
                    out.preempted += 1

    while subs or completions:
        t_ext = min(
            subs[-1][0] if subs else math.inf, completions[0][0] if completions else math.inf
        )
        t_int = fleet.next_due(fleet.state.clock)
        if t_int is not None and t_int < t_ext:
            note(fleet.reconcile(t_int))
            continue
        t = int(t_ext)
        # what ends first: completions due now (closed before lease expiry can see them) ...
        closing: list[Event] = []
        while completions and completions[0][0] == t:
            _, key = heapq.heappop(completions)
            st = fleet.state.status.get(key)
            if st is None or st.phase != "Running":
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
            hist.add(by_key[key])
        fleet.commit(closing)
        # ... then the submissions of this instant, then one reconcile
        new: list[str] = []
        while subs and subs[-1][0] == t:
            _, key, run = subs.pop()
            fleet.commit([RunSubmitted(at=t, run=run)])
            new.append(key)
        note(fleet.reconcile(t))
        ahead = 0
        for key in sorted(queued, key=lambda k: queued[k]):
            ahead += by_key[key].gpus * expected_duration(key)
        for key in new:
            if key in starts:
                out.immediate += 1
                continue
            record_forecast(out, fleet, key, t, by_key, declared, ahead, fleet_gpus)
            queued[key] = t
            ahead += by_key[key].gpus * expected_duration(key)
    out.never_started = sum(1 for r in out.records.values() if r.start is None)
    out.end_clock = fleet.state.clock
    out.wall_s = time.perf_counter() - t_wall
    return out


def record_forecast(  # noqa: PLR0917 - a helper of replay's loop
    out: Replay,
    fleet: Fleet,
    key: str,
    now: int,
    by_key: dict[str, Job],
    declared: dict[str, bool],
    ahead_gpu_s: int,
    fleet_gpus: int,
) -> None:
    t0 = time.perf_counter()
    try:
        fc = forecast(fleet.state, key, now)
    except ForecastError:
        out.forecast_errors += 1
        return
    out.forecast_ms.append((time.perf_counter() - t0) * 1000)
    res = fleet.state.pending_reservation(key)
    out.records[key] = Record(
        key=key,
        submit=now,
        gpus=by_key[key].gpus,
        declared=declared[key],
        p50=fc.p50,
        p90=fc.p90,
        confidence=fc.confidence,
        earliest=res.earliest_start if res is not None else None,
        baseline=now + math.ceil(ahead_gpu_s / fleet_gpus),
    )


# ------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------


@dataclass
class Score:
    label: str
    runs: int
    waited: int
    scored: int  # waited, started, and with a P50
    med_err: float
    p90_err: float
    med_wait: float
    med_rel: float  # median over runs of |err| / wait
    within_p90: float  # share of waited-and-started runs that started no later than P90
    late_by_p90: float  # median lateness over those that started after P90 (s)


def score(rep: Replay, label: str, p50_of, p90_of) -> Score:
    started = [r for r in rep.records.values() if r.start is not None]
    scored = [r for r in started if p50_of(r) is not None]
    errs = [abs(p50_of(r) - r.start) for r in scored]
    waits = [r.start - r.submit for r in started]
    rel = [abs(p50_of(r) - r.start) / max(1, r.start - r.submit) for r in scored]
    ok = [r for r in started if p90_of(r) is not None and r.start <= p90_of(r)]
    late = [r.start - p90_of(r) for r in started if p90_of(r) is not None and r.start > p90_of(r)]
    return Score(
        label=label,
        runs=rep.runs,
        waited=len(rep.records),
        scored=len(scored),
        med_err=median(errs),
        p90_err=pct(errs, 90),
        med_wait=median(waits),
        med_rel=median(rel),
        within_p90=len(ok) / len(started) if started else float("nan"),
        late_by_p90=median(late) if late else 0.0,
    )


def _baseline(r: Record) -> int:
    return r.baseline


def scores(rep: Replay) -> list[Score]:
    # Waits that end at the reservation bound (the resolver makes room then) are the easy part:
    # the forecaster knows the bound.  Score the runs that started before it separately.
    natural = Replay(
        rep.variant,
        runs=rep.runs,
        records={
            k: r
            for k, r in rep.records.items()
            if r.start is not None and r.earliest is not None and r.start < r.earliest
        },
    )
    return [
        score(rep, "forecast (core)", lambda r: r.p50, lambda r: r.p90),
        score(natural, "forecast, started before bound", lambda r: r.p50, lambda r: r.p90),
        score(
            natural, "baseline, started before bound", lambda r: r.baseline, lambda r: r.baseline
        ),
        score(rep, "baseline (queue/fleet)", lambda r: r.baseline, lambda r: r.baseline),
    ]


def table(rep: Replay) -> list[str]:
    rows = scores(rep)
    head = (
        "| estimator | runs | waited | with P50 | median abs err (s) | p90 abs err (s) | "
        "median wait (s) | med err / med wait | median err/wait | share <= P90 |"
    )
    lines = [head, "|" + "---|" * 10]
    for s in rows:
        lines.append(
            f"| {s.label} | {s.runs} | {s.waited} | {s.scored} | {s.med_err:.0f} | "
            f"{s.p90_err:.0f} | {s.med_wait:.0f} | {s.med_err / max(1.0, s.med_wait):.2f} | "
            f"{s.med_rel:.2f} | {s.within_p90:.1%} |"
        )
    for s, base in ((rows[0], rows[3]), (rows[1], rows[2])):
        lines.append(
            f"| ratio {s.label} / baseline | | | | "
            f"{s.med_err / max(1.0, base.med_err):.2f} | {s.p90_err / max(1.0, base.p90_err):.2f} "
            f"| | | | {s.within_p90 / base.within_p90 if base.within_p90 else float('nan'):.2f} |"
        )
    return lines


def details(rep: Replay) -> list[str]:
    conf: dict[str, int] = defaultdict(int)
    for r in rep.records.values():
        conf[r.confidence] += 1
    started = [r for r in rep.records.values() if r.start is not None]
    by_earliest = [r for r in started if r.earliest is not None and r.start <= r.earliest]
    return [
        f"immediate starts {rep.immediate}, waited {len(rep.records)}, waited but never started "
        f"{rep.never_started}, preempted by the resolver {rep.preempted}, expired {rep.expired}, "
        f"forecast errors {rep.forecast_errors}",
        "confidence at submission: " + ", ".join(f"{k} {v}" for k, v in sorted(conf.items())),
        f"started no later than the reservation's earliest_start: "
        f"{len(by_earliest) / max(1, len(started)):.1%}",
        f"virtual time replayed {(rep.end_clock - T0) / 86_400:.2f} days in {rep.wall_s:.1f} s",
        f"forecast latency (with remedies): p50 {median(rep.forecast_ms):.1f} ms, "
        f"p99 {pct(rep.forecast_ms, 99):.1f} ms over {len(rep.forecast_ms)} forecasts",
    ]


def goal_line(rep: Replay) -> str:
    rows = scores(rep)
    fc, base = rows[0], rows[-1]
    ratio = fc.med_err / max(1.0, fc.med_wait)
    met_acc = ratio <= ERR_GOAL
    better = fc.med_err < 0.5 * base.med_err and fc.p90_err < base.p90_err
    return (
        f"goal: median err <= {ERR_GOAL:.0%} of median wait: {'MET' if met_acc else 'NOT MET'} "
        f"({ratio:.2f}); clearly better than baseline (median < half, p90 lower): "
        f"{'MET' if better else 'NOT MET'} ({fc.med_err:.0f} s vs {base.med_err:.0f} s)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a slice of the trace (< 60 s)")
    ap.add_argument("--nodes", type=int, default=200, help="8-GPU nodes in the fleet")
    ap.add_argument("--compress", type=float, default=60.0, help="arrival time compression")
    ap.add_argument("--declared-share", type=float, default=0.5, help="partial variant share")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--synthetic", action="store_true", help="ignore the trace")
    ap.add_argument("--limit", type=int, default=0, help="use only the last N jobs")
    args = ap.parse_args(argv)

    path = TRACE_DIR / TRACE_FILE
    if path.exists() and not args.synthetic:
        jobs = load_trace(path)
        source = f"{path.name} ({len(jobs)} pods with num_gpu >= 1)"
    else:
        jobs = synthetic(7000, args.seed)
        source = f"synthetic seeded workload (seed {args.seed}, {len(jobs)} jobs)"
    limit = args.limit or (1500 if args.quick else 0)
    if limit:
        jobs = jobs[-limit:]
        source += f", last {len(jobs)} by creation time"
    print(f"machine: {machine_line()}; load {load_line()}")
    print(f"workload: {source}")
    print(
        f"fleet: {args.nodes} x {GPUS_PER_NODE}-GPU {FLAVOR} nodes in domains of "
        f"{NODES_PER_DOMAIN}; {TEAMS} team budgets, concurrency = fleet each; arrivals "
        f"compressed x{args.compress:g}, durations as traced; 2/4/8-GPU pods x{MULTI_GPU_SCALE}"
    )
    total = 0.0
    for variant, share in (("declared", 1.0), ("partial", args.declared_share)):
        rep = replay(
            jobs,
            n_nodes=args.nodes,
            compress=args.compress,
            declared_share=share,
            seed=args.seed,
            variant=variant,
        )
        total += rep.wall_s
        print()
        print(f"## variant {variant}: {share:.0%} of runs declare maxDuration")
        for line in table(rep):
            print(line)
        for line in details(rep):
            print("  " + line)
        print("  " + goal_line(rep))
    print()
    print(f"total replay wall time {total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
