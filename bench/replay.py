"""Trace replay through the engine: how long a replay of thousands of runs takes, and how the
cost of an instant grows with what changed rather than with everything that waits.

Run: ``.venv/bin/python bench/replay.py [--quick] [--limit N] [--nodes N] [--compress X]``.

Workload: ``shared/traces/alibaba-gpu-v2023-pods.csv`` (8,152 pods), scaled so that every row
is a run:

* **width**: pods of 1 GPU (GPU-sharing ones too) ask for 1 GPU; pods of 2/4/8 GPUs are
  multiplied by 8 (16/32/64 GPUs in groups of 8, one fabric domain per group); the 1,088
  CPU-only pods (``num_gpu`` 0) ask for 1 GPU, so the replay has every row of the file;
* **time**: arrivals compressed by ``--compress`` (gaps divided), durations as traced
  (``deletion_time - creation_time``, at least 1 s; a pod never deleted runs to the trace end);
* **fleet**: ``--nodes`` 8-GPU nodes of one flavor in fabric domains of 16, two regions; two
  team budgets (team = hash of the pod name) with concurrency equal to the fleet each, so every
  wait is a capacity wait and queues build up when the compressed load exceeds the fleet.

Each run is submitted at its compressed creation time and completed when its traced duration
has passed after it started (the same loop as ``bench/forecast.py``, without forecasts).

Baseline in the same run: a plain fold (``fold_all``) of the ledger the replay produced - the
cost of merely recording what was decided.  Printed: wall time, the ratio to the fold, events,
instants reconciled, the deepest queue, and the cost of an instant against the runs waiting
then and against the events it produced.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import heapq
import itertools
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import load_line, machine_line, timed
from gpu_fleet.cli.progress import ProgressBar, Tick, progress_wanted
from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import Event, LeaseClosed, RunStatusChanged, RunSubmitted, fold_all
from gpu_fleet.core.manifests import validate_manifest
from gpu_fleet.core.model import API_VERSION, Budget, Node, Run
from gpu_fleet.core.timeutil import format_instant

TRACE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "alibaba-gpu-v2023-pods.csv"
)
FLAVOR = "G2"
GPUS_PER_NODE = 8
NODES_PER_DOMAIN = 16
REGIONS = ("cn-north", "cn-east")
TEAMS = 2
MULTI_GPU_SCALE = 8
T0 = 1_767_225_600
GOAL_S = 60.0
GOAL_RUNS = 8000


@dataclass(frozen=True)
class Job:
    name: str
    created: int
    duration: int
    gpus: int


def load(path: Path) -> list[Job]:
    rows = list(csv.DictReader(path.open(newline="")))
    end = max(int(r["deletion_time"] or r["creation_time"]) for r in rows)
    jobs = []
    for r in rows:
        n = int(r["num_gpu"] or 0)
        created = int(r["creation_time"])
        deleted = int(r["deletion_time"]) if r["deletion_time"] else end
        gpus = 1 if n <= 1 else n * MULTI_GPU_SCALE
        jobs.append(Job(r["name"], created, max(1, deleted - created), gpus))
    jobs.sort(key=lambda j: (j.created, j.name))
    return jobs


def team_of(name: str) -> str:
    return f"team-{int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % TEAMS}"


def build_fleet(n_nodes: int) -> Fleet:
    fleet = Fleet()
    for i in range(n_nodes):
        domain = i // NODES_PER_DOMAIN
        labels = {
            "region": REGIONS[domain % len(REGIONS)],
            "cluster": f"c{domain % len(REGIONS)}",
            "fabric.domain": f"d{domain:03d}",
            "gpu.flavor": FLAVOR,
        }
        fleet.register_node(Node(name=f"n{i:05d}", gpus=GPUS_PER_NODE, labels=labels), T0)
    for t in range(TEAMS):
        budget = validate_manifest(
            {
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
        )
        assert isinstance(budget, Budget)
        fleet.apply(budget, T0)
    return fleet


def manifest(job: Job) -> Run:
    spec: dict[str, object] = {"resources": {"gpuType": FLAVOR, "totalGPUs": job.gpus}}
    if job.gpus > GPUS_PER_NODE:
        spec["locality"] = {"groupGPUs": GPUS_PER_NODE}
    run = validate_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "metadata": {"name": job.name, "namespace": team_of(job.name)},
            "spec": spec,
        }
    )
    assert isinstance(run, Run)
    return run


@dataclass
class Result:
    runs: int
    started: int
    wall_s: float
    instants: int
    events: int
    max_waiting: int
    end_clock: int
    # per instant: (seconds, runs waiting before it, events it produced)
    samples: list[tuple[float, int, int]]


def replay(
    jobs: Sequence[Job], n_nodes: int, compress: float, tick: Tick | None = None
) -> tuple[Result, Fleet]:
    fleet = build_fleet(n_nodes)
    c0 = jobs[0].created
    subs = [(T0 + 60 + int((j.created - c0) / compress), j) for j in jobs]
    subs.reverse()
    by_key: dict[str, Job] = {}
    completions: list[tuple[int, str]] = []
    started: set[str] = set()
    waiting: set[str] = set()
    samples: list[tuple[float, int, int]] = []
    instants = 0
    max_waiting = 0

    def note(events: Sequence[Event]) -> None:
        for e in events:
            if isinstance(e, RunStatusChanged):
                if e.phase == "Running" and e.run not in started:
                    started.add(e.run)
                    waiting.discard(e.run)
                    heapq.heappush(completions, (e.at + by_key[e.run].duration, e.run))
                elif e.phase in ("Failed", "Completed"):
                    waiting.discard(e.run)

    t_wall = time.perf_counter()
    while subs or completions:
        t_ext = min(
            subs[-1][0] if subs else math.inf, completions[0][0] if completions else math.inf
        )
        t_int = fleet.next_due(fleet.state.clock)
        before = len(waiting)
        t0 = time.perf_counter()
        if t_int is not None and t_int < t_ext:
            events = fleet.reconcile(t_int)
        else:
            t = int(t_ext)
            closing: list[Event] = []
            while completions and completions[0][0] == t:
                _, key = heapq.heappop(completions)
                st = fleet.state.status.get(key)
                if st is None or st.phase != "Running":
                    continue
                closing += [
                    LeaseClosed(at=t, lease=x.id, reason="Completed")
                    for x in fleet.state.leases_of(key, open_only=True)
                ]
                closing.append(
                    RunStatusChanged(
                        at=t, run=key, phase="Completed", reason="AllSucceeded", message="done"
                    )
                )
            events = fleet.commit(closing)
            while subs and subs[-1][0] == t:
                _, job = subs.pop()
                run = manifest(job)
                by_key[run.key] = job
                waiting.add(run.key)
                events += fleet.commit([RunSubmitted(at=t, run=run)])
            events += fleet.reconcile(t)
        note(events)
        samples.append((time.perf_counter() - t0, before, len(events)))
        if tick is not None:  # runs submitted so far (the bar ends once all have arrived)
            tick(len(jobs) - len(subs), len(jobs))
        instants += 1
        max_waiting = max(max_waiting, len(waiting))
    wall = time.perf_counter() - t_wall
    result = Result(
        runs=len(jobs),
        started=len(started),
        wall_s=wall,
        instants=instants,
        events=len(fleet.state.history),
        max_waiting=max_waiting,
        end_clock=fleet.state.clock,
        samples=samples,
    )
    return result, fleet


def growth(samples: list[tuple[float, int, int]]) -> list[str]:
    """Mean cost of an instant by how many runs waited before it, and by events it produced."""
    lines = []
    for label, idx, edges in (
        ("runs waiting", 1, (0, 1, 10, 50, 200, 1000, 10**9)),
        ("events produced", 2, (0, 1, 5, 20, 100, 10**9)),
    ):
        cells = []
        for lo, hi in itertools.pairwise(edges):
            xs = [s[0] for s in samples if lo <= s[idx] < hi]
            if xs:
                top = "+" if hi >= 10**9 else f"-{hi - 1}"
                cells.append(f"{lo}{top}: {statistics.mean(xs) * 1000:.2f} ms (n={len(xs)})")
        lines.append(f"mean cost of an instant by {label}: " + "; ".join(cells))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first 2,000 runs")
    ap.add_argument("--limit", type=int, default=0, help="only the first N runs")
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--compress", type=float, default=60.0)
    args = ap.parse_args(argv)
    jobs = load(TRACE)
    limit = args.limit or (2000 if args.quick else 0)
    if limit:
        jobs = jobs[:limit]
    print(f"machine: {machine_line()}; load {load_line()}")
    print(
        f"workload: {TRACE.name}, {len(jobs)} runs (every row; 0-GPU pods ask 1 GPU, 2/4/8-GPU "
        f"pods x{MULTI_GPU_SCALE} in groups of 8); arrivals compressed x{args.compress:g}; "
        f"fleet {args.nodes} x {GPUS_PER_NODE} GPUs, domains of {NODES_PER_DOMAIN}"
    )
    # A bar on a terminal only: quiet in CI and when the output is piped (see cli.progress).
    tick = ProgressBar(sys.stderr, "replay: runs submitted").tick if progress_wanted() else None
    result, fleet = replay(jobs, args.nodes, args.compress, tick)
    history = list(fleet.state.history)
    fold_s, _ = timed(lambda: fold_all(history))
    days = (result.end_clock - T0) / 86_400
    print(
        f"replayed {result.runs} runs ({result.started} started) over {days:.1f} virtual days in "
        f"{result.wall_s:.1f} s; {result.instants} instants, {result.events} events, "
        f"deepest queue {result.max_waiting} runs"
    )
    print(
        f"baseline: plain fold of the same {len(history)} events {fold_s:.2f} s; "
        f"replay / fold = {result.wall_s / fold_s:.1f}x"
    )
    slow = sorted(result.samples, reverse=True)[:3]
    print(
        "slowest instants: "
        + ", ".join(f"{s * 1000:.0f} ms ({w} waiting, {n} events)" for s, w, n in slow)
    )
    for line in growth(result.samples):
        print(line)
    if result.runs >= GOAL_RUNS:
        verdict = "MET" if result.wall_s <= GOAL_S else "NOT MET"
        print(f"goal: {GOAL_RUNS} runs in <= {GOAL_S:.0f} s: {verdict} ({result.wall_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
