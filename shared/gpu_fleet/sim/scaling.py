"""How a trace is fitted to the fleet being simulated, always stated in the output.

Public traces rarely match the fleet under study: the Alibaba v2023 pods ask for at most 8 GPUs
and arrive over 149 days.  ``Scaling`` says what was changed, in a fixed order:

1. ``skip`` / ``limit``: drop the first ``skip`` jobs by arrival, keep the next ``limit``;
2. ``sample``: keep a share of the jobs, chosen by a hash of the name (stable, seeded);
3. ``time``: divide inter-arrival gaps by this factor (durations unchanged), so the offered
   load grows by the same factor;
4. ``gpus``: multiply the width of multi-GPU jobs (2 GPUs or more) by this factor, placed in
   groups of ``group`` GPUs (one fabric domain each), to exercise gangs the trace lacks;
5. ``declared``: for traces that do not say, the share of jobs (seeded draw) that declare their
   duration up front.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gpu_fleet.sim.jobs import Job


class ScalingError(ValueError):
    """A malformed ``--scale`` option; the message names the key."""


@dataclass(frozen=True)
class Scaling:
    time: float = 1.0
    gpus: int = 1
    group: int = 8
    sample: float = 1.0
    skip: int = 0
    limit: int = 0  # 0: no limit
    declared: float | None = None  # None: keep what the trace says
    seed: int = 7

    def describe(self) -> str:
        """One line for the report: every change made to the trace."""
        parts = []
        if self.skip or self.limit:
            parts.append(f"jobs {self.skip}..{self.skip + self.limit if self.limit else 'end'}")
        if self.sample < 1.0:
            parts.append(f"sampled {self.sample:.0%} by name hash (seed {self.seed})")
        parts.append(f"arrivals compressed x{self.time:g}, durations as traced")
        if self.gpus != 1:
            parts.append(f"multi-GPU jobs widened x{self.gpus} in groups of {self.group}")
        if self.declared is not None:
            parts.append(f"{self.declared:.0%} of jobs declare their duration (seed {self.seed})")
        return "; ".join(parts)


_KEYS = {"time", "gpus", "group", "sample", "skip", "limit", "declared", "seed"}


def parse_scaling(items: Sequence[str], base: Scaling | None = None) -> Scaling:
    """``key=value`` items (``--scale time=60 --scale gpus=8,group=8``) over ``base``."""
    values: dict[str, float | int] = {}
    for item in items:
        for part in (p for p in item.split(",") if p.strip()):
            key, sep, text = part.partition("=")
            key = key.strip()
            if not sep or key not in _KEYS:
                raise ScalingError(
                    f"--scale: {part!r}: expected key=value with key one of {sorted(_KEYS)}"
                )
            try:
                number = float(text)
            except ValueError:
                raise ScalingError(f"--scale: {key}: expected a number, got {text!r}") from None
            values[key] = number
    s = base or Scaling()
    out = Scaling(
        time=float(values.get("time", s.time)),
        gpus=int(values.get("gpus", s.gpus)),
        group=int(values.get("group", s.group)),
        sample=float(values.get("sample", s.sample)),
        skip=int(values.get("skip", s.skip)),
        limit=int(values.get("limit", s.limit)),
        declared=float(values["declared"]) if "declared" in values else s.declared,
        seed=int(values.get("seed", s.seed)),
    )
    checks = (
        ("time", out.time > 0, "must be > 0"),
        ("gpus", out.gpus >= 1, "must be >= 1"),
        ("group", out.group >= 1, "must be >= 1"),
        ("sample", 0 < out.sample <= 1, "must be in (0, 1]"),
        ("skip", out.skip >= 0, "must be >= 0"),
        ("limit", out.limit >= 0, "must be >= 0"),
        ("declared", out.declared is None or 0 <= out.declared <= 1, "must be in [0, 1]"),
    )
    for key, ok, rule in checks:
        if not ok:
            raise ScalingError(f"--scale: {key}: {rule}")
    return out


def _hash_unit(seed: int, name: str) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def apply_scaling(jobs: Sequence[Job], s: Scaling) -> list[Job]:
    """The scaled trace, sorted by arrival, first arrival at 0."""
    ordered = sorted(jobs)[s.skip :]
    if s.limit:
        ordered = ordered[: s.limit]
    if s.sample < 1.0:
        ordered = [j for j in ordered if _hash_unit(s.seed, j.name) < s.sample]
    if not ordered:
        return []
    t0 = ordered[0].submit
    rng = random.Random(s.seed)
    out: list[Job] = []
    for j in ordered:
        gpus = j.gpus * s.gpus if j.gpus >= 2 else j.gpus
        group = j.group_gpus
        if s.gpus != 1 and j.gpus >= 2 and gpus > s.group:
            group = s.group
        declared = j.declared if s.declared is None else rng.random() < s.declared
        out.append(
            replace(
                j,
                submit=int((j.submit - t0) / s.time),
                gpus=gpus,
                group_gpus=group,
                declared=declared,
            )
        )
    return sorted(out)
