"""Budgets for a simulation: a manifests file or Helios VC quotas, what-if overrides, and the
entitlement each team holds over time (what the fairness and adherence metrics measure against).

The budgets are real ``Budget`` manifests in every case: gpu-fleet applies them to the same core
that production runs, and the baselines read the same numbers as quotas.  A team is a Budget's
namespace.
"""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec
import yaml

from gpu_fleet.core.manifests import ManifestError, parse_manifests, validate_manifest
from gpu_fleet.core.model import API_VERSION, Budget, to_instant
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.sim.jobs import Job

HELIOS_HORIZON = 10 * 365 * 86_400  # Helios-derived envelopes stay open this long
_LABEL = re.compile(r"[^a-z0-9-]")


class BudgetError(ValueError):
    """Budgets that cannot be loaded or overridden; the message names the file or option."""


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------


def load_budgets_file(path: Path) -> list[Budget]:
    """Budget manifests from a YAML/JSON file (Runs are refused: the trace brings the runs)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BudgetError(f"{path}: {exc.strerror or exc}") from exc
    try:
        manifests = parse_manifests(text, source=str(path))
    except ManifestError as exc:
        first = exc.errors[0] if exc.errors else None
        raise BudgetError(f"{path}: {first or exc}") from exc
    budgets: list[Budget] = []
    for m in manifests:
        if not isinstance(m, Budget):
            raise BudgetError(f"{path}: {m.metadata.name}: expected kind Budget, got Run")
        budgets.append(m)
    if not budgets:
        raise BudgetError(f"{path}: no Budget in the file")
    return budgets


def _largest_remainder(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Integers proportional to ``weights`` that sum to ``total`` exactly (Hamilton's method);
    ties broken by name, so the result is deterministic."""
    s = sum(weights.values())
    raw = {k: total * w / s for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in raw.items()}
    left = total - sum(out.values())
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


@dataclass(frozen=True)
class HeliosBudgets:
    budgets: list[Budget]
    description: str


def helios_budgets(
    path: Path, *, fleet_gpus: int, flavor: str, origin: int, share: float = 1.0, day: str = ""
) -> HeliosBudgets:
    """One Budget per Helios Venus virtual cluster with a quota on ``day`` (default: the last).

    Quotas are scaled so they sum to ``share`` x the fleet's GPUs (largest remainder), because
    the Venus cluster (968-1,264 GPUs) is not the simulated fleet.  Every VC is a child of
    ``org:helios``, so gpu-fleet's family sharing lets siblings use each other's idle quota -
    the same pool Kueue-style cohort borrowing draws from.  Windows cover the whole simulation.
    """
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise BudgetError(f"{path}: {exc.strerror or exc}") from exc
    if not rows or "date" not in rows[0]:
        raise BudgetError(f"{path}: header: expected date,vc...,total (Helios cluster_gpu_number)")
    row = rows[-1] if not day else next((r for r in rows if r["date"] == day), None)
    if row is None:
        raise BudgetError(f"{path}: --helios-day: no row for {day!r}")
    quotas: dict[str, float] = {}
    for column, text in row.items():
        if column in ("date", "total") or not column:
            continue
        try:
            value = float(text)
        except ValueError:
            raise BudgetError(f"{path}: {row['date']}: {column}: not a number: {text!r}") from None
        if value > 0:
            ns = _LABEL.sub("-", column.lower()).strip("-")
            if ns in quotas:
                raise BudgetError(f"{path}: {column}: two VCs map to namespace {ns!r}")
            quotas[ns] = value
    if not quotas:
        raise BudgetError(f"{path}: {row['date']}: no VC has a quota")
    target = max(len(quotas), round(fleet_gpus * share))
    scaled = _largest_remainder(quotas, target)
    env = _LABEL.sub("-", flavor.lower()).strip("-") or "gpus"
    budgets = []
    for ns in sorted(scaled):
        if scaled[ns] == 0:
            continue  # too small a share of a small fleet: no budget (and no jobs, see teams)
        doc = {
            "apiVersion": API_VERSION,
            "kind": "Budget",
            "metadata": {"name": ns, "namespace": ns},
            "spec": {
                "owner": f"org:helios:{ns}",
                "parents": ["org:helios"],
                "envelopes": [
                    {
                        "name": env,
                        "flavor": flavor,
                        "selector": {"region": "*"},
                        "concurrency": scaled[ns],
                        "start": format_instant(origin - 86_400),
                        "end": format_instant(origin + HELIOS_HORIZON),
                    }
                ],
            },
        }
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        budgets.append(budget)
    total = sum(quotas.values())
    dropped = len(quotas) - len(budgets)
    return HeliosBudgets(
        budgets,
        f"Helios Venus VC quotas of {row['date']} ({len(quotas)} VCs, {total:g} GPUs) scaled "
        f"to {target} GPUs ({share:.0%} of the fleet's {fleet_gpus}), one Budget per VC under "
        "org:helios" + (f" ({dropped} VCs scaled to 0 GPUs dropped)" if dropped else ""),
    )


# ------------------------------------------------------------------------------------------
# What-if overrides
# ------------------------------------------------------------------------------------------


def _parse_value(text: str) -> object:
    try:
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text


def apply_overrides(budgets: Sequence[Budget], sets: Sequence[str]) -> list[Budget]:
    """Apply ``budget.<name>.envelopes.<env>.<field>[.<sub>]=<value>`` overrides (also
    ``aggregateCaps.<cap>``) and re-validate each changed Budget as a manifest."""
    docs: dict[str, dict[str, object]] = {
        b.key: msgspec.json.decode(msgspec.json.encode(b)) for b in budgets
    }
    for item in sets:
        path, sep, text = item.partition("=")
        parts = path.strip().split(".")
        if (
            not sep
            or len(parts) < 5
            or parts[0] != "budget"
            or parts[2]
            not in (
                "envelopes",
                "aggregateCaps",
            )
        ):
            raise BudgetError(
                f"--set {item}: expected budget.<name>.envelopes.<envelope>.<field>=<value>"
            )
        name, listing, entry, fields = parts[1], parts[2], parts[3], parts[4:]
        keys = [k for k, d in docs.items() if k == name or k.rpartition("/")[2] == name]
        if len(keys) != 1:
            found = "no budget" if not keys else f"{len(keys)} budgets"
            raise BudgetError(f"--set {item}: {found} named {name!r}")
        spec = docs[keys[0]]["spec"]
        assert isinstance(spec, dict)
        entries = spec.get(listing) or []
        assert isinstance(entries, list)
        target = next((e for e in entries if e.get("name") == entry), None)
        if target is None:
            raise BudgetError(f"--set {item}: budget {name!r} has no {listing[:-1]} {entry!r}")
        node = target
        for f in fields[:-1]:
            child = node.get(f)
            if child is None:
                child = node[f] = {}
            if not isinstance(child, dict):
                raise BudgetError(f"--set {item}: {f} is not a mapping")
            node = child
        node[fields[-1]] = _parse_value(text.strip())
    out: list[Budget] = []
    for key, doc in docs.items():
        try:
            budget = validate_manifest(doc)
        except ManifestError as exc:
            raise BudgetError(f"--set: budget {key}: {exc.errors[0]}") from exc
        assert isinstance(budget, Budget)
        out.append(budget)
    return out


# ------------------------------------------------------------------------------------------
# Entitlements and teams
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """``gpus`` of entitlement over ``[start, end)``, in simulation seconds."""

    start: float
    end: float
    gpus: int


def entitlements(budgets: Sequence[Budget], flavor: str, origin: int) -> dict[str, list[Window]]:
    """Each team's envelopes of ``flavor`` as windows relative to ``origin`` (sorted)."""
    out: dict[str, list[Window]] = defaultdict(list)
    for b in sorted(budgets, key=lambda b: b.key):
        for e in b.spec.envelopes:
            if e.flavor != flavor or e.start is None or e.end is None or e.concurrency <= 0:
                continue
            out[b.metadata.namespace].append(
                Window(to_instant(e.start) - origin, to_instant(e.end) - origin, e.concurrency)
            )
    return {team: sorted(ws, key=lambda w: (w.start, w.end)) for team, ws in sorted(out.items())}


def entitled_at(windows: Sequence[Window], t: float) -> int:
    return sum(w.gpus for w in windows if w.start <= t < w.end)


def assign_teams(jobs: Sequence[Job], shares: Mapping[str, list[Window]], seed: int) -> list[Job]:
    """Give every job without a team one, drawn by a hash of its name with probability
    proportional to each team's entitlement at time 0 (so demand follows quota)."""
    weights = {t: entitled_at(ws, 0) for t, ws in sorted(shares.items())}
    weights = {t: w for t, w in weights.items() if w > 0}
    if not weights:
        if any(not j.team for j in jobs):
            raise BudgetError("no budget is active at the trace start: cannot assign teams")
        return list(jobs)
    total = sum(weights.values())
    cumulative: list[tuple[float, str]] = []
    acc = 0.0
    for team, w in weights.items():
        acc += w / total
        cumulative.append((acc, team))
    out: list[Job] = []
    for j in jobs:
        if j.team:
            out.append(j)
            continue
        digest = hashlib.sha256(f"{seed}:team:{j.name}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        team = next((name for bound, name in cumulative if u < bound), cumulative[-1][1])
        out.append(replace(j, team=team))
    return out
