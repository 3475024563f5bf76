"""The ledger's events: every state change, immutable, in one tagged union.

The manager publishes these to the JetStream stream ``FLEET``; the scenario runner applies them in
memory.  Time comes *from the events* (``at``), which is what makes a replay reproduce every
decision.

Evolution rules for this message family (msgspec tagged union on ``type``):

* new fields get defaults and are appended; a field's type never changes;
* decoders do not forbid unknown fields, so an older service reads a newer event;
* an event type is never reused for a different meaning.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from gpu_fleet.core.model import (
    Budget,
    Instant,
    Lease,
    Node,
    NodeHealth,
    NotificationChannel,
    Run,
)


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    at: Instant


class NodeRegistered(_Event, tag="NodeRegistered", kw_only=True, frozen=True):
    node: Node


class NodeHealthChanged(_Event, tag="NodeHealthChanged", kw_only=True, frozen=True):
    node: str
    health: NodeHealth


class BudgetApplied(_Event, tag="BudgetApplied", kw_only=True, frozen=True):
    budget: Budget


class BudgetDeleted(_Event, tag="BudgetDeleted", kw_only=True, frozen=True):
    namespace: str
    name: str


class RunSubmitted(_Event, tag="RunSubmitted", kw_only=True, frozen=True):
    run: Run


class RunUpdated(_Event, tag="RunUpdated", kw_only=True, frozen=True):
    run: Run


class RunDeleted(_Event, tag="RunDeleted", kw_only=True, frozen=True):
    run: str


class RunEtaReported(_Event, tag="RunEtaReported", kw_only=True, frozen=True):
    """A run's expected completion (``kubectl runs eta``); the forecaster plans with it."""

    run: str
    eta: Instant
    source: Literal["job", "controller"] = "job"


RunPhase = Literal["Pending", "Waiting", "Running", "Completed", "Failed"]


class RunStatusChanged(_Event, tag="RunStatusChanged", kw_only=True, frozen=True):
    """A run's state: the reason names the state (SPEC §A.6), the phase is derived from it."""

    run: str
    phase: RunPhase
    reason: str
    message: str = ""
    detail: dict[str, object] = msgspec.field(default_factory=dict)


class LeaseMinted(_Event, tag="LeaseMinted", kw_only=True, frozen=True):
    lease: Lease


class LeaseClosed(_Event, tag="LeaseClosed", kw_only=True, frozen=True):
    lease: str
    reason: str


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    run: str
    kind: Literal["capacity", "window", "budget"]
    state: Literal["Pending", "Released", "Failed", "BlockedFunding"] = "Pending"
    domain: str = ""
    nodes: tuple[str, ...] = ()
    paying_envelope: str = ""
    earliest_start: Instant
    deficit_gpus: int = 0
    confidence: str = "conservative"
    reason: str = ""
    remedies: tuple[str, ...] = ()
    created_at: Instant
    released_at: Instant | None = None

    @property
    def holds_slice(self) -> bool:
        """Does this wait keep others out of its intended slice (DESIGN decision 5)?

        A capacity wait does, and so does a window wait that is also short of GPUs in its
        slice (``deficit_gpus > 0``): it activates when the window opens and the resolver makes
        room then, so backfill must not fill that room meanwhile.  A budget-only wait, or a
        window wait with the capacity already there, holds nothing.
        """
        return self.kind != "budget" and self.deficit_gpus > 0 and bool(self.nodes)


class ReservationCreated(_Event, tag="ReservationCreated", kw_only=True, frozen=True):
    reservation: Reservation


class ReservationReleased(_Event, tag="ReservationReleased", kw_only=True, frozen=True):
    name: str
    state: Literal["Released", "Failed"] = "Released"
    reason: str = ""


class LeasePreemptionScheduled(_Event, tag="LeasePreemptionScheduled", kw_only=True, frozen=True):
    """The resolver chose a lease to free capacity for someone else (DESIGN decision 3).

    Preemption comes with notice: this event is the notice, and the lease closes with ``reason``
    at ``deadline`` (the same instant when the effective grace is zero).  The attested lottery
    ``seed`` and the ``conflict_set`` (every lease the same resolution cut, sorted) are kept here,
    on the ledger, so ``explain``, the notifier and a replay all see exactly what was decided and
    why - the closure event itself only carries the reason.
    """

    lease: str
    run: str
    deadline: Instant
    reason: str  # the closure reason applied at the deadline, e.g. "RandomPreempt(0x...)"
    kind: Literal["ReclaimUnfunded", "DropSpare", "Shrink", "Lottery"]
    seed: str
    conflict_set: tuple[str, ...] = ()
    beneficiary: str = ""  # run key of the demand the cut makes room for
    source: str = ""  # the reservation (or admitting run) that ran the resolver


class LeasePreemptionCanceled(_Event, tag="LeasePreemptionCanceled", kw_only=True, frozen=True):
    """A noticed preemption that will not happen: its beneficiary no longer needs the room
    (deleted, finished, or started without it).  The lease stays open and may be chosen again."""

    lease: str
    reason: str = ""


class RunRetried(_Event, tag="RunRetried", kw_only=True, frozen=True):
    """A workload pod failed under ``failurePolicy: Retry`` with retries left: attempt
    ``attempt`` (1 = the first retry) restarts the gang on the same leases at ``retry_after``
    (``backoff`` doubled per retry).  On the ledger so a replay counts retries exactly as
    decided, and a retry reported twice (two bridges, a replayed pass) counts once."""

    run: str
    attempt: int
    retry_after: Instant
    pod: str = ""  # the pod whose failure this is (informational)


class RunRestarted(_Event, tag="RunRestarted", kw_only=True, frozen=True):
    """The backoff of retry ``attempt`` is over: the gang's pods are created again."""

    run: str
    attempt: int


class ChannelApplied(_Event, tag="ChannelApplied", kw_only=True, frozen=True):
    """A NotificationChannel created or changed.  It carries the secret's *reference* only."""

    channel: NotificationChannel


class ChannelDeleted(_Event, tag="ChannelDeleted", kw_only=True, frozen=True):
    namespace: str
    name: str


Event = (
    NodeRegistered
    | NodeHealthChanged
    | BudgetApplied
    | BudgetDeleted
    | RunSubmitted
    | RunUpdated
    | RunDeleted
    | RunEtaReported
    | RunStatusChanged
    | LeaseMinted
    | LeaseClosed
    | ReservationCreated
    | ReservationReleased
    | LeasePreemptionScheduled
    | LeasePreemptionCanceled
    | ChannelApplied
    | ChannelDeleted
    | RunRetried
    | RunRestarted
)

EVENT_ENCODER = msgspec.json.Encoder()
EVENT_DECODER = msgspec.json.Decoder(Event)
