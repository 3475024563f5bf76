"""Decisions: from the folded state and an instant to the ledger events that should follow.

Every public function here is a *decision*: it reads ``FleetState`` and returns events without
touching anything (admission, reservation, activation, follow, the resolver, failures, elasticity,
and the building blocks they share in ``gang``); ``Fleet`` commits them in memory.  Because
decisions read only folded state and the instant passed in, a replay of the ledger reproduces
every one of them.

This package must never do I/O or read a clock: time is the instant it is given.
"""

from gpu_fleet.core.engine.activation import (
    UNFUNDED_DEMAND,
    Activation,
    activate,
    activate_reservation,
)
from gpu_fleet.core.engine.admission import Admission, admit
from gpu_fleet.core.engine.fleet import CommandError, Fleet
from gpu_fleet.core.engine.follow import follow_gate
from gpu_fleet.core.engine.gang import TERMINAL, Settings

__all__ = [
    "TERMINAL",
    "UNFUNDED_DEMAND",
    "Activation",
    "Admission",
    "CommandError",
    "Fleet",
    "Settings",
    "activate",
    "activate_reservation",
    "admit",
    "follow_gate",
]
