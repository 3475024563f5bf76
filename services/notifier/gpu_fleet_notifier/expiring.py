"""Deadlines that are not ledger events: a lease nearing its scheduled end.

"Now" is given (the wall clock or the ledger clock, the actor decides); the functions here are
pure in the folded state and that instant, so a notifier on the ledger clock re-derives exactly
which warnings it already gave after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.model import Instant, Lease
from gpu_fleet.messages import notify
from gpu_fleet_notifier.derive import lease_detail, team_of


def expiring(
    state: FleetState, now: Instant, lead: int, warned: Mapping[str, Instant]
) -> list[Lease]:
    """Open leases whose scheduled end is within ``lead`` of ``now`` and not yet announced.

    A lease already past its end is left to its closure (``lease-closed``, reason Expired).
    """
    return sorted(
        (
            x
            for x in state.open_leases.values()
            if x.end is not None and x.end - lead <= now < x.end and warned.get(x.id) != x.end
        ),
        key=lambda x: (x.end or 0, x.id),
    )


def expiring_note(state: FleetState, lease: Lease, now: Instant, seq: int) -> notify.Notification:
    end = lease.end or now
    return notify.Notification(
        id=f"lease-expiring:{lease.id}:{end}",
        team=team_of(state, lease.run),
        event="lease-expiring",
        run=lease.run,
        lease=lease.id,
        at=now,
        detail={"end": end, "remainingSeconds": end - now, **lease_detail(lease)},
        seq=seq,
    )
