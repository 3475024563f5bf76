"""Trace readers: our own simple CSV, the Alibaba GPU v2023 pods file, and a synthetic workload.

Each reader returns ``Job`` values sorted by (submit, name), before scaling (see ``scaling``).
Traces without a team column leave ``team`` empty; ``budgets.assign_teams`` fills it.  Bad input
raises ``TraceError`` naming the file, the line and the field, so the CLI can print one line.

The simple CSV (header required, columns in any order, ``#`` lines ignored)::

    name,submit,team,gpus,group_gpus,duration,declared
    train-1,0,vision,16,8,3600,true

``name`` is optional (``job-<line>``); ``group_gpus`` may be empty; ``declared`` is one of
``true/false/yes/no/1/0`` and defaults to false.  Times are integer seconds from the trace start.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from gpu_fleet.sim.jobs import Job

SIMPLE_COLUMNS = ("name", "submit", "team", "gpus", "group_gpus", "duration", "declared")
ALIBABA_COLUMNS = ("name", "num_gpu", "creation_time", "deletion_time", "qos")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0", ""}


class TraceError(ValueError):
    """A trace that cannot be read; the message names the file, line and field."""


def _rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, Mapping[str, str]]]:
    try:
        fh = path.open(newline="")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from exc
    with fh:
        lines = (line for line in fh if not line.lstrip().startswith("#"))
        reader = csv.DictReader(lines)
        header = [h.strip() for h in reader.fieldnames or ()]
        if not header:
            raise TraceError(f"{path}: empty file (expected a CSV header)")
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise TraceError(f"{path}: header: missing column {missing[0]!r}")
        for row in reader:
            yield reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}


def _int(path: Path, line: int, field: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise TraceError(
            f"{path}: line {line}: {field}: expected an integer, got {text!r}"
        ) from None
    if value < low:
        raise TraceError(f"{path}: line {line}: {field}: must be >= {low}, got {value}")
    return value


def read_simple_csv(path: Path) -> list[Job]:
    """Our own trace format (module docstring).  Names must be unique DNS-1123 labels."""
    jobs: list[Job] = []
    seen: set[str] = set()
    for line, row in _rows(path, ("submit", "team", "gpus", "duration")):
        name = row.get("name") or f"job-{line}"
        if not _LABEL.match(name) or len(name) > 40:
            raise TraceError(
                f"{path}: line {line}: name: {name!r} must be a lowercase DNS-1123 label "
                "of at most 40 characters"
            )
        if name in seen:
            raise TraceError(f"{path}: line {line}: name: duplicate {name!r}")
        seen.add(name)
        team = row["team"]
        if not _LABEL.match(team):
            raise TraceError(
                f"{path}: line {line}: team: {team!r} must be a lowercase DNS-1123 label"
            )
        gpus = _int(path, line, "gpus", row["gpus"], 1)
        group_text = row.get("group_gpus", "")
        group = _int(path, line, "group_gpus", group_text, 1) if group_text else None
        declared_text = row.get("declared", "").lower()
        if declared_text not in _TRUE | _FALSE:
            raise TraceError(
                f"{path}: line {line}: declared: expected true or false, got {declared_text!r}"
            )
        jobs.append(
            Job(
                submit=_int(path, line, "submit", row["submit"], 0),
                name=name,
                team=team,
                gpus=gpus,
                duration=_int(path, line, "duration", row["duration"], 1),
                declared=declared_text in _TRUE,
                group_gpus=group,
            )
        )
    return sorted(jobs)


def read_alibaba_pods(path: Path) -> list[Job]:
    """The Alibaba GPU v2023 pods file (``openb_pod_list_*.csv``).

    Kept: pods with ``num_gpu >= 1`` and a ``deletion_time``; GPU-sharing pods (``gpu_milli <
    1000``) count as one whole GPU.  Submit = ``creation_time``; duration = ``deletion_time -
    creation_time`` (at least 1 s) - the trace's own lifetime, queueing included, since it has no
    finer record.  No team and no declared duration: both come later (``assign_teams`` and the
    ``declared`` scaling option).
    """
    jobs: list[Job] = []
    for line, row in _rows(path, ALIBABA_COLUMNS):
        n = _int(path, line, "num_gpu", row["num_gpu"] or "0", 0)
        if n < 1 or not row["deletion_time"]:
            continue
        created = _int(path, line, "creation_time", row["creation_time"], 0)
        deleted = _int(path, line, "deletion_time", row["deletion_time"], 0)
        jobs.append(
            Job(
                submit=created,
                name=row["name"],
                team="",
                gpus=n,
                duration=max(1, deleted - created),
                qos=row["qos"] or "BE",
            )
        )
    return sorted(jobs)


def synthetic(n: int, seed: int, mean_gap: float = 160.0) -> list[Job]:
    """A seeded workload shaped like the published Alibaba GPU v2023 statistics.

    Poisson arrivals (mean gap ``mean_gap`` s); log-normal durations with median 540 s and a
    p90 near 6,500 s; 1 % of jobs very long (5-60 days); 98.9 % one-GPU jobs and 1.1 % of 2, 4 or
    8 GPUs (the trace's shares); QoS LS 57 %, else BE.  No team (``assign_teams``).
    """
    rng = random.Random(seed)
    jobs: list[Job] = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(1 / mean_gap)
        if rng.random() < 0.01:
            duration = int(rng.uniform(5, 60) * 86_400)
        else:
            duration = max(1, int(math.exp(rng.gauss(math.log(540), 1.95))))
        width = rng.choice((2, 4, 8)) if rng.random() < 0.011 else 1
        qos = "LS" if rng.random() < 0.57 else "BE"
        jobs.append(Job(int(t), f"syn-{i:05d}", "", width, duration, qos=qos))
    return sorted(jobs)


def read_trace(path: Path, fmt: str) -> list[Job]:
    """Read ``path`` in format ``csv`` (ours) or ``alibaba`` (v2023 pods)."""
    if fmt == "csv":
        return read_simple_csv(path)
    if fmt == "alibaba":
        return read_alibaba_pods(path)
    raise TraceError(f"--format: unknown trace format {fmt!r} (expected csv or alibaba)")
