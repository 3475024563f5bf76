"""The simulator's unit of work: one job of a trace, whatever the trace's format.

A job is what a user would submit once: a gang of ``gpus`` GPUs (in groups of ``group_gpus``
when it spans nodes) that runs for ``duration`` seconds once started.  ``declared`` says whether
the user told the scheduler that duration up front (gpu-fleet's ``maxDuration``, Slurm's time
limit); schedulers that plan with durations may use it only then.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE_CLASSES: tuple[tuple[str, int, int], ...] = (
    ("1", 1, 1),
    ("2-8", 2, 8),
    ("9-64", 9, 64),
    (">64", 65, 1 << 30),
)
"""Size classes by GPUs (name, lowest, highest): one GPU, up to one node, up to a fabric
domain of 8 nodes, larger.  Metrics are broken down by these."""


def size_class(gpus: int) -> str:
    """The size class of a job of ``gpus`` GPUs (see ``SIZE_CLASSES``)."""
    for name, low, high in SIZE_CLASSES:
        if low <= gpus <= high:
            return name
    raise ValueError(f"gpus must be >= 1, got {gpus}")


@dataclass(frozen=True, order=True)
class Job:
    """One submission of a trace after scaling.  Ordered by (submit, name): the arrival order."""

    submit: int  # seconds from the trace's start (after time compression)
    name: str  # unique in the trace, a DNS-1123 label
    team: str  # a Budget namespace (the team that pays)
    gpus: int  # total GPUs, >= 1
    duration: int  # seconds of work once started, >= 1
    declared: bool = False  # the duration is told to the scheduler up front
    group_gpus: int | None = None  # GPUs per placement group (one fabric domain each)
    qos: str = ""  # the trace's service class, when it has one (informational)

    @property
    def size(self) -> str:
        return size_class(self.gpus)
