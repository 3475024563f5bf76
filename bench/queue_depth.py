"""Cost per change against the depth of the queue: the event-driven reconcile (issue 11).

Run: ``.venv/bin/python bench/queue_depth.py [--quick] [--nodes N] [--depths A,B,C]
[--changes N]``.

World (the shape of ``bench/admission_profile.py``): ``--nodes`` 8-GPU nodes, one Budget
funding them all, the fleet full of 8-GPU runs, and a queue of ``depth`` 8-GPU runs each
holding a reservation.  Then ``--changes`` changes are timed, half of them submissions (one
more run waits; eight per clock second, as a burst reaches the manager's group commit) and
half completions (a running run ends and the first run in line takes its GPUs).

Baseline measured in the same run: the same changes with the reference loop that offers
every waiting run a start (``waiting.offer_every_run``, each asked ``certain_to_wait``),
which is what every change cost before.  Printed per depth: ms per change both ways and
their ratio, then how the event-driven cost grows from the shallowest queue to the deepest
(the goal: with what changed, not with what is waiting).
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import load_line, machine_line
from admission_profile import T0, admit_many, world
from gpu_fleet.core.engine import Fleet, waiting
from gpu_fleet.core.engine import fleet as fleet_module


def changes(fleet: Fleet, prefix: str, n: int, t: int) -> tuple[float, int]:
    """Time ``n`` changes - submissions and completions, alternating in blocks of eight;
    (seconds, the last instant)."""
    running = sorted(k for k, s in fleet.state.status.items() if s.phase == "Running")
    done = 0
    start = time.perf_counter()
    for block in range(0, n, 8):
        t += 1
        if block // 8 % 2 == 0:
            _, t = admit_many(fleet, f"{prefix}{block:05d}-", min(8, n - block), t - 1, 8)
        else:
            for _ in range(min(8, n - block)):
                fleet.complete(running[done], t)
                done += 1
    return time.perf_counter() - start, t


def measure(nodes: int, depth: int, n: int) -> tuple[float, float, int]:
    """ms per change with the event-driven offers and with the reference; waiting runs."""
    fleet, _ = world(nodes, "cpsat")
    _, t = admit_many(fleet, "busy", nodes, T0, 8)
    _, t = admit_many(fleet, "queued", depth, t, 8)
    waiting_now = len(fleet.state.waiting_runs)
    real = fleet_module.admit_waiting
    fleet_module.admit_waiting = waiting.offer_every_run  # type: ignore[attr-defined]
    try:
        ref_s, t = changes(fleet, "ref", n, t)
    finally:
        fleet_module.admit_waiting = real  # type: ignore[attr-defined]
    fast_s, t = changes(fleet, "fast", n, t)
    return fast_s / n * 1000, ref_s / n * 1000, waiting_now


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="depths 250,1000,4000; 64 changes")
    ap.add_argument("--nodes", type=int, default=250)
    ap.add_argument("--depths", default="")
    ap.add_argument("--changes", type=int, default=0)
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d] or (
        [250, 1000, 4000] if args.quick else [500, 2000, 8000]
    )
    n = args.changes or (64 if args.quick else 160)
    print(f"machine: {machine_line()}; load {load_line()}")
    print(f"nodes {args.nodes} (8 GPUs each, all busy), {n} changes per depth (half submissions)")
    print(f"{'waiting':>8} {'event-driven ms':>16} {'every run ms':>13} {'ratio':>7}")
    fast_costs = []
    for depth in depths:
        fast, ref, waiting_now = measure(args.nodes, depth, n)
        fast_costs.append(fast)
        print(f"{waiting_now:>8} {fast:>16.3f} {ref:>13.3f} {fast / ref:>6.3f}x")
    growth = fast_costs[-1] / fast_costs[0]
    print(
        f"event-driven cost, deepest / shallowest queue ({depths[-1]} / {depths[0]} runs): "
        f"{growth:.2f}x for {depths[-1] / depths[0]:.0f}x the runs waiting"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
