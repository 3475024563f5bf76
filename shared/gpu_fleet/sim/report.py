"""The Markdown report: policies side by side for each budget set, then baseline against the
what-if variant for the policies that read budgets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpu_fleet.sim.jobs import SIZE_CLASSES

Metrics = dict[str, Any]


def _num(value: object, fmt: str = "{:,.0f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        return fmt.format(value)
    return str(value)


def _pct(value: object) -> str:
    return _num(value, "{:.1%}")


def _hours(seconds: object) -> str:
    if not isinstance(seconds, float | int):
        return "-"
    if seconds < 600:
        return f"{seconds:,.0f} s"
    if seconds < 86_400:
        return f"{seconds / 3600:,.2f} h"
    return f"{seconds / 86_400:,.2f} d"


def _rows() -> list[tuple[str, Callable[[Metrics], str]]]:
    rows: list[tuple[str, Callable[[Metrics], str]]] = [
        (
            "jobs started / completed",
            lambda m: f"{m['jobs']['started']} / {m['jobs']['completed']}",
        ),
        ("utilisation (arrival window)", lambda m: _pct(m["utilisation"])),
        ("... of it work not lost to preemption", lambda m: _pct(m["useful_utilisation"])),
        ("makespan", lambda m: _hours(m["makespan_s"])),
    ]
    for kind, label in (("queue_delay_s", "queueing delay"), ("completion_time_s", "JCT")):
        for cls in ["all"] + [name for name, _, _ in SIZE_CLASSES]:
            rows.append(
                (
                    f"{label} p50 / p90 / p99, {cls} GPUs"
                    if cls != "all"
                    else f"{label} p50 / p90 / p99",
                    _spread_of(kind, cls),
                )
            )
    rows += [
        (
            "stranded GPUs (mean) / GPU-h",
            lambda m: f"{m['stranded']['mean_gpus']:.2f} / {m['stranded']['gpu_hours']:,.0f}",
        ),
        (
            "span excess (mean nodes, multi-GPU)",
            lambda m: _num(m["fragmentation"]["mean_span_excess_multi_gpu"], "{:.2f}"),
        ),
        (
            "use above entitlement (GPU-h)",
            lambda m: _num(m["budget"]["above_entitlement_gpu_hours"]),
        ),
        ("funded overdraft (GPUs / GPU-h)", _overdraft),
        (
            "GPU-h by class",
            lambda m: (
                ", ".join(f"{k} {v:,.0f}" for k, v in m["budget"]["class_gpu_hours"].items()) or "-"
            ),
        ),
        ("fairness (Jain over teams)", lambda m: _num(m["fairness"]["jain"], "{:.3f}")),
        (
            "preemptions / lost GPU-h",
            lambda m: f"{m['preemptions']['count']} / {m['preemptions']['lost_gpu_hours']:,.1f}",
        ),
        (
            "reclaimed (unfunded/borrowed) GPU-h",
            lambda m: f"{m['preemptions']['reclaimed_gpu_hours']:,.1f}",
        ),
        ("forecast P50 error median / p90", _forecast),
        (
            "started by P90",
            lambda m: _pct(m["forecast"]["share_started_by_p90"]) if m["forecast"] else "-",
        ),
    ]
    return rows


def _spread_of(kind: str, cls: str) -> Callable[[Metrics], str]:
    def cell(m: Metrics) -> str:
        return _spread(m[kind].get(cls))

    return cell


def _spread(s: dict[str, Any] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return " / ".join(_hours(s[k]) for k in ("p50", "p90", "p99"))


def _overdraft(m: Metrics) -> str:
    b = m["budget"]
    if b["funded_overdraft_gpus"] is None:
        return "n/a"
    return f"{b['funded_overdraft_gpus']} / {b['hours_overdraft']:.2f}"


def _forecast(m: Metrics) -> str:
    f = m["forecast"]
    if not f:
        return "-"
    median, p90 = _hours(f["median_abs_error_s"]), _hours(f["p90_abs_error_s"])
    return f"{median} / {p90} ({f['forecasts']} runs)"


def table(results: dict[str, Metrics], columns: list[str]) -> list[str]:
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for label, cell in _rows():
        values = [cell(results[c]) for c in columns]
        if all(v in ("-", "n/a") for v in values):
            continue
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines


def render_markdown(summary: dict[str, Any]) -> str:
    """The whole report as Markdown (deterministic: wall times are listed last)."""
    out = ["# gpu-fleet simulation", ""]
    for key, text in summary["inputs"].items():
        out.append(f"- **{key}**: {text}")
    opts = summary["options"]
    out.append(
        f"- **options**: EASY default limit {opts['easy_default_limit_s']} s for undeclared "
        f"jobs; drain {opts['drain_s']} s after the last arrival; forecast every "
        f"{opts['forecast_every']} waiting arrival(s)"
    )
    results = summary["results"]
    for label, by_policy in results.items():
        out += ["", f"## Policies side by side ({label} budgets)", ""]
        out += table(by_policy, list(by_policy))
        notes = [f"{p}: {n}" for p, m in by_policy.items() for n in m["notes"]]
        if notes:
            out += ["", *[f"- {n}" for n in notes]]
    if len(results) == 2:
        base, variant = list(results)
        out += ["", f"## {base} against {variant}", ""]
        for policy in results[base]:
            pair = {
                f"{policy} ({base})": results[base][policy],
                f"{policy} ({variant})": results[variant][policy],
            }
            out += [f"### {policy}", "", *table(pair, list(pair)), ""]
    out += ["", "## Wall time (s)", ""]
    for label, by_policy in summary["wall_s"].items():
        out.append(f"- {label}: " + ", ".join(f"{p} {s:.1f}" for p, s in by_policy.items()))
    return "\n".join(out) + "\n"
