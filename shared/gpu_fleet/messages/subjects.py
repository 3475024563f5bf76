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


# -- delivery to NotificationChannels (the notifier owns these streams) ----------------------

OUTBOX_STREAM = "NOTIFY_OUTBOX"  # work queue: deliveries owed, one subject per channel
OUTBOX_PREFIX = "fleet.outbox"
HISTORY_STREAM = "NOTIFY_HISTORY"  # every attempt's outcome, one subject per delivery
HISTORY_PREFIX = "fleet.delivery"
CHANNEL_STREAM = "NOTIFY_CHANNELS"  # what NATS-only channels receive
CHANNEL_PREFIX = "fleet.channel"
NOTIFIER_GROUP = "fleet.notifier"


def outbox(namespace: str, channel: str) -> str:
    """``fleet.outbox.<namespace>.<channel>``: deliveries owed to one channel.

    Namespaces and channel names are DNS-1123 labels (validated), so each is one token.
    """
    return f"{OUTBOX_PREFIX}.{namespace}.{channel}"


def history(namespace: str, channel: str, delivery_key: str = ">") -> str:
    """``fleet.delivery.<namespace>.<channel>.<delivery key>``: the attempts of one delivery.

    ``delivery_key`` is a hash of the delivery id (ids hold characters subjects cannot); the
    latest record of a delivery is the last message on its subject.
    """
    return f"{HISTORY_PREFIX}.{namespace}.{channel}.{delivery_key}"


def channel(namespace: str, name: str, event: str) -> str:
    """``fleet.channel.<namespace>.<channel>.<event>``: a NATS-only channel's deliveries."""
    return f"{CHANNEL_PREFIX}.{namespace}.{name}.{event}"


def consumer_name(namespace: str, channel_name: str) -> str:
    """The durable outbox consumer of one channel (labels hold no ``_``: unambiguous)."""
    return f"deliver_{namespace}_{channel_name}"


def notifier(endpoint: str) -> str:
    return f"{NOTIFIER_GROUP}.{endpoint}"
