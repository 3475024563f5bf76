"""When a waiting run will start, and what would make it sooner (DESIGN decision 4): the forecast,
its capacity timeline, the play of the queue forward, and the history of run durations.

This package must never decide: the engine's decisions are events; a forecast only predicts them.
"""

from gpu_fleet.core.forecast.forecast import Confidence, ForecastResult, RemedyOption, forecast
from gpu_fleet.core.forecast.history import MIN_EVENTS, Curve, DurationHistory, duration_history
from gpu_fleet.core.forecast.queue_play import (
    QUEUED_REASONS,
    Outcome,
    Release,
    SimTopologyError,
    Simulation,
    Start,
    expected_duration,
    needed_gpus,
    pack_request,
    queue_of,
    simulate,
)
from gpu_fleet.core.forecast.timeline import (
    Fit,
    ForecastError,
    Timeline,
    build_timeline,
    earliest_fit,
    fits_when_empty,
    queue_outcome,
)

__all__ = [
    "MIN_EVENTS",
    "QUEUED_REASONS",
    "Confidence",
    "Curve",
    "DurationHistory",
    "Fit",
    "ForecastError",
    "ForecastResult",
    "Outcome",
    "Release",
    "RemedyOption",
    "SimTopologyError",
    "Simulation",
    "Start",
    "Timeline",
    "build_timeline",
    "duration_history",
    "earliest_fit",
    "expected_duration",
    "fits_when_empty",
    "forecast",
    "needed_gpus",
    "pack_request",
    "queue_of",
    "queue_outcome",
    "simulate",
]
