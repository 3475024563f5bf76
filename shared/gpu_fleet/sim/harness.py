"""One event-driven harness for the baseline schedulers (FIFO, quota with borrowing, EASY).

Time jumps from event to event: arrivals and completions.  At each instant, completions are
handled first, then arrivals (in arrival order), then the policy decides once (``decide``),
starting jobs on planned slots and, for the quota policy, evicting borrowers.  An evicted job
returns to the queue in its original arrival position and later starts again from scratch (no
checkpoints are assumed - the same rule as for gpu-fleet's preemptions in ``gpufleet``).
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from gpu_fleet.core.model import Node
from gpu_fleet.core.placement import PackPlan
from gpu_fleet.sim.budgets import Window, entitled_at
from gpu_fleet.sim.cluster import Cluster, min_nodes, plan_nodes
from gpu_fleet.sim.jobs import Job
from gpu_fleet.sim.timeline import Outcome, Segment, Timeline

Progress = Callable[[int, int], None]
"""Called with (jobs arrived so far, jobs in the trace)."""


@dataclass
class Running:
    job: Job
    plan: PackPlan
    start: int
    borrowing: bool = False


class Policy(Protocol):
    name: str

    def decide(self, now: int, sim: Harness) -> None:
        """Start (and possibly evict) jobs at ``now`` through ``sim.start`` / ``sim.evict``."""


class Harness:
    """The queue, the running set, the cluster and the recorder a baseline policy works on."""

    def __init__(
        self,
        policy: Policy,
        nodes: Sequence[Node],
        flavor: str,
        jobs: Sequence[Job],
        entitlements: Mapping[str, list[Window]],
    ) -> None:
        self.policy = policy
        self.cluster = Cluster(nodes, flavor)
        self.jobs = sorted(jobs)
        self.entitlements = dict(entitlements)
        self.queue: list[Job] = []  # waiting, in arrival order
        self.running: dict[str, Running] = {}
        self.now = 0
        self._ends: list[tuple[int, str, int]] = []  # (end, job, start)
        self.timeline = Timeline(
            policy=policy.name,
            fleet_gpus=self.cluster.capacity,
            jobs=list(self.jobs),
            entitlements={k: list(v) for k, v in self.entitlements.items()},
        )

    # -- what policies call ---------------------------------------------------------------------
    def start(self, job: Job, plan: PackPlan, *, borrowing: bool = False) -> None:
        self.queue.remove(job)
        self.cluster.take(plan)
        self.running[job.name] = Running(job, plan, self.now, borrowing)
        heapq.heappush(self._ends, (self.now + job.duration, job.name, self.now))

    def evict(self, name: str, outcome: Outcome = "reclaimed") -> None:
        r = self.running.pop(name)
        self.cluster.release(r.plan)
        self._segment(r, self.now, outcome)
        bisect.insort(self.queue, r.job)

    def entitled(self, team: str) -> int:
        return entitled_at(self.entitlements.get(team, ()), self.now)

    def usage(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for r in self.running.values():
            out[r.job.team] += r.job.gpus
        return out

    # -- the loop -------------------------------------------------------------------------------
    def run(self, drain_limit: int, progress: Progress | None = None) -> Timeline:
        t_wall = time.perf_counter()
        arrivals = list(reversed(self.jobs))
        total = len(arrivals)
        while arrivals or self._ends:
            t_next = min(
                arrivals[-1].submit if arrivals else drain_limit + 1,
                self._ends[0][0] if self._ends else drain_limit + 1,
            )
            if t_next > drain_limit:
                break
            self.now = t_next
            while self._ends and self._ends[0][0] == t_next:
                _, name, started = heapq.heappop(self._ends)
                r = self.running.get(name)
                if r is None or r.start != started:
                    continue  # evicted meanwhile
                del self.running[name]
                self.cluster.release(r.plan)
                self._segment(r, t_next, "completed")
            while arrivals and arrivals[-1].submit == t_next:
                bisect.insort(self.queue, arrivals.pop())
            self.policy.decide(t_next, self)
            if progress is not None:
                progress(total - len(arrivals), total)
        end = self.now if not self.running else max(self.now, drain_limit)
        for r in sorted(self.running.values(), key=lambda r: r.job.name):
            self._segment(r, end, "running")
        tl = self.timeline
        tl.end = end
        tl.segments.sort(key=lambda s: (s.start, s.job))
        if self.queue:
            tl.notes.append(f"{len(self.queue)} jobs never started (drain limit or no room)")
        still = sum(1 for s in tl.segments if s.outcome == "running")
        if still:
            tl.notes.append(f"{still} jobs still running when the drain limit stopped the run")
        tl.wall_s = time.perf_counter() - t_wall
        return tl

    def _segment(self, r: Running, end: int, outcome: Outcome) -> None:
        self.timeline.segments.append(
            Segment(
                job=r.job.name,
                start=r.start,
                end=end,
                gpus=r.job.gpus,
                nodes=plan_nodes(r.plan),
                min_nodes=min_nodes(self.cluster.node_sizes, r.job.gpus),
                outcome=outcome,
            )
        )
