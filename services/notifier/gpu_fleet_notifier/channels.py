"""Which NotificationChannels a notification goes to: pure functions of the folded state.

Routing happens when the notification is derived, against the channels as the ledger holds them
at that message, so a replay routes exactly as the first pass did.  A channel receives a notice
when all of these hold:

* **scope**: ``namespace`` - the notice concerns the channel's namespace (a run there, or a
  budget there); ``team`` - the notice's team is the owner of the channel's namespace or one of
  its descendants in the family (``spec.parents``), so ``org:ai``'s channel hears about
  ``org:ai:rai`` and ``org:ai:vision`` (never about ``_unbound``);
* **filter**: the event is listed (or the list is empty), the run is listed (a bare name means
  one in the channel's namespace; empty means every run), the severity is at least the
  filter's;
* **lead time** (``lease-expiring``, ``funding-expiring``): the notice's lead is one of the
  channel's (the fleet-wide lead when the channel names none), and no shorter lead of the
  channel is due at the same instant - a notifier that was down past the 1h mark sends the 10m
  warning, not both.

Two events never go to webhooks: ``delivery-dead-lettered`` (a broken receiver must not start
a loop of failures about failures; NATS-only channels and team subjects still get it) and
``channel-test`` (``notify test`` sends it to one channel directly).
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import SEVERITIES, NotificationChannel
from gpu_fleet.messages import notify
from gpu_fleet_notifier.derive import UNBOUND
from gpu_fleet_notifier.expiring import parse_leads

DEADLINE_EVENTS = frozenset({"lease-expiring", "funding-expiring"})
NEVER_TO_WEBHOOKS = frozenset({"delivery-dead-lettered", "channel-test"})
NOT_ROUTED = frozenset({"channel-test"})


def routes(
    state: FleetState, note: notify.Notification, default_lead: int
) -> list[NotificationChannel]:
    """The channels that want ``note``, by key (deterministic order)."""
    if note.event in NOT_ROUTED:
        return []
    return [
        ch
        for _, ch in sorted(state.channels.items())
        if wants(ch, note, team_of_channel(state, ch), default_lead)
    ]


def team_of_channel(state: FleetState, channel: NotificationChannel) -> frozenset[str]:
    """The owners a ``scope: team`` channel hears about: its namespace's owner and every owner
    below it in the family (empty when the namespace has no owner)."""
    family = state.index.family
    owner = family.owner_of(channel.metadata.namespace)
    if not owner:
        return frozenset()
    seen = {owner}
    todo = [owner]
    while todo:
        for child in family.children_of.get(todo.pop(), frozenset()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return frozenset(seen)


def wants(
    channel: NotificationChannel,
    note: notify.Notification,
    team: frozenset[str],
    default_lead: int,
) -> bool:
    spec = channel.spec
    if note.event in NEVER_TO_WEBHOOKS and spec.target.webhook is not None:
        return False
    namespace = channel.metadata.namespace
    if spec.scope == "team":
        if note.team in ("", UNBOUND) or note.team not in team:
            return False
    elif note.namespace != namespace:
        return False
    filt = spec.filter
    if filt is not None:
        if filt.events and note.event not in filt.events:
            return False
        if filt.runs and not _run_listed(note.run, filt.runs, namespace):
            return False
        if SEVERITIES.index(note.severity) < SEVERITIES.index(filt.severity):
            return False
    if note.event in DEADLINE_EVENTS:
        return lead_wanted(note, leads_of(channel, default_lead))
    return True


def leads_of(channel: NotificationChannel, default_lead: int) -> list[int]:
    leads = parse_leads(channel.spec.lead_times)
    return sorted(leads or ({default_lead} if default_lead > 0 else set()), reverse=True)


def lead_wanted(note: notify.Notification, leads: Sequence[int]) -> bool:
    """The notice's lead is the channel's most urgent lead due at the notice's instant."""
    lead = note.detail.get("lead")
    due = note.due
    if not isinstance(lead, int) or due is None or lead not in leads:
        return False
    return not any(other < lead and due - other <= note.at for other in leads)


def _run_listed(run: str, listed: Sequence[str], namespace: str) -> bool:
    if not run:
        return False  # a budget notice names no run: a run filter excludes it
    return any((item if "/" in item else f"{namespace}/{item}") == run for item in listed)
