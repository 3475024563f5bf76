"""Admission cost in the engine alone: where the time of one admission goes, at fleet scale.

Run: ``.venv/bin/python bench/admission_profile.py [--quick] [--nodes N] [--open N] [--runs N]
[--per-instant N] [--planner greedy|cpsat] [--profile]``.

World (the shape of ``bench/e2e.py``, without NATS): ``--nodes`` 8-GPU nodes in fabric domains
of 32, one Budget whose one envelope covers the whole fleet, ``--open`` 8-GPU runs already
running (admitted one by one before timing starts), then ``--runs`` 8-GPU runs admitted one at
a time through ``Fleet.apply`` with the clock moving one second per admission, as the manager's
wall clock does.  Placement uses CP-SAT (``plan_placement``, the binder's planner) by default.

Baseline measured in the same run: a plain fold (``fold_all``) of the ledger the timed
admissions produced, i.e. the cost of merely recording those decisions.  The ratio
``admission / fold`` is what to compare across machines.

``--profile`` prints the cProfile of the timed admissions (cumulative, top 30).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

from _common import load_line, machine_line, timed
from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import Event, fold_all
from gpu_fleet.core.manifests import validate_manifest
from gpu_fleet.core.model import API_VERSION, Budget, Node, Run
from gpu_fleet.core.placement import pack_greedy, plan_placement
from gpu_fleet.core.timeutil import format_instant

T0 = 1_767_225_600
PER_DOMAIN = 32


def world(nodes: int, planner: str) -> tuple[Fleet, list[Event]]:
    fleet = Fleet(planner=plan_placement if planner == "cpsat" else pack_greedy)
    events: list[Event] = []
    for i in range(nodes):
        labels = {
            "region": "r1",
            "cluster": "c1",
            "fabric.domain": f"d{i // PER_DOMAIN:04d}",
            "gpu.flavor": "H100",
        }
        fleet.register_node(Node(name=f"n{i:05d}", gpus=8, labels=labels), T0)
    budget = validate_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": "Budget",
            "metadata": {"name": "team", "namespace": "team"},
            "spec": {
                "owner": "org:team",
                "envelopes": [
                    {
                        "name": "west",
                        "flavor": "H100",
                        "selector": {"region": "r1"},
                        "concurrency": nodes * 8,
                        "start": format_instant(T0),
                        "end": format_instant(T0 + 400 * 86_400),
                    }
                ],
            },
        }
    )
    assert isinstance(budget, Budget)
    events += fleet.apply(budget, T0)
    return fleet, events


def run_doc(name: str, gpus: int = 8) -> Run:
    run = validate_manifest(
        {
            "apiVersion": API_VERSION,
            "kind": "Run",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"resources": {"gpuType": "H100", "totalGPUs": gpus}},
        }
    )
    assert isinstance(run, Run)
    return run


def admit_many(fleet: Fleet, prefix: str, n: int, t0: int, per_instant: int = 1) -> tuple[int, int]:
    """Admit ``n`` runs one by one, ``per_instant`` per second (a group commit decides the
    commands waiting together at one wall-clock second); (admitted, last instant)."""
    started = 0
    t = t0
    for i in range(n):
        if i % per_instant == 0:
            t += 1
        fleet.apply(run_doc(f"{prefix}{i:05d}"), t)
        st = fleet.state.status.get(f"team/{prefix}{i:05d}")
        started += st is not None and st.phase == "Running"
    return started, t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1k nodes, 200 runs")
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--open", type=int, default=0, help="runs already running before timing")
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--planner", choices=("cpsat", "greedy"), default="cpsat")
    ap.add_argument("--per-instant", type=int, default=1, help="admissions per clock second")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    nodes = args.nodes or 1000
    runs = args.runs or (200 if args.quick else 1000)
    print(f"machine: {machine_line()}; load {load_line()}")
    fleet, _ = world(nodes, args.planner)
    t = T0
    if args.open:
        _, t = admit_many(fleet, "open", args.open, t)
    before = len(fleet.state.history)
    prof = cProfile.Profile() if args.profile else None
    t_start = time.perf_counter()
    if prof is not None:
        prof.enable()
    started, _ = admit_many(fleet, "run", runs, t, max(1, args.per_instant))
    if prof is not None:
        prof.disable()
    elapsed = time.perf_counter() - t_start
    history = list(fleet.state.history)
    fold_s, _ = timed(lambda: fold_all(history))
    fold_share = fold_s * (len(history) - before) / max(1, len(history))
    print(
        f"nodes {nodes}, open runs {args.open}, planner {args.planner}, "
        f"{max(1, args.per_instant)} per instant: {started}/{runs} "
        f"admitted in {elapsed:.2f} s = {runs / elapsed:.1f} admissions/s "
        f"({elapsed / runs * 1000:.2f} ms each)"
    )
    print(
        f"baseline: plain fold of the whole ledger ({len(history)} events) {fold_s:.3f} s; "
        f"of the timed admissions' events ~{fold_share:.3f} s; "
        f"admission / fold = {elapsed / max(fold_share, 1e-9):.1f}x"
    )
    if prof is not None:
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
