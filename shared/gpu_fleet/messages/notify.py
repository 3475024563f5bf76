"""Notifications to teams (``fleet.notify.<team>.<event>``, stored in the stream ``NOTIFY``).

A notification is published once per (ledger message, event, run or lease): its ``id`` is also
its ``Nats-Msg-Id``, so JetStream drops a repeat and a subscriber can drop one too (delivery is
at least once).  Evolution rules: new fields get defaults and are appended; a field's type never
changes; decoders do not forbid unknown fields, so a team's consumer keeps working when we add
fields.  ``detail`` keys are camelCase like the manifests and may grow.
"""

from __future__ import annotations

from typing import Any

import msgspec

EVENTS = (
    "run-admitted",
    "run-reserved",
    "run-completed",
    "run-failed",
    "run-unfunded",
    "lease-started",
    "lease-closed",
    "lease-expiring",
    "preempted",
    "run-forecast",
)
"""Every event name the notifier publishes (the last subject token)."""


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # "<ledger seq>:<event>:<run or lease>", or "lease-expiring:<lease>:<end>"
    team: str  # the derived owner of the run's namespace, "_unbound" when there is none
    event: str
    run: str
    lease: str | None = None
    at: int  # Unix seconds: the ledger event's time, or the check time for lease-expiring
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    seq: int = 0  # the ledger sequence that caused it (the last folded one for lease-expiring)


class NotifierStatus(msgspec.Struct, frozen=True, kw_only=True):
    """``fleet.notifier.status``: how far the notifier is, and what it published."""

    seq: int  # last ledger sequence handled (folded and acknowledged)
    delivered: int  # notifications the NOTIFY stream stored
    deduplicated: int  # publishes NOTIFY recognised as repeats (same Nats-Msg-Id)


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(Notification)
STATUS_DECODER = msgspec.json.Decoder(NotifierStatus)
