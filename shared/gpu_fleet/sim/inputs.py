"""Everything a simulation reads, loaded and checked once: the fleet, the budgets (and a what-if
variant), the trace after scaling, with one line describing each for the report.

Errors are ``InputError`` with one line naming the file or option and the reason; the CLI exits 2
with it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gpu_fleet.core.manifests import ManifestError, parse_inventory
from gpu_fleet.core.model import Budget, Node
from gpu_fleet.core.placement import TopologyError, compile_nodes
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.sim.budgets import (
    BudgetError,
    Window,
    apply_overrides,
    assign_teams,
    entitlements,
    helios_budgets,
    load_budgets_file,
)
from gpu_fleet.sim.jobs import Job
from gpu_fleet.sim.scaling import Scaling, ScalingError, apply_scaling
from gpu_fleet.sim.traces import TraceError, read_trace, synthetic

NODES_PER_DOMAIN = 16
_SYNTHETIC_FLEET = re.compile(r"^(\d+)x(\d+)$")


class InputError(ValueError):
    """Bad simulation input; one line naming the file or option and the reason."""


@dataclass(frozen=True)
class BudgetSet:
    label: str
    budgets: list[Budget]
    entitlements: dict[str, list[Window]]
    description: str


@dataclass(frozen=True)
class SimInputs:
    nodes: list[Node]
    flavor: str
    origin: int
    jobs: list[Job]
    budget_sets: list[BudgetSet]  # the baseline first, then the what-if variant if any
    described: dict[str, str]

    @property
    def fleet_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes if n.flavor == self.flavor)


def load_fleet(spec: str, flavor: str) -> tuple[list[Node], str]:
    """An inventory file, or ``NxG``: N nodes of G GPUs of ``flavor`` in fabric domains of 16."""
    m = _SYNTHETIC_FLEET.match(spec)
    if m:
        count, gpus = int(m.group(1)), int(m.group(2))
        if count < 1 or gpus < 1:
            raise InputError(f"--fleet {spec}: need at least one node of at least one GPU")
        nodes = [
            Node(
                name=f"n{i:05d}",
                gpus=gpus,
                labels={
                    "region": "sim",
                    "cluster": "c0",
                    "fabric.domain": f"d{i // NODES_PER_DOMAIN:03d}",
                    "gpu.flavor": flavor or "GPU",
                },
            )
            for i in range(count)
        ]
        return nodes, (
            f"{count} x {gpus}-GPU {flavor or 'GPU'} nodes in fabric domains of {NODES_PER_DOMAIN}"
        )
    path = Path(spec)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"--fleet {spec}: {exc.strerror or exc}") from exc
    try:
        nodes = parse_inventory(text, source=spec)
    except ManifestError as exc:
        raise InputError(f"{spec}: {exc.errors[0] if exc.errors else exc}") from exc
    if not nodes:
        raise InputError(f"{spec}: nodes: the inventory has no node")
    return nodes, f"inventory {path.name} ({len(nodes)} nodes)"


def choose_flavor(nodes: Sequence[Node], flavor: str) -> str:
    gpus: Counter[str] = Counter()
    for n in nodes:
        if n.gpus > 0 and n.flavor:
            gpus[n.flavor] += n.gpus
    if flavor:
        if flavor not in gpus:
            raise InputError(f"--flavor: no node of flavor {flavor!r} in the fleet")
        return flavor
    if not gpus:
        raise InputError("--fleet: no node has GPUs and a gpu.flavor label")
    return sorted(gpus.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def load_budget_set(
    label: str,
    path: str,
    sets: Sequence[str],
    *,
    nodes: list[Node],
    flavor: str,
    origin: int,
    share: float,
    helios_day: str,
) -> BudgetSet:
    """Budgets from a manifests file or a Helios VC CSV (``.csv``), with ``sets`` applied."""
    try:
        if path.endswith(".csv"):
            hb = helios_budgets(
                Path(path),
                fleet_gpus=sum(n.gpus for n in nodes if n.flavor == flavor),
                flavor=flavor,
                origin=origin,
                share=share,
                day=helios_day,
            )
            budgets, description = hb.budgets, hb.description
        else:
            budgets = load_budgets_file(Path(path))
            description = f"{Path(path).name} ({len(budgets)} budgets)"
        if sets:
            budgets = apply_overrides(budgets, sets)
            description += "; " + ", ".join(sets)
    except BudgetError as exc:
        raise InputError(str(exc)) from exc
    return BudgetSet(label, budgets, entitlements(budgets, flavor, origin), description)


def load_inputs(
    *,
    fleet: str,
    budgets: str,
    trace: str | None,
    fmt: str,
    scaling: Scaling,
    sets: Sequence[str] = (),
    budgets_variant: str | None = None,
    flavor: str = "",
    start: str = "2026-01-01T00:00:00Z",
    budget_share: float = 1.0,
    helios_day: str = "",
    synthetic_jobs: int = 500,
) -> SimInputs:
    """Load and check every input (see the CLI's help for each option)."""
    try:
        origin = parse_instant(start)
    except ValueError as exc:
        raise InputError(f"--start: {exc}") from exc
    nodes, fleet_text = load_fleet(fleet, flavor)
    flavor = choose_flavor(nodes, flavor)
    try:
        compile_nodes(nodes, flavor)
    except TopologyError as exc:
        raise InputError(f"--fleet {fleet}: {exc}") from exc

    def budget_set(label: str, path: str, overrides: Sequence[str]) -> BudgetSet:
        return load_budget_set(
            label,
            path,
            overrides,
            nodes=nodes,
            flavor=flavor,
            origin=origin,
            share=budget_share,
            helios_day=helios_day,
        )

    sets_base = budget_set("baseline", budgets, ())
    budget_sets = [sets_base]
    if sets or budgets_variant:
        budget_sets.append(budget_set("what-if", budgets_variant or budgets, sets))
    try:
        if trace is None:
            raw = synthetic(synthetic_jobs, scaling.seed)
            trace_text = (
                f"synthetic (Alibaba v2023-shaped, {synthetic_jobs} jobs, seed {scaling.seed})"
            )
        else:
            raw = read_trace(Path(trace), fmt)
            trace_text = f"{Path(trace).name} ({fmt}, {len(raw)} jobs read)"
        jobs = apply_scaling(raw, scaling)
        jobs = assign_teams(jobs, sets_base.entitlements, scaling.seed)
    except (TraceError, ScalingError, BudgetError) as exc:
        raise InputError(str(exc)) from exc
    if not jobs:
        raise InputError(f"{trace or 'synthetic'}: no job left after scaling")
    capacity = sum(n.gpus for n in nodes if n.flavor == flavor)
    too_big = [j for j in jobs if j.gpus > capacity]
    if too_big:
        raise InputError(
            f"{trace}: job {too_big[0].name} asks for {too_big[0].gpus} GPUs, more than the "
            f"fleet's {capacity}"
        )
    return SimInputs(
        nodes=nodes,
        flavor=flavor,
        origin=origin,
        jobs=jobs,
        budget_sets=budget_sets,
        described={
            "trace": trace_text,
            "scaling": scaling.describe(),
            "fleet": f"{fleet_text}; flavor {flavor}, {capacity} GPUs",
            "budgets": sets_base.description,
            **({"what-if": budget_sets[1].description} if len(budget_sets) > 1 else {}),
            "jobs": f"{len(jobs)} jobs, {sum(j.gpus * j.duration for j in jobs) / 3600:.0f} "
            f"GPU-hours of work, arrivals over {jobs[-1].submit / 3600:.1f} h, "
            f"{sum(j.declared for j in jobs)} declare their duration",
        },
    )
