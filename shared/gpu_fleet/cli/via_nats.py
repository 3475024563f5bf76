"""``gpu-fleet scenario run --via-nats``: the same story, told through the real services.

The runner starts an embedded NATS server with the manager (on a virtual clock set to the
scenario's start) and the binder, drives every object and step through the fleet API, and builds
each report by folding the ledger *read back from the JetStream stream* - so the report shows
what the system of record holds, not what any one service believes.  For the same file it must
produce exactly the in-process report (a test checks it for every shared scenario).  A step the
manager refuses (``REJECTED_CODES``) is recorded under ``rejections`` with the manager's reason,
which is the core's own ``CommandError`` text, so the in-process runner records the same row.
"""

from __future__ import annotations

import contextlib
import tempfile
from typing import Any

import msgspec

from gpu_fleet.cli.stack import ApiCallError, InProcessStack, call
from gpu_fleet.core.ledger import FleetState, LedgerError, fold
from gpu_fleet.core.model import Instant
from gpu_fleet.runtime.ledger_stream import LedgerStream
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
from gpu_fleet.scenario.runner import (
    REJECTED_CODES,
    rejection,
    settings_of,
    with_rejections,
)
from gpu_fleet.views import build_report


async def _report(stack: InProcessStack, scenario: Scenario, label: str, at: Instant) -> Any:
    assert stack.nc is not None
    state = FleetState(settings_period_hours=settings_of(scenario).period_hours)
    async for _, event in LedgerStream(stack.nc, keys=stack.keys_for("admin")).read(1):
        if event is not None:
            # An event the fold refuses changed nothing; skip it as every ledger reader does.
            with contextlib.suppress(LedgerError):
                fold(state, event)
    return build_report(state, label, at)


async def run_via_nats(scenario: Scenario, data_dir: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu-fleet-scenario-") as tmp:
        stack = InProcessStack(
            data_dir or tmp,
            virtual_start=scenario.start,
            services=("binder", "manager"),
            settings=settings_of(scenario),
        )
        async with stack:
            nc = stack.nc
            assert nc is not None
            for node in scenario.nodes:
                await call(nc, "node", {"op": "register", "node": msgspec.to_builtins(node)})
            for obj in scenario.objects:
                await call(nc, "apply", {"documents": msgspec.json.encode(obj).decode()})
            reports: list[Any] = []
            last = scenario.start
            rejections: list[dict[str, Any]] = []
            for step in scenario.steps:
                await call(nc, "clock", {"advance_to": step.at})
                last = step.at
                try:
                    await _step(stack, scenario, step, reports, rejections)
                except ApiCallError as exc:
                    if exc.code not in REJECTED_CODES:
                        raise
                    rejections.append(rejection(step, exc.message))
            await call(nc, "clock", {"advance_to": last})
            reports.append(
                with_rejections(await _report(stack, scenario, "final", last), rejections)
            )
    return {"scenario": scenario.name, "reports": reports}


async def _step(
    stack: InProcessStack,
    scenario: Scenario,
    step: Step,
    reports: list[Any],
    rejections: list[dict[str, Any]],
) -> None:
    """One step through the fleet API; a refused one raises ``ApiCallError``."""
    nc = stack.nc
    assert nc is not None
    match step:
        case ApplyStep(manifest=m):
            await call(nc, "apply", {"documents": msgspec.json.encode(m).decode()})
        case DeleteStep(kind=kind, namespace=ns, name=name):
            await call(nc, "delete", {"kind": kind, "namespace": ns, "name": name})
        case FenceNodeStep(node=node_name):
            await call(nc, "node", {"op": "fence", "name": node_name})
        case CordonNodeStep(node=node_name):
            await call(nc, "node", {"op": "cordon", "name": node_name})
        case CompleteStep(run=key):
            ns, name = key.split("/", 1)
            await call(nc, "complete", {"namespace": ns, "name": name})
        case FailStep(run=key):
            ns, name = key.split("/", 1)
            await call(nc, "fail", {"namespace": ns, "name": name})
        case ShrinkStep(run=key, desired_total_gpus=desired):
            ns, name = key.split("/", 1)
            await call(nc, "shrink", {"namespace": ns, "name": name, "desired": desired})
        case ReportStep(label=label):
            report = await _report(stack, scenario, label, step.at)
            reports.append(with_rejections(report, rejections))
        case EtaStep(run=key, eta=eta):
            ns, name = key.split("/", 1)
            await call(nc, "eta", {"namespace": ns, "name": name, "eta": eta})
