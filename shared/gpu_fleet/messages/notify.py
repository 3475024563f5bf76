"""Notifications to teams (``fleet.notify.<team>.<event>``, stored in the stream ``NOTIFY``), and
their delivery to NotificationChannels (webhooks, NATS).

A notification is published once per (ledger message, event, run or lease): its ``id`` is also
its ``Nats-Msg-Id``, so JetStream drops a repeat and a subscriber can drop one too (delivery is
at least once).  Evolution rules: new fields get defaults and are appended; a field's type never
changes; decoders do not forbid unknown fields, so a team's consumer keeps working when we add
fields.  ``detail`` keys are camelCase like the manifests and may grow.

Delivery messages: a ``Delivery`` is one notification owed to one channel (the outbox item);
a ``DeliveryRecord`` is one attempt's outcome (the history).  The notifier owns both streams.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from gpu_fleet.core.model import NOTIFICATION_EVENTS, Severity

EVENTS = tuple(NOTIFICATION_EVENTS)
"""Every event name the notifier publishes (the last subject token)."""


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # stable: "<seq>[.<index>]:<event>:<run or lease>", or "<event>:<subject>:<instant>..."
    team: str  # the derived owner of the run's namespace, "_unbound" when there is none
    event: str
    run: str  # "namespace/name"; "" for a notice about a budget only (budget-renewal-due)
    lease: str | None = None
    at: int  # Unix seconds: the ledger event's time, or the check time for a deadline
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    seq: int = 0  # the ledger message that caused it (the last folded one for a deadline)
    # -- added with NotificationChannels (issue 13) --
    envelope: str | None = None  # "namespace/budget/envelope" the notice is about, if any
    reason: str = ""  # one line a person reads: why this notice exists
    severity: Severity = "info"
    due: int | None = None  # the instant the announced thing happens (end, demotion, deadline)
    namespace: str = ""  # the namespace it concerns (the run's, or the budget's)


class NotifierStatus(msgspec.Struct, frozen=True, kw_only=True):
    """``fleet.notifier.status``: how far the notifier is, and what it published."""

    seq: int  # last ledger sequence handled (folded and acknowledged)
    delivered: int  # notifications the NOTIFY stream stored
    deduplicated: int  # publishes NOTIFY recognised as repeats (same Nats-Msg-Id)


# ------------------------------------------------------------------------------------------
# Delivery to channels
# ------------------------------------------------------------------------------------------


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One notification owed to one channel: the outbox item, ``Nats-Msg-Id`` = ``id``."""

    id: str  # "<notification id>@<namespace>/<channel>"
    channel: str  # "namespace/name"
    note: Notification


Outcome = Literal["delivered", "retry", "dead", "failed", "skipped"]
"""delivered: the receiver took it; retry: failed, another attempt is scheduled; dead: given
up (dead letter); failed: a test send that failed (never retried); skipped: the channel was gone
or no longer wants it."""


class DeliveryRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt at one delivery and what came of it (the stream ``NOTIFY_HISTORY``)."""

    delivery: str
    notification: str
    channel: str
    event: str
    run: str
    lease: str | None = None
    attempt: int
    outcome: Outcome
    at: float  # when the attempt ended (the notifier's delivery clock, Unix seconds)
    target: str = ""  # "webhook https://host/..." (path elided) or "nats <subject>"
    status: int | None = None  # HTTP status, when there was an answer
    error: str = ""
    next_at: float | None = None  # when the next attempt is due (outcome retry)
    retry_after: float | None = None  # what the receiver asked for (Retry-After), if anything
    ms: float = 0.0
    test: bool = False


class ChannelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``fleet.notifier.channels``: one channel as the notifier sees it."""

    channel: str
    target: str
    format: str
    events: list[str]
    lead_times: list[int]
    scope: str
    breaker: str  # "closed", "open", "half-open"
    pending: int  # deliveries waiting in the outbox
    delivered: int  # counted since this notifier started
    failed_attempts: int
    dead: int


class ChannelsRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str | None = None  # None: every namespace


class ChannelTestRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str = "default"
    name: str


class ChannelTestReply(msgspec.Struct, frozen=True, kw_only=True):
    """What the receiver answered to a signed sample (``kubectl runs notify test``)."""

    channel: str
    target: str
    delivered: bool
    status: int | None = None
    body: str = ""  # the receiver's answer, first KiB
    error: str = ""
    ms: float = 0.0
    id: str = ""  # the sample notification's id (its idempotency key)
    signature: str = ""  # the signature header that was sent


class HistoryRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str | None = None  # None: every namespace
    channel: str | None = None  # a channel name in ``namespace``
    run: str | None = None  # "namespace/name"
    limit: int = 200  # the newest records, at most this many


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    error: str
    code: str = "bad_request"


ENCODER = msgspec.json.Encoder()
DECODER = msgspec.json.Decoder(Notification)
STATUS_DECODER = msgspec.json.Decoder(NotifierStatus)
DELIVERY_DECODER = msgspec.json.Decoder(Delivery)
RECORD_DECODER = msgspec.json.Decoder(DeliveryRecord)
