"""Instants and durations as the manifests and reports write them.

Durations use Go's notation (``15m``, ``1h30m``, ``30s``, ``0s``) because that is what operators
already type for Kubernetes controllers.  Instants are RFC 3339 in UTC with a ``Z`` suffix.
"""

from __future__ import annotations

import datetime as dt
import re

from gpu_fleet.core.model import Instant

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class DurationError(ValueError):
    """A duration string that does not parse; the message says what was expected."""


def parse_duration(text: str) -> int:
    """Parse ``1h30m`` style durations into whole seconds (sub-second parts round down)."""
    s = text.strip()
    if s in {"0", ""}:
        if s == "":
            raise DurationError("must be a duration such as 30s, 15m or 1h30m")
        return 0
    pos = 0
    total = 0.0
    for m in _DURATION_PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise DurationError(f"{text!r} is not a duration such as 30s, 15m or 1h30m")
    return int(total)


def parse_instant(text: str) -> Instant:
    """Parse an RFC 3339 timestamp into Unix seconds."""
    try:
        value = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp") from exc
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp())


def format_instant(t: Instant) -> str:
    """Render Unix seconds as RFC 3339 UTC with a ``Z`` suffix."""
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: int) -> str:
    """Render seconds the way ``parse_duration`` reads them (``1h30m``, ``45s``)."""
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        q, seconds = divmod(seconds, size)
        if q:
            out.append(f"{q}{unit}")
    return "".join(out)
