"""``kubectl runs top`` and ``kubectl runs viz``: pictures of the fleet, not tables of leases.

Both read ``fleet.api.fleetmap`` (``views.fleet_map`` folded by the manager), so they show the
same slots, classes and runs as every other command.  ``top`` draws one bar per fabric domain
(``-o wide``: per node too) with one character per GPU: the character says the funding class, so
the bar reads without colour; on a terminal it is coloured like the HTML page.  ``viz`` writes
the self-contained HTML page (``views.fleet_page``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from gpu_fleet.cli.stack import call
from gpu_fleet.views.fleet_map import SLOT_STATES
from gpu_fleet.views.fleet_page import render_page

EXIT_OK, EXIT_FAILED = 0, 1

BAR_CHARS: dict[str, str] = {
    "owned": "#",
    "shared": "=",
    "borrowed": "+",
    "unfunded": "!",
    "free": ".",
    "unavailable": "x",
}
"""One character per state, so a bar reads without colour (and in a CI log)."""

ANSI: dict[str, str] = {
    "owned": "\033[32m",
    "shared": "\033[34m",
    "borrowed": "\033[33m",
    "unfunded": "\033[31m",
    "free": "\033[2m",
    "unavailable": "\033[90m",
}
RESET = "\033[0m"
BAR_MAX = 48
"""A bar longer than this many GPUs is scaled down (largest remainders keep the total)."""


def add_parsers(sub: Any, base: argparse.ArgumentParser) -> None:
    """Register ``top`` and ``viz``; ``base`` carries --nats-url, -n and --timeout (not -o)."""
    top = sub.add_parser("top", help="GPUs by funding class per fabric domain", parents=[base])
    top.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json", "yaml"),
        default="table",
        help="wide: a bar per node too",
    )
    top.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the bars (auto: when stdout is a terminal)",
    )
    viz = sub.add_parser(
        "viz", help="write the fleet map, timeline and budget burn as one HTML page", parents=[base]
    )
    viz.add_argument(
        "-o", "--output", default="fleet.html", metavar="FILE", help="the page ('-' for stdout)"
    )


def scaled(counts: dict[str, int], width: int) -> dict[str, int]:
    """``counts`` scaled to sum to ``width`` (largest remainders), a state with GPUs keeps 1."""
    total = sum(counts.values())
    if total <= width:
        return dict(counts)
    exact = {k: v * width / total for k, v in counts.items()}
    out = {k: max(1 if counts[k] else 0, int(v)) for k, v in exact.items()}
    rest = width - sum(out.values())
    for k in sorted(exact, key=lambda k: exact[k] - int(exact[k]), reverse=True):
        if rest <= 0:
            break
        if counts[k]:
            out[k] += 1
            rest -= 1
    return out


def bar(counts: dict[str, int], colour: bool) -> str:
    cells = scaled(counts, BAR_MAX)
    parts = []
    for state in SLOT_STATES:
        n = cells.get(state, 0)
        if not n:
            continue
        text = BAR_CHARS[state] * n
        parts.append(f"{ANSI[state]}{'█' * n}{RESET}" if colour else text)
    return "[" + "".join(parts) + "]"


def _num(counts: dict[str, int]) -> str:
    return "  ".join(
        f"{state} {counts[state]}" for state in SLOT_STATES if counts.get(state) or state == "free"
    )


def render_top(data: dict[str, Any], *, wide: bool, colour: bool) -> str:
    lines = [f"Fleet at {data['at']['iso']}: {data['gpus']} GPUs  {_num(data['counts'])}", ""]
    key_width = max([len(d["key"]) for d in data["domains"]] + [6])
    node_width = max([len(n["name"]) for d in data["domains"] for n in d["nodes"]] + [4])
    for d in data["domains"]:
        used = d["gpus"] - d["counts"]["free"] - d["counts"]["unavailable"]
        lines.append(
            f"{d['key']:<{key_width}}  {','.join(d['flavors']) or '-':<6} "
            f"{used:>4}/{d['gpus']:<4} {bar(d['counts'], colour)}  {_num(d['counts'])}"
        )
        runs = ", ".join(f"{r['run']} ({r['gpus']})" for r in d["runs"]) or "-"
        lines.append(f"  runs: {runs}")
        if wide:
            for n in d["nodes"]:
                health = "" if n["health"] == "Ready" else f" {n['health']}"
                lines.append(
                    f"    {n['name']:<{node_width}} {bar(n['counts'], colour)}{health}  "
                    f"{', '.join(n['runs']) or '-'}"
                )
    legend = "  ".join(
        f"{ANSI[s]}█{RESET} {s}" if colour else f"{BAR_CHARS[s]} {s}" for s in SLOT_STATES
    )
    lines += ["", legend]
    return "\n".join(lines)


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """What ``top -o json|yaml`` prints: the map without the per-slot detail."""
    return {
        "at": data["at"]["iso"],
        "gpus": data["gpus"],
        "counts": data["counts"],
        "domains": [
            {
                "domain": d["key"],
                "flavors": d["flavors"],
                "gpus": d["gpus"],
                "counts": d["counts"],
                "runs": d["runs"],
                "nodes": [
                    {k: n[k] for k in ("name", "gpus", "flavor", "health", "counts", "runs")}
                    for n in d["nodes"]
                ],
            }
            for d in data["domains"]
        ],
    }


async def cmd_top(nc: Any, args: argparse.Namespace) -> int:
    data = await call(nc, "fleetmap", {}, timeout=args.timeout, team=getattr(args, "team", None))
    if args.output == "json":
        print(json.dumps(summary(data), indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(summary(data), sort_keys=False).rstrip())
    else:
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(render_top(data, wide=args.output == "wide", colour=colour))
    return EXIT_OK


async def cmd_viz(nc: Any, args: argparse.Namespace) -> int:
    data = await call(nc, "fleetmap", {}, timeout=args.timeout, team=getattr(args, "team", None))
    page = render_page(data)
    if args.output == "-":
        sys.stdout.write(page)
        return EXIT_OK
    path = Path(args.output)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        print(f"error: {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"wrote the fleet map ({data['gpus']} GPUs in {len(data['domains'])} domains, "
        f"{len(data['timeline']['rows'])} runs on the timeline) to {path.resolve()}"
    )
    return EXIT_OK
