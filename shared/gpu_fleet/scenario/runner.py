"""Drive the pure core through a scenario with a virtual clock and capture reports.

The runner owns no semantics: it registers the fleet, applies objects and steps through the
same ``Fleet`` committer the local CLI uses, and lets ``Fleet.advance_to`` run everything that
falls due between steps (activations, expiries) exactly as production would.

A step the fleet refuses (completing a run that already Failed, deleting what is gone) is what
a real user would have been told: it changes nothing, is listed under ``rejections`` in every
report from then on (step index, instant, action, target, reason) and the scenario goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpu_fleet.core.engine import CommandError, Fleet, Settings
from gpu_fleet.core.model import NodeHealth
from gpu_fleet.core.placement.pack import Planner
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.scenario.loader import (
    ApplyStep,
    CompleteStep,
    CordonNodeStep,
    DeleteStep,
    EtaStep,
    FailStep,
    FenceNodeStep,
    ReportStep,
    Scenario,
    ShrinkStep,
    Step,
)
from gpu_fleet.views.report import build_report

Report = dict[str, Any]


def settings_of(scenario: Scenario) -> Settings:
    s = scenario.settings
    return Settings(
        accounting_period=s.accounting_period,
        preemption_grace=s.preemption_grace,
        preemption_grace_max=s.preemption_grace_max,
        activation_lead=s.activation_lead,
        activation_lead_per_gpu=s.activation_lead_per_gpu,
    )


def run_scenario(
    scenario: Scenario,
    planner: Planner | None = None,
    on_step: Callable[[Fleet, object], None] | None = None,
    configure: Callable[[Fleet], None] | None = None,
) -> Report:
    """Run ``scenario`` in-process and return the JSON-able report of scenario-format.md.

    ``configure`` sees the fleet before anything is applied (tests switch the engine's
    shortcuts off, or on with their proofs, through it)."""
    fleet = Fleet(settings_of(scenario), planner)
    if configure is not None:
        configure(fleet)
    t0 = scenario.start
    for inventory_row in scenario.nodes:
        fleet.register_node(inventory_row, t0)
    for obj in scenario.objects:
        fleet.apply(obj, t0)
    reports: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    last = t0
    for step in scenario.steps:
        fleet.advance_to(step.at)
        last = step.at
        try:
            match step:
                case ApplyStep(manifest=m):
                    fleet.apply(m, step.at)
                case DeleteStep(kind=kind, namespace=ns, name=name):
                    fleet.delete(kind, ns, name, step.at)
                case FenceNodeStep(node=node):
                    fleet.set_node_health(node, NodeHealth.FENCED, step.at)
                case CordonNodeStep(node=node):
                    fleet.set_node_health(node, NodeHealth.CORDONED, step.at)
                case CompleteStep(run=key):
                    fleet.complete(key, step.at)
                case FailStep(run=key):
                    fleet.fail(key, step.at)
                case ShrinkStep(run=key, desired_total_gpus=desired):
                    fleet.shrink(key, desired, step.at)
                case ReportStep(label=label):
                    reports.append(
                        with_rejections(build_report(fleet.state, label, step.at), rejections)
                    )
                case EtaStep(run=key, eta=eta):
                    fleet.report_eta(key, eta, step.at)
        except CommandError as exc:
            rejections.append(rejection(step, str(exc)))
        if on_step is not None:
            on_step(fleet, step)
    fleet.advance_to(last)
    reports.append(with_rejections(build_report(fleet.state, "final", last), rejections))
    return {"scenario": scenario.name, "reports": reports}


REJECTED_CODES = frozenset({"not_found", "rejected", "bad_request"})
"""API error codes that mean "the fleet refused this step" (``CommandError.code``): the
``--via-nats`` runner records them as rejections, as the in-process runner does."""


def rejection(step: Step, reason: str) -> dict[str, Any]:
    """A refused step as reports list it: where it is in the file, when, what, and why."""
    return {
        "step": step.index,
        "at": format_instant(step.at),
        "action": type(step).__struct_config__.tag,
        "target": _target(step),
        "reason": reason,
    }


def _target(step: Step) -> str:
    match step:
        case ApplyStep(manifest=m):
            return f"{type(m).__name__} {m.key}"
        case DeleteStep(kind=kind):
            return f"{kind} {step.key}"
        case FenceNodeStep(node=node) | CordonNodeStep(node=node):
            return node
        case CompleteStep(run=key) | FailStep(run=key) | ShrinkStep(run=key) | EtaStep(run=key):
            return key
        case ReportStep(label=label):
            return label


def with_rejections(report: Report, rejections: list[dict[str, Any]]) -> Report:
    """The report with the steps refused so far (an extra field scenario-format.md welcomes)."""
    return {**report, "rejections": list(rejections)}
