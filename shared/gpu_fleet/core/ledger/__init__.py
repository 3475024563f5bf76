"""The system of record: the ledger's events, the state folded from them, and snapshots of it.

Live state is a deterministic fold of the events (``events`` is the schema and its evolution
rules, ``fold`` the fold and the invariants, ``state`` what is folded with the indexes the fold
keeps - ``reservation_line`` the pending reservations' - and ``snapshot`` a faster start from a
saved fold).

This package must never decide anything: it records decisions and folds them, it makes none.
"""

from gpu_fleet.core.ledger.events import (
    EVENT_DECODER,
    EVENT_ENCODER,
    BudgetApplied,
    BudgetDeleted,
    ChannelApplied,
    ChannelDeleted,
    Event,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionCanceled,
    LeasePreemptionScheduled,
    NodeHealthChanged,
    NodeRegistered,
    Reservation,
    ReservationCreated,
    ReservationReleased,
    RunDeleted,
    RunEtaReported,
    RunPhase,
    RunRestarted,
    RunRetried,
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
)
from gpu_fleet.core.ledger.fold import check_invariants, fold, fold_all
from gpu_fleet.core.ledger.snapshot import Snapshot
from gpu_fleet.core.ledger.state import FleetState, LedgerError, RunStatus

__all__ = [
    "EVENT_DECODER",
    "EVENT_ENCODER",
    "BudgetApplied",
    "BudgetDeleted",
    "ChannelApplied",
    "ChannelDeleted",
    "Event",
    "FleetState",
    "LeaseClosed",
    "LeaseMinted",
    "LeasePreemptionCanceled",
    "LeasePreemptionScheduled",
    "LedgerError",
    "NodeHealthChanged",
    "NodeRegistered",
    "Reservation",
    "ReservationCreated",
    "ReservationReleased",
    "RunDeleted",
    "RunEtaReported",
    "RunPhase",
    "RunRestarted",
    "RunRetried",
    "RunStatus",
    "RunStatusChanged",
    "RunSubmitted",
    "RunUpdated",
    "Snapshot",
    "check_invariants",
    "fold",
    "fold_all",
]
