"""Shared building blocks of every decision that places, funds, mints or releases a gang.

Admission, reservation activation, the resolver, node-failure swaps, checkpoint top-ups and
elastic growth all lower a run to a pack request, plan it on a topology snapshot of the folded
ledger, check who pays, and mint or close leases.  They live here, at the bottom of the engine
package, so that the decision modules (``admission``, ``activation``, ``resolver``, ``failures``,
``elastic``) and the ``Fleet`` committer share one implementation without importing each other
in a cycle.

Everything here is pure: it reads ``FleetState`` and returns values or events.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice

from gpu_fleet.core.funding.cover import CoverFailure, CoverPlan, CoverRequest, cover
from gpu_fleet.core.funding.envelopes import location_of
from gpu_fleet.core.funding.incremental import extend_fill
from gpu_fleet.core.funding.matching import fill
from gpu_fleet.core.ledger.events import (
    Event,
    LeaseClosed,
    ReservationReleased,
    RunPhase,
    RunStatusChanged,
)
from gpu_fleet.core.ledger.reservation_line import SliceEntry
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    LOCATION_KEYS,
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    MintReason,
    Run,
)
from gpu_fleet.core.placement.pack import PackError, PackPlan, PackRequest, Planner
from gpu_fleet.core.placement.topology import Topology
from gpu_fleet.core.timeutil import parse_duration

_ACTIVATION = operator.itemgetter(0, 1)  # a SliceEntry's (earliest start, name)

TERMINAL = ("Completed", "Failed")


@dataclass(frozen=True)
class Settings:
    """Cluster settings (seconds); defaults match scenario-format.md."""

    accounting_period: int = 86400
    preemption_grace: int = 0
    preemption_grace_max: int = 3600
    activation_lead: int = 900
    activation_lead_per_gpu: int = 30
    window_activation_delay: int = 10

    @property
    def period_hours(self) -> float:
        return self.accounting_period / 3600.0


def status_event(
    run: str, at: Instant, phase: str, reason: str, message: str, **detail: object
) -> RunStatusChanged:
    """A run's new state; the phase literal is checked by the ledger's decoder, not here."""
    return RunStatusChanged(
        at=at,
        run=run,
        phase=phase,  # type: ignore[arg-type]
        reason=reason,
        message=message,
        detail=dict(detail),
    )


def commentary(state: FleetState, run: str, at: Instant, message: str) -> RunStatusChanged:
    """A message-only update (SPEC §A.6): the run keeps its phase, reason and detail."""
    cur = state.status.get(run)
    phase: RunPhase = cur.phase if cur is not None else "Pending"
    reason = cur.reason if cur is not None else ""
    detail = dict(cur.detail) if cur is not None else {}
    return RunStatusChanged(
        at=at, run=run, phase=phase, reason=reason, message=message, detail=detail
    )


def reserved_slots(state: FleetState, run_key: str, topology: Topology) -> frozenset[str]:
    """Backfill protection (DESIGN decision 5): free slots of other runs' intended slices.

    A pending reservation that waits for capacity closes its slice to every other run, except
    to a run whose ``maxDuration`` runs out before the reservation's earliest start (it is gone
    before the room is needed), to a run whose *own* reservation in that slice came first
    (``protects``), and to a run whose own reservation is due now and comes first in activation
    order (earliest start, then name).  The first-comer exception is work conservation: room
    that frees in a slice goes at once to the reservation that was promised the slice first,
    if it fits, not at its bound; a later comer waits behind it (it would delay it).  The due
    exception keeps two reservations falling due together from keeping each other out of the
    room the resolver just made for them.  Only waits with a physical deficit hold a slice
    (``Reservation.holds_slice``).
    """
    closed = closed_slices(state, run_key)
    if not closed:
        return frozenset()
    # keyed by the snapshot itself (not its id: a hypothetical one may be freed and its id
    # reused within the same ledger version)
    cache: dict[tuple[Topology, object], frozenset[str]] = state.cached(
        f"reserved_slots:{topology.flavor}", dict
    )
    key = (topology, "all" if closed is state.slice_keys() else closed)
    hit = cache.get(key)
    if hit is None:
        held: set[str] = set()
        for nodes in closed:
            for node in nodes:
                held.update(topology.free_slots(node) if topology.has_node(node) else ())
        hit = cache[key] = frozenset(held)
    return hit


def closed_slices(state: FleetState, run_key: str) -> tuple[tuple[str, ...], ...]:
    """The intended slices (their node tuples, in slice order) closed to ``run_key`` now:
    ``protects`` over every slice, without walking the long lines of entries.

    In a slice where the run has no entry, ``protects`` is decided by the slice's first entry
    (activation order).  So only the run's own slices (usually one) need the full walk, and
    a run with no scheduled end whose promise is not due finds every slice closed except one
    where its only entry is first in line.  Runs waiting in the same line therefore see the
    same few sets of closed slices, and the slot sets built from them are kept per ledger
    version (``reserved_slots``, ``closed_free``).
    """
    run = state.runs.get(run_key)
    duration = max_duration(run) if run is not None else None
    own = state.pending_reservation(run_key)
    mine = (own.earliest_start, own.name) if own is not None else None
    now = state.clock
    due = mine is not None and mine[0] <= now
    held: dict[tuple[str, ...], int] = {}
    for r in state.pending_of(run_key):
        if r.holds_slice:
            held[tuple(r.nodes)] = held.get(tuple(r.nodes), 0) + 1
    if duration is None and not due:
        opened = set()
        for nodes, n in held.items():
            first = state.first_in_line(nodes)
            if n == 1 and first is not None and first.run == run_key:
                opened.add(nodes)
        keys = state.slice_keys()
        return keys if not opened else tuple(k for k in keys if k not in opened)
    out: list[tuple[str, ...]] = []
    for nodes, entries in state.protected_slices().items():
        if nodes in held:
            if protects(entries, run_key, mine, duration, now):
                out.append(nodes)
            continue
        first = entries[0]
        if mine is not None and due and mine <= (first[0], first[1]):
            continue
        if duration is None or now + duration > first[0]:
            out.append(nodes)
    return tuple(out)


def closed_free(state: FleetState, run_key: str, topology: Topology) -> int:
    """Free GPUs of ``topology`` inside the slices closed to ``run_key`` (counted once each)."""
    return _slices_free(state, closed_slices(state, run_key), topology)


def protected_free(state: FleetState, topology: Topology) -> int:
    """Free GPUs of ``topology`` inside any protected slice: what a run closed out of every
    slice (``closed_slices``) cannot have."""
    return _slices_free(state, state.slice_keys(), topology)


def _slices_free(state: FleetState, closed: tuple[tuple[str, ...], ...], topology: Topology) -> int:
    if not closed:
        return 0
    cache: dict[tuple[Topology, object], int] = state.cached(f"closed_free:{topology.flavor}", dict)
    # every slice closed is the common case: key it cheaply (hashing the slices costs O(nodes))
    key = (topology, "all" if closed is state.slice_keys() else closed)
    hit = cache.get(key)
    if hit is None:
        nodes = {n for slice_nodes in closed for n in slice_nodes if topology.has_node(n)}
        hit = cache[key] = sum(topology.free_gpus(n) for n in nodes)
    return hit


def protects(
    entries: Sequence[SliceEntry],
    run_key: str,
    mine: tuple[Instant, str] | None,
    duration: int | None,
    now: Instant,
) -> bool:
    """Is a slice with these reservations (in activation order) closed to ``run_key`` at ``now``?

    ``mine`` is the run's own pending reservation (earliest start, name), if any.  When that
    reservation is in this slice, the reservations made after it (``SliceEntry.line``: the
    line is the order in which the slice was promised) do not keep the run out: it is ahead of
    them.  Of the rest, the first entry of another run decides: a due run that comes before it
    comes before all of them, and a run that ends before it ends before all of them.  (Letting
    a later comer with a sooner bound in early would undo backfill protection: a small run
    arriving just after a big one gets a shorter lead, hence a sooner bound.)
    """
    stop = len(entries)
    if mine is not None and mine[0] <= now:
        # A due run comes before every entry from its own promise on (activation order), so
        # only the entries ahead of it can keep it out: a bisection, not a walk of the line
        # (an activation in a deep queue walked thousands of entries; issue 11).
        stop = bisect.bisect_left(entries, mine, key=_ACTIVATION)
    own = next((e for e in islice(entries, stop) if e.run == run_key), None)
    if own is None and stop < len(entries):
        # the run's first entry is at its promise (usually ``entries[stop]``) or after it
        own = next((e for e in islice(entries, stop, None) if e.run == run_key), None)
    for bound, _, owner, line in islice(entries, stop):
        if owner == run_key:
            continue
        if own is not None and own.line < line:
            continue  # promised the slice after this run: behind it in line
        return duration is None or now + duration > bound
    return False


def cover_run(
    state: FleetState,
    run: Run,
    *,
    quantity: int,
    location: Mapping[str, str] | None,
    now: Instant,
    settings: Settings,
    conservative: bool = True,
) -> CoverPlan | CoverFailure:
    """Cover ``quantity`` GPUs of ``run`` at ``location`` from the evaluation at ``now``, with
    the GPU-hours left and the run's current borrowing: the one call admission, activation,
    elastic growth and top-ups share (they differ only in what, where and how senior)."""
    matched = state.matching(now)
    borrowed = sum(
        x.width
        for x in state.leases_of(run.key, open_only=True)
        if x.role is LeaseRole.ACTIVE and matched.class_of(x.id) is FundingClass.BORROWED
    )  # what the evaluation's summary of the run says it borrows
    hours = state.meter.hours_view(state.index, settings.period_hours)
    return cover(
        state.index,
        matched,
        CoverRequest(
            run=run,
            quantity=quantity,
            location=location,
            now=now,
            admitted=state.admitted.get(run.key, now),
            conservative=conservative,
            already_borrowed=borrowed,
        ),
        remaining_hours=hours.remaining_envelope,
        remaining_cap_hours=hours.remaining_cap,
        period_hours=settings.period_hours,
    )


def max_duration(run: Run) -> int | None:
    """The run's ``spec.runtime.maxDuration`` in seconds (``None``: no scheduled end)."""
    rt = run.spec.runtime
    if rt is None or rt.max_duration is None:
        return None
    return parse_duration(rt.max_duration)


def snapshot(state: FleetState, flavor: str, released: Collection[str] = ()) -> Topology:
    """The topology of ``flavor`` as the ledger holds it, optionally with ``released`` slots
    counted as free (a hypothetical: "what if these leases were closed?")."""
    current = state.topology(flavor)
    if not released:
        return current
    held: dict[str, set[int]] = {}
    for s in released:
        node, _, ordinal = s.rpartition("#")
        if node not in held:
            held[node] = set(state.held_by_node.get(node, ()))
        held[node].discard(int(ordinal))
    return current.with_nodes(state.skeleton(flavor), held, sorted(held))


def plan_pack(
    state: FleetState,
    run: Run,
    planner: Planner,
    *,
    width: int | None = None,
    spares: bool = True,
    protect_reservations: bool = True,
    released: Collection[str] = (),
    excluded: Collection[str] = (),
    group_index_offset: int = 0,
    preferred_domains: Sequence[str] = (),
    single_domain: bool | None = None,
    one_group: bool = False,
) -> tuple[Topology, PackRequest, PackPlan | PackError]:
    """Pack ``run`` (or ``width`` GPUs of it) on the current snapshot.

    The keyword extras serve the partial plans: ``released`` frees slots hypothetically (reclaim
    for admission checks the run would fit before it cuts anyone), ``excluded`` keeps slots of an
    earlier partial plan out, ``group_index_offset`` numbers grown or topped-up groups after the
    ones in use, ``preferred_domains`` keeps growth in the run's own domains, ``single_domain``
    forces one domain (a topped-up group must rejoin its own), and ``one_group`` packs the width
    as a single group.  Raises ``TopologyError`` for a mislabelled node.
    """
    topology = snapshot(state, run.flavor, released)
    protected = reserved_slots(state, run.key, topology) if protect_reservations else frozenset()
    loc = run.spec.locality
    spread = loc.allow_cross_group_spread if loc is not None else True
    if single_domain is not None:
        spread = not single_domain
    size = None if one_group or loc is None else loc.group_gpus
    request = PackRequest(
        flavor=run.flavor,
        total_gpus=width if width is not None else run.spec.resources.total_gpus,
        group_gpus=size,
        allow_cross_group_spread=spread,
        spares_per_group=run.spec.spares_per_group if spares else 0,
        group_index_offset=group_index_offset,
        preferred_domains=tuple(preferred_domains),
        excluded_slots=protected | frozenset(excluded) if excluded else protected,
    )
    try:
        return topology, request, planner(topology, request)
    except PackError as exc:
        return topology, request, exc


def first_location(topology: Topology, plan: PackPlan) -> dict[str, str] | None:
    """Cover's location hint: the domain labels of the plan's first active node."""
    if not plan.groups or not plan.groups[0].allocations:
        return None
    return location_of(topology.node_labels(plan.groups[0].allocations[0].node))


def scheduled_end(run: Run, at: Instant) -> Instant | None:
    """DESIGN decision 2: a run's leases end at ``maxDuration`` after they start."""
    rt = run.spec.runtime
    if rt is None or rt.max_duration is None:
        return None
    return at + parse_duration(rt.max_duration)


def mint_leases(  # noqa: PLR0917 - positional shape kept for existing callers
    state: FleetState,
    run: Run,
    plan: PackPlan,
    segments: Sequence[tuple[EnvelopeKey | None, str, int]],
    at: Instant,
    reason: MintReason = MintReason.START,
    *,
    cohort: int = 0,
) -> list[Lease]:
    """Walk node allocations and payer segments as two cursors (SPEC §B.7).

    Each lease covers ``min(GPUs left on the node chunk, quantity left in the segment)`` so a
    lease never spans two nodes and is paid by exactly one segment.  ``segments`` are
    (envelope, owner, quantity) in cover's proximity order; an envelope of ``None`` mints with
    no payer (an unfunded start).

    Chunks are walked in the order the funding matching ranks a run's own leases (group index,
    then first slot), not SPEC's "actives, then spares": the first segment (usually the run's
    own envelope) then goes to exactly the leases the matching will offer it first, so the
    payer derived after the mint agrees with the one cover planned.
    """
    index = state.index
    end = scheduled_end(run, at)
    chunks: list[tuple[int, LeaseRole, str, tuple[str, ...]]] = []
    for g in plan.groups:
        chunks.extend((g.index, LeaseRole.ACTIVE, a.node, a.slots) for a in g.allocations)
        chunks.extend((g.index, LeaseRole.SPARE, a.node, a.slots) for a in g.spare_allocations)
    chunks.sort(key=lambda c: (c[0], _first_slot(c[3])))
    seg_iter = iter(segments)
    seg_key, _, seg_left = next(seg_iter, (None, "", 0))
    counter = state.lease_count(run.key)
    admitted = state.admitted.get(run.key, at)
    leases: list[Lease] = []
    for group, role, node, slots in chunks:
        pos = 0
        while pos < len(slots):
            if seg_left <= 0:
                seg_key, _, seg_left = next(seg_iter, (None, "", len(slots) - pos))
            take = min(seg_left, len(slots) - pos)
            payer = index.envelopes[seg_key].payer if seg_key is not None else None
            leases.append(
                Lease(
                    id=lease_id(run.key, admitted, counter),
                    run=run.key,
                    node=node,
                    slots=tuple(slots[pos : pos + take]),
                    role=role,
                    group=group,
                    reason=reason,
                    cohort=cohort,
                    minted_payer=payer,
                    start=at,
                    end=end,
                )
            )
            counter += 1
            pos += take
            seg_left -= take
    return leases


def _first_slot(slots: Sequence[str]) -> tuple[str, int]:
    node, _, ordinal = min(slots, key=_slot_order).rpartition("#")
    return node, int(ordinal)


def _slot_order(s: str) -> tuple[str, int]:
    node, _, ordinal = s.rpartition("#")
    return node, int(ordinal) if ordinal.isdigit() else -1


def lease_id(run_key: str, admitted: Instant, counter: int) -> str:
    """Lease names are unique per run incarnation (SPEC §F.1.9): the admission instant is the
    incarnation nonce, the counter the run's lease count so far."""
    return f"{run_key}@{admitted}#{counter:03d}"


def verify_funded(
    state: FleetState,
    run: Run,
    new: Sequence[Lease],
    now: Instant,
    borrowed: bool,
    *,
    closing: Collection[str] = (),
) -> str:
    """No born-unfunded work, and a loan never displaces anyone (DESIGN decision 9).

    Cover is a fast, conservative planner; this replays the matching with the new leases to be
    sure the ledger will agree with it.  ``closing`` names leases the same decision closes (they
    are left out of the replay).  Returns "" when fine, else the reason.
    """
    inputs = state.funding_inputs(leases=False)  # listed below only if matched afresh
    view = state.meter.hours_view(inputs.index, inputs.period_hours)
    # The ledger's runs with this one as decided (copied only when it differs: O(runs))
    runs: Mapping[str, Run] = (
        state.runs if state.runs.get(run.key) is run else {**state.runs, run.key: run}
    )
    admitted: Mapping[str, Instant] = (
        state.admitted if run.key in state.admitted else {**state.admitted, run.key: now}
    )
    gone = set(closing)

    def current() -> list[Lease]:
        return [x for x in state.funding_inputs().leases if x.id not in gone]

    after = None
    alone = not state.leases_of(run.key, open_only=True)
    base = state.current_fill(now) if not gone else None
    if base is not None and (alone or state.runs.get(run.key) is run):
        # The matching of the world as it stands is known: extend it by the new claims when
        # that is provably what the whole matching would give (``extend_fill``).
        after = extend_fill(
            inputs.index, base, new, runs, admitted, inputs.node_labels, now, view, runs_alone=alone
        )
    if after is None:
        after = fill(
            inputs.index, [*current(), *new], runs, admitted, inputs.node_labels, now, view
        )

    def waits_for_window(lease: Lease) -> bool:
        # preActivation.allowAdmission: planned against an envelope whose window has not opened;
        # the lease is Unfunded until it does, by design (SPEC §A.1), not born unfunded by mistake.
        payer = lease.minted_payer
        info = inputs.index.envelopes.get(payer.key) if payer is not None else None
        return info is not None and info.admits_at(now) and not info.active_at(now)

    unfunded = [x for x in new if after.payer_of(x.id) is None and not waits_for_window(x)]
    if unfunded:
        return f"{sum(x.width for x in unfunded)} GPUs would be born unfunded"
    if borrowed:
        before = (
            state.matching(now)
            if not gone and run.key in state.runs
            else fill(inputs.index, current(), runs, admitted, inputs.node_labels, now, view)
        )
        displaced = [
            lid for lid, env in before.payer.items() if env is not None and after.payer[lid] is None
        ]
        if displaced:
            return "a loan may only use free headroom"
    if not gone and run.key in state.runs:
        state.offer_fill(now, tuple(new), after)
    return ""


def release_reservations(state: FleetState, run: str, at: Instant, reason: str) -> list[Event]:
    """Release every pending reservation of ``run`` (its pointers are cleared with it)."""
    return [
        ReservationReleased(at=at, name=res.name, reason=reason)
        for res in state.pending_by_name(run)
    ]


def fail_events(  # noqa: PLR0917 - positional shape kept for existing callers
    state: FleetState,
    key: str,
    now: Instant,
    reason: str,
    message: str,
    closure: str = "RunFailed",
    *,
    already_closed: Collection[str] = (),
) -> list[Event]:
    """Failed is terminal (DESIGN decision 7): close every open lease of the run, then say so.

    ``already_closed`` names leases the same decision closes earlier in its event list.
    """
    skip = set(already_closed)
    events: list[Event] = [
        LeaseClosed(at=now, lease=lease.id, reason=closure)
        for lease in state.leases_of(key, open_only=True)
        if lease.id not in skip
    ]
    events.append(status_event(key, now, "Failed", reason, message))
    events += release_reservations(state, key, now, "run failed")
    return events


def domain_of(state: FleetState, node: str) -> str:
    """The ``region/cluster/fabric`` key of a node's domain, as topology spells it."""
    labels = state.nodes[node].labels if node in state.nodes else {}
    return "/".join(labels.get(k, "") for k in LOCATION_KEYS)


def effective_grace(run: Run | None, settings: Settings) -> int:
    """DESIGN decision 3: the run's own preemptionGrace up to the cluster cap, else the default."""
    rt = run.spec.runtime if run is not None else None
    if rt is not None and rt.preemption_grace is not None:
        return max(0, min(parse_duration(rt.preemption_grace), settings.preemption_grace_max))
    return max(0, settings.preemption_grace)


def checkpoint_seconds(run: Run) -> int:
    rt = run.spec.runtime
    return parse_duration(rt.checkpoint) if rt is not None else 0


def checkpoint_deadline(state: FleetState, run: str) -> Instant | None:
    """The run's checkpoint-grace deadline, if it is inside one (kept in its status detail)."""
    st = state.status.get(run)
    if st is None or st.phase in TERMINAL:
        return None
    raw = st.detail.get("checkpointDeadline")
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None
