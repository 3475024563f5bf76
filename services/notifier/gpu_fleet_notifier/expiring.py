"""Deadlines that are not ledger events: leases nearing their end, funding that will run out,
funding lost or regained as time passes, budget windows due for renewal (DESIGN decision 2).

"Now" is given (the wall clock or the ledger clock, the actor decides); everything here is a
pure function of the folded state, that instant and a ``Memory`` of what was already said, so a
notifier on the ledger clock re-derives exactly which warnings it gave after a restart, and the
tests need no NATS and no sleeping.

Warnings come at **lead times**: the fleet-wide lead (``--expiry-lead``) plus every lead a
NotificationChannel asks for (``spec.leadTimes``).  One warning per (lease, lead): its id
``lease-expiring:<lease>:<end>:<lead>`` (``funding-expiring:<lease>:<instant>:<lead>``) is also
its idempotency key, so a repeat after a restart is dropped by the streams.

* ``lease-expiring``: ``end - lead <= now < end`` for an open lease with a scheduled end.
* ``funding-expiring``: the funding outlook (``core.funding.outlook``) predicts the lease's
  demotion at T and ``T - lead <= now < T``.  The prediction assumes the current burn; when the
  burn changes (a lease starts or ends) the outlook is recomputed, and a changed T is a new
  warning (its id names the new instant, its detail the previous one).
* ``funding-demoted`` / ``funding-restored``: a lease's payer at this check against the last
  one.  The instant reported is the predicted demotion when there was one, the ledger event's
  time when an event caused it, else the check's time.
* ``budget-renewal-due``: an envelope of a Budget with ``autoRenew`` whose window ends within
  ``notifyBefore`` (SPEC A.1 ``pendingRenewals``; renewal itself is reporting only).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpu_fleet.core.funding.metering import evaluate
from gpu_fleet.core.funding.outlook import Demotion, demotions
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import EnvelopeKey, Instant, Lease
from gpu_fleet.core.timeutil import DurationError, format_duration, parse_duration
from gpu_fleet.messages import notify
from gpu_fleet_notifier.derive import UNBOUND, lease_detail, make_note

OUTLOOK_SLACK = 86400
"""How much further than the longest lead the outlook looks, so it is recomputed only when the
ledger changes or a prediction falls due, not at every check."""


@dataclass
class Memory:
    """What was already said, so each warning is given once (at least once across restarts)."""

    leases: dict[tuple[str, int], Instant] = field(default_factory=dict)  # (lease, lead) -> end
    funding: dict[tuple[str, int], Instant] = field(default_factory=dict)  # (lease, lead) -> T
    renewals: set[str] = field(default_factory=set)  # "<envelope>:<end>"
    payers: dict[str, str | None] = field(default_factory=dict)  # lease -> payer at last check
    checked_at: Instant | None = None
    checked_version: int = -1
    # The outlook last computed: (ledger version, computed at, horizon, predictions by lease).
    outlook: tuple[int, Instant, Instant, dict[str, Demotion]] | None = None

    def copy(self) -> Memory:
        return copy.deepcopy(self)


def lead_times(state: FleetState, default: int) -> tuple[int, ...]:
    """The fleet-wide lead plus every channel's, longest first (what deadlines are checked at)."""
    leads = {default} if default > 0 else set()
    for channel in state.channels.values():
        leads.update(parse_leads(channel.spec.lead_times))
    return tuple(sorted(leads, reverse=True))


def parse_leads(texts: Iterable[str]) -> set[int]:
    out = set()
    for text in texts:
        try:
            seconds = parse_duration(text)
        except DurationError:
            continue  # validated when applied; an older rule is not fatal here
        if seconds > 0:
            out.add(seconds)
    return out


def check(
    state: FleetState, now: Instant, seq: int, leads: Sequence[int], memory: Memory
) -> list[notify.Notification]:
    """Every deadline notice due at ``now``, in a fixed order; records them in ``memory``."""
    notes: list[notify.Notification] = []
    for lease, lead in expiring(state, now, leads, memory.leases):
        memory.leases[(lease.id, lead)] = lease.end or 0
        notes.append(expiring_note(state, lease, lead, now, seq))
    previous = dict(memory.outlook[3]) if memory.outlook is not None else {}
    outlook = funding_outlook(state, now, max(leads, default=0), memory)
    notes.extend(funding_changes(state, now, seq, previous, memory))
    for demotion, lead in funding_expiring(outlook.values(), now, leads, memory.funding):
        said = memory.funding.get((demotion.lease, lead))
        memory.funding[(demotion.lease, lead)] = demotion.at
        notes.append(funding_note(state, demotion, lead=lead, now=now, seq=seq, previous=said))
    for key, end, before in renewals_due(state, now, memory.renewals):
        memory.renewals.add(f"{key}:{end}")
        notes.append(renewal_note(state, key, end=end, before=before, now=now, seq=seq))
    memory.checked_at = now
    memory.checked_version = state.version
    _forget_closed(state, memory)
    return notes


# ------------------------------------------------------------------------------------------
# Leases nearing their scheduled end
# ------------------------------------------------------------------------------------------


def expiring(
    state: FleetState,
    now: Instant,
    leads: Sequence[int],
    warned: dict[tuple[str, int], Instant],
) -> list[tuple[Lease, int]]:
    """(lease, lead) pairs due now and not yet announced for the lease's current end.

    A lease already past its end is left to its closure (``lease-expired``).  Sorted by end,
    then lease, then the longest lead first.
    """
    out = []
    for x in state.open_leases.values():
        if x.end is None or not now < x.end:
            continue
        for lead in leads:
            if x.end - lead <= now and warned.get((x.id, lead)) != x.end:
                out.append((x, lead))
    return sorted(out, key=lambda p: (p[0].end or 0, p[0].id, -p[1]))


def expiring_note(
    state: FleetState, lease: Lease, lead: int, now: Instant, seq: int
) -> notify.Notification:
    end = lease.end or now
    return make_note(
        state,
        f"lease-expiring:{lease.id}:{end}:{lead}",
        "lease-expiring",
        lease.run,
        at=now,
        seq=seq,
        detail={
            "end": end,
            "remainingSeconds": end - now,
            "lead": lead,
            "leadText": format_duration(lead),
            **lease_detail(lease),
        },
        lease=lease.id,
        envelope=_minted(lease),
        reason="maxDuration",
        due=end,
    )


def _minted(lease: Lease) -> str | None:
    return str(lease.minted_payer.key) if lease.minted_payer is not None else None


# ------------------------------------------------------------------------------------------
# Funding: predicted demotions, and demotions and re-fundings as they happen
# ------------------------------------------------------------------------------------------


def funding_outlook(
    state: FleetState, now: Instant, longest_lead: int, memory: Memory
) -> dict[str, Demotion]:
    """The predicted demotions of leases funded now, by lease (reusing the last walk while the
    ledger is unchanged and no prediction has fallen due)."""
    if not state.budgets or not state.open_leases:
        memory.outlook = None
        return {}
    want = now + longest_lead
    cached = memory.outlook
    if cached is not None:
        version, at, horizon, predicted = cached
        due = min((d.at for d in predicted.values()), default=None)
        if (
            version == state.version
            and at <= now
            and want <= horizon
            and (due is None or now < due)
        ):
            return {k: d for k, d in predicted.items() if d.at > now}
    horizon = want + OUTLOOK_SLACK
    found = demotions(state.meter, state.funding_inputs(), now, horizon)
    predicted = {d.lease: d for d in found}
    memory.outlook = (state.version, now, horizon, predicted)
    return predicted


def funding_expiring(
    outlook: Iterable[Demotion],
    now: Instant,
    leads: Sequence[int],
    warned: dict[tuple[str, int], Instant],
) -> list[tuple[Demotion, int]]:
    """(demotion, lead) pairs due now whose instant was not announced yet at that lead."""
    out = []
    for d in outlook:
        for lead in leads:
            if d.at - lead <= now < d.at and warned.get((d.lease, lead)) != d.at:
                out.append((d, lead))
    return sorted(out, key=lambda p: (p[0].at, p[0].lease, -p[1]))


_CAUSE_TEXT = {
    "window": "its envelope's window ends",
    "gpu-hours": "its envelope's GPU-hours run out at the current burn",
    "displaced": "its envelope will fund higher-ranked claims",
}


def funding_note(
    state: FleetState,
    d: Demotion,
    *,
    lead: int,
    now: Instant,
    seq: int,
    previous: Instant | None = None,
) -> notify.Notification:
    lease = state.leases[d.lease]
    detail: dict[str, Any] = {
        "demotesAt": d.at,
        "remainingSeconds": d.at - now,
        "cause": d.cause,
        "causeText": _CAUSE_TEXT[d.cause],
        "payer": str(d.payer),
        "lead": lead,
        "leadText": format_duration(lead),
        "burnGPUs": d.burn_gpus,
        **lease_detail(lease),
    }
    info = state.index.envelopes.get(d.payer)
    if info is not None and info.end is not None:
        detail["windowEnd"] = info.end
    if d.remaining_hours is not None:
        detail["remainingGPUHours"] = round(d.remaining_hours, 4)
    if d.exhausted_at is not None:
        detail["exhaustedAt"] = d.exhausted_at
    if previous is not None and previous != d.at:
        detail["previousDemotesAt"] = previous
    return make_note(
        state,
        f"funding-expiring:{d.lease}:{d.at}:{lead}",
        "funding-expiring",
        lease.run,
        at=now,
        seq=seq,
        detail=detail,
        lease=d.lease,
        envelope=str(d.payer),
        reason=d.cause,
        due=d.at,
    )


def funding_changes(
    state: FleetState,
    now: Instant,
    seq: int,
    predicted: dict[str, Demotion],
    memory: Memory,
) -> list[notify.Notification]:
    """``funding-demoted`` and ``funding-restored`` for open leases whose payer appeared or
    vanished since the last check; leases first seen are recorded silently.  ``predicted`` is
    the outlook of the *previous* check: it says when a demotion due since then happened."""
    if not state.open_leases:
        memory.payers = {}
        return []
    payer = _payers(state, now)
    caused_by_event = memory.checked_version != state.version
    notes = []
    current: dict[str, str | None] = {}
    for lease_id in sorted(state.open_leases):
        lease = state.open_leases[lease_id]
        if not lease.live_at(now):
            continue  # past its scheduled end: an expiry, not a change of funding
        env = payer.get(lease_id)
        now_payer = str(env) if env is not None else None
        current[lease_id] = now_payer
        if lease_id not in memory.payers:
            continue
        before = memory.payers[lease_id]
        if before is not None and now_payer is None:
            when = _demoted_at(predicted.get(lease_id), memory.checked_at, now)
            if when is None:
                when = state.clock if caused_by_event and state.clock <= now else now
            notes.append(
                _change_note(
                    state, lease, "funding-demoted", envelope=before, at=when, now=now, seq=seq
                )
            )
        elif before is None and now_payer is not None and env is not None:
            when = _restored_at(state, env, memory.checked_at, now, caused_by_event)
            notes.append(
                _change_note(
                    state, lease, "funding-restored", envelope=now_payer, at=when, now=now, seq=seq
                )
            )
    memory.payers = current
    return notes


def _payers(state: FleetState, now: Instant) -> dict[str, EnvelopeKey | None]:
    """Who pays each open lease at ``now``.

    At the ledger's own instant this is the state's cached evaluation; at a wall-clock instant
    it is computed through ``FleetState.cached``, which keeps only the latest instant - the
    state's per-instant evaluation cache would grow by one entry a second in a quiet fleet.
    """
    if now == state.clock:
        return state.evaluation(now).fill.payer
    return state.cached(
        "notifier_payers",
        lambda: evaluate(state.meter, state.funding_inputs(), now).fill.payer,
        at=now,
    )


def _demoted_at(d: Demotion | None, since: Instant | None, now: Instant) -> Instant | None:
    """The predicted instant, when the prediction fell due between the last check and now."""
    if d is not None and (since is None or since < d.at) and d.at <= now:
        return d.at
    return None


def _restored_at(
    state: FleetState, env: EnvelopeKey, since: Instant | None, now: Instant, by_event: bool
) -> Instant:
    info = state.index.envelopes.get(env)
    start = info.start if info is not None else None
    if start is not None and (since is None or since < start) and start <= now:
        return start
    return state.clock if by_event and state.clock <= now else now


def _change_note(
    state: FleetState,
    lease: Lease,
    event: str,
    *,
    envelope: str,
    at: Instant,
    now: Instant,
    seq: int,
) -> notify.Notification:
    demoted = event == "funding-demoted"
    return make_note(
        state,
        f"{event}:{lease.id}:{at}",
        event,
        lease.run,
        at=at,
        seq=seq,
        detail={
            ("formerPayer" if demoted else "payer"): envelope,
            "class": "unfunded" if demoted else "funded",
            **lease_detail(lease),
        },
        lease=lease.id,
        envelope=envelope,
        reason="no envelope pays for it now; it keeps running unfunded"
        if demoted
        else "funded again",
    )


def _forget_closed(state: FleetState, memory: Memory) -> None:
    """Drop what concerns closed leases: the memory stays as small as the open set."""
    open_ids = state.open_leases
    memory.leases = {k: v for k, v in memory.leases.items() if k[0] in open_ids}
    memory.funding = {k: v for k, v in memory.funding.items() if k[0] in open_ids}


# ------------------------------------------------------------------------------------------
# Budget renewal (autoRenew.notifyBefore)
# ------------------------------------------------------------------------------------------


def renewals_due(
    state: FleetState, now: Instant, announced: set[str]
) -> list[tuple[EnvelopeKey, Instant, int]]:
    """(envelope, window end, notifyBefore) for windows ending within notifyBefore of ``now``."""
    out = []
    for key, info in sorted(state.index.envelopes.items()):
        budget = state.budgets.get(f"{key.namespace}/{key.budget}")
        renew = budget.spec.auto_renew if budget is not None else None
        if renew is None or info.end is None:
            continue
        try:
            before = parse_duration(renew.notify_before)
        except DurationError:
            continue
        due = before > 0 and info.end - before <= now < info.end
        if due and f"{key}:{info.end}" not in announced:
            out.append((key, info.end, before))
    return out


def renewal_note(
    state: FleetState, key: EnvelopeKey, *, end: Instant, before: int, now: Instant, seq: int
) -> notify.Notification:
    budget = state.budgets[f"{key.namespace}/{key.budget}"]
    renew = budget.spec.auto_renew
    return make_note(
        state,
        f"budget-renewal-due:{key}:{end}",
        "budget-renewal-due",
        "",
        at=now,
        seq=seq,
        detail={
            "budget": f"{key.namespace}/{key.budget}",
            "windowEnd": end,
            "remainingSeconds": end - now,
            "notifyBefore": before,
            "period": renew.period if renew is not None else "",
        },
        envelope=str(key),
        reason="autoRenew: the window ends within notifyBefore; renewal is not automatic",
        due=end,
        team=budget.spec.owner or UNBOUND,
        namespace=key.namespace,
    )
