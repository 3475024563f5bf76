"""PNG plots of a simulation (matplotlib, the ``sim`` extra): utilisation over time, queueing
delay CDF by size class, per-team share of entitled demand, funding classes over time, and
gpu-fleet's forecast error.  Imported only when plots are written, so the rest of the simulator
does not need matplotlib.  Figures are built with matplotlib's object API (``Figure``), never
``pyplot``: no global state, no GUI backend, nothing to close."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from gpu_fleet.sim.jobs import SIZE_CLASSES
from gpu_fleet.sim.metrics import class_steps, delays, integrals
from gpu_fleet.sim.runner import SimResult
from gpu_fleet.sim.timeline import Timeline

HOUR = 3600.0


def _busy_steps(tl: Timeline) -> tuple[list[float], list[int]]:
    deltas: dict[int, int] = {}
    for s in tl.segments:
        deltas[s.start] = deltas.get(s.start, 0) + s.gpus
        deltas[s.end] = deltas.get(s.end, 0) - s.gpus
    xs, ys, busy = [0.0], [0], 0
    for t in sorted(deltas):
        busy += deltas[t]
        xs.append(t / HOUR)
        ys.append(busy)
    return xs, ys


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def utilisation(timelines: dict[str, Timeline], path: Path, title: str) -> Path:
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for name, tl in timelines.items():
        xs, ys = _busy_steps(tl)
        ax.step(xs, [100 * y / tl.fleet_gpus for y in ys], where="post", label=name, lw=1)
    ax.set_xlabel("hours since the first arrival")
    ax.set_ylabel("GPUs busy (% of fleet)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def delay_cdf(timelines: dict[str, Timeline], path: Path, title: str) -> Path:
    per_policy = {name: delays(tl)["queue"] for name, tl in timelines.items()}
    classes = [c for c, _, _ in SIZE_CLASSES if any(d.get(c) for d in per_policy.values())]
    fig = Figure(figsize=(4 * max(1, len(classes)), 3.5))
    axes = fig.subplots(1, max(1, len(classes)), squeeze=False)[0]
    axes_list = list(axes)
    for ax, cls in zip(axes_list, classes, strict=False):
        for name, d in per_policy.items():
            values = sorted(v / HOUR for v in d.get(cls, []))
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, ys, where="post", label=name, lw=1)
        ax.set_title(f"{cls} GPUs")
        ax.set_xlabel("queueing delay (h)")
        ax.set_ylabel("share of jobs")
        ax.set_xscale("symlog", linthresh=0.01)
    axes_list[0].legend(loc="lower right", fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def team_share(timelines: dict[str, Timeline], path: Path, title: str) -> Path:
    shares = {
        name: integrals(tl)["team_share_of_entitled_demand"] for name, tl in timelines.items()
    }
    teams = sorted({t for s in shares.values() for t in s})
    fig = Figure(figsize=(max(6, 0.5 * len(teams) * len(shares)), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(shares))
    for i, (name, s) in enumerate(shares.items()):
        ax.bar(
            [k + i * width for k in range(len(teams))],
            [s.get(t, 0) for t in teams],
            width,
            label=name,
        )
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(teams))], teams, rotation=60, fontsize=7)
    ax.set_ylabel("use / min(demand, entitlement)")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return _save(fig, path)


def funding_classes(timelines: dict[str, Timeline], path: Path, title: str) -> Path:
    names = list(timelines)
    fig = Figure(figsize=(9, 2.2 * len(names)))
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    axes_list = list(axes)
    for ax, name in zip(axes_list, names, strict=True):
        tl = timelines[name]
        steps = class_steps(tl)
        classes = sorted({c for _, counts in steps for c in counts})
        xs = [t / HOUR for t, _ in steps] + [tl.end / HOUR]
        stacks = [[counts.get(c, 0) for _, counts in steps] for c in classes]
        for c, ys in zip(classes, stacks, strict=True):
            ax.step(xs, [*ys, ys[-1] if ys else 0], where="post", label=c, lw=1)
        ax.set_ylabel("GPUs")
        ax.set_title(name, fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    axes_list[-1].set_xlabel("hours since the first arrival")
    fig.suptitle(title)
    return _save(fig, path)


def forecast_error(tl: Timeline, path: Path, title: str) -> Path:
    errs = sorted(
        (r.start - r.p50) / HOUR for r in tl.forecasts if r.start is not None and r.p50 is not None
    )
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    if errs:
        ax.hist(errs, bins=40)
    ax.set_xlabel("actual start - forecast P50 (h)")
    ax.set_ylabel("runs")
    ax.set_title(title)
    return _save(fig, path)


def write_plots(result: SimResult, folder: Path) -> Sequence[Path]:
    """Every plot of ``result`` into ``folder``; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for label, tls in result.timelines.items():
        tag = label.replace(" ", "-")
        written.append(
            utilisation(tls, folder / f"utilisation-{tag}.png", f"Utilisation ({label})")
        )
        written.append(
            delay_cdf(tls, folder / f"queue-delay-cdf-{tag}.png", f"Queueing delay ({label})")
        )
        written.append(
            team_share(
                tls, folder / f"team-share-{tag}.png", f"Share of entitled demand served ({label})"
            )
        )
        written.append(
            funding_classes(tls, folder / f"funding-classes-{tag}.png", f"GPUs by class ({label})")
        )
        if "gpu-fleet" in tls and tls["gpu-fleet"].forecasts:
            written.append(
                forecast_error(
                    tls["gpu-fleet"],
                    folder / f"forecast-error-{tag}.png",
                    f"gpu-fleet forecast error ({label})",
                )
            )
    return written
