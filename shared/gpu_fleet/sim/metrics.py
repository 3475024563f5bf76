"""Metrics: pure functions of a recorded ``Timeline``; docs/simulation.md defines each one.

Conventions, chosen so a small trace can be checked by hand:

* percentiles are nearest-rank: the value at position ceil(p/100 x n) of the sorted list;
* the *arrival window* is ``[0, A]`` with ``A`` the last arrival (the whole run if ``A`` is 0):
  utilisation is measured there, where every policy faces the same offered work, so the drain
  at the end (which rewards nobody) does not dilute it;
* time integrals (stranded GPUs, entitlement, fairness, class hours) run over ``[0, end]``;
* a job *waits* from its arrival to its first start, and again from a preemption to its restart;
  its *demand* lasts from arrival to completion.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpu_fleet.sim.jobs import SIZE_CLASSES
from gpu_fleet.sim.timeline import PREEMPTED, Segment, Timeline

HOUR = 3600.0


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return float(ordered[rank - 1])


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def jain(values: Sequence[float]) -> float | None:
    """Jain's fairness index: (sum x)^2 / (n sum x^2); 1 is perfectly even."""
    squares = sum(x * x for x in values)
    if not values or squares == 0:
        return None
    return sum(values) ** 2 / (len(values) * squares)


def _by_job(tl: Timeline) -> dict[str, list[Segment]]:
    out: dict[str, list[Segment]] = defaultdict(list)
    for s in tl.segments:
        out[s.job].append(s)
    for segs in out.values():
        segs.sort(key=lambda s: s.start)
    return out


def arrival_window(tl: Timeline) -> float:
    last = max((j.submit for j in tl.jobs), default=0)
    return float(last if last > 0 else tl.end)


# ------------------------------------------------------------------------------------------
# Per job
# ------------------------------------------------------------------------------------------


def delays(tl: Timeline) -> dict[str, dict[str, list[float]]]:
    """Queueing delay (first start - arrival) and completion time (completion - arrival), in
    seconds, per size class and ``all``; jobs that never started / completed are left out."""
    segs = _by_job(tl)
    out: dict[str, dict[str, list[float]]] = {
        "queue": defaultdict(list),
        "jct": defaultdict(list),
    }
    for j in tl.jobs:
        mine = segs.get(j.name, [])
        if mine:
            for key in (j.size, "all"):
                out["queue"][key].append(float(mine[0].start - j.submit))
        done = [s for s in mine if s.outcome == "completed"]
        if done:
            for key in (j.size, "all"):
                out["jct"][key].append(float(done[-1].end - j.submit))
    return out


def _classed(samples: dict[str, list[float]]) -> dict[str, dict[str, float | int | None]]:
    names = [name for name, _, _ in SIZE_CLASSES if samples.get(name)] + ["all"]
    return {name: spread(samples.get(name, [])) for name in names}


# ------------------------------------------------------------------------------------------
# Time integrals
# ------------------------------------------------------------------------------------------


@dataclass
class _State:
    use: dict[str, int]
    demand: dict[str, int]
    entitled: dict[str, int]
    waiting: dict[int, int]  # width -> jobs waiting with that width


def _intervals(tl: Timeline, horizon: float) -> Iterator[tuple[float, float, _State]]:
    """Walk ``[0, horizon]`` as intervals over which use, demand, entitlement and the waiting
    set are constant."""
    deltas: list[tuple[float, int, str, object, int]] = []  # (t, order, kind, key, delta)
    team = {j.name: j.team for j in tl.jobs}
    segs = _by_job(tl)
    for j in tl.jobs:
        mine = segs.get(j.name, [])
        done = [s.end for s in mine if s.outcome == "completed"]
        deltas.append((j.submit, 1, "demand", j.team, j.gpus))
        deltas.append((done[-1] if done else math.inf, 0, "demand", j.team, -j.gpus))
        wait_from: float = j.submit
        for s in mine:
            deltas.append((wait_from, 1, "wait", j.gpus, 1))
            deltas.append((s.start, 0, "wait", j.gpus, -1))
            wait_from = s.end if s.outcome in PREEMPTED else math.inf
        if wait_from != math.inf:
            deltas.append((wait_from, 1, "wait", j.gpus, 1))
    for s in tl.segments:
        deltas.append((s.start, 1, "use", team[s.job], s.gpus))
        deltas.append((s.end, 0, "use", team[s.job], -s.gpus))
    for name, windows in tl.entitlements.items():
        for w in windows:
            deltas.append((max(0.0, w.start), 1, "ent", name, w.gpus))
            deltas.append((w.end, 0, "ent", name, -w.gpus))
    deltas.sort(key=lambda d: (d[0], d[1], d[2], str(d[3])))
    state = _State(defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int))
    tables: dict[str, dict[Any, int]] = {
        "use": state.use,
        "demand": state.demand,
        "ent": state.entitled,
        "wait": state.waiting,
    }
    now = 0.0
    for t, _, kind, key, delta in deltas:
        t_clip = min(t, horizon)
        if t_clip > now:
            yield now, t_clip, state
            now = t_clip
        if t > horizon:
            break
        tables[kind][key] += delta
    if horizon > now:
        yield now, horizon, state


def busy_gpu_seconds(tl: Timeline, until: float, *, useful_only: bool = False) -> float:
    """GPU-seconds held before ``until``; ``useful_only`` leaves out segments a preemption cut
    (their work was lost: no checkpoints are assumed)."""
    return sum(
        s.gpus * max(0.0, min(s.end, until) - s.start)
        for s in tl.segments
        if not (useful_only and s.outcome in PREEMPTED)
    )


def integrals(tl: Timeline) -> dict[str, Any]:
    """Stranded GPUs, use above entitlement, and per-team fairness over ``[0, end]``."""
    stranded = 0.0
    above = 0.0
    got: dict[str, float] = defaultdict(float)
    owed: dict[str, float] = defaultdict(float)
    used: dict[str, float] = defaultdict(float)
    for t0, t1, st in _intervals(tl, float(tl.end)):
        dt = t1 - t0
        in_use = sum(st.use.values())
        free = tl.fleet_gpus - in_use
        widths = [w for w, n in st.waiting.items() if n > 0]
        if widths and free > 0 and min(widths) <= free:
            stranded += free * dt
        for name in set(st.use) | set(st.demand) | set(st.entitled):
            u, d, e = st.use.get(name, 0), st.demand.get(name, 0), st.entitled.get(name, 0)
            above += max(0, u - e) * dt
            got[name] += min(u, e) * dt
            owed[name] += min(d, e) * dt
            used[name] += u * dt
    share = {n: got[n] / owed[n] for n in sorted(owed) if owed[n] > 0}
    return {
        "stranded_gpu_hours": stranded / HOUR,
        "stranded_mean_gpus": stranded / tl.end if tl.end else 0.0,
        "above_entitlement_gpu_hours": above / HOUR,
        "team_share_of_entitled_demand": share,
        "team_gpu_hours": {n: used[n] / HOUR for n in sorted(used) if used[n] > 0},
        "jain": jain(list(share.values())),
    }


def class_steps(tl: Timeline) -> list[tuple[int, dict[str, int]]]:
    """GPUs in use per class over time: gpu-fleet's funding classes as recorded, else (for the
    baselines, which have no funding) use *within* and *above* each team's entitlement."""
    if tl.classes:
        return tl.classes
    steps: list[tuple[int, dict[str, int]]] = []
    for t0, _, st in _intervals(tl, float(tl.end)):
        within = above = 0
        for name, used in st.use.items():
            e = st.entitled.get(name, 0)
            within += min(used, e)
            above += max(0, used - e)
        counts = {k: v for k, v in (("above", above), ("within", within)) if v}
        if not steps or steps[-1][1] != counts:
            steps.append((int(t0), counts))
    return steps


def class_gpu_hours(tl: Timeline) -> dict[str, float]:
    """GPU-hours per class (``class_steps``) over ``[0, end]``."""
    out: dict[str, float] = defaultdict(float)
    steps = class_steps(tl)
    for i, (t, counts) in enumerate(steps):
        t_next = steps[i + 1][0] if i + 1 < len(steps) else tl.end
        for name, gpus in counts.items():
            out[name] += gpus * max(0, t_next - t) / HOUR
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------
# Placement, preemption, forecast
# ------------------------------------------------------------------------------------------


def fragmentation(segments: Iterable[Segment]) -> dict[str, float | int | None]:
    """Span excess: nodes a segment spans beyond the fewest that could hold it."""
    excess = [s.nodes - s.min_nodes for s in segments]
    multi = [s.nodes - s.min_nodes for s in segments if s.gpus > 1]
    return {
        "segments": len(excess),
        "mean_span_excess": sum(excess) / len(excess) if excess else None,
        "share_with_excess": sum(1 for x in excess if x > 0) / len(excess) if excess else None,
        "mean_span_excess_multi_gpu": sum(multi) / len(multi) if multi else None,
    }


def preemptions(tl: Timeline) -> dict[str, float | int]:
    cut = [s for s in tl.segments if s.outcome in PREEMPTED]
    reclaimed = [s for s in cut if s.outcome == "reclaimed"]
    return {
        "count": len(cut),
        "lost_gpu_hours": sum(s.gpus * (s.end - s.start) for s in cut) / HOUR,
        "reclaimed": len(reclaimed),
        "reclaimed_gpu_hours": sum(s.gpus * (s.end - s.start) for s in reclaimed) / HOUR,
    }


def forecast_error(tl: Timeline) -> dict[str, float | int | None] | None:
    """|P50 - actual start| over forecast jobs that started; share that started by their P90."""
    if not tl.forecasts:
        return None
    started = [r for r in tl.forecasts if r.start is not None]
    errors = [
        float(abs(r.p50 - r.start)) for r in started if r.p50 is not None and r.start is not None
    ]
    with_p90 = [r for r in started if r.p90 is not None and r.start is not None]
    by_p90 = [r for r in with_p90 if r.start is not None and r.p90 is not None and r.start <= r.p90]
    waits = [float(r.start - r.submit) for r in started if r.start is not None]
    return {
        "forecasts": len(tl.forecasts),
        "started": len(started),
        "median_abs_error_s": percentile(errors, 50),
        "p90_abs_error_s": percentile(errors, 90),
        "median_wait_s": percentile(waits, 50),
        "share_started_by_p90": len(by_p90) / len(with_p90) if with_p90 else None,
    }


# ------------------------------------------------------------------------------------------
# The summary
# ------------------------------------------------------------------------------------------


def summarize(tl: Timeline) -> dict[str, Any]:
    """Every metric of one policy's timeline, JSON-able, deterministic."""
    window = arrival_window(tl)
    segs = _by_job(tl)
    completed = sum(1 for j in tl.jobs if any(s.outcome == "completed" for s in segs[j.name]))
    started = sum(1 for j in tl.jobs if segs.get(j.name))
    d = delays(tl)
    inte = integrals(tl)
    return {
        "policy": tl.policy,
        "jobs": {"submitted": len(tl.jobs), "started": started, "completed": completed},
        "utilisation": busy_gpu_seconds(tl, window) / (tl.fleet_gpus * window) if window else None,
        "useful_utilisation": (
            busy_gpu_seconds(tl, window, useful_only=True) / (tl.fleet_gpus * window)
            if window
            else None
        ),
        "makespan_s": tl.end,
        "queue_delay_s": _classed(d["queue"]),
        "completion_time_s": _classed(d["jct"]),
        "stranded": {
            "gpu_hours": inte["stranded_gpu_hours"],
            "mean_gpus": inte["stranded_mean_gpus"],
        },
        "fragmentation": fragmentation(tl.segments),
        "budget": {
            "above_entitlement_gpu_hours": inte["above_entitlement_gpu_hours"],
            "class_gpu_hours": class_gpu_hours(tl),
            "funded_overdraft_gpus": tl.funded_overdraft_gpus,
            "hours_overdraft": tl.hours_overdraft,
        },
        "fairness": {
            "jain": inte["jain"],
            "team_share_of_entitled_demand": inte["team_share_of_entitled_demand"],
            "team_gpu_hours": inte["team_gpu_hours"],
        },
        "preemptions": preemptions(tl),
        "forecast": forecast_error(tl),
        "notes": list(tl.notes),
    }
