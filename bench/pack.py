"""Packing benchmark: CP-SAT binder vs SPEC greedy vs first-fit on churned fleets.

Run: ``.venv/bin/python bench/pack.py [--quick]``.  Fleets of 1k and 10k eight-GPU nodes in
fabric domains of 32-64 nodes are filled to 50/80/95 % by a seeded churn of gang jobs (8-256
GPUs arriving and departing), so free space is fragmented the way real fleets fragment (gangs
leave holes of their own shape), not uniformly at random.  Every planner sees the same snapshot
and the same requests; ratios are against greedy measured in the same run.

Metrics (per request, averaged): *span excess* = domains touched minus the lower bound (fewest
domains whose free GPUs could hold actives and spares); *stranded* = free GPUs left in domains
with fewer free GPUs than the smallest queued group (``STRANDED_GROUP``) after the placement;
*one-domain runs* = share of runs whose groups all landed in one domain (every group is always in
one domain - that is a hard rule of all three planners); latency p50/p99 of one plan.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpu_fleet.core.model import Node
from gpu_fleet.core.placement import (
    Decision,
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    PlannerSettings,
    Topology,
    Work,
    build_topology,
    decide_greedy,
    decide_spares,
    model_size,
    pack_greedy,
    plan_batch,
    plan_cost,
    plan_placement,
    realize,
    span_lower_bound,
    validate,
)

FLAVOR = "H100-80GB"
GPUS_PER_NODE = 8
STRANDED_GROUP = 32  # the smallest group we assume is waiting in the queue
JOB_SIZES = (8, 16, 32, 64, 128, 256)
JOB_WEIGHTS = (30, 25, 20, 12, 8, 5)


def build_fleet(n_nodes: int, rng: random.Random) -> list[Node]:
    nodes: list[Node] = []
    d = 0
    while len(nodes) < n_nodes:
        size = min(rng.randint(32, 64), n_nodes - len(nodes))
        for i in range(size):
            labels = {
                "region": "us-west",
                "cluster": f"c{d // 50}",
                "fabric.domain": f"d{d:04}",
                "gpu.flavor": FLAVOR,
            }
            nodes.append(Node(name=f"d{d:04}-n{i:02}", gpus=GPUS_PER_NODE, labels=labels))
        d += 1
    return nodes


def random_request(rng: random.Random, *, churn: bool = False) -> PackRequest:
    size = rng.choices(JOB_SIZES, JOB_WEIGHTS)[0]
    mode = rng.random()
    if mode < 0.6:  # gang in groups
        group = rng.choice([g for g in (8, 16, 32, 64) if g <= size])
        return PackRequest(
            flavor=FLAVOR,
            total_gpus=size,
            group_gpus=group,
            spares_per_group=0 if churn or rng.random() < 0.7 else rng.choice([1, 2]),
        )
    if mode < 0.8:  # must stay in one domain
        return PackRequest(flavor=FLAVOR, total_gpus=min(size, 128), allow_cross_group_spread=False)
    return PackRequest(flavor=FLAVOR, total_gpus=size)  # fill-to-empty


def churn(nodes: Sequence[Node], target: float, rng: random.Random) -> set[str]:
    """Arrivals and departures of gang jobs (placed by SPEC greedy) until ``target`` is held,
    then a few epochs of steady-state churn at that level."""
    capacity = len(nodes) * GPUS_PER_NODE
    jobs: list[tuple[str, ...]] = []
    held: set[str] = set()
    for epoch in range(6):
        if epoch:  # departures: a fifth of the running jobs end
            rng.shuffle(jobs)
            cut = len(jobs) // 5
            for job in jobs[:cut]:
                held.difference_update(job)
            jobs = jobs[cut:]
        topo = build_topology(nodes, held, FLAVOR)
        work = Work(topo)
        misses = 0
        while len(held) < target * capacity and misses < 20:
            r = random_request(rng, churn=True)
            sizes = validate(topo, r)
            try:
                decision = decide_greedy(topo, r, sizes, work.domain_frees())
            except PackError:
                misses += 1
                continue
            plan = realize(work, r, decision, "greedy")
            jobs.append(plan.slots())
            held.update(plan.slots())
    return held


def first_fit(topo: Topology, request: PackRequest) -> PackPlan:
    """Baseline: domains in key order, the first one with room wins."""
    sizes = validate(topo, request)
    work = Work(topo, request.excluded_slots)
    frees = work.domain_frees()
    keys = sorted(frees)
    placed: list[tuple[int, str]] = []
    if not request.allow_cross_group_spread:
        d = next((k for k in keys if frees[k] >= request.total_gpus), None)
        if d is None:
            raise PackError(PackErrorKind.INSUFFICIENT_TOPOLOGY, "no fit")
        placed = [(s, d) for s in sizes]
        frees[d] -= request.total_gpus
    elif request.group_gpus is None:
        left = request.total_gpus
        for k in keys:
            take = min(frees[k], left)
            if take:
                placed.append((take, k))
                frees[k] -= take
                left -= take
            if not left:
                break
        if left:
            raise PackError(PackErrorKind.INSUFFICIENT_CAPACITY, "no fit")
    else:
        for s in sizes:
            d = next((k for k in keys if frees[k] >= s), None)
            if d is None:
                raise PackError(PackErrorKind.INSUFFICIENT_CAPACITY, "no fit")
            placed.append((s, d))
            frees[d] -= s
    spares = decide_spares(frees, placed, request.spares_per_group)
    if spares is None:
        raise PackError(PackErrorKind.INSUFFICIENT_CAPACITY, "no fit")
    return realize(work, request, Decision(tuple(placed), spares), "first-fit")


@dataclass
class Tally:
    latency: list[float] = field(default_factory=list)
    excess: list[int] = field(default_factory=list)
    stranded: list[int] = field(default_factory=list)
    plan_stranded: list[int] = field(default_factory=list)
    one_domain: list[bool] = field(default_factory=list)
    failed: int = 0


def stranded_after(topo: Topology, plan: PackPlan) -> int:
    taken: dict[str, int] = {}
    for s in plan.slots():
        d = topo.domain_of(s.rpartition("#")[0])
        taken[d] = taken.get(d, 0) + 1
    total = 0
    for d in topo.domain_keys():
        free = topo.domain_free(d) - taken.get(d, 0)
        if free < STRANDED_GROUP:
            total += free
    return total


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_case(
    n_nodes: int, fill: float, n_requests: int, seed: int, settings: PlannerSettings
) -> dict[str, Tally]:
    rng = random.Random(seed)
    nodes = build_fleet(n_nodes, rng)
    held = churn(nodes, fill, rng)
    topo = build_topology(nodes, held, FLAVOR)
    planners: dict[str, Callable[[Topology, PackRequest], PackPlan]] = {
        "cp-sat": lambda t, r: plan_placement(t, r, settings),
        "greedy": pack_greedy,
        "first-fit": first_fit,
    }
    tallies = {name: Tally() for name in planners}
    worse = better = 0
    for _ in range(n_requests):
        r = random_request(rng)
        sizes = validate(topo, r)
        lb = span_lower_bound(Work(topo).domain_frees(), r, sizes)
        costs = {}
        for name, planner in planners.items():
            t0 = time.perf_counter()
            try:
                plan = planner(topo, r)
            except PackError:
                tallies[name].latency.append(time.perf_counter() - t0)
                tallies[name].failed += 1
                continue
            tallies[name].latency.append(time.perf_counter() - t0)
            cost = plan_cost(topo, r, plan)
            costs[name] = cost
            tallies[name].excess.append(cost.span - lb)
            tallies[name].plan_stranded.append(cost.stranded)
            tallies[name].stranded.append(stranded_after(topo, plan))
            tallies[name].one_domain.append(len({g.domain for g in plan.groups}) == 1)
        if "cp-sat" in costs and "greedy" in costs:
            worse += costs["cp-sat"] > costs["greedy"]
            better += costs["cp-sat"] < costs["greedy"]
    print(
        f"  cp-sat vs greedy on the exact objective: better {better}, worse {worse}, "
        f"equal {n_requests - better - worse - tallies['greedy'].failed} (of {n_requests})"
    )
    return tallies


def report(tallies: dict[str, Tally]) -> list[str]:
    base = tallies["greedy"]
    lines = [
        "| planner | span excess (mean) | stranded GPUs after (mean) | GPUs left in touched "
        "domains (mean) | one-domain runs | failed | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def mean(v: Sequence[float]) -> float:
        return statistics.fmean(v) if v else float("nan")

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else ("1.00x" if a == b else "n/a")

    for name, t in tallies.items():
        lines.append(
            f"| {name} | {mean(t.excess):.3f} ({ratio(mean(t.excess), mean(base.excess))}) "
            f"| {mean(t.stranded):.1f} ({ratio(mean(t.stranded), mean(base.stranded))}) "
            f"| {mean(t.plan_stranded):.1f} "
            f"({ratio(mean(t.plan_stranded), mean(base.plan_stranded))}) "
            f"| {100 * mean([float(x) for x in t.one_domain]):.0f}% | {t.failed} "
            f"| {1000 * pct(t.latency, 0.5):.2f} | {1000 * pct(t.latency, 0.99):.2f} |"
        )
    return lines


def bench_batch(n_nodes: int, fill: float, seed: int, settings: PlannerSettings) -> list[str]:
    rng = random.Random(seed)
    nodes = build_fleet(n_nodes, rng)
    held = churn(nodes, fill, rng)
    topo = build_topology(nodes, held, FLAVOR)
    requests = [random_request(rng) for _ in range(100)]
    out = []
    for label, s in (("cp-sat", settings), ("greedy", PlannerSettings(enabled=False))):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = plan_batch(topo, requests, s)
            times.append(time.perf_counter() - t0)
        placed = sum(isinstance(p, PackPlan) for p in res)
        out.append(
            f"| {label} | {n_nodes} | {int(fill * 100)}% | {placed}/100 "
            f"| {min(times):.3f} | {max(times):.3f} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, for CI (< 60 s)")
    args = ap.parse_args(argv)
    settings = PlannerSettings()
    n_requests = 25 if args.quick else 400
    sizes = (1000, 10_000)
    fills = (0.5, 0.8, 0.95)
    print(f"# bench/pack.py ({'quick' if args.quick else 'full'})")
    print(
        f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.machine()}; settings: {settings}"
    )
    t_all = time.perf_counter()
    for n_nodes in sizes:
        for fill in fills:
            print(f"\n## {n_nodes} nodes, filled to {int(fill * 100)}%, {n_requests} requests")
            tallies = run_case(
                n_nodes, fill, n_requests, seed=n_nodes + int(fill * 100), settings=settings
            )
            print("\n".join(report(tallies)))
    rng = random.Random(7)
    big = build_topology(build_fleet(10_000, rng), set(), FLAVOR)
    r = PackRequest(flavor=FLAVOR, total_gpus=256, group_gpus=8)
    print(
        f"\nmodel size (variables) for 256 GPUs in groups of 8 on an empty 10k fleet: "
        f"{model_size(big, r)}"
    )
    print("\n## plan_batch: 100 pending runs, one time budget")
    print("| planner | nodes | fill | placed | best s | worst s |")
    print("|---|---|---|---|---|---|")
    print("\n".join(bench_batch(10_000, 0.8, seed=99, settings=settings)))
    print(f"\ntotal bench time {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
