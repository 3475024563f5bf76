"""``gpu-fleet simulate``: replay a trace through gpu-fleet and the baselines, write the report.

Everything is loaded and checked before anything runs, so bad input exits 2 with one line naming
the file or option and the reason.  See docs/simulation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpu_fleet.cli.progress import bars, no_bars, progress_wanted
from gpu_fleet.core.timeutil import parse_duration
from gpu_fleet.sim import (
    POLICIES,
    InputError,
    ScalingError,
    SimOptions,
    load_inputs,
    parse_scaling,
    simulate,
)
from gpu_fleet.sim.report import render_markdown

EXIT_OK = 0
EXIT_USAGE = 2


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "simulate",
        help="replay a trace through gpu-fleet and the baseline schedulers (what-if budgets)",
        description="Replay a trace through gpu-fleet's core and FIFO, quota-with-borrowing "
        "and EASY backfill on the same fleet; compare budgets and a what-if variant.",
    )
    p.add_argument("--fleet", required=True, help="inventory YAML, or NxG (N nodes of G GPUs)")
    p.add_argument("--budgets", required=True, help="Budget manifests, or a Helios VC CSV")
    p.add_argument("--trace", default=None, help="trace file (omit for a synthetic workload)")
    p.add_argument("--format", choices=("csv", "alibaba"), default="csv", help="trace format")
    p.add_argument(
        "--scale",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="time, gpus, group, sample, skip, limit, declared, seed (repeatable)",
    )
    p.add_argument(
        "--policy", action="append", choices=POLICIES, help="policies to run (default: all)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="sets",
        metavar="PATH=VALUE",
        help="what-if override: budget.<name>.envelopes.<env>.<field>=<value> (repeatable)",
    )
    p.add_argument("--budgets-variant", default=None, help="what-if budgets file")
    p.add_argument("--flavor", default="", help="GPU flavor to simulate (default: the largest)")
    p.add_argument("--start", default="2026-01-01T00:00:00Z", help="virtual instant of arrival 0")
    p.add_argument(
        "--budget-share", type=float, default=1.0, help="Helios quotas scaled to this x the fleet"
    )
    p.add_argument("--helios-day", default="", help="Helios row to use (default: the last day)")
    p.add_argument("--synthetic-jobs", type=int, default=500, help="jobs of the synthetic trace")
    p.add_argument("--easy-default-limit", default="24h", help="EASY's limit for undeclared jobs")
    p.add_argument("--drain", default="30d", help="how long to run after the last arrival")
    p.add_argument(
        "--forecast-every", type=int, default=1, help="forecast every k-th waiting arrival"
    )
    p.add_argument("-o", "--out", default=None, help="write summary.json, report.md, plots here")
    p.add_argument("--json", action="store_true", help="print the JSON summary, not Markdown")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar on stderr even when it is not a terminal",
    )
    p.set_defaults(func=cmd_simulate)


def _show_progress(args: argparse.Namespace) -> bool:
    return progress_wanted(json_output=bool(args.json), force=bool(args.progress))


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        scaling = parse_scaling(args.scale)
        options = SimOptions(
            policies=tuple(dict.fromkeys(args.policy)) if args.policy else POLICIES,
            default_limit=_duration("--easy-default-limit", args.easy_default_limit),
            drain=_duration("--drain", args.drain),
            forecast_every=_positive("--forecast-every", args.forecast_every),
        )
        if not 0 < args.budget_share <= 10:
            raise InputError("--budget-share: must be in (0, 10]")
        _positive("--synthetic-jobs", args.synthetic_jobs)
        inputs = load_inputs(
            fleet=args.fleet,
            budgets=args.budgets,
            trace=args.trace,
            fmt=args.format,
            scaling=scaling,
            sets=args.sets,
            budgets_variant=args.budgets_variant,
            flavor=args.flavor,
            start=args.start,
            budget_share=args.budget_share,
            helios_day=args.helios_day,
            synthetic_jobs=args.synthetic_jobs,
        )
    except (InputError, ScalingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    progress = bars(sys.stderr) if _show_progress(args) else no_bars
    result = simulate(inputs, options, progress)
    markdown = render_markdown(result.summary)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(result.summary, indent=2) + "\n")
        (folder / "report.md").write_text(markdown)
        if not args.no_plots:
            try:
                from gpu_fleet.sim.plots import write_plots  # noqa: PLC0415 - optional extra
            except ImportError:
                print(
                    "note: plots skipped: matplotlib is not installed (pip install "
                    "'gpu-fleet[sim]')",
                    file=sys.stderr,
                )
            else:
                write_plots(result, folder / "plots")
    if args.json:
        print(json.dumps(result.summary, indent=2))
    else:
        print(markdown, end="")
    return EXIT_OK


def _duration(option: str, text: str) -> int:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InputError(f"{option}: {exc}") from exc
    if seconds <= 0:
        raise InputError(f"{option}: must be positive, got {text!r}")
    return seconds


def _positive(option: str, value: int) -> int:
    if value < 1:
        raise InputError(f"{option}: must be >= 1, got {value}")
    return value
