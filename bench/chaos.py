"""Chaos campaign: random kill -9 of any service or NATS server mid-burst, then audit the ledger.

Run: ``.venv/bin/python bench/chaos.py [--quick] [--trials N] [--max-seconds S] [--seed N]
[--nats-cluster 3] [--json FILE]`` (``make chaos`` runs the long campaign).

Everything stays on 127.0.0.1: one ``ProcessStack`` (nats-server or a 3-server JetStream cluster,
binder, manager, forecaster, notifier as separate OS processes, as ``gpu-fleet up`` runs them).
The campaign is bounded twice: at most ``--trials`` trials and at most ``--max-seconds`` of wall
time (a trial in progress finishes).  Every random choice comes from one ``random.Random(seed)``
per trial, so a failing trial is named by its seed; process timing is, of course, not
reproducible, which is the point of a fault campaign.

A trial works in its own namespace ``t<N>``: it applies a budget, then runs 3-6 *steps*.  Each
step is a concurrent burst of operations - submit (sometimes the same submit twice at once: a
duplicate delivery), delete, complete, shrink, fence and uncordon of a node - while, with some
probability, a *fault* fires at a random moment inside the burst: SIGKILL of one service process
or one NATS server, restarted after a random delay (the service rebuilds from its snapshot and
the ledger; the server comes back on its port and store).  Clients behave as real ones do: an
unavailable or timed-out call is retried until a deadline.  After the steps every killed process
is back, and the ledger - the truth - is audited (``audit``):

* no lost acknowledged decision: every acknowledged submit has its ``RunSubmitted``, every
  acknowledged delete its ``RunDeleted``, every acknowledged complete left the run terminal;
* the core's invariants (``check_invariants``): no double-booked slot, no funded overdraft of
  concurrency, caps or GPU-hours, no open lease for a terminal or missing run;
* closures final: a lease closes at most once and is never minted again after closing, and a
  terminal run never goes back to a live phase;
* replay: a fresh fold of the ledger up to the manager's sequence gives every run the phase the
  manager reports over the API (what it decided and what it recorded agree).

Then the trial deletes its runs and uncordons its nodes, so capacity is free for the next one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client

from gpu_fleet.cli.stack import ApiCallError, ProcessStack, call, wait_for_services
from gpu_fleet.core.ledger import (
    FleetState,
    LeaseClosed,
    LeaseMinted,
    RunDeleted,
    RunStatusChanged,
    RunSubmitted,
    check_invariants,
    fold,
)
from gpu_fleet.runtime.ledger_stream import LedgerStream
from gpu_fleet.runtime.natsd_cluster import NatsCluster, split_userinfo

NODES = 8
GPUS_PER_NODE = 8
TERMINAL = ("Completed", "Failed")
RETRY_CODES = ("unavailable", "conflict")
CALL_DEADLINE = 120.0
"""Seconds a client keeps retrying one operation; past it the trial records a hung call."""

INVENTORY = "nodes:\n" + "".join(
    f"  - {{name: n{i}, gpus: {GPUS_PER_NODE}, labels: {{region: r1, cluster: c1,"
    f" fabric.domain: f{i // 4}, gpu.flavor: H100}}}}\n"
    for i in range(NODES)
)


def budget_doc(namespace: str, concurrency: int) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\n"
        f"metadata: {{name: b, namespace: {namespace}}}\n"
        f'spec:\n  owner: "org:{namespace}"\n  envelopes:\n'
        f"    - {{name: e, flavor: H100, selector: {{region: r1}}, concurrency: {concurrency},"
        ' start: "2026-01-01T00:00:00Z", end: "2100-01-01T00:00:00Z"}\n'
    )


def run_doc(namespace: str, name: str, gpus: int) -> str:
    return (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )


# -- clients -------------------------------------------------------------------------------------


async def connect(url: str, deadline: float) -> Client:
    """A client on every server of the stack, reconnecting forever (a real CLI retries too)."""

    async def quiet(_: Exception) -> None:  # refused connections while a server is down
        return None

    while True:
        try:
            bare, credentials = split_userinfo(url)  # credentials for discovered servers too
            return await nats.connect(
                servers=bare,
                **credentials,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.1,
                error_cb=quiet,
            )
        except (OSError, nats.errors.NoServersError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


class HungError(RuntimeError):
    """An operation found no answer before its deadline (a liveness violation)."""


async def attempt(nc: Client, endpoint: str, body: dict[str, Any], deadline: float) -> Any:
    """Call until answered: unavailability and conflicts are retried, refusals raise
    ``ApiCallError``, and no answer by ``deadline`` raises ``HungError``."""
    while True:
        try:
            return await call(nc, endpoint, body, timeout=5)
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
        ):
            pass
        except ApiCallError as exc:
            if exc.code not in RETRY_CODES:
                raise
        if time.monotonic() > deadline:
            raise HungError(f"{endpoint} {json.dumps(body)[:80]} got no answer")
        await asyncio.sleep(0.05)


async def fold_ledger(nc: Client, until: int | None = None) -> tuple[FleetState, int]:
    """The ledger folded from its first message (up to ``until``), and the last sequence."""
    state = FleetState()
    last = 0
    async for seq, event in LedgerStream(nc, timeout=10.0).read(1, until_seq=until):
        if event is not None:
            fold(state, event)
        last = seq
    return state, last


# -- what a trial promises -------------------------------------------------------------------


@dataclass
class Acks:
    """Decisions the manager acknowledged (answered ok) during a campaign."""

    submitted: set[str] = field(default_factory=set)
    deleted: set[str] = field(default_factory=set)
    completed: set[str] = field(default_factory=set)


def audit(state: FleetState, acks: Acks) -> list[str]:
    """Every broken promise in a folded ledger, as sentences (empty: all kept)."""
    problems = list(check_invariants(state))
    submitted = {e.run.key for e in state.history if isinstance(e, RunSubmitted)}
    deleted = {e.run for e in state.history if isinstance(e, RunDeleted)}
    problems += [
        f"acknowledged submit of {k} is not in the ledger"
        for k in sorted(acks.submitted - submitted)
    ]
    problems += [
        f"acknowledged delete of {k} is not in the ledger" for k in sorted(acks.deleted - deleted)
    ]
    for key in sorted(acks.completed - deleted):
        status = state.status.get(key)
        if status is None or status.phase not in TERMINAL:
            phase = status.phase if status is not None else "none"
            problems.append(f"acknowledged complete of {key} left it {phase}")
    closed: Counter[str] = Counter()
    terminal: set[str] = set()
    for event in state.history:
        if isinstance(event, LeaseClosed):
            closed[event.lease] += 1
            if closed[event.lease] > 1:
                problems.append(f"lease {event.lease} closed twice")
        elif isinstance(event, LeaseMinted) and closed[event.lease.id]:
            problems.append(f"lease {event.lease.id} minted again after it closed")
        elif isinstance(event, RunStatusChanged):
            if event.run in terminal and event.phase not in TERMINAL:
                problems.append(f"terminal run {event.run} went back to {event.phase}")
            if event.phase in TERMINAL:
                terminal.add(event.run)
        elif isinstance(event, RunSubmitted):
            terminal.discard(event.run.key)  # a name used again is a new run
        elif isinstance(event, RunDeleted):
            terminal.discard(event.run)
    return problems


def replay_differences(state: FleetState, views: Sequence[dict[str, Any]]) -> list[str]:
    """Runs whose phase in a fresh fold differs from what the manager reports."""
    reported = {f"{v['namespace']}/{v['name']}": v["phase"] for v in views}
    folded = {
        key: (state.status[key].phase if key in state.status else "Pending") for key in state.runs
    }
    out = []
    for key in sorted(set(reported) | set(folded)):
        if reported.get(key) != folded.get(key):
            out.append(
                f"replay: {key} is {folded.get(key)} in the fold,"
                f" {reported.get(key)} in the manager"
            )
    return out


# -- faults --------------------------------------------------------------------------------------


@dataclass
class Figures:
    """What a campaign did and found."""

    trials: int = 0
    ops: int = 0
    acked: int = 0
    refused: int = 0
    hung: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def line(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "none"
        return (
            f"trials {self.trials}, ops {self.ops} (acknowledged {self.acked}, refused"
            f" {self.refused}, hung {self.hung}), faults {sum(self.faults.values())} ({faults}),"
            f" violations {len(self.violations)}, {self.seconds:.0f} s"
        )


class Faults:
    """Kill -9 one process of the stack and bring it back (on its old port and store)."""

    def __init__(self, stack: ProcessStack) -> None:
        self.stack = stack

    def targets(self) -> list[str]:
        names = list(self.stack.services)
        if isinstance(self.stack.nats, NatsCluster):
            names += [f"nats-{m.name}" for m in self.stack.nats.members]
        else:
            names.append("nats")
        return names

    async def kill(self, target: str) -> None:
        """SIGKILL on the event loop's thread: the wait after it is immediate, and the stack's
        process table is then never changed while ``supervise`` reads it."""
        if target == "nats":
            self.stack.nats.kill()
        elif target.startswith("nats-"):
            assert isinstance(self.stack.nats, NatsCluster)
            self.stack.nats.kill_member(self._member(target))
        else:
            self.stack.kill(target)

    async def restart(self, target: str) -> None:
        if target == "nats":
            await asyncio.to_thread(self.stack.nats.start)
        elif target.startswith("nats-"):
            assert isinstance(self.stack.nats, NatsCluster)
            await asyncio.to_thread(self.stack.nats.start_member, self._member(target))
        else:
            self.stack.spawn(target)

    def _member(self, target: str) -> int:
        assert isinstance(self.stack.nats, NatsCluster)
        names = [m.name for m in self.stack.nats.members]
        return names.index(target.removeprefix("nats-"))

    async def revive_dead_services(self) -> list[str]:
        """Services that died by themselves (e.g. exit 1 after losing NATS for good) restart,
        as the supervisor of ``gpu-fleet up`` would; returned to be counted."""
        dead = self.stack.dead()
        for name in dead:
            self.stack.procs.pop(name, None)
            self.stack.spawn(name)
        return dead


# -- a trial -------------------------------------------------------------------------------------


class Trial:
    """One seeded schedule of bursts and faults in namespace ``t<index>``."""

    def __init__(
        self,
        index: int,
        *,
        seed: int,
        nc: Client,
        faults: Faults,
        acks: Acks,
        figures: Figures,
        fault_rate: float,
    ) -> None:
        self.ns = f"t{index}"
        self.rng = random.Random(seed)
        self.nc = nc
        self.faults = faults
        self.acks = acks
        self.figures = figures
        self.fault_rate = fault_rate
        self.live: list[str] = []  # run names submitted and not deleted by this trial
        self.fenced: set[str] = set()
        self.counter = 0

    async def op(self, endpoint: str, body: dict[str, Any]) -> Any:
        self.figures.ops += 1
        try:
            result = await attempt(self.nc, endpoint, body, time.monotonic() + CALL_DEADLINE)
        except ApiCallError:
            self.figures.refused += 1
            return None
        except HungError as exc:
            self.figures.hung += 1
            self.figures.violations.append(f"{self.ns}: hung: {exc}")
            return None
        self.figures.acked += 1
        return result if result is not None else True

    async def submit(self, duplicate: bool) -> None:
        self.counter += 1
        name = f"r{self.counter}"
        key = f"{self.ns}/{name}"
        body = {"documents": run_doc(self.ns, name, self.rng.choice((1, 2, 4, 8, 12, 16)))}
        calls = [self.op("apply", body) for _ in range(2 if duplicate else 1)]
        results = await asyncio.gather(*calls)
        self.live.append(name)
        if any(results):
            self.acks.submitted.add(key)

    async def delete(self, name: str) -> None:
        body = {"kind": "Run", "namespace": self.ns, "name": name}
        if await self.op("delete", body):
            self.acks.deleted.add(f"{self.ns}/{name}")

    async def complete(self, name: str) -> None:
        if await self.op("complete", {"namespace": self.ns, "name": name}):
            self.acks.completed.add(f"{self.ns}/{name}")

    async def shrink(self, name: str) -> None:
        await self.op("shrink", {"namespace": self.ns, "name": name, "by": 1})

    async def node(self, op: str, name: str) -> None:
        if await self.op("node", {"op": op, "name": name}):
            (self.fenced.add if op == "fence" else self.fenced.discard)(name)

    def burst(self) -> list[Any]:
        """A random mix of operations to run concurrently."""
        rng = self.rng
        work: list[Any] = [self.submit(rng.random() < 0.2) for _ in range(rng.randint(2, 8))]
        picks = rng.sample(self.live, k=min(len(self.live), rng.randint(0, 4)))
        for name in picks:
            kind = rng.choice(("delete", "complete", "complete", "shrink"))
            if kind == "delete":
                self.live.remove(name)
                work.append(self.delete(name))
            elif kind == "complete":
                work.append(self.complete(name))
            else:
                work.append(self.shrink(name))
        if rng.random() < 0.25:
            node = f"n{rng.randrange(NODES)}"
            work.append(self.node("uncordon" if node in self.fenced else "fence", node))
        return work

    async def fault(self) -> None:
        """Kill a random process a random moment into the burst; restart it a bit later."""
        target = self.rng.choice(self.faults.targets())
        await asyncio.sleep(self.rng.uniform(0.0, 0.5))
        await self.faults.kill(target)
        self.figures.faults[target] += 1
        await asyncio.sleep(self.rng.uniform(0.0, 1.5))
        await self.faults.restart(target)

    async def run(self, steps: int) -> None:
        await self.op("apply", {"documents": budget_doc(self.ns, self.rng.choice((16, 24, 32)))})
        for _ in range(steps):
            work = self.burst()
            if self.rng.random() < self.fault_rate:
                work.append(self.fault())
            await asyncio.gather(*work)

    async def cleanup(self) -> None:
        """Free the trial's capacity for the next one (deletes are audited like any other)."""
        await asyncio.gather(*(self.delete(n) for n in self.live))
        self.live.clear()
        await asyncio.gather(*(self.node("uncordon", n) for n in sorted(self.fenced)))


SETTLE_SECONDS = 300.0
"""Seconds for every service to answer again after a trial's last fault."""


async def supervise(faults: Faults, figures: Figures) -> None:
    """Start again, every 0.2 s, a service that exited by itself (e.g. it could not start while
    JetStream elected a leader, or its connection closed for good), as ``gpu-fleet up``'s
    supervisor would; counted apart from the injected faults."""
    while True:
        try:
            for dead in await faults.revive_dead_services():
                figures.faults[f"{dead} (exited, restarted)"] += 1
        except OSError as exc:  # could not spawn (e.g. out of processes): try again
            print(f"supervise: {exc!r}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.2)


async def settle(nc: Client, faults: Faults, deadline: float) -> None:
    """Every service answers its ping again (the stacks' own readiness poll)."""
    left = max(0.0, deadline - time.monotonic())
    await wait_for_services(nc, faults.stack.services, timeout=left)


async def settled_audit(nc: Client, acks: Acks, deadline: float) -> list[str]:
    """Audit the ledger against what the manager reports at one and the same sequence."""
    while True:
        before = int((await attempt(nc, "seq", {}, deadline))["seq"])
        views = await list_all(nc, deadline)
        after = int((await attempt(nc, "seq", {}, deadline))["seq"])
        if before == after:
            break
        if time.monotonic() > deadline:
            return [f"the manager never held still (seq {before} then {after})"]
    state, last = await fold_ledger(nc, until=before)
    problems = audit(state, acks)
    if last != before:
        problems.append(f"the ledger ends at {last}, the manager is at {before}")
    return problems + replay_differences(state, views)


async def list_all(nc: Client, deadline: float) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        body: dict[str, Any] = {"limit": 500}
        if token:
            body["continue"] = token
        page = await attempt(nc, "list", body, deadline)
        items += page["items"]
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


# -- a campaign ----------------------------------------------------------------------------------


async def campaign(
    data_dir: Path,
    *,
    trials: int,
    max_seconds: float,
    seed: int,
    nats_cluster: int = 1,
    fault_rate: float = 0.7,
    services: tuple[str, ...] = ("binder", "manager", "forecaster", "notifier"),
    out: Any = sys.stdout,
) -> Figures:
    """Run up to ``trials`` trials (stopping after ``max_seconds``) on one stack; audit each."""
    inventory = data_dir / "inventory.yaml"
    data_dir.mkdir(parents=True, exist_ok=True)
    inventory.write_text(INVENTORY)
    stack = ProcessStack(
        data_dir / "stack",
        inventory=str(inventory),
        log_level="warning",
        services=services,
        nats_cluster=nats_cluster,
    )
    figures = Figures()
    acks = Acks()
    started = time.monotonic()
    await asyncio.to_thread(stack.start)
    nc: Client | None = None
    supervisor: asyncio.Task[None] | None = None
    try:
        nc = await connect(stack.admin_url, started + 120)  # authorization is on
        await wait_for_services(nc, services, timeout=180)
        faults = Faults(stack)
        supervisor = asyncio.create_task(supervise(faults, figures))
        for index in range(trials):
            if time.monotonic() - started > max_seconds:
                break
            trial_seed = seed * 1_000_003 + index
            trial = Trial(
                index,
                seed=trial_seed,
                nc=nc,
                faults=faults,
                acks=acks,
                figures=figures,
                fault_rate=fault_rate,
            )
            try:
                await trial.run(steps=trial.rng.randint(3, 6))
                await settle(nc, faults, time.monotonic() + SETTLE_SECONDS)
                problems = await settled_audit(nc, acks, time.monotonic() + CALL_DEADLINE)
            except Exception as exc:  # the harness or the stack broke: record, stop the campaign
                figures.violations.append(f"trial {index} (seed {trial_seed}): {exc!r}")
                break
            figures.violations += [f"trial {index} (seed {trial_seed}): {p}" for p in problems]
            await trial.cleanup()
            figures.trials += 1
            figures.seconds = time.monotonic() - started
            print(
                f"trial {index} seed {trial_seed}: {len(problems)} violations; {figures.line()}",
                file=out,
                flush=True,
            )
    finally:
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(BaseException):  # cancelled, or failed: the stack stops
                await supervisor
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await asyncio.to_thread(stack.stop)
    figures.seconds = time.monotonic() - started
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--trials", type=int, default=1000)
    p.add_argument("--max-seconds", type=float, default=1500.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nats-cluster", type=int, choices=(1, 3, 5), default=1)
    p.add_argument("--fault-rate", type=float, default=0.7, help="chance a step injects a fault")
    p.add_argument("--quick", action="store_true", help="3 trials, at most 120 s")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--keep", default=None, help="keep the stack's data and logs in this folder")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.max_seconds = min(args.trials, 3), min(args.max_seconds, 120.0)
    with tempfile.TemporaryDirectory(prefix="gpu-fleet-chaos-") as tmp:
        data = Path(args.keep) if args.keep else Path(tmp)
        figures = asyncio.run(
            campaign(
                data,
                trials=args.trials,
                max_seconds=args.max_seconds,
                seed=args.seed,
                nats_cluster=args.nats_cluster,
                fault_rate=args.fault_rate,
            )
        )
    print(f"chaos (seed {args.seed}, nats servers {args.nats_cluster}): {figures.line()}")
    for violation in figures.violations:
        print(f"  VIOLATION {violation}")
    if args.json:
        record = asdict(figures)  # a Counter does not survive asdict: its items, as a dict
        record.update(faults=dict(figures.faults), seed=args.seed, nats_cluster=args.nats_cluster)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 1 if figures.violations else 0


if __name__ == "__main__":
    sys.exit(main())
