"""Elastic growth and voluntary shrink of Running malleable runs (SPEC §B.14).

**Grow.**  While ``desired > allocated`` the run grows by ``min(desired - allocated, step)`` per
step: the delta is packed *alone* (same group size and spread rule, no spares, preferring the
run's own domains), its groups numbered after the highest group index in use, covered as a
claim of exactly the delta, verified so nothing is born unfunded, and minted as ``Grow`` leases
of a new cohort.  The committer repeats the step at the same instant until the run reaches
``desired`` or is blocked - so a run admitted at its base width grows right after, never before
its base gang exists.  Unlike the reference, a cohort is minted at once, so allocated width
never lags behind emitted work (SPEC §F.2.5 cannot happen).

**Voluntary shrink.**  While ``desired < allocated`` whole groups close (``Shrink``): groups
holding the most non-Owned active GPUs first (borrowed and unfunded width goes before the run's
own), then the highest index; a group is only closed if that does not take the run below the
target.  If whole groups cannot hit the target exactly, the run says so and keeps what it has.

Both write only commentary (message) updates: a grow or a voluntary shrink does not change the
run's state (SPEC §A.6).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from gpu_fleet.core.engine.gang import (
    Settings,
    commentary,
    cover_run,
    domain_of,
    first_location,
    mint_leases,
    plan_pack,
    verify_funded,
)
from gpu_fleet.core.funding.cover import CoverFailure
from gpu_fleet.core.ledger.events import Event, LeaseClosed, LeaseMinted
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import FundingClass, Instant, Lease, LeaseRole, MintReason, Run
from gpu_fleet.core.placement.pack import PackError, Planner
from gpu_fleet.core.placement.topology import TopologyError


@dataclass
class ElasticStep:
    """One grow or shrink step: its events, and whether the run's width changed."""

    events: list[Event] = field(default_factory=list)
    progressed: bool = False


def elastic_step(
    state: FleetState, run: Run, now: Instant, planner: Planner, settings: Settings
) -> ElasticStep:
    """One step toward the run's desired width (nothing for a fixed-width or idle run)."""
    m = run.spec.malleable
    st = state.status.get(run.key)
    if m is None or st is None or st.phase != "Running":
        return ElasticStep()
    held = state.leases_of(run.key, open_only=True)
    allocated = sum(x.width for x in held if x.role is LeaseRole.ACTIVE)
    desired = run.desired_width
    if desired > allocated:
        delta = min(desired - allocated, m.step_gpus)
        return _grow(
            state,
            run,
            held=held,
            allocated=allocated,
            delta=delta,
            now=now,
            planner=planner,
            settings=settings,
        )
    if desired < allocated:
        return _shrink(state, run, held=held, allocated=allocated, target=desired, now=now)
    return ElasticStep()


def _waiting(state: FleetState, run: Run, now: Instant, why: str) -> ElasticStep:
    return ElasticStep([commentary(state, run.key, now, f"waiting to grow: {why}")])


def _grow(
    state: FleetState,
    run: Run,
    *,
    held: list[Lease],
    allocated: int,
    delta: int,
    now: Instant,
    planner: Planner,
    settings: Settings,
) -> ElasticStep:
    offset = 1 + max((x.group for x in held), default=-1)
    domains = sorted({domain_of(state, x.node) for x in held if x.role is LeaseRole.ACTIVE})
    try:
        topology, _, packed = plan_pack(
            state,
            run,
            planner,
            width=delta,
            spares=False,
            group_index_offset=offset,
            preferred_domains=domains,
        )
    except TopologyError as exc:
        return _waiting(state, run, now, str(exc))
    if isinstance(packed, PackError):
        return _waiting(state, run, now, packed.message)
    result = cover_run(
        state,
        run,
        quantity=delta,
        location=first_location(topology, packed),
        now=now,
        settings=settings,
    )
    if isinstance(result, CoverFailure):
        return _waiting(state, run, now, result.message)
    cohort = 1 + max((x.cohort for x in state.leases_of(run.key)), default=0)
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, packed, segments, now, MintReason.GROW, cohort=cohort)
    problem = verify_funded(state, run, leases, now, result.borrowed > 0)
    if problem:
        return _waiting(state, run, now, problem)
    events: list[Event] = [LeaseMinted(at=now, lease=x) for x in leases]
    events.append(commentary(state, run.key, now, f"grew to {allocated + delta} GPUs"))
    return ElasticStep(events, True)


def _shrink(
    state: FleetState,
    run: Run,
    *,
    held: list[Lease],
    allocated: int,
    target: int,
    now: Instant,
) -> ElasticStep:
    ev = state.evaluation(now)
    by_group: dict[int, list[Lease]] = defaultdict(list)
    for x in held:
        by_group[x.group].append(x)

    def non_owned(group: int) -> int:
        return sum(
            x.width
            for x in by_group[group]
            if x.role is LeaseRole.ACTIVE and ev.lease_class(x.id) is not FundingClass.OWNED
        )

    order = sorted(by_group, key=lambda g: (-non_owned(g), -g))
    events: list[Event] = []
    width = allocated
    for group in order:
        if width <= target:
            break
        active = sum(x.width for x in by_group[group] if x.role is LeaseRole.ACTIVE)
        if active == 0 or width - active < target:
            continue
        events.extend(
            LeaseClosed(at=now, lease=x.id, reason="Shrink")
            for x in sorted(by_group[group], key=lambda x: x.id)
        )
        width -= active
    if width != target:
        events.append(
            commentary(
                state,
                run.key,
                now,
                "unable to shrink: insufficient groups available to reach target width "
                f"{target} (holding {width} GPUs)",
            )
        )
    else:
        events.append(commentary(state, run.key, now, f"shrunk to {width} GPUs"))
    return ElasticStep(events, width != allocated)
