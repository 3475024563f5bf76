"""A reservation's remedies as the full funding summaries give them (the reference for
``reservation._remedies``, which reads the matching alone since issue 11)."""

from __future__ import annotations

from gpu_fleet.core.funding.metering import Evaluation
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import FundingClass, Run


def reference_remedies(state: FleetState, run: Run, ev: Evaluation) -> tuple[str, ...]:
    """The remedies as they were computed from the full evaluation (before issue 11)."""
    out: list[str] = []
    flavor_envs = [u for u in ev.envelopes.values() if u.flavor == run.flavor]
    unfunded = any(
        state.open_leases[lid].run != run.key
        and ev.lease_class(lid) is FundingClass.UNFUNDED
        and state.runs.get(state.open_leases[lid].run) is not None
        and state.runs[state.open_leases[lid].run].flavor == run.flavor
        for lid in ev.fill.funding_class
    )
    if unfunded:
        out.append("Reclaim unfunded capacity in scope")
    if any(u.spare > 0 for u in flavor_envs):
        out.append("Drop spares in scope")
    if any(key != run.key for key in state.malleable_runs.get(run.flavor, ())):
        out.append("Shrink elastic runs by step size")
    out.append("Run fair lottery if deficit remains")
    return tuple(out)
