"""How long work takes: a survival curve of run durations, for leases that declare no end.

A run without ``spec.runtime.maxDuration`` has no scheduled end, so the forecaster estimates
one from runs like it: the same namespace and flavor when enough of them have completed, else
the same flavor.  A run's time is from its first lease's start to its last lease's closure.

**Censoring.**  Completed runs alone are a biased sample: at any moment the runs that have
already completed are the short ones, and the long ones are still running.  (In a burst of
submissions the first completions are all short, and a median of them promises the fleet will
free almost at once.)  So the curve is the Kaplan-Meier product-limit estimate over completed
runs (an observed duration) *and* runs still running (a duration known only to exceed their
age).  Failed and preempted runs are left out: how long they ran says little about the work.

**Conditioning on age.**  GPU job durations are heavy-tailed (in the Alibaba 2023 trace the
median pod runs ~9 minutes, the p90 ~2 hours), and a run that has already run an hour is not
"due at the median".  The expected end of a running lease is its start plus the median
*remaining* life: the first duration ``d`` past its age with ``S(d) <= S(age) / 2``.  When the
curve never falls that far (nothing observed ran that long) the end is unknown, and the
forecast says so instead of inventing one.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant, Run

MIN_EVENTS = 5
"""Fewer completed runs than this in a namespace and flavor: use the flavor's curve."""

_EPS = 1e-12


@dataclass(frozen=True)
class Curve:
    """A Kaplan-Meier survival curve: ``survival[k]`` is S just after ``times[k]``."""

    times: tuple[int, ...]
    survival: tuple[float, ...]
    events: int

    @classmethod
    def fit(cls, observations: list[tuple[int, bool]]) -> Curve:
        """From (duration, completed) pairs; a ``False`` pair is still running at that age."""
        observations.sort()
        at_risk = len(observations)
        s = 1.0
        times: list[int] = []
        survival: list[float] = []
        i = 0
        while i < len(observations):
            t = observations[i][0]
            ended = total = 0
            while i < len(observations) and observations[i][0] == t:
                ended += observations[i][1]
                total += 1
                i += 1
            if ended:
                s *= 1.0 - ended / at_risk
                times.append(t)
                survival.append(s)
            at_risk -= total
        return cls(tuple(times), tuple(survival), sum(1 for _, ok in observations if ok))

    def survival_at(self, t: int) -> float:
        i = bisect.bisect_right(self.times, t)
        return 1.0 if i == 0 else self.survival[i - 1]

    def median_after(self, age: int) -> int | None:
        """The first duration past ``age`` by which half of the runs that lived that long ended
        (``None`` when the curve never gets there)."""
        target = self.survival_at(age) / 2 + _EPS
        lo = bisect.bisect_right(self.times, age)
        for k in range(lo, len(self.times)):  # survival is non-increasing: stops early
            if self.survival[k] <= target:
                return self.times[k]
        return None


@dataclass(frozen=True)
class DurationHistory:
    """Curves by (namespace, flavor) and by ("", flavor)."""

    curves: Mapping[tuple[str, str], Curve]

    def of(self, run: Run) -> Curve | None:
        own = self.curves.get((run.metadata.namespace, run.flavor))
        if own is not None and own.events >= MIN_EVENTS:
            return own
        return self.curves.get(("", run.flavor), own)

    def typical(self, run: Run) -> int | None:
        """The median duration of runs like ``run`` (``None`` when the history cannot say)."""
        curve = self.of(run)
        return curve.median_after(0) if curve is not None else None

    def expected_end(self, run: Run, started: Instant, now: Instant) -> Instant | None:
        """When a run like ``run`` that started at ``started`` and still runs at ``now`` ends."""
        curve = self.of(run)
        if curve is None:
            return None
        d = curve.median_after(max(0, now - started))
        return None if d is None else max(now + 1, started + d)


def duration_history(state: FleetState, now: Instant) -> DurationHistory:
    """The history as the ledger holds it at ``now`` (computed once per version and instant)."""
    return state.cached("duration_history", lambda: _fit(state, now), at=now)


def _fit(state: FleetState, now: Instant) -> DurationHistory:
    spans: dict[str, tuple[Instant, Instant]] = {}
    for lease in state.leases.values():
        if lease.closure_reason != "Completed" or lease.closed_at is None:
            continue
        lo, hi = spans.get(lease.run, (lease.start, lease.closed_at))
        spans[lease.run] = (min(lo, lease.start), max(hi, lease.closed_at))
    running: dict[str, Instant] = {}
    for lease in state.open_leases.values():
        running[lease.run] = min(running.get(lease.run, lease.start), lease.start)
    observations: dict[tuple[str, str], list[tuple[int, bool]]] = {}
    for key, (lo, hi) in spans.items():
        _observe(observations, state.runs.get(key), hi - lo, True)
    for key, since in running.items():
        _observe(observations, state.runs.get(key), max(0, now - since), False)
    return DurationHistory({k: Curve.fit(v) for k, v in sorted(observations.items())})


def _observe(
    into: dict[tuple[str, str], list[tuple[int, bool]]], run: Run | None, t: int, ended: bool
) -> None:
    if run is None:
        return
    for group in ((run.metadata.namespace, run.flavor), ("", run.flavor)):
        into.setdefault(group, []).append((t, ended))
