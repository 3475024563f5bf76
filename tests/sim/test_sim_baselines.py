"""Each baseline's decisions on tiny traces, and gpu-fleet's real core on one."""

from __future__ import annotations

from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Budget
from gpu_fleet.sim.baselines import EasyBackfillPolicy, FifoPolicy, QuotaPolicy
from gpu_fleet.sim.budgets import Window, entitlements
from gpu_fleet.sim.gpufleet import GpuFleetPolicy
from gpu_fleet.sim.harness import Harness, Policy
from gpu_fleet.sim.inputs import load_fleet
from gpu_fleet.sim.jobs import Job
from gpu_fleet.sim.timeline import Segment, Timeline

ORIGIN = 1_767_225_600  # 2026-01-01T00:00:00Z


def run(policy: Policy, nodes: int, jobs: list[Job], ent: dict[str, list[Window]] | None = None):
    fleet, _ = load_fleet(f"{nodes}x4", "T")
    return Harness(policy, fleet, "T", jobs, ent or {}).run(drain_limit=10_000)


def starts(tl: Timeline) -> dict[str, list[Segment]]:
    out: dict[str, list[Segment]] = {}
    for s in tl.segments:
        out.setdefault(s.job, []).append(s)
    return out


# A (8 GPUs) runs [0, 10); B (12 GPUs, the whole fleet) waits for it; D (4 GPUs, 100 s) fits
# now but would hold B's slots past 10; C (2 GPUs, 5 s) fits now and ends before 10.
BLOCKED = [
    Job(0, "a", "t", 8, 10, declared=True),
    Job(1, "b", "t", 12, 20, declared=True),
    Job(2, "d", "t", 4, 100, declared=True),
    Job(3, "c", "t", 2, 5, declared=True),
]


def test_fifo_blocks_behind_a_big_head() -> None:
    s = starts(run(FifoPolicy(), 3, BLOCKED))
    assert s["b"][0].start == 10
    assert s["d"][0].start == 30  # behind b, though it fit at 2
    assert s["c"][0].start == 30


def test_easy_backfills_a_short_job_without_delaying_the_head() -> None:
    s = starts(run(EasyBackfillPolicy(default_limit=3600), 3, BLOCKED))
    assert s["c"][0].start == 3  # ends at 8, before the head's reservation at 10
    assert s["b"][0].start == 10  # the head is not delayed
    assert s["d"][0].start == 30  # would have held the head's slots past 10


def test_easy_uses_the_default_limit_for_undeclared_jobs() -> None:
    jobs = [*BLOCKED[:3], Job(3, "c", "t", 2, 5, declared=False)]
    s = starts(run(EasyBackfillPolicy(default_limit=3600), 3, jobs))
    assert s["c"][0].start == 30  # believed to run an hour: no backfill into the reservation


def test_quota_lends_idle_quota_and_reclaims_it() -> None:
    ent = {"a": [Window(0, 10**6, 4)], "b": [Window(0, 10**6, 4)]}
    jobs = [Job(0, "a1", "a", 8, 100), Job(5, "b1", "b", 4, 10)]
    tl = run(QuotaPolicy({"a": "org", "b": "org"}), 2, jobs, ent)
    s = starts(tl)
    # a borrows b's idle 4 GPUs at 0; b reclaims them at 5 by evicting a1 (restarts from scratch)
    assert [(x.start, x.end, x.outcome) for x in s["a1"]] == [
        (0, 5, "reclaimed"),
        (15, 115, "completed"),
    ]
    assert s["b1"][0].start == 5


def test_quota_without_a_cohort_never_borrows() -> None:
    ent = {"a": [Window(0, 10**6, 4)], "b": [Window(0, 10**6, 4)]}
    jobs = [Job(0, "a1", "a", 8, 100)]
    tl = run(QuotaPolicy({"a": "org-a", "b": "org-b"}), 2, jobs, ent)
    assert tl.segments == []
    assert tl.notes == ["1 jobs never started (drain limit or no room)"]


BUDGET = """
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: t, namespace: t}
spec:
  owner: "org:t"
  envelopes:
    - {name: gpus, flavor: T, selector: {region: "*"}, concurrency: 8,
       start: "2025-12-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}
"""


def test_gpu_fleet_runs_the_real_core() -> None:
    budgets = [b for b in parse_manifests(BUDGET) if isinstance(b, Budget)]
    nodes, _ = load_fleet("2x4", "T")
    jobs = [Job(0, "j1", "t", 8, 100, declared=True), Job(10, "j2", "t", 4, 50, declared=True)]
    policy = GpuFleetPolicy(nodes, "T", budgets, ORIGIN)
    tl = policy.run(jobs, entitlements(budgets, "T", ORIGIN), drain_limit=10_000)
    assert [(s.job, s.start, s.end, s.gpus, s.outcome) for s in tl.segments] == [
        ("j1", 0, 100, 8, "completed"),
        ("j2", 100, 150, 4, "completed"),
    ]
    # j2 waited: forecast at its arrival from j1's declared end, exactly
    assert [(r.job, r.submit, r.p50, r.start) for r in tl.forecasts] == [("j2", 10, 100, 100)]
    assert tl.funded_overdraft_gpus == 0
    assert tl.classes[0] == (0, {"owned": 8})
    assert tl.end == 150
