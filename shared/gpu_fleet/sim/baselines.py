"""The schedulers users would pick instead of gpu-fleet, as small simulators of their own.

They are *not* gpu-fleet: no budgets over time, no loans, no reservations with forecasts, no
resolver.  Each is a faithful sketch of a well-known policy, documented in docs/simulation.md,
and all place gangs with the same packer on the same topology (``cluster``).

* ``FifoPolicy`` - strict first-come first-served gang scheduling: the queue head starts when it
  fits; nothing behind it may pass it (head-of-line blocking).
* ``QuotaPolicy`` - Kueue-like ClusterQueues in cohorts: each team has a nominal quota (its
  entitlement now), may borrow the cohort's unused quota, and a team within its nominal quota
  reclaims borrowed GPUs by evicting the newest borrowing jobs of other teams.  BestEffortFIFO
  within a team, heads not needing to borrow first across teams.  No windows ahead, no loans.
* ``EasyBackfillPolicy`` - Slurm-like EASY backfill: FIFO, plus a reservation for the blocked
  head at the earliest time it fits given the running jobs' *declared* end times (a default
  limit for jobs that declared none); any later job may start now if it fits and either ends
  before that time (by its declared limit) or stays off the head's reserved slots.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from gpu_fleet.core.placement import PackPlan
from gpu_fleet.sim.harness import Harness
from gpu_fleet.sim.jobs import Job


class FifoPolicy:
    name = "fifo"

    def decide(self, now: int, sim: Harness) -> None:
        while sim.queue:
            plan = sim.cluster.plan(sim.queue[0])
            if plan is None:
                return
            sim.start(sim.queue[0], plan)


class EasyBackfillPolicy:
    name = "easy-backfill"

    def __init__(self, default_limit: int) -> None:
        self.default_limit = default_limit

    def limit(self, job: Job) -> int:
        """What the scheduler believes the job will run: its declared duration, else the
        default limit (Slurm's partition time limit)."""
        return job.duration if job.declared else self.default_limit

    def decide(self, now: int, sim: Harness) -> None:
        FifoPolicy().decide(now, sim)
        if not sim.queue or sim.cluster.free == 0:
            return
        head = sim.queue[0]
        shadow, reserved = self._shadow(now, sim, head)
        for job in list(sim.queue[1:]):
            if sim.cluster.free == 0:
                return
            plan = sim.cluster.plan(job)
            if plan is None:
                continue
            if shadow is not None and now + self.limit(job) > shadow:
                plan = sim.cluster.plan(job, excluded=reserved)
                if plan is None:
                    continue
            sim.start(job, plan)

    def _shadow(self, now: int, sim: Harness, head: Job) -> tuple[int | None, frozenset[str]]:
        """The head's reservation: the earliest believed end after which it fits, and the slots
        it would take then.  ``None`` when it would not fit even on an empty fleet."""
        ends = sorted(
            (max(now + 1, r.start + self.limit(r.job)), name) for name, r in sim.running.items()
        )
        released: list[PackPlan] = []
        free = sim.cluster.free
        for end, name in ends:
            r = sim.running[name]
            released.append(r.plan)
            free += r.job.gpus
            if free < head.gpus:
                continue
            plan = sim.cluster.fits_after(released, head)
            if plan is not None:
                return end, frozenset(plan.slots())
        return None, frozenset()


class QuotaPolicy:
    name = "quota-borrowing"

    def __init__(self, cohorts: Mapping[str, str]) -> None:
        self.cohorts = dict(cohorts)  # team -> cohort name

    def cohort(self, team: str) -> str:
        return self.cohorts.get(team, f"(alone) {team}")

    def decide(self, now: int, sim: Harness) -> None:
        while self._admit_one(sim):
            pass

    def _admit_one(self, sim: Harness) -> bool:
        usage = sim.usage()
        nominal: dict[str, int] = {}
        cohort_nominal: dict[str, int] = defaultdict(int)
        cohort_usage: dict[str, int] = defaultdict(int)
        teams = sorted({j.team for j in sim.queue} | set(usage) | set(sim.entitlements))
        for team in teams:
            nominal[team] = sim.entitled(team)
            cohort_nominal[self.cohort(team)] += nominal[team]
            cohort_usage[self.cohort(team)] += usage.get(team, 0)
        heads: list[tuple[bool, Job, PackPlan]] = []
        reclaim: list[Job] = []
        seen_reclaim: set[str] = set()
        done: set[str] = set()
        for job in sim.queue:
            if job.team in done:
                continue
            c = self.cohort(job.team)
            within = usage.get(job.team, 0) + job.gpus <= nominal[job.team]
            quota_ok = within or cohort_usage[c] + job.gpus <= cohort_nominal[c]
            plan = sim.cluster.plan(job) if quota_ok else None
            if plan is not None:
                heads.append((not within, job, plan))
                done.add(job.team)
            elif within and job.team not in seen_reclaim:
                reclaim.append(job)
                seen_reclaim.add(job.team)
        if heads:
            borrowing, job, plan = min(heads, key=lambda h: (h[0], h[1]))
            sim.start(job, plan, borrowing=borrowing)
            return True
        return any(self._reclaim(sim, job, usage, nominal) for job in reclaim)

    def _reclaim(
        self, sim: Harness, job: Job, usage: dict[str, int], nominal: Mapping[str, int]
    ) -> bool:
        """Evict the newest jobs of borrowing teams in ``job``'s cohort until it fits (quota and
        slots); evict nothing if even all of them would not make it fit."""
        c = self.cohort(job.team)
        over = dict(usage)
        victims: list[str] = []
        candidates = sorted(
            (r for r in sim.running.values() if self.cohort(r.job.team) == c),
            key=lambda r: (-r.start, r.job.name),
        )
        cohort_used = sum(u for t, u in usage.items() if self.cohort(t) == c)
        cohort_nominal = sum(n for t, n in nominal.items() if self.cohort(t) == c)
        for r in candidates:
            team = r.job.team
            if team == job.team or over.get(team, 0) <= nominal.get(team, 0):
                continue
            victims.append(r.job.name)
            over[team] -= r.job.gpus
            cohort_used -= r.job.gpus
            if cohort_used + job.gpus > cohort_nominal:
                continue
            plan = sim.cluster.fits_after([sim.running[v].plan for v in victims], job)
            if plan is None:
                continue
            for v in victims:
                sim.evict(v, "reclaimed")
            sim.start(job, plan)
            return True
        return False
