"""Payload formats a channel may ask for: one small renderer each, one registry dict.

* ``json``: the ``Notification`` exactly as on NATS (``gpu_fleet.messages.notify``), so one
  decoder serves both paths.
* ``slack``: a Slack incoming-webhook payload - ``text`` (what notifications and plain clients
  show) plus ``blocks`` (a section with the same sentence and a context line with the instant,
  the team and the notification id).  The sentence says what happens, to which run and lease,
  when, and why, in words a person reads on a phone.

Renderers are pure: same notification, same bytes (the signature covers these bytes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec

from gpu_fleet.core.timeutil import format_duration, format_instant
from gpu_fleet.messages import notify


class Format(Protocol):
    content_type: str

    def render(self, note: notify.Notification) -> bytes: ...


class JsonFormat:
    content_type = "application/json"

    def render(self, note: notify.Notification) -> bytes:
        return notify.ENCODER.encode(note)


class SlackFormat:
    content_type = "application/json"

    def render(self, note: notify.Notification) -> bytes:
        text = sentence(note)
        context = f"{format_instant(note.at)} · team {note.team} · id `{note.id}`"
        body = {
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": text}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
            ],
        }
        return msgspec.json.encode(body)


FORMATS: dict[str, Format] = {"json": JsonFormat(), "slack": SlackFormat()}


# ------------------------------------------------------------------------------------------
# Readable sentences
# ------------------------------------------------------------------------------------------


def _when(t: object) -> str:
    return format_instant(t) if isinstance(t, int) else "an unknown time"


def _in(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return ""
    return f"in {format_duration(max(0, int(seconds)))}"


def _code(text: object) -> str:
    return f"`{text}`" if text else "-"


def _lease_expiring(n: notify.Notification, d: dict[str, Any]) -> str:
    return (
        f":hourglass_flowing_sand: *Lease expiring {_in(d.get('remainingSeconds'))}*: "
        f"lease {_code(n.lease)} of run {_code(n.run)} ends at {_when(n.due)} "
        "(spec.runtime.maxDuration). Checkpoint now; the run fails with reason Expired then."
    )


def _funding_expiring(n: notify.Notification, d: dict[str, Any]) -> str:
    text = (
        f":money_with_wings: *Funding expiring {_in(d.get('remainingSeconds'))}*: "
        f"lease {_code(n.lease)} of run {_code(n.run)} will run unfunded from {_when(n.due)} "
        f"because {d.get('causeText', 'its envelope stops paying')} "
        f"(envelope {_code(n.envelope)}"
    )
    if "remainingGPUHours" in d:
        text += f", {d['remainingGPUHours']:g} GPU-hours left at a burn of {d.get('burnGPUs')} GPUs"
    if "exhaustedAt" in d:
        text += f", empty at {_when(d['exhaustedAt'])}"
    text += "). It keeps running, but the resolver may reclaim unfunded work."
    if "previousDemotesAt" in d:
        text += f" (Revised: was {_when(d['previousDemotesAt'])}.)"
    return text


def _demoted(n: notify.Notification, d: dict[str, Any]) -> str:
    return (
        f":warning: *Demoted*: lease {_code(n.lease)} of run {_code(n.run)} is unfunded since "
        f"{_when(n.at)} (was paid by {_code(d.get('formerPayer'))}). "
        "It keeps running; unfunded work is reclaimed first when others need room."
    )


def _restored(n: notify.Notification, d: dict[str, Any]) -> str:
    return (
        f":white_check_mark: *Re-funded*: lease {_code(n.lease)} of run {_code(n.run)} is paid "
        f"by {_code(d.get('payer'))} since {_when(n.at)}."
    )


def _renewal(n: notify.Notification, d: dict[str, Any]) -> str:
    return (
        f":calendar: *Budget renewal due*: envelope {_code(n.envelope)} of budget "
        f"{_code(d.get('budget'))} ends at {_when(n.due)} ({_in(d.get('remainingSeconds'))}). "
        "autoRenew only reports: apply a new window to keep funding."
    )


def _preempted(n: notify.Notification, d: dict[str, Any]) -> str:
    conflict = ", ".join(f"`{x}`" for x in d.get("conflictSet", []) or [])
    extra = f" Seed {_code(d.get('seed'))}" + (f", conflict set {conflict}." if conflict else ".")
    if d.get("stage") == "notice":
        return (
            f":rotating_light: *Preemption notice*: lease {_code(n.lease)} of run {_code(n.run)} "
            f"will close at {_when(d.get('deadline'))} ({_code(d.get('closureReason'))}) to make "
            f"room for {_code(d.get('beneficiary'))}. Checkpoint before the deadline.{extra}"
        )
    return (
        f":no_entry: *Preempted*: lease {_code(n.lease)} of run {_code(n.run)} closed at "
        f"{_when(n.at)} ({_code(d.get('closureReason'))}).{extra if d.get('seed') else ''}"
    )


def _dead(n: notify.Notification, d: dict[str, Any]) -> str:
    return (
        f":skull: *Delivery dead-lettered*: {d.get('attempts', '?')} attempt(s) to deliver "
        f"{_code(d.get('notification'))} ({d.get('failedEvent', '?')}) to channel "
        f"{_code(d.get('channel'))} failed; last error: {d.get('error') or '-'}."
    )


_SENTENCES: dict[str, Callable[[notify.Notification, dict[str, Any]], str]] = {
    "lease-expiring": _lease_expiring,
    "funding-expiring": _funding_expiring,
    "funding-demoted": _demoted,
    "funding-restored": _restored,
    "budget-renewal-due": _renewal,
    "preempted": _preempted,
    "delivery-dead-lettered": _dead,
    "run-admitted": lambda n, d: f":rocket: *Run started*: {_code(n.run)}. {d.get('message', '')}",
    "run-reserved": lambda n, d: (
        f":ticket: *Reserved*: run {_code(n.run)} is promised a start by "
        f"{_when(d.get('earliestStart'))} ({d.get('confidence', '')})."
    ),
    "run-forecast": lambda n, d: (
        f":crystal_ball: *Forecast*: run {_code(n.run)} starts around {_when(d.get('p50'))} "
        f"(P90 {_when(d.get('p90'))}, {d.get('confidence', '')})."
    ),
    "reservation-activated": lambda n, d: (
        f":arrow_forward: *Reservation activated*: {_code(d.get('reservation'))} started run "
        f"{_code(n.run)}."
    ),
    "run-completed": lambda n, d: f":tada: *Completed*: run {_code(n.run)}.",
    "run-failed": lambda n, d: (
        f":x: *Failed*: run {_code(n.run)} ({_code(d.get('reason'))}). {d.get('message', '')}"
    ),
    "run-unfunded": lambda n, d: (
        f":pause_button: *Held unfunded*: run {_code(n.run)}. {d.get('message', '')}"
    ),
    "run-swapped": lambda n, d: (
        f":arrows_counterclockwise: *Swapped*: run {_code(n.run)} moved a group onto its spares "
        f"(new lease {_code(n.lease)} on {_code(d.get('node'))})."
    ),
    "lease-started": lambda n, d: (
        f":large_green_circle: *Lease started*: {_code(n.lease)} of run {_code(n.run)} on "
        f"{_code(d.get('node'))} ({len(d.get('slots', []) or [])} GPUs)."
    ),
    "lease-closed": lambda n, d: (
        f":white_circle: *Lease closed*: {_code(n.lease)} of run {_code(n.run)} "
        f"({_code(d.get('closureReason'))})."
    ),
    "lease-expired": lambda n, d: (
        f":alarm_clock: *Lease expired*: {_code(n.lease)} of run {_code(n.run)} reached its "
        f"maxDuration at {_when(n.due)}."
    ),
    "channel-test": lambda n, d: (
        f":wave: *Test* from gpu-fleet to channel {_code(d.get('channel'))}: signed and delivered."
    ),
}


def sentence(note: notify.Notification) -> str:
    """One line a person reads: what happens, to what, when, why."""
    render = _SENTENCES.get(note.event)
    if render is None:
        return f"*{note.event}*: run {_code(note.run)} {note.reason}".rstrip()
    return render(note, note.detail).rstrip()
