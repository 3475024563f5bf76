"""Snapshots of folded state, so a restart folds only the ledger's tail.

A snapshot holds the durable part of ``FleetState`` at one ledger sequence: the objects, the
leases, reservations, preemption notices, notification channels, run status, the event history,
the clock, the GPU-hour meter and the fold counters.  Indexes (open leases, slot holders, held
ordinals per node) are rebuilt on load, and caches start empty.  Loading the snapshot and then
folding the events after it gives exactly the state a full replay gives; a test checks this over
whole scenarios.

The format is msgpack through msgspec.  A snapshot from another format version is ignored, and
the caller then replays from the start: snapshots only save time and are never the truth.
"""

from __future__ import annotations

import msgspec

from gpu_fleet.core.funding.metering import Meter
from gpu_fleet.core.ledger.events import (
    Event,
    LeasePreemptionScheduled,
    Reservation,
    RunPhase,
    RunRetried,
)
from gpu_fleet.core.ledger.state import FleetState, RunStatus
from gpu_fleet.core.model import (
    Budget,
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    Node,
    NotificationChannel,
    Run,
)

FORMAT = 1


class _Status(msgspec.Struct, frozen=True):
    phase: RunPhase
    reason: str
    message: str
    detail: dict[str, object]


class _Meter(msgspec.Struct, frozen=True):
    t: float
    envelope_hours: list[tuple[EnvelopeKey, float]]
    envelope_class_hours: list[tuple[EnvelopeKey, FundingClass, float]]
    cap_hours: dict[str, float]
    run_hours: dict[str, dict[FundingClass, float]]
    run_lender_hours: dict[str, dict[str, float]]
    previously_funded: list[tuple[str, EnvelopeKey]]


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FORMAT
    seq: int
    settings_period_hours: float
    nodes: dict[str, Node]
    budgets: dict[str, Budget]
    runs: dict[str, Run]
    admitted: dict[str, Instant]
    status: dict[str, _Status]
    leases: dict[str, Lease]
    reservations: dict[str, Reservation]
    preemptions: dict[str, LeasePreemptionScheduled]
    history: list[Event]
    meter: _Meter
    clock: Instant
    version: int
    funding_epoch: int
    etas: dict[str, Instant] = {}
    channels: dict[str, NotificationChannel] = {}
    retries: dict[str, RunRetried] = {}
    restarts: dict[str, int] = {}


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Snapshot)


def take(state: FleetState, seq: int) -> bytes:
    """Encode ``state`` as folded up to ledger sequence ``seq``."""
    m = state.meter
    snap = Snapshot(
        seq=seq,
        settings_period_hours=state.settings_period_hours,
        nodes=state.nodes,
        budgets=state.budgets,
        runs=state.runs,
        admitted=state.admitted,
        status={
            k: _Status(v.phase, v.reason, v.message, dict(v.detail))
            for k, v in state.status.items()
        },
        leases=state.leases,
        reservations=state.reservations,
        preemptions=state.preemptions,
        history=state.history,
        meter=_Meter(
            t=m.t,
            envelope_hours=sorted(m.envelope_hours.items()),
            envelope_class_hours=sorted(
                (k, c, h) for k, by in m.envelope_class_hours.items() for c, h in by.items()
            ),
            # Encoded as they are (msgspec writes a defaultdict as a dict): a copy per run was
            # most of a snapshot at 5k runs, under the writer's lock.
            cap_hours=m.cap_hours,
            run_hours=m.run_hours,
            run_lender_hours=m.run_lender_hours,
            previously_funded=sorted(m.previously_funded),
        ),
        clock=state.clock,
        version=state.version,
        funding_epoch=state.funding_epoch,
        etas=state.etas,
        channels=state.channels,
        retries=state.retries,
        restarts=state.restarts,
    )
    return _ENCODER.encode(snap)


def restore(data: bytes) -> tuple[FleetState, int] | None:
    """The state and its sequence, or ``None`` for an unreadable or foreign-format snapshot."""
    try:
        snap = _DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if snap.format != FORMAT:
        return None
    meter = Meter(t=snap.meter.t)
    for key, hours in snap.meter.envelope_hours:
        meter.envelope_hours[key] = hours
    for key, cls, hours in snap.meter.envelope_class_hours:
        meter.envelope_class_hours[key][cls] = hours
    meter.cap_hours.update(snap.meter.cap_hours)
    for run, by_cls in snap.meter.run_hours.items():
        meter.run_hours[run].update(by_cls)
    for run, by_owner in snap.meter.run_lender_hours.items():
        meter.run_lender_hours[run].update(by_owner)
    meter.previously_funded = frozenset(snap.meter.previously_funded)
    state = FleetState(settings_period_hours=snap.settings_period_hours)
    state.nodes = dict(snap.nodes)
    state.budgets = dict(snap.budgets)
    state.runs = dict(snap.runs)
    state.admitted = dict(snap.admitted)
    state.status = {
        k: RunStatus(v.phase, v.reason, v.message, dict(v.detail)) for k, v in snap.status.items()
    }
    state.leases = dict(snap.leases)
    state.reservations = dict(snap.reservations)
    state.pending_reservations = {
        name: r for name, r in state.reservations.items() if r.state == "Pending"
    }
    state.preemptions = dict(snap.preemptions)
    state.history = list(snap.history)
    state.meter = meter
    state.clock = snap.clock
    state.version = snap.version
    state.funding_epoch = snap.funding_epoch
    state.etas = dict(snap.etas)
    state.channels = dict(snap.channels)
    state.retries = dict(snap.retries)
    state.restarts = dict(snap.restarts)
    state.rebuild_indexes()
    return state, snap.seq
