"""What a simulation records: the trace, who ran when on how many nodes, and policy extras.

A ``Timeline`` is the only input of the metrics (``metrics``), so every policy - gpu-fleet's
real core and the baselines alike - is measured by the same pure functions.  Times are
simulation seconds (0 = the first arrival).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gpu_fleet.sim.budgets import Window
from gpu_fleet.sim.jobs import Job

Outcome = Literal["completed", "preempted", "reclaimed", "expired", "running"]
"""How a segment ended: ran its duration; cut by a preemption (gpu-fleet's lottery); reclaimed
as unfunded / borrowed work; reached a declared limit; still running when the simulation ended."""

PREEMPTED: frozenset[str] = frozenset({"preempted", "reclaimed"})


@dataclass(frozen=True)
class Segment:
    """One uninterrupted stretch of a job on the fleet.  A preempted job that starts again from
    scratch (no checkpoints are assumed) has a second segment."""

    job: str
    start: int
    end: int
    gpus: int
    nodes: int  # nodes the segment's GPUs are on
    min_nodes: int  # fewest nodes that could hold that many GPUs in this fleet
    outcome: Outcome


@dataclass(frozen=True)
class ForecastRecord:
    """gpu-fleet's forecast for a job that did not start at submission, and what happened."""

    job: str
    submit: int
    p50: int | None
    p90: int | None
    start: int | None = None


@dataclass
class Timeline:
    policy: str
    fleet_gpus: int
    jobs: list[Job]
    entitlements: dict[str, list[Window]]
    segments: list[Segment] = field(default_factory=list)
    # Step function of GPUs in use per funding class: (from instant, {class: GPUs}).
    classes: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    forecasts: list[ForecastRecord] = field(default_factory=list)
    funded_overdraft_gpus: int | None = None  # gpu-fleet: max funded GPUs above concurrency
    hours_overdraft: float | None = None  # gpu-fleet: max GPU-hours charged above an allowance
    end: int = 0  # when the simulation stopped (every job done, or the drain limit)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def record_classes(self, at: int, counts: dict[str, int]) -> None:
        """Append a step of the class function unless nothing changed."""
        clean = {k: v for k, v in sorted(counts.items()) if v}
        if self.classes and self.classes[-1][1] == clean:
            return
        if self.classes and self.classes[-1][0] == at:
            self.classes[-1] = (at, clean)
        else:
            self.classes.append((at, clean))
