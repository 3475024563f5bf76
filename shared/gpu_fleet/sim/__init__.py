"""The simulator: replay a trace through gpu-fleet's own core on a virtual clock, beside the
schedulers users would pick instead, and measure them all the same way (docs/simulation.md).

``inputs`` loads the fleet, budgets and trace (``traces``, ``scaling``, ``budgets``);
``gpufleet`` drives ``core.engine.Fleet``; ``harness``, ``cluster`` and ``baselines`` are the
other schedulers; ``timeline`` is what every run records and ``metrics`` measures;
``runner`` runs them all, ``report`` and ``plots`` present the result.

This package must never re-implement gpu-fleet's semantics (it drives the core), and never
imports nats or kubernetes_asyncio: a simulation is pure, in-process and deterministic.
"""

from gpu_fleet.sim.budgets import BudgetError, Window, helios_budgets
from gpu_fleet.sim.inputs import BudgetSet, InputError, SimInputs, load_inputs
from gpu_fleet.sim.jobs import SIZE_CLASSES, Job, size_class
from gpu_fleet.sim.metrics import summarize
from gpu_fleet.sim.runner import POLICIES, SimOptions, SimResult, run_policy, simulate
from gpu_fleet.sim.scaling import Scaling, ScalingError, apply_scaling, parse_scaling
from gpu_fleet.sim.timeline import ForecastRecord, Segment, Timeline
from gpu_fleet.sim.traces import (
    TraceError,
    read_alibaba_pods,
    read_simple_csv,
    read_trace,
    synthetic,
)

__all__ = [
    "POLICIES",
    "SIZE_CLASSES",
    "BudgetError",
    "BudgetSet",
    "ForecastRecord",
    "InputError",
    "Job",
    "Scaling",
    "ScalingError",
    "Segment",
    "SimInputs",
    "SimOptions",
    "SimResult",
    "Timeline",
    "TraceError",
    "Window",
    "apply_scaling",
    "helios_budgets",
    "load_inputs",
    "parse_scaling",
    "read_alibaba_pods",
    "read_simple_csv",
    "read_trace",
    "run_policy",
    "simulate",
    "size_class",
    "summarize",
    "synthetic",
]
