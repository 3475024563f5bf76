"""Node failure: spare swaps, the no-spare path and checkpoint grace (SPEC §B.13).

A node *fails* only when it is fenced (deleted, or tainted out-of-service).  A cordon is not a
failure (SPEC §F.1.4, DESIGN decision 7): it only stops new work landing there, which topology
already handles, so nothing here runs for it.

For one fenced node, in order:

1. every open Spare lease on it closes ``NodeFailure`` (the gang is untouched);
2. every open Active lease on it is *decided* on the state before the call, with one funding
   evaluation, so the outcome does not depend on the order the leases are visited in: a swap
   to the first open Spares of the same run and group elsewhere (enough of them to cover the
   failed lease's width - SPEC §F.2.4 - after a slot-exact conflict check on their own slots,
   SPEC §F.1.3), or the no-spare path;
3. verdicts fold worst-wins per run (Running < Pending < Failed).  Only then are events written:
   a run that ends Failed (no spare, no checkpoint) is released whole (``RunFailed``) and does
   no swap - evicting a squatter or burning a spare for a run that stops anyway helps nobody;
   a run with ``spec.runtime.checkpoint`` enters checkpoint grace; the others swap.

Physical slots (DESIGN decision 6) mean a spare's slots are normally its own - the ledger refuses a
second open lease on a held slot - so the conflict check mostly guards ledgers written by older
code.  It is kept exact anyway, because a wrong eviction there would kill funded work.

The replacement lease records as ``mintedPayer`` the envelope that pays for it at the swap instant
(DESIGN decision 9; with the failed lease and the spare closed, that is usually the run's own
envelope), falling back to the spare's own minted payer when the matching funds it nowhere, so the
provenance of a loan that covered the spare is never lost.

During checkpoint grace the run keeps its surviving leases and is topped up - only its lost
groups, each back in its own domain - as soon as capacity and funding allow (``top_up``); at the
deadline it fails ``CheckpointExpired`` and is released.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec

from gpu_fleet.core.engine.gang import (
    Settings,
    checkpoint_deadline,
    checkpoint_seconds,
    cover_run,
    domain_of,
    lease_id,
    mint_leases,
    plan_pack,
    release_reservations,
    status_event,
    verify_funded,
)
from gpu_fleet.core.funding.cover import CoverFailure
from gpu_fleet.core.funding.matching import fill
from gpu_fleet.core.funding.metering import Evaluation
from gpu_fleet.core.ledger.events import Event, LeaseClosed, LeaseMinted, RunStatusChanged
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    MintReason,
    Payer,
    Run,
)
from gpu_fleet.core.placement.pack import GroupPlacement, PackError, PackPlan, Planner
from gpu_fleet.core.placement.topology import TopologyError
from gpu_fleet.core.timeutil import format_instant


@dataclass
class _Swap:
    """An Active lease on the failed node replaced by spares of its run and group."""

    failed: Lease
    spares: list[Lease]  # used in order; together they hold at least ``failed.width`` slots
    evict: list[Lease]  # stale same-run leases and Unfunded squatters on the spares' slots


@dataclass
class _NoSpare:
    failed: Lease
    declined: list[Lease] = field(default_factory=list)  # spares released ``SwapDeclined``


@dataclass
class _Plan:
    """Every decision of one failure call, taken on the state *before* any of them (so the
    outcome does not depend on the order the leases are visited in)."""

    state: FleetState
    node: str
    now: Instant
    evaluation: Evaluation
    casualties: list[Lease] = field(default_factory=list)
    orphans: list[Lease] = field(default_factory=list)
    outcomes: dict[str, list[_Swap | _NoSpare]] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # spares consumed or declined
    evicted: dict[str, Lease] = field(default_factory=dict)


def handle_node_failure(
    state: FleetState, node: str, now: Instant, settings: Settings
) -> list[Event]:
    """Everything that follows from ``node`` failing at ``now`` (empty if it held no lease)."""
    del settings  # the swap path has no tunable today; kept for a stable call shape
    plan = _Plan(state, node, now, state.evaluation(now))
    on_node = sorted((x for x in state.open_leases.values() if x.node == node), key=lambda x: x.id)
    plan.casualties = [x for x in on_node if x.role is LeaseRole.SPARE]
    plan.used.update(x.id for x in plan.casualties)
    for lease in on_node:
        if lease.role is not LeaseRole.ACTIVE:
            continue
        if lease.run not in state.runs:
            plan.orphans.append(lease)
            continue
        plan.outcomes.setdefault(lease.run, []).append(_decide(plan, lease))
    return _emit(plan)


def _decide(plan: _Plan, failed: Lease) -> _Swap | _NoSpare:
    """Swap to the first open spares of the same run and group (enough of them to cover the
    failed lease's width - SPEC §F.2.4), after a slot-exact conflict check on their slots."""
    spares: list[Lease] = []
    covered = 0
    for x in plan.state.leases_of(failed.run, open_only=True):
        if covered >= failed.width:
            break
        if x.role is LeaseRole.SPARE and x.group == failed.group and x.id not in plan.used:
            spares.append(x)
            covered += x.width
    if covered < failed.width:
        return _NoSpare(failed)
    evict: list[Lease] = []
    for spare in spares:
        found = _conflicts(plan, spare)
        if found is None:
            plan.used.add(spare.id)
            return _NoSpare(failed, [spare])
        evict.extend(found)
    plan.used.update(x.id for x in spares)
    for x in evict:
        plan.evicted[x.id] = x
    return _Swap(failed, spares, evict)


def _conflicts(plan: _Plan, spare: Lease) -> list[Lease] | None:
    """Who must leave the spare's exact slots (SPEC §F.1.3), or ``None`` to decline the swap.

    Sharing a node is not a conflict; only a lease holding one of the spare's own slots is.  A
    stale lease of the same run goes; another run's lease goes only if the evaluation calls it
    Unfunded together with all its leases on that machine (a squatter); anything funded makes
    the swap decline.
    """
    state = plan.state
    ev = plan.evaluation
    holders = sorted(
        {h for s in spare.slots if (h := state.slot_holder.get(s)) is not None and h != spare.id}
    )
    out: list[Lease] = []
    for holder_id in holders:
        holder = state.open_leases.get(holder_id)
        if holder is None or holder_id in plan.evicted:
            continue
        if holder.run == spare.run:
            out.append(holder)
            continue
        machine = [x for x in state.leases_of(holder.run, open_only=True) if x.node == holder.node]
        if any(ev.lease_class(x.id) is not FundingClass.UNFUNDED for x in machine):
            return None
        out.extend(x for x in machine if x.id not in plan.evicted)
    return out


def _severity(run: Run, outcomes: Sequence[_Swap | _NoSpare]) -> str:
    """Worst wins (SPEC §B.13 step 4): Running < Pending (checkpoint grace) < Failed."""
    if not any(isinstance(o, _NoSpare) for o in outcomes):
        return "Running"
    return "Pending" if checkpoint_seconds(run) > 0 else "Failed"


def _emit(plan: _Plan) -> list[Event]:
    state, now = plan.state, plan.now
    events: list[Event] = [
        LeaseClosed(at=now, lease=x.id, reason="NodeFailure") for x in plan.casualties
    ]
    events += [LeaseClosed(at=now, lease=x.id, reason="NodeFailure") for x in plan.orphans]
    closed = {x.id for x in plan.casualties} | {x.id for x in plan.orphans}
    minted: list[Lease] = []
    squatters: set[str] = set()

    def close(lease_id: str, reason: str) -> None:
        if lease_id not in closed:
            closed.add(lease_id)
            events.append(LeaseClosed(at=now, lease=lease_id, reason=reason))

    for run_key in sorted(plan.outcomes):
        run = state.runs[run_key]
        outcomes = plan.outcomes[run_key]
        phase = _severity(run, outcomes)
        if phase == "Failed":
            # Released whole; no swap is performed and no squatter is evicted for a run that
            # cannot keep running anyway.
            for o in outcomes:
                close(o.failed.id, "NodeFailure")
                for d in o.declined if isinstance(o, _NoSpare) else ():
                    close(d.id, "SwapDeclined")
            for x in state.leases_of(run_key, open_only=True):
                close(x.id, "RunFailed")
            events.append(
                status_event(
                    run_key,
                    now,
                    "Failed",
                    "NodeFailureNoSpare",
                    f"node {plan.node} failed without spare coverage",
                )
            )
            events.extend(release_reservations(state, run_key, now, "run failed"))
            continue
        swapped: list[int] = []
        lost: dict[str, int] = {}
        for o in outcomes:
            if isinstance(o, _NoSpare):
                close(o.failed.id, "NodeFailure")
                for d in o.declined:
                    close(d.id, "SwapDeclined")
                lost[str(o.failed.group)] = lost.get(str(o.failed.group), 0) + o.failed.width
                continue
            for x in o.evict:
                close(x.id, "ReclaimedBySpare")
                if x.run != run_key:
                    squatters.add(x.run)
            for spare in o.spares:
                close(spare.id, "Swap")
            close(o.failed.id, "NodeFailure")
            for lease in _replacements(state, o, now, minted, closed):
                minted.append(lease)
                events.append(LeaseMinted(at=now, lease=lease))
            swapped.append(o.failed.group)
        status = _survivor_status(plan, run, phase, swapped, lost)
        if status is not None:
            events.append(status)
    for run_key in sorted(squatters - set(plan.outcomes)):
        events.extend(_settle_squatter(plan, run_key, closed))
    return events


def _survivor_status(
    plan: _Plan, run: Run, phase: str, swapped: Sequence[int], lost: Mapping[str, int]
) -> RunStatusChanged | None:
    current = plan.state.status.get(run.key)
    if phase == "Running":
        if current is not None and current.reason == "CheckpointGrace":
            return None  # a run in checkpoint grace that swaps another group keeps its grace
        groups = ", ".join(str(g) for g in sorted(set(swapped)))
        return status_event(
            run.key,
            plan.now,
            "Running",
            "GangBound",
            f"group {groups} swapping to spare after node {plan.node} failure",
        )
    earlier = checkpoint_deadline(plan.state, run.key)
    deadline = plan.now + checkpoint_seconds(run)
    if earlier is not None:
        deadline = min(deadline, earlier)
    merged = _lost_groups(current.detail) if current is not None else {}
    for g, w in lost.items():
        merged[g] = merged.get(g, 0) + w
    return status_event(
        run.key,
        plan.now,
        "Pending",
        "CheckpointGrace",
        f"node {plan.node} failed without spare coverage; checkpoint grace until "
        f"{format_instant(deadline)}",
        checkpointDeadline=deadline,
        lostGroups=merged,
    )


def _settle_squatter(plan: _Plan, run_key: str, closed: Collection[str]) -> list[Event]:
    """A squatter keeps running on what it has left, or goes back to Pending whole."""
    run = plan.state.runs.get(run_key)
    if run is None:
        return []
    left = [x for x in plan.state.leases_of(run_key, open_only=True) if x.id not in closed]
    width = sum(x.width for x in left if x.role is LeaseRole.ACTIVE)
    if width >= run.min_width and width > 0:
        return []
    events: list[Event] = [
        LeaseClosed(at=plan.now, lease=x.id, reason="ReclaimedBySpare") for x in left
    ]
    events.append(
        status_event(
            run_key,
            plan.now,
            "Pending",
            "Reclaimed",
            "reclaimed by a node-failure swap; will re-admit when capacity allows",
        )
    )
    events.extend(release_reservations(plan.state, run_key, plan.now, "Reclaimed"))
    return events


def _replacements(
    state: FleetState,
    swap: _Swap,
    now: Instant,
    minted: Sequence[Lease],
    closed: Collection[str],
) -> list[Lease]:
    """Active leases on the spares' slots (reason ``Swap``), exactly the failed lease's width.

    A spare wider than what is still needed is split: the needed slots become Active, the rest
    stays a Spare of the same group and payer, so no insurance is silently lost.
    """
    failed = swap.failed
    counter = state.lease_count(failed.run) + sum(1 for x in minted if x.run == failed.run)
    admitted = state.admitted.get(failed.run, now)
    need = failed.width
    out: list[Lease] = []
    for spare in swap.spares:
        take = min(need, spare.width)
        need -= take
        draft = Lease(
            id=lease_id(failed.run, admitted, counter),
            run=failed.run,
            node=spare.node,
            slots=spare.slots[:take],
            role=LeaseRole.ACTIVE,
            group=failed.group,
            reason=MintReason.SWAP,
            cohort=failed.cohort,
            start=now,
            end=failed.end,
        )
        counter += 1
        payer = _payer_at_swap(state, draft, [*minted, *out], closed, spare)
        out.append(msgspec.structs.replace(draft, minted_payer=payer))
        if take < spare.width:
            out.append(
                Lease(
                    id=lease_id(failed.run, admitted, counter),
                    run=failed.run,
                    node=spare.node,
                    slots=spare.slots[take:],
                    role=LeaseRole.SPARE,
                    group=spare.group,
                    reason=MintReason.SWAP,
                    cohort=spare.cohort,
                    minted_payer=spare.minted_payer,
                    start=now,
                    end=spare.end,
                )
            )
            counter += 1
    return out


def _payer_at_swap(
    state: FleetState,
    draft: Lease,
    minted: Sequence[Lease],
    closed: Collection[str],
    spare: Lease,
) -> Payer | None:
    """The envelope the matching gives the replacement at the swap instant, else the spare's
    own minted payer (a loan that covered the spare is not lost by the swap)."""
    inputs = state.funding_inputs()
    live = [x for x in inputs.leases if x.id not in closed]
    live += [x for x in minted if x.id not in closed]
    view = state.meter.hours_view(inputs.index, inputs.period_hours)
    result = fill(
        inputs.index,
        [*live, draft],
        inputs.runs,
        inputs.admitted,
        inputs.node_labels,
        draft.start,
        view,
    )
    key = result.payer.get(draft.id)
    if key is not None:
        return inputs.index.envelopes[key].payer
    return spare.minted_payer


def _lost_groups(detail: Mapping[str, object]) -> dict[str, int]:
    """The ``lostGroups`` a checkpoint-grace status carries: group index (text) -> GPUs lost."""
    raw = detail.get("lostGroups")
    if not isinstance(raw, dict):
        return {}
    return {str(g): int(w) for g, w in raw.items() if isinstance(w, int)}


# ------------------------------------------------------------------------------------------
# Checkpoint grace: topping a run back up to its width
# ------------------------------------------------------------------------------------------


@dataclass
class TopUp:
    events: list[Event]
    started: bool


def top_up(
    state: FleetState, run: Run, now: Instant, planner: Planner, settings: Settings
) -> TopUp | None:
    """Re-place only the groups a run in checkpoint grace lost; ``None`` when not applicable.

    Surviving spares are kept but never count as width (SPEC §F.1.2): runnability is judged on
    the active GPUs after assembly, grown groups included.

    Each lost group is packed alone: back into the domain where the rest of it still runs, or
    (fully lost) into any single domain - the run's own when it may not spread.  The whole
    top-up is covered and verified as one claim, then minted ``Start`` under the lost group
    indices, so group identity survives (SPEC §F.1.5).  Nothing fits → the run keeps waiting.
    """
    st = state.status.get(run.key)
    held = state.leases_of(run.key, open_only=True)
    actives = [x for x in held if x.role is LeaseRole.ACTIVE]
    if st is None or st.reason != "CheckpointGrace" or not held:
        return None  # holding nothing: ordinary admission re-admits the whole gang
    lost = {int(g): w for g, w in _lost_groups(st.detail).items() if w > 0 and g.isdigit()}
    if not lost:
        return None
    try:
        plans = _pack_lost(state, run, planner, lost, actives)
    except TopologyError:
        return TopUp([], False)
    if plans is None:
        return TopUp([], False)
    quantity = sum(g.size for g in plans.groups)
    if sum(x.width for x in actives) + quantity < run.min_width:
        return TopUp([], False)  # re-placing the lost groups would still not make it runnable
    result = cover_run(
        state,
        run,
        quantity=quantity,
        location=_plan_location(state, plans),
        now=now,
        settings=settings,
    )
    if isinstance(result, CoverFailure):
        return TopUp([], False)
    segments = [(s.payer.key, s.payer.owner, s.quantity) for s in result.segments]
    leases = mint_leases(state, run, plans, segments, now)
    if verify_funded(state, run, leases, now, result.borrowed > 0):
        return TopUp([], False)
    events: list[Event] = [LeaseMinted(at=now, lease=x) for x in leases]
    width = sum(x.width for x in actives) + quantity
    events.append(
        status_event(
            run.key,
            now,
            "Running",
            "GangBound",
            f"re-assembled {width} GPUs after node failure; checkpoint grace ended",
        )
    )
    events.extend(release_reservations(state, run.key, now, "Superseded"))
    return TopUp(events, True)


def _pack_lost(
    state: FleetState,
    run: Run,
    planner: Planner,
    lost: dict[int, int],
    actives: Sequence[Lease],
) -> PackPlan | None:
    domains_of: dict[int, set[str]] = defaultdict(set)
    for x in actives:
        domains_of[x.group].add(domain_of(state, x.node))
    run_domains = sorted({d for ds in domains_of.values() for d in ds})
    loc = run.spec.locality
    spread = loc.allow_cross_group_spread if loc is not None else True
    taken: set[str] = set()
    groups: list[GroupPlacement] = []
    for group in sorted(lost):
        own = sorted(domains_of.get(group, set()))
        preferred: Collection[str] = own or ([] if spread else run_domains)
        _, _, packed = plan_pack(
            state,
            run,
            planner,
            width=lost[group],
            spares=False,
            excluded=taken,
            group_index_offset=group,
            preferred_domains=tuple(preferred),
            single_domain=True,
            one_group=True,
        )
        if isinstance(packed, PackError):
            return None
        groups.extend(packed.groups)
        taken.update(packed.slots())
    return PackPlan(groups=tuple(groups), total_gpus=sum(g.size for g in groups), total_spares=0)


def _plan_location(state: FleetState, plan: PackPlan) -> dict[str, str] | None:
    """Cover's location hint for a plan assembled from several partial plans."""
    if not plan.groups or not plan.groups[0].allocations:
        return None
    labels = state.nodes[plan.groups[0].allocations[0].node].labels
    return {k: labels[k] for k in ("region", "cluster", "fabric.domain") if k in labels}
