"""Run every policy on the same trace, for the baseline budgets and the what-if variant, and
gather one JSON-able summary (wall times apart, so the rest is deterministic)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gpu_fleet.core.model import Budget
from gpu_fleet.sim.baselines import EasyBackfillPolicy, FifoPolicy, QuotaPolicy
from gpu_fleet.sim.gpufleet import GpuFleetPolicy
from gpu_fleet.sim.harness import Harness, Policy, Progress
from gpu_fleet.sim.inputs import BudgetSet, SimInputs
from gpu_fleet.sim.metrics import summarize
from gpu_fleet.sim.timeline import Timeline

POLICIES = ("gpu-fleet", "fifo", "quota-borrowing", "easy-backfill")
BUDGET_BLIND = frozenset({"fifo", "easy-backfill"})
"""Policies that never read budgets: run once, measured against each budget set."""


@dataclass(frozen=True)
class SimOptions:
    policies: tuple[str, ...] = POLICIES
    default_limit: int = 86_400  # EASY's belief for jobs that declare no duration
    drain: int = 30 * 86_400  # how long after the last arrival the simulation may run
    forecast_every: int = 1  # forecast every k-th waiting arrival (gpu-fleet)


@dataclass
class SimResult:
    inputs: SimInputs
    options: SimOptions
    timelines: dict[str, dict[str, Timeline]]  # budget set label -> policy -> timeline
    summary: dict[str, Any]


def cohorts_of(budgets: Sequence[Budget]) -> dict[str, str]:
    """A team's cohort for the quota baseline: its Budget's first parent (the family it shares
    with under gpu-fleet), else a cohort of its own."""
    return {
        b.metadata.namespace: b.spec.parents[0] if b.spec.parents else b.spec.owner
        for b in sorted(budgets, key=lambda b: b.key)
    }


def run_policy(
    name: str,
    inputs: SimInputs,
    bset: BudgetSet,
    options: SimOptions,
    progress: Progress | None = None,
) -> Timeline:
    drain_limit = (inputs.jobs[-1].submit if inputs.jobs else 0) + options.drain
    if name == "gpu-fleet":
        return GpuFleetPolicy(
            inputs.nodes,
            inputs.flavor,
            bset.budgets,
            inputs.origin,
            forecast_every=options.forecast_every,
        ).run(inputs.jobs, bset.entitlements, drain_limit, progress)
    policy: Policy
    if name == "fifo":
        policy = FifoPolicy()
    elif name == "easy-backfill":
        policy = EasyBackfillPolicy(options.default_limit)
    elif name == "quota-borrowing":
        policy = QuotaPolicy(cohorts_of(bset.budgets))
    else:
        raise ValueError(f"unknown policy {name!r} (expected one of {', '.join(POLICIES)})")
    harness = Harness(policy, inputs.nodes, inputs.flavor, inputs.jobs, bset.entitlements)
    return harness.run(drain_limit, progress)


def simulate(
    inputs: SimInputs,
    options: SimOptions,
    progress_for: Callable[[str], Progress | None] = lambda _: None,
) -> SimResult:
    """Every policy of ``options`` on ``inputs`` for each budget set (budget-blind policies run
    once and are re-measured against the what-if entitlements)."""
    timelines: dict[str, dict[str, Timeline]] = {}
    first: dict[str, Timeline] = {}
    for bset in inputs.budget_sets:
        timelines[bset.label] = {}
        for name in options.policies:
            if name in BUDGET_BLIND and name in first:
                tl = dataclasses.replace(
                    first[name], entitlements={k: list(v) for k, v in bset.entitlements.items()}
                )
            else:
                tl = run_policy(name, inputs, bset, options, progress_for(f"{bset.label}/{name}"))
            first.setdefault(name, tl)
            timelines[bset.label][name] = tl
    summary = {
        "inputs": dict(inputs.described),
        "options": {
            "policies": list(options.policies),
            "easy_default_limit_s": options.default_limit,
            "drain_s": options.drain,
            "forecast_every": options.forecast_every,
        },
        "results": {
            label: {name: summarize(tl) for name, tl in by_policy.items()}
            for label, by_policy in timelines.items()
        },
        "wall_s": {
            label: {name: round(tl.wall_s, 3) for name, tl in by_policy.items()}
            for label, by_policy in timelines.items()
        },
    }
    return SimResult(inputs, options, timelines, summary)
