"""Live state folded from the ledger's events: what is there (nodes, budgets, runs, leases,
reservations, the GPU-hour meter), and the indexes and caches the fold keeps current so that
decisions cost what changed (the known matching, topology snapshots, reservation order).

``fold`` (in ``fold``) is the only thing that changes it.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar, cast

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, Place, build_index
from gpu_fleet.core.funding.fill_result import FillResult
from gpu_fleet.core.funding.incremental import extend_fill, rebase_fill, shrink_fill
from gpu_fleet.core.funding.matching import HoursView, fill
from gpu_fleet.core.funding.metering import (
    Evaluation,
    FundingInputs,
    Meter,
    evaluate,
    matching_at,
)
from gpu_fleet.core.ledger.events import (
    Event,
    LeasePreemptionScheduled,
    Reservation,
    RunPhase,
    RunRetried,
)
from gpu_fleet.core.ledger.reservation_line import ReservationLine, SliceEntry
from gpu_fleet.core.ledger.waiting_line import WaitingLine, fenced, parked_need
from gpu_fleet.core.model import (
    Budget,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    Node,
    NotificationChannel,
    Run,
)
from gpu_fleet.core.placement.topology import Skeleton, Topology, compile_nodes, topology_from

_T = TypeVar("_T")


class LedgerError(ValueError):
    """An event that would break an invariant; the fold refuses it and changes nothing."""


@dataclass(frozen=True)
class _KnownFill:
    """A matching known to hold: at ``at``, for the funding inputs of ``epoch`` plus the mints
    of ``pending`` (a decision's check, before its commit), under the meter at ``meter_t`` or
    (``advanced``) under a copy of it advanced to ``at``.  Where GPU-hours are set, one under
    an earlier meter is used only once shown to hold under the meter as it stands
    (``incremental.rebase_fill``)."""

    at: float
    epoch: int
    meter_t: float
    advanced: bool
    pending: tuple[Lease, ...]
    fill: FillResult


@dataclass
class RunStatus:
    phase: RunPhase = "Pending"
    reason: str = ""
    message: str = ""
    detail: dict[str, object] = field(default_factory=dict)


@dataclass
class FleetState(ReservationLine):
    """Live state folded from the ledger.  Only ``fold`` mutates it."""

    settings_period_hours: float = 24.0
    nodes: dict[str, Node] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    admitted: dict[str, Instant] = field(default_factory=dict)
    status: dict[str, RunStatus] = field(default_factory=dict)
    leases: dict[str, Lease] = field(default_factory=dict)
    open_leases: dict[str, Lease] = field(default_factory=dict)
    slot_holder: dict[str, str] = field(default_factory=dict)  # slot -> open lease id
    reservations: dict[str, Reservation] = field(default_factory=dict)
    # lease id -> the notice its preemption was given; kept after closure for explain/audit
    preemptions: dict[str, LeasePreemptionScheduled] = field(default_factory=dict)
    etas: dict[str, Instant] = field(default_factory=dict)  # run -> reported completion
    # run -> its latest retry (failurePolicy Retry), and the attempt whose backoff is over
    retries: dict[str, RunRetried] = field(default_factory=dict)
    restarts: dict[str, int] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    meter: Meter = field(default_factory=lambda: Meter(t=0.0))
    clock: Instant = 0
    version: int = 0  # bumped by every fold: the key of the caches below
    funding_epoch: int = 0  # bumped by every fold that can change who pays (see _NEUTRAL)
    # The last matching known to hold for the open leases (see ``known_fill``).
    _known: _KnownFill | None = field(default=None, repr=False)
    # ``open_leases`` as a tuple for ``funding_inputs``, until a lease is minted or closed (an
    # admission asks for the inputs several times between two folds).
    _open_tuple: tuple[Lease, ...] | None = field(default=None, repr=False, compare=False)
    # False: every matching is computed afresh (the reference the incremental paths are
    # tested against); nothing persisted depends on it.
    incremental: bool = True
    # False: the fold moves the clock without charging GPU-hours, so the meter (and every
    # funding answer, which reads it) stays where it was.  For a follower that only places
    # (the binder): charging matched every open lease each time the clock moved, a fifth of
    # its CPU in a burst, on the cores where nats-server and the clients turn the writer's
    # appends and replies around (issue 11).  Such a state must not be asked about funding:
    # its meter still stands where it started.
    metered: bool = True
    # Funding-relevant changes since ``_known`` was made: (epoch after, "mint" | "close" |
    # "other", the lease or None).  Cleared whenever a new matching is remembered.
    _funding_log: list[tuple[int, str, Lease | None]] = field(default_factory=list, repr=False)
    # (scheduled end, lease id) of open leases with one, sorted: "does a lease end between?"
    _scheduled_ends: list[tuple[int, str]] = field(default_factory=list, repr=False)
    _hours_of: EnvelopeIndex | None = field(default=None, repr=False)
    _hours_any: bool = field(default=False, repr=False)
    held_by_node: dict[str, set[int]] = field(default_factory=dict)  # the active index per node
    _skeletons: dict[str, Skeleton] = field(default_factory=dict, repr=False)
    # flavor -> the topology snapshot last handed out, and the nodes whose held slots changed
    # since (``topology``); both dropped with the skeletons.
    _topologies: dict[str, Topology] = field(default_factory=dict, repr=False)
    _topology_dirty: dict[str, set[str]] = field(default_factory=dict, repr=False)
    _node_labels: dict[str, Mapping[str, str]] | None = field(default=None, repr=False)
    # run key -> ids of every lease minted under it (mint order), and its open leases
    _run_leases: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list), repr=False)
    _open_by_run: dict[str, dict[str, Lease]] = field(
        default_factory=lambda: defaultdict(dict), repr=False
    )
    # Runs by what the reconcile loop asks of them, kept by the fold (``_index_run``): waiting
    # (Pending or Waiting, and still defined), in a checkpoint grace, malleable and Running.
    waiting_runs: set[str] = field(default_factory=set, repr=False)
    # flavor -> defined runs with a malleable spec (a remedy exists: shrink them)
    malleable_runs: dict[str, set[str]] = field(default_factory=dict, repr=False)
    checkpoint_runs: set[str] = field(default_factory=set, repr=False)
    elastic_runs: set[str] = field(default_factory=set, repr=False)
    # The waiting runs split for the event-driven reconcile (``waiting_line``): built when
    # first asked, then kept by the fold (``run_touched``), dropped when the Budgets change.
    _waiting_line: WaitingLine | None = field(default=None, repr=False, compare=False)
    # lease id -> its notice, for leases still open, in ledger order (``pending_preemptions``)
    _pending_preemptions: dict[str, LeasePreemptionScheduled] = field(
        default_factory=dict, repr=False
    )
    _evaluations: dict[float, Evaluation] = field(default_factory=dict, repr=False)
    _evaluations_version: int = -1
    _index: EnvelopeIndex | None = None
    # Each node's place, handed from the index to the one built after a budget change
    # (``EnvelopeIndex.node_places``).
    _node_places: dict[str, tuple[dict[str, str] | None, Place | None]] = field(
        default_factory=dict, repr=False, compare=False
    )
    # Reservations still Pending, by name: kept by the fold so lookups never scan the history.
    pending_reservations: dict[str, Reservation] = field(default_factory=dict, repr=False)
    # Views derived from the state (``cached``, ``_funding_cached``): name -> (what they are
    # valid for - (version, argument), or (funding epoch, meter, instant) - and the value).
    _derived: dict[str, tuple[object, object]] = field(default_factory=dict, repr=False)
    # Runs, Budgets and NotificationChannels per namespace, once asked for (``objects_in``),
    # then kept by the fold: the manager checks it on every apply that creates something.
    _ns_objects: Counter[str] | None = field(default=None, repr=False, compare=False)
    # NotificationChannels by "namespace/name": read by the notifier only, decide nothing.
    channels: dict[str, NotificationChannel] = field(default_factory=dict)
    # Bumped by every fold that changes the pending reservations; views of them only are
    # cached by it (``_reservations_cached``).
    reservations_epoch: int = field(default=0, repr=False)
    _by_reservations: dict[str, tuple[int, object]] = field(default_factory=dict, repr=False)
    # The pending reservations indexed by the fold (``_add_pending``): place in line, per run
    # (and each run's newest), and per intended slice (activation order, and line order).
    _promise: dict[str, int] = field(default_factory=dict, repr=False)
    _promise_counter: int = field(default=0, repr=False)
    _pending_of: dict[str, dict[str, Reservation]] = field(
        default_factory=lambda: defaultdict(dict), repr=False
    )
    _newest_pending: dict[str, Reservation] = field(default_factory=dict, repr=False)
    _slices: dict[tuple[str, ...], list[SliceEntry]] = field(default_factory=dict, repr=False)
    _slice_line: dict[tuple[str, ...], dict[str, SliceEntry]] = field(
        default_factory=dict, repr=False
    )
    _by_start: list[tuple[Instant, str]] = field(default_factory=list, repr=False)

    @property
    def index(self) -> EnvelopeIndex:
        if self._index is None:
            self._index = build_index(self.budgets.values(), node_places=self._node_places)
        return self._index

    def skeleton(self, flavor: str) -> Skeleton:
        """The static topology of ``flavor``, recompiled only when nodes change."""
        sk = self._skeletons.get(flavor)
        if sk is None:
            sk = compile_nodes(list(self.nodes.values()), flavor)
            self._skeletons[flavor] = sk
        return sk

    def topology(self, flavor: str) -> Topology:
        """The topology of ``flavor`` as the ledger holds it now (``topology_from`` of the
        skeleton and the held slots), kept current incrementally.

        Rebuilding the overlay costs O(nodes) - 38 ms at 10k nodes, once per admission - while
        a commit changes the held slots of a handful of nodes.  The fold notes which nodes a
        lease touched since each flavor's snapshot was made, and only those are recomputed
        (``Topology.with_nodes``).  A node registered or whose health changed drops every
        snapshot (the skeleton changes with it).  Callers treat the value as read-only.
        """
        skeleton = self.skeleton(flavor)
        cached = self._topologies.get(flavor)
        if cached is None:
            topo = topology_from(skeleton, self.held_by_node)
        else:
            dirty = self._topology_dirty[flavor]
            topo = cached.with_nodes(skeleton, self.held_by_node, dirty) if dirty else cached
        self._topologies[flavor] = topo
        self._topology_dirty[flavor] = set()
        return topo

    def evaluation(self, at: float) -> Evaluation:
        """The funding evaluation at ``at``, computed once per (ledger version, instant).

        Decisions at one instant ask for it several times (admission, reservation, remedies);
        it is a pure function of folded state and the instant, so caching cannot change them.
        The matching it needs is derived from the last one known (``current_fill``) when that
        is provably the same; otherwise it is matched afresh.  Callers treat it as read-only.
        """
        if self._evaluations_version != self.version:
            self._evaluations = {}
            self._evaluations_version = self.version
        ev = self._evaluations.get(at)
        if ev is None:
            final = self.current_fill(at, meter_view=False)
            first = self.current_fill(self.meter.t) if at > self.meter.t else None
            ev = evaluate(self.meter, self.funding_inputs(), at, first=first, final=final)
            if final is None:
                self._remember(at, ev.fill, advanced=at > self.meter.t)
            self._evaluations[at] = ev
        return ev

    def matching(self, at: float) -> FillResult:
        """``evaluation(at).fill`` without the summaries (per envelope, cap and run), which
        most decisions never read: derived from the last known matching when possible."""
        ev = self._evaluations.get(at) if self._evaluations_version == self.version else None
        if ev is not None:
            return ev.fill
        known = self.current_fill(at, meter_view=False)
        if known is not None:
            return known
        if at > self.meter.t and self._hours_anywhere():
            # Matched under the meter advanced to ``at``, as ``evaluation`` would, without its
            # summaries (which it reads from this matching when asked, ``current_fill``).
            first = self.current_fill(self.meter.t)
            result = matching_at(self.meter, self.funding_inputs(), at, first=first)
            kept = self._known
            if kept is None or kept.advanced:
                # Not over a matching under the meter as it stands: a decision's check reads
                # that one (``gang.verify_funded``) and extends it, and one made under the
                # meter advanced could not be shown to hold under the meter behind it.
                self._remember(at, result, advanced=True)
            return result
        inputs = self.funding_inputs()
        view = self.meter.hours_view(inputs.index, inputs.period_hours)
        result = fill(
            inputs.index, inputs.leases, inputs.runs, inputs.admitted, inputs.node_labels, at, view
        )
        self._remember(at, result, advanced=at > self.meter.t)
        return result

    def current_fill(self, at: float, *, meter_view: bool = True) -> FillResult | None:
        """The matching of the open leases at ``at`` - what ``fill`` would answer now - if it
        can be derived from the last matching known, else ``None``.

        Known matchings come from evaluations and from decisions' checks (``offer_fill``).
        Since one was made, the fold logs every funding-relevant change: leases minted and
        closed are replayed on it (``extend_fill``, ``shrink_fill``, each exact or refusing);
        any other change (a budget, a node, a run updated) ends the line.  The matching is
        under the meter as it stands (``meter_view``), or under the meter advanced to ``at``
        as ``evaluate`` uses it; the two differ only where GPU-hours are set.
        """
        known = self._known
        if not self.incremental or known is None:
            return None
        advanced = not meter_view and at > self.meter.t
        # GPU-hours make the matching depend on the meter it ran under: one under another
        # meter is shown to hold under this one first, or not used.
        rebase = self._hours_anywhere() and not (
            known.meter_t == self.meter.t and known.at == at and known.advanced == advanced
        )
        if rebase and advanced:
            return None  # under a copy of the meter advanced to ``at``: ``evaluate``'s
        if known.at != at and not self._nothing_changes_between(known.at, at):
            return None
        base: FillResult | None = known.fill
        if rebase:
            index = self.index
            base = rebase_fill(
                known.fill, index, self.meter.hours_view(index, self.settings_period_hours)
            )
            if base is None:
                return None
        assert base is not None
        if known.epoch == self.funding_epoch and not known.pending:
            if base is not known.fill:
                self._remember(at, base, advanced=advanced)
            return base
        if known.advanced and self._hours_anywhere():
            # Made under a meter advanced past the leases minted or closed since: that meter
            # would have charged them, so no view at hand is the one to replay them under.
            return None
        changes = self._changes_since(known.epoch)
        if changes is None:
            return None
        pending = known.pending
        if pending:
            head = changes[: len(pending)]
            if len(head) < len(pending) or any(
                kind != "mint" or x is not y for (kind, x), y in zip(head, pending, strict=True)
            ):
                return None  # the decision that was checked is not what was committed
            changes = changes[len(pending) :]
        result: FillResult | None = base
        inputs = self.funding_inputs(leases=False)
        view = self.meter.hours_view(inputs.index, inputs.period_hours)
        i = 0
        while result is not None and i < len(changes):
            kind = changes[i][0]
            j = i + 1
            while j < len(changes) and changes[j][0] == kind:
                j += 1
            batch = [x for _, x in changes[i:j]]
            if kind == "close":
                result = shrink_fill(result, batch)
            else:
                result = self._extend(result, batch, at, view)
            i = j
        if result is not None:
            self._remember(at, result, advanced=advanced)
        return result

    def _extend(
        self, base: FillResult, new: list[Lease], at: float, view: HoursView
    ) -> FillResult | None:
        """``extend_fill`` by leases minted since ``base``, one run's at a time."""
        by_run: dict[str, list[Lease]] = defaultdict(list)
        for x in new:
            by_run[x.run].append(x)
        inputs = self.funding_inputs(leases=False)
        result: FillResult | None = base
        for run, leases in by_run.items():
            if result is None:
                break
            alone = self.lease_count(run) == len(leases)  # the run never held another lease
            result = extend_fill(
                inputs.index,
                result,
                leases,
                inputs.runs,
                inputs.admitted,
                inputs.node_labels,
                at,
                view,
                runs_alone=alone,
            )
        return result

    def _changes_since(self, epoch: int) -> list[tuple[str, Lease]] | None:
        """Leases minted and closed since funding epoch ``epoch``, in ledger order, or
        ``None`` if anything else that moves funding happened (or the log was cut)."""
        log = self._funding_log
        if not log or epoch < log[0][0] - 1:
            return None if epoch != self.funding_epoch else []
        out: list[tuple[str, Lease]] = []
        for e, kind, lease in log:
            if e <= epoch:
                continue
            if lease is None:
                return None
            out.append((kind, lease))
        return out

    def _remember(
        self, at: float, result: FillResult, *, advanced: bool, meter_t: float | None = None
    ) -> None:
        """Keep ``result`` as the matching at ``at``, made under the meter at ``meter_t``
        (default: as it stands)."""
        under = self.meter.t if meter_t is None else meter_t
        self._known = _KnownFill(at, self.funding_epoch, under, advanced, (), result)
        self._funding_log = []

    def _hours_anywhere(self) -> bool:
        """Does any envelope or cap set GPU-hours?  (Else the meter never moves funding.)"""
        index = self.index
        if self._hours_of is not index:
            self._hours_any = any(e.gpu_hours is not None for e in index.envelopes.values()) or any(
                c.gpu_hours is not None for c in index.caps.values()
            )
            self._hours_of = index
        return self._hours_any

    def _nothing_changes_between(self, t0: float, t1: float) -> bool:
        """No window bound or scheduled lease end moves funding in ``(t0, t1]`` - so a matching
        at ``t0`` is the matching at ``t1``, but for the GPU-hours charged in between (which
        ``current_fill`` checks)."""
        if t1 < t0:
            return False
        if t1 == t0:
            return True
        for e in self.index.envelopes.values():
            for bound in (e.start, e.end):
                if bound is not None and t0 < bound <= t1:
                    return False
        ends = self._scheduled_ends
        i = bisect.bisect_right(ends, (t0, "\U0010ffff"))
        return not (i < len(ends) and ends[i][0] <= t1)

    def leases_ending(self, until: float) -> list[Lease]:
        """Open leases whose scheduled end is at or before ``until``, by (end, id)."""
        ends = self._scheduled_ends
        i = bisect.bisect_right(ends, (until, "\U0010ffff"))
        return [self.open_leases[lid] for _, lid in ends[:i]]

    def next_scheduled_end(self, after: float) -> Instant | None:
        """The earliest scheduled end of an open lease strictly after ``after``."""
        ends = self._scheduled_ends
        i = bisect.bisect_right(ends, (after, "\U0010ffff"))
        return ends[i][0] if i < len(ends) else None

    def offer_fill(self, at: float, new: tuple[Lease, ...], result: FillResult) -> None:
        """A decision already matched the world it is about to commit (admission's check).

        ``result`` is the matching at ``at``, under the meter as it stands, of the open leases
        plus the leases ``new`` the decision mints.  If those mints (of these very lease
        objects) are the next funding-relevant changes, ``current_fill`` starts from it instead
        of matching again: the next evaluation, the meter's next advance, the next decision's
        check.  Identical inputs, identical result: the reuse is invisible except in speed.
        """
        if not self.incremental:
            return
        self._known = _KnownFill(at, self.funding_epoch, self.meter.t, False, new, result)
        self._funding_log = []

    def node_labels(self) -> dict[str, Mapping[str, str]]:
        """Labels by node name, rebuilt only when a node changes (read-only for callers)."""
        if self._node_labels is None:
            self._node_labels = {name: n.labels for name, n in self.nodes.items()}
        return self._node_labels

    def _nodes_changed(self) -> None:
        self._skeletons.clear()
        self._topologies.clear()
        self._topology_dirty.clear()
        self._node_labels = None

    def _index_run(self, key: str, before: Run | None = None) -> None:
        """Put run ``key`` in the reconcile indexes its status and spec call for (``before``:
        the run's spec until this fold, if it changed)."""
        st = self.status.get(key)
        run = self.runs.get(key)
        if before is not None and before.spec.malleable is not None:
            self.malleable_runs.get(before.flavor, set()).discard(key)
        if run is not None and run.spec.malleable is not None:
            self.malleable_runs.setdefault(run.flavor, set()).add(key)
        phase = st.phase if st is not None else None
        for index, member in (
            (self.waiting_runs, run is not None and phase in ("Pending", "Waiting")),
            (
                self.checkpoint_runs,
                st is not None
                and phase not in ("Completed", "Failed")
                and isinstance(st.detail.get("checkpointDeadline"), int),
            ),
            (
                self.elastic_runs,
                run is not None and phase == "Running" and run.spec.malleable is not None,
            ),
        ):
            if member:
                index.add(key)
            else:
                index.discard(key)

    def waiting_line(self) -> WaitingLine:
        """The waiting runs, parked or not (``waiting_line``), up to date with every fold.

        Built by one walk of the waiting runs when first asked (or after the Budgets changed);
        after that only the runs the fold touched since are filed again, so asking costs what
        changed.  Read-only for callers, valid until the next fold.
        """
        line = self._waiting_line
        if line is None:
            line = self._waiting_line = WaitingLine()
            todo: Iterable[str] = list(self.waiting_runs)
        else:  # each run is filed on its own facts: the order does not matter
            todo, line.dirty = line.dirty, set()
        for key in todo:
            run = self.runs.get(key)
            if run is None or key not in self.waiting_runs:
                line.place(key, None, None)
                continue
            need = parked_need(self, run)
            if need is None:
                line.place(key, run.flavor, None)
            else:
                res = self.pending_reservation(key)
                assert res is not None  # parked runs hold one
                line.place(key, run.flavor, need, self._promise[res.name], fenced(run))
        return line

    def drop_waiting_line(self) -> None:
        """Stop keeping the waiting line until it is next asked for (it is a cache: dropping it
        changes no answer, and the fold no longer files every run it touches)."""
        self._waiting_line = None

    def _slots_changed(self, node: str) -> None:
        for dirty in self._topology_dirty.values():
            dirty.add(node)

    def funding_inputs(self, *, leases: bool = True) -> FundingInputs:
        """What the funding evaluation reads.  ``leases=False``: without the open leases (an
        empty tuple), for a caller that extends a known matching and reads only the rest -
        listing every open lease was a tenth of an admission once the others were cheap."""
        if not leases:
            open_leases: tuple[Lease, ...] = ()
        elif self._open_tuple is None:
            open_leases = self._open_tuple = tuple(self.open_leases.values())
        else:
            open_leases = self._open_tuple
        return FundingInputs(
            index=self.index,
            leases=open_leases,
            runs=self.runs,
            admitted=self.admitted,
            node_labels=self.node_labels(),
            period_hours=self.settings_period_hours,
        )

    def leases_of(self, run: str, *, open_only: bool = False) -> list[Lease]:
        """The run's leases (every incarnation's, or only the open ones) by start, then id.

        Read from the per-run index the fold keeps, so asking costs what the run holds, not
        what the fleet holds (it used to scan every lease ever minted).
        """
        if open_only:
            pool: Iterable[Lease] = self._open_by_run.get(run, {}).values()
        else:
            pool = (self.leases[i] for i in self._run_leases.get(run, ()))
        return sorted(pool, key=lambda x: (x.start, x.id))

    def holds_leases(self, run: str) -> bool:
        """Does ``run`` hold an open lease?"""
        return bool(self._open_by_run.get(run))

    def has_pending_preemptions(self) -> bool:
        """Is any preemption notice still waiting for its deadline?"""
        return bool(self._pending_preemptions)

    def lease_count(self, run: str) -> int:
        """Leases ever minted under the run's key, all incarnations (the next lease counter)."""
        return len(self._run_leases.get(run, ()))

    def rebuild_indexes(self) -> None:
        """Rebuild every index the fold keeps from ``leases`` (after a snapshot restore, or a
        test that wrote leases directly): open leases, slot holders, held ordinals, per run."""
        self._ns_objects = None  # counted again when next asked
        self.open_leases = {}
        self._open_tuple = None
        self.slot_holder = {}
        held: dict[str, set[int]] = defaultdict(set)
        self._run_leases = defaultdict(list)
        self._open_by_run = defaultdict(dict)
        for lease in self.leases.values():
            self._run_leases[lease.run].append(lease.id)
            if lease.closure_reason is not None:
                continue
            self.open_leases[lease.id] = lease
            self._open_by_run[lease.run][lease.id] = lease
            for s in lease.slots:
                self.slot_holder[s] = lease.id
                held[lease.node].add(_ordinal(s))
        self.held_by_node = dict(held)
        self._pending_preemptions = {
            k: p for k, p in self.preemptions.items() if p.lease in self.open_leases
        }
        self._scheduled_ends = sorted(
            (x.end, x.id) for x in self.open_leases.values() if x.end is not None
        )
        self._reindex_reservations()
        self._waiting_line = None
        self._derived = {}
        self.waiting_runs, self.checkpoint_runs, self.elastic_runs = set(), set(), set()
        self.malleable_runs = {}
        for key in {*self.status, *self.runs}:
            self._index_run(key)
        self._known = None
        self._funding_log = []
        self._nodes_changed()

    def pending_preemptions(self) -> list[LeasePreemptionScheduled]:
        """Notices whose lease is still open (the closure is due at their deadline), in ledger
        order - which is the resolver's cut order, so closures replay in the order decided."""
        return list(self._pending_preemptions.values())

    def objects_in(self, namespace: str) -> int:
        """Runs, Budgets and NotificationChannels in ``namespace`` (the per-namespace limit).

        Counted once over every object, then kept up to date by the fold (``_object_count``),
        so asking costs nothing however large the fleet.
        """
        if self._ns_objects is None:
            tables = (self.runs, self.budgets, self.channels)
            self._ns_objects = Counter(key.split("/", 1)[0] for t in tables for key in t)
        return self._ns_objects[namespace]

    def _object_count(self, key: str, delta: int) -> None:
        if self._ns_objects is not None:
            self._ns_objects[key.split("/", 1)[0]] += delta

    def cached(self, name: str, compute: Callable[..., _T], *args: object, at: object = None) -> _T:
        """A view derived from the state, ``compute(*args)``, computed once per ledger version
        (and ``at``).

        Only the latest (version, ``at``) is kept per name, so a service forecasting at the
        wall clock does not accumulate one entry per instant.  ``compute`` must be a pure
        function of the folded state (and ``at``); callers treat the value as read-only.  A
        view asked in a hot loop passes a method and its arguments rather than a closure: a
        hit then builds nothing.
        """
        return self._kept(name, (self.version, at), compute, *args)

    def _kept(self, name: str, valid: object, compute: Callable[..., _T], *args: object) -> _T:
        """``compute(*args)``, kept under ``name`` for as long as ``valid`` is what it was."""
        hit = self._derived.get(name)
        if hit is not None and hit[0] == valid:
            return cast(_T, hit[1])
        value = compute(*args)
        self._derived[name] = (valid, value)
        return value

    def has_unfunded_actives(self, at: float) -> bool:
        """Is any open active lease Unfunded at ``at``?  If not, reclaiming has nothing to draw
        (phase 0 of the resolver only takes groups whose actives are all Unfunded).  Asked by
        ``certain_to_wait`` and, after each decision, by the event-driven offers (issue 11)."""
        return self._funding_cached("has_unfunded_actives", self._has_unfunded_actives, at)

    def _funding_cached(self, name: str, compute: Callable[[float], _T], at: float) -> _T:
        """Like ``cached``, but kept while nothing changes who pays: the same funding epoch
        (events in ``fold._NEUTRAL`` - statuses, reservations, notices - leave it), meter
        and instant.  For views of the matching asked after every decision: in a sweep into
        a full fleet each submission is a new version (its status and reservation) but the
        same funding, and the matching's view costs O(open leases) (issue 11).

        Without the incremental paths (the reference the tests compare against) it is kept
        per version only, as before: so a wrong ``_NEUTRAL`` entry cannot be wrong on both
        sides of a comparison."""
        if not self.incremental:
            return self.cached(name, compute, at, at=at)
        return self._kept(name, (self.funding_epoch, self.meter.t, float(at)), compute, at)

    def _has_unfunded_actives(self, at: float) -> bool:
        leases, active = self.open_leases, LeaseRole.ACTIVE
        return any(
            lease.role is active
            for lease in (leases.get(lid) for lid in self.unfunded_leases(at))
            if lease is not None
        )

    def unfunded_leases(self, at: float) -> list[str]:
        """Ids of the open leases the matching at ``at`` leaves unfunded - those it classes
        Unfunded, and any open lease it does not cover - in no particular order.

        Asked after every decision (the resolver's ``has_unfunded_actives``, a reservation's
        remedies), so it is kept while the funding is unchanged (``_funding_cached``) and made
        in two passes at C speed: the matching's classes, and a set difference of ids (issue
        11: a plain walk with a lookup per open lease was half of a waiting submission at 10k
        nodes).  Callers look each id up in ``open_leases``."""
        return self._funding_cached("unfunded_leases", self._unfunded_leases, at)

    def _unfunded_leases(self, at: float) -> list[str]:
        classes = self.matching(at).funding_class
        unfunded = FundingClass.UNFUNDED
        flagged = [lid for lid, cls in classes.items() if cls is unfunded]
        flagged += self.open_leases.keys() - classes.keys()
        return flagged


def _ordinal(slot_name: str) -> int:
    return int(slot_name.rpartition("#")[2])
