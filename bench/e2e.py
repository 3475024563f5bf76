"""End-to-end admission benchmark: submit -> leases committed in the ledger.

What it measures, on the real stack (embedded nats-server, manager and binder as separate OS
processes, CP-SAT placement, atomic ledger appends):

* latency of one submission (p50/p99), one at a time: the API reply comes back only after the
  run's leases are appended to the JetStream stream, so reply time = submit -> leases committed;
* sustained admissions per second with 16 concurrent clients (the manager decides the commands
  waiting together in one pass and appends them as one batch: group commit).

Both on a fleet already running ``--open`` 1-GPU runs (submitted first, 100 per request), so
the funding matching and the topology carry the weight of a busy fleet.  The 8-GPU runs of the
measurement are one envelope's, so admission is never budget-bound.

Goals (issue 11): >= 1,000 admissions/s and >= 0.2x the sequential JetStream publish+ack rate
of the same run, p99 <= 50 ms, at 10k nodes with 5k open runs and at 1k nodes.

Baselines measured in the same run on the same server, just before the burst, with the stack
up and idle (ratios are printed against them, since absolute numbers depend on the machine): a
sequential JetStream publish-with-ack, and a request/reply round trip to a trivial responder in
another process, each the median of three rounds of 500.

    .venv/bin/python bench/e2e.py            # 1k nodes (2k open runs), 10k nodes (5k open)
    .venv/bin/python bench/e2e.py --quick    # 1k nodes, 1k open runs, fewer submissions
    .venv/bin/python bench/e2e.py --nodes 10000 --burst 4000   # one fleet, a longer burst
    .venv/bin/python bench/e2e.py --quick --gpu-hours 1e9      # the envelope sets GPU-hours

With ``--gpu-hours`` the envelope sets GPU-hours (more than the run can use), so the matching
depends on the meter, which moves at every instant the clock does: the budgets-over-time case.

Under each row it prints the CPU time the manager and the binder spent per admission during the
burst (from /proc, on Linux): steadier than the rate on a shared machine, so compare it across
runs and sessions.  On stderr it also prints the five slowest one-at-a-time submissions (where
p99 comes from) and announces the burst as it starts and ends (so a profiler such as py-spy can
measure the manager over exactly that window).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import StreamConfig

from _common import load_line, machine_line
from gpu_fleet.cli.stack import ProcessStack, call, wait_for_services

RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def echo(msg): await msg.respond(msg.data)
    await nc.subscribe("bench.echo", cb=echo)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def inventory(nodes: int, per_domain: int = 32) -> str:
    lines = ["nodes:"]
    for i in range(nodes):
        lines.append(
            f"  - {{name: n{i:05d}, gpus: 8, labels: {{region: r1, cluster: c1, "
            f"fabric.domain: d{i // per_domain:04d}, gpu.flavor: H100}}}}"
        )
    return "\n".join(lines) + "\n"


BUDGET = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: team, namespace: team}}
spec:
  owner: "org:team"
  envelopes:
    - {{name: west, flavor: H100, selector: {{region: r1}}, concurrency: {gpus},
       start: "2020-01-01T00:00:00Z", end: "2100-01-01T00:00:00Z"{hours}}}
"""


def run_doc(name: str, gpus: int) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: team}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


async def prefill(nc: nats.NATS, n: int, per_request: int = 100) -> float:
    """Submit ``n`` 1-GPU runs, ``per_request`` to an apply; seconds it took."""
    t = time.perf_counter()
    for start in range(0, n, per_request):
        docs = "---\n".join(
            run_doc(f"open{i:05d}", 1) for i in range(start, min(n, start + per_request))
        )
        await call(nc, "apply", {"documents": docs}, timeout=600)
    return time.perf_counter() - t


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def baselines(url: str, n: int, rounds: int = 3) -> tuple[float, float]:
    """(JetStream publish-with-ack per second, request/reply round trips per second).

    Measured once the services are up and idle (their start folds the whole inventory: a
    baseline taken during it measured the server under that load, anywhere from 3k to 9k
    acks/s on one machine), as the median of ``rounds`` rounds of ``n``."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.js"]))
    payload = b"x" * 200
    js_rates = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            await js.publish("bench.js", payload)
        js_rates.append(n / (time.perf_counter() - t))
    js_rate = statistics.median(js_rates)
    proc = subprocess.Popen([sys.executable, "-c", RESPONDER, url])
    try:
        while True:
            try:
                await nc.request("bench.echo", b"ping", timeout=1)
                break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await asyncio.sleep(0.05)
        rr_rates = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                await nc.request("bench.echo", payload, timeout=5)
            rr_rates.append(n / (time.perf_counter() - t))
        rr_rate = statistics.median(rr_rates)
    finally:
        proc.terminate()
        proc.wait()
        await nc.close()
    return js_rate, rr_rate


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU time (user + system) each service process has used so far; {} where /proc is not
    there to read it (not Linux)."""
    out: dict[str, float] = {}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def measure(
    url: str,
    nodes: int,
    *,
    open_runs: int,
    latency_n: int,
    burst_n: int,
    clients: int,
    pids: dict[str, int],
    gpu_hours: float | None = None,
) -> dict[str, float]:
    nc = await nats.connect(url)
    try:
        await wait_for_services(nc, ("binder", "manager"), timeout=300)
        # wait until the inventory is folded (the manager registers it at start)
        while True:
            runs = await call(nc, "budgets", {})
            if runs is not None:
                break
        hours = "" if gpu_hours is None else f", gpuHours: {gpu_hours}"
        await call(nc, "apply", {"documents": BUDGET.format(gpus=nodes * 8, hours=hours)})
        prefill_s = await prefill(nc, open_runs)
        lat: list[float] = []
        for i in range(latency_n):  # idle fleet: one at a time
            t = time.perf_counter()
            await call(nc, "apply", {"documents": run_doc(f"lat{i:05d}", 8)})
            lat.append((time.perf_counter() - t) * 1000)
        queue = list(range(burst_n))

        async def client() -> None:
            while queue:
                i = queue.pop()
                await call(nc, "apply", {"documents": run_doc(f"burst{i:05d}", 8)}, timeout=60)

        slowest = ", ".join(f"{v:.0f}" for v in sorted(lat)[-5:])
        print(f"  one at a time: slowest {slowest} ms", file=sys.stderr, flush=True)
        # The baselines now, on the stack as the burst finds it: up, caught up and idle.
        js_rate, rr_rate = await baselines(url, 500)
        print(f"  baselines: {js_rate:.0f} JS acks/s", file=sys.stderr, flush=True)
        print(f"  burst: {burst_n} submissions from {clients} clients", file=sys.stderr, flush=True)
        t = time.perf_counter()
        cpu_before = {**cpu_seconds(pids), "clients": time.process_time()}
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t
        cpu_after = {**cpu_seconds(pids), "clients": time.process_time()}
        rate = burst_n / elapsed
        print(f"  burst done: {rate:.0f} submissions/s", file=sys.stderr, flush=True)
        admitted = 0
        token = None
        while True:  # the list is paged once it is large
            page = await call(nc, "list", {"namespace": "team", "limit": 1000, "continue": token})
            items = page["items"] if isinstance(page, dict) else page
            admitted += sum(
                1 for r in items if r["phase"] == "Running" and not r["name"].startswith("open")
            )
            token = page["metadata"].get("continue") if isinstance(page, dict) else None
            if not token:
                break
    finally:
        await nc.close()
    cpu = {
        f"cpu_ms_{name}": (cpu_after[name] - cpu_before[name]) * 1000 / burst_n
        for name in cpu_after
        if name in cpu_before
    }
    cores = {
        f"cores_{name}": (cpu_after[name] - cpu_before[name]) / elapsed
        for name in cpu_after
        if name in cpu_before
    }
    return {
        **cpu,
        **cores,
        "p50_ms": statistics.median(lat),
        "p99_ms": pct(lat, 0.99),
        "admissions_per_s": rate,
        "admitted": admitted,
        "submitted": latency_n + burst_n,
        "prefill_s": prefill_s,
        "js_publish_ack_per_s": js_rate,
        "request_reply_per_s": rr_rate,
    }


def bench(
    nodes: int,
    open_runs: int,
    latency_n: int,
    burst_n: int,
    clients: int,
    *,
    gpu_hours: float | None = None,
) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="gpu-fleet-bench-") as tmp:
        inv = Path(tmp) / "inventory.yaml"
        inv.write_text(inventory(nodes))
        stack = ProcessStack(
            Path(tmp) / "data",
            inventory=str(inv),
            log_level="warning",
            services=("binder", "manager"),
        )
        stack.start()
        try:
            result = asyncio.run(
                measure(
                    stack.admin_url,
                    nodes,
                    open_runs=open_runs,
                    latency_n=latency_n,
                    burst_n=burst_n,
                    clients=clients,
                    gpu_hours=gpu_hours,
                    pids={
                        **{name: proc.pid for name, proc in stack.procs.items()},
                        **(
                            {"nats": stack.nats.proc.pid}
                            if getattr(stack.nats, "proc", None)
                            else {}
                        ),
                    },
                )
            )
        finally:
            stack.stop()
    return result


def _met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


GOAL_RATE = 1000.0
GOAL_RATIO = 0.2
GOAL_P99_MS = 50.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--open", type=int, default=None, help="1-GPU runs running before timing")
    p.add_argument("--nodes", type=int, default=None, help="only the fleet of this many nodes")
    p.add_argument("--burst", type=int, default=None, help="submissions timed with 16 clients")
    p.add_argument(
        "--gpu-hours",
        type=float,
        default=None,
        help="GPU-hours on the envelope (never running out): the meter then decides funding",
    )
    args = p.parse_args()
    # (nodes, open runs, one-at-a-time submissions, burst submissions)
    plan = (
        [(1000, 1000, 50, 300)]
        if args.quick
        else [(1000, 2000, 200, 500), (10000, 5000, 200, 1600)]
    )
    if args.open is not None:
        plan = [(n, args.open, lat, burst) for n, _, lat, burst in plan]
    if args.burst is not None:
        plan = [(n, o, lat, args.burst) for n, o, lat, _ in plan]
    if args.nodes is not None:
        plan = [row for row in plan if row[0] == args.nodes]
        if not plan:
            p.error(f"--nodes: no fleet of {args.nodes} nodes in this plan (1000 or 10000)")
    print(f"machine: {machine_line()}; load {load_line()}")
    print(
        f"{'nodes':>6} {'open':>5} {'p50 ms':>8} {'p99 ms':>8} {'adm/s':>8} {'JS ack/s':>9}"
        f" {'req/s':>8} {'adm/JS':>7} {'adm/req':>8} {'admitted':>9}"
    )
    goals = []
    for n, open_runs, latency_n, burst_n in plan:
        r = bench(n, open_runs, latency_n, burst_n, clients=16, gpu_hours=args.gpu_hours)
        ratio = r["admissions_per_s"] / r["js_publish_ack_per_s"]
        print(
            f"{n:>6} {open_runs:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}"
            f" {r['admissions_per_s']:>8.1f} {r['js_publish_ack_per_s']:>9.0f}"
            f" {r['request_reply_per_s']:>8.0f} {ratio:>7.3f}"
            f" {r['admissions_per_s'] / r['request_reply_per_s']:>8.3f}"
            f" {int(r['admitted']):>5}/{int(r['submitted'])}"
            f"   (prefill {r['prefill_s']:.1f} s)"
        )
        spent = [
            f"{name} {r[f'cpu_ms_{name}']:.2f} ms ({r[f'cores_{name}']:.2f} of a core)"
            for name in ("manager", "binder", "nats", "clients")
            if f"cpu_ms_{name}" in r
        ]
        if spent:  # steadier than the rate on a shared machine: compare these across runs
            print(f"{'':>6} CPU per admission during the burst: {', '.join(spent[:2])}")
            print(f"{'':>6}   and around them: {', '.join(spent[2:])}")
        rate = r["admissions_per_s"]
        goals.append(
            f"goal at {n} nodes, {open_runs} open runs:"
            f" >= {GOAL_RATE:.0f} adm/s {_met(rate >= GOAL_RATE)} ({rate:.0f});"
            f" >= {GOAL_RATIO}x JS acks {_met(ratio >= GOAL_RATIO)} ({ratio:.3f});"
            f" p99 <= {GOAL_P99_MS:.0f} ms {_met(r['p99_ms'] <= GOAL_P99_MS)}"
            f" ({r['p99_ms']:.1f})"
        )
    for line in goals:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
