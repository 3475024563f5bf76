"""Decision log lines carry the run, lease, envelope and reservation they are about."""

from __future__ import annotations

from test_fleet_map import example_fleet

from gpu_fleet.core.ledger import LeaseMinted, ReservationCreated, RunStatusChanged
from gpu_fleet.views.log_context import event_context


def test_every_event_of_a_real_history_names_what_it_is_about() -> None:
    fleet, _ = example_fleet()
    history = fleet.state.history
    assert history
    for event in history:
        ctx = event_context(event)
        assert ctx["type"] == type(event).__name__
        assert ctx["at"] == event.at
        assert None not in ctx.values()
        assert {"run", "lease", "budget", "node", "reservation"} & set(ctx), ctx
    minted = next(e for e in history if isinstance(e, LeaseMinted))
    ctx = event_context(minted)
    assert ctx["run"] == minted.lease.run
    assert ctx["lease"] == minted.lease.id
    payer = minted.lease.minted_payer
    assert payer is not None
    assert ctx["envelope"] == str(payer.key)
    status = next(e for e in history if isinstance(e, RunStatusChanged))
    assert event_context(status)["reason"] == status.reason
    created = next(e for e in history if isinstance(e, ReservationCreated))
    assert event_context(created)["reservation"] == created.reservation.name
