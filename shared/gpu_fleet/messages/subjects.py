"""Subject names, built in one place.  Nothing here touches a connection."""

from __future__ import annotations

import re

API_GROUP = "fleet.api"
BINDER_PLACE = "fleet.binder.place"
FORECAST_RUN = "fleet.forecast.run"
NOTIFY_PREFIX = "fleet.notify"
NOTIFY_STREAM = "NOTIFY"

_TOKEN = re.compile(r"[^A-Za-z0-9_-]")


def api(endpoint: str) -> str:
    return f"{API_GROUP}.{endpoint}"


def team_token(owner: str) -> str:
    """An owner such as ``org:ai:rai`` as one subject token (``org_ai_rai``)."""
    token = _TOKEN.sub("_", owner)
    return token or "_unbound"


def notify(owner: str, event: str) -> str:
    """``fleet.notify.<team>.<event>``: what a team subscribes to.

    For example ``fleet.notify.org_ai_rai.>``.
    """
    return f"{NOTIFY_PREFIX}.{team_token(owner)}.{event}"
