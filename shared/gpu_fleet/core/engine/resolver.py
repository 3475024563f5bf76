"""The resolver: which leases to cut so that fundable demand fits (SPEC §B.11, §B.12).

It runs in two places only (SPEC §F.1.10: a budget shortfall never preempts funded work):

* at **reservation activation**, when a run whose demand is fundable still does not fit
  physically, in the reservation's intended scope, through all four phases;
* at **ordinary admission**, once, reclaiming Unfunded work only, and only when that makes the
  run fit (the caller checks the fit before it applies anything).

Phases, in order, each stopping as soon as the deficit is cleared:

0. reclaim Unfunded groups, drawn by the attested lottery (owner uniformly, then one of the
   owner's groups uniformly) so no owner is favoured for having more groups;
1. drop spares (they are insurance, not width);
2. shrink malleable runs by whole groups, run key ascending, group index numerically descending
   (SPEC §F.1.6: group 10 goes before group 9), never below a run's minimum;
3. the lottery over whole groups of every run in scope, same two-stage draw.

Deliberate differences from the reference:

* **Freed GPUs are counted once** (SPEC §F.2.1): a spare dropped in phase 1 no longer counts in
  its group in phases 2-3, and the minimum-width guard counts *active* GPUs only.  The guard
  uses the run's whole active width (in scope or not): a run spread over two domains is not
  "below minimum" because half of it lies outside the scope.
* Dropping a spare touches nothing else of its group (SPEC §F.2.3): the run keeps its state and
  only gets a commentary.
* Leases on nodes that are not Ready, leases already under a preemption notice and the
  beneficiary's own leases are not candidates: cutting them would free nothing usable now.
* A run reclaimed below its minimum is reclaimed whole: a partial gang cannot run (SPEC
  §F.1.1), so its other leases close with the same reason and it re-admits from scratch.

The seed is attested: ``"0x" + sha256(f"{source}|{now in Unix nanoseconds}")[:8 bytes]``, and the
PRNG is ``random.Random`` seeded with those bytes read as a signed big-endian integer, so a
replay of the ledger draws exactly the same victims.
"""

from __future__ import annotations

import enum
import hashlib
import random
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from gpu_fleet.core.engine.gang import (
    Settings,
    checkpoint_deadline,
    commentary,
    effective_grace,
    release_reservations,
    status_event,
)
from gpu_fleet.core.ledger.events import (
    Event,
    LeaseClosed,
    LeasePreemptionCanceled,
    LeasePreemptionScheduled,
    RunStatusChanged,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    Node,
    NodeHealth,
    Run,
)
from gpu_fleet.core.timeutil import format_instant


class CutKind(enum.StrEnum):
    """What a cut is, as counted by ``jobtree_resolver_actions_total{kind}``."""

    RECLAIM_UNFUNDED = "ReclaimUnfunded"
    DROP_SPARE = "DropSpare"
    SHRINK = "Shrink"
    LOTTERY = "Lottery"


@dataclass(frozen=True)
class Cut:
    """One lease the resolver closes, with the closure reason it will carry."""

    kind: CutKind
    lease: str
    run: str
    group: int
    gpus: int
    reason: str


@dataclass(frozen=True)
class Resolution:
    """The ordered cuts for one deficit, or why there are none (``error``)."""

    seed: str
    deficit: int
    cuts: tuple[Cut, ...] = ()
    error: str = ""

    @property
    def freed(self) -> int:
        return sum(c.gpus for c in self.cuts)

    @property
    def conflict_set(self) -> tuple[str, ...]:
        """Every lease this resolution closes, sorted: what stood in the beneficiary's way."""
        return tuple(sorted(c.lease for c in self.cuts))


def attested_seed(source: str, now: Instant) -> tuple[str, int]:
    """The seed text (``0x`` + 16 hex digits) and the integer the PRNG is seeded with."""
    digest = hashlib.sha256(f"{source}|{now * 1_000_000_000}".encode()).digest()[:8]
    return "0x" + digest.hex(), int.from_bytes(digest, "big", signed=True)


def unbound_bucket(namespace: str) -> str:
    """Lottery bucket of a namespace with no owner (SPEC §F.1.14): one per namespace, and it can
    never equal a real owner string (owners never contain a NUL)."""
    return f"\x00unbound:{namespace or 'default'}"


@dataclass
class _Group:
    run: str
    index: int
    leases: list[Lease] = field(default_factory=list)

    def open(self, cut: Collection[str]) -> list[Lease]:
        return [x for x in self.leases if x.id not in cut]

    def active(self, cut: Collection[str]) -> int:
        return sum(x.width for x in self.open(cut) if x.role is LeaseRole.ACTIVE)


def _in_scope(node: Node | None, scope: Mapping[str, str]) -> bool:
    if node is None or node.health is not NodeHealth.READY:
        return False
    return all(node.labels.get(k) == v for k, v in scope.items())


def resolve(
    *,
    deficit: int,
    flavor: str,
    scope: Mapping[str, str],
    seed_source: str,
    now: Instant,
    nodes: Mapping[str, Node],
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    owner_of: Callable[[str], str],
    classes: Mapping[str, FundingClass] | None,
    only_unfunded: bool = False,
    exclude_runs: Collection[str] = (),
    exclude_leases: Collection[str] = (),
) -> Resolution:
    """Order the cuts that free ``deficit`` GPUs in ``scope`` (empty scope: the whole flavor).

    ``leases`` are the open leases (all of them: the minimum-width guard needs every active
    GPU of a run, in scope or not); ``classes`` is the funding class of each lease in the
    evaluation phase 0 trusts (``None`` skips phase 0).  ``owner_of`` maps a namespace to its
    derived owner ("" when unbound).  A lottery that cannot clear the deficit discards the
    whole result (``error`` says why) - half a resolution would cut people for nothing.

    The four phases run in the fixed order of the contention rule and share one accumulator of
    cuts; each stops as soon as the deficit is cleared.
    """
    seed, seed_int = attested_seed(seed_source, now)
    groups = _groups_in_scope(
        leases,
        runs=runs,
        flavor=flavor,
        scope=scope,
        nodes=nodes,
        skip_runs=set(exclude_runs),
        skip_leases=set(exclude_leases),
    )
    acc = _Cuts(seed, deficit, random.Random(seed_int), runs, owner_of, _active_widths(leases))
    ordered = sorted(groups, key=lambda g: (g.run, g.index))
    if classes is not None:
        _reclaim_unfunded(acc, ordered, classes)
    if only_unfunded:
        return acc.resolution()
    _drop_spares(acc, ordered)
    _shrink_malleable(acc, groups)
    if acc.left <= 0:
        return acc.resolution()
    return acc.resolution(error=_lottery(acc, ordered))


_BOTH = (LeaseRole.ACTIVE, LeaseRole.SPARE)


def _active_widths(leases: Sequence[Lease]) -> dict[str, int]:
    """Active GPUs per run, over every open lease (in scope or not): the minimum-width guard."""
    width: dict[str, int] = defaultdict(int)
    for lease in leases:
        if lease.is_open and lease.role is LeaseRole.ACTIVE:
            width[lease.run] += lease.width
    return width


def _groups_in_scope(
    leases: Sequence[Lease],
    *,
    runs: Mapping[str, Run],
    flavor: str,
    scope: Mapping[str, str],
    nodes: Mapping[str, Node],
    skip_runs: Collection[str],
    skip_leases: Collection[str],
) -> list[_Group]:
    """The gang groups the resolver may cut: open, this flavor, in scope, not excluded."""
    groups: dict[tuple[str, int], _Group] = {}
    for lease in sorted(leases, key=lambda x: x.id):
        run = runs.get(lease.run)
        if (
            run is None
            or not lease.is_open
            or run.flavor != flavor
            or lease.run in skip_runs
            or lease.id in skip_leases
            or not _in_scope(nodes.get(lease.node), scope)
        ):
            continue
        g = groups.setdefault((lease.run, lease.group), _Group(lease.run, lease.group))
        g.leases.append(lease)
    return list(groups.values())


@dataclass
class _Cuts:
    """The cuts decided so far, the deficit left, and the one seeded draw every phase shares."""

    seed: str
    deficit: int
    rng: random.Random
    runs: Mapping[str, Run]
    owner_of: Callable[[str], str]
    width: dict[str, int]
    cut: dict[str, Cut] = field(default_factory=dict)
    left: int = 0

    def __post_init__(self) -> None:
        self.left = self.deficit

    def bucket(self, run_key: str) -> str:
        """The lottery's first draw is by owner, so a team with many runs gets no more tickets."""
        run = self.runs[run_key]
        return self.owner_of(run.metadata.namespace) or unbound_bucket(run.metadata.namespace)

    def take(
        self, kind: CutKind, g: _Group, reason: str, roles: Collection[LeaseRole] = _BOTH
    ) -> None:
        for lease in g.open(self.cut):
            if lease.role in roles:
                self.cut[lease.id] = Cut(
                    kind, lease.id, lease.run, lease.group, lease.width, reason
                )
                self.left -= lease.width
                if lease.role is LeaseRole.ACTIVE:
                    self.width[lease.run] -= lease.width

    def take_lease(self, lease: Lease) -> None:
        """One spare lease, and nothing else of its group (phase 1)."""
        self.cut[lease.id] = Cut(
            CutKind.DROP_SPARE, lease.id, lease.run, lease.group, lease.width, "DropSpare"
        )
        self.left -= lease.width

    def draw(self, tokens: dict[str, list[_Group]]) -> _Group:
        """Owner first, then one of that owner's groups, both uniformly with the attested seed."""
        owners = sorted(o for o, ts in tokens.items() if ts)
        owner = owners[self.rng.randrange(len(owners))]
        pool = tokens[owner]
        return pool.pop(self.rng.randrange(len(pool)))

    def resolution(self, error: str | None = None) -> Resolution:
        if error is not None:
            return Resolution(self.seed, self.deficit, error=error)
        return Resolution(self.seed, self.deficit, tuple(self.cut.values()))


def _reclaim_unfunded(
    acc: _Cuts, ordered: Sequence[_Group], classes: Mapping[str, FundingClass]
) -> None:
    """Phase 0: reclaim Unfunded groups by lottery (a group with only spares is not a token)."""
    if acc.left <= 0:
        return
    tokens: dict[str, list[_Group]] = defaultdict(list)
    for g in ordered:
        actives = [x for x in g.leases if x.role is LeaseRole.ACTIVE]
        if actives and all(
            classes.get(x.id, FundingClass.UNFUNDED) is FundingClass.UNFUNDED for x in actives
        ):
            tokens[acc.bucket(g.run)].append(g)
    while acc.left > 0 and any(tokens.values()):
        acc.take(CutKind.RECLAIM_UNFUNDED, acc.draw(tokens), f"ReclaimUnfunded({acc.seed})")


def _drop_spares(acc: _Cuts, ordered: Sequence[_Group]) -> None:
    """Phase 1: drop spares, and nothing else of their group."""
    for g in ordered:
        if acc.left <= 0:
            return
        for lease in g.open(acc.cut):
            if acc.left <= 0:
                return
            if lease.role is LeaseRole.SPARE:
                acc.take_lease(lease)


def _shrink_malleable(acc: _Cuts, groups: Sequence[_Group]) -> None:
    """Phase 2: shrink malleable runs, highest group first, never below their minimum."""
    malleable = [g for g in groups if acc.runs[g.run].spec.malleable is not None]
    malleable.sort(key=lambda g: (g.run, -g.index))  # numeric, highest first (SPEC §F.1.6)
    for g in malleable:
        if acc.left <= 0:
            return
        active = g.active(acc.cut)
        if active > 0 and acc.width[g.run] - active >= acc.runs[g.run].min_width:
            acc.take(CutKind.SHRINK, g, "Shrink")


def _lottery(acc: _Cuts, ordered: Sequence[_Group]) -> str | None:
    """Phase 3: the lottery over whole groups; malleable groups only while the run keeps its
    minimum.  Returns why it could not clear the deficit, or None."""

    def eligible(g: _Group) -> bool:
        active = g.active(acc.cut)
        if active <= 0:
            return False
        run = acc.runs[g.run]
        return run.spec.malleable is None or acc.width[g.run] - active >= run.min_width

    lottery: dict[str, list[_Group]] = defaultdict(list)
    for g in ordered:
        if eligible(g):
            lottery[acc.bucket(g.run)].append(g)
    if not any(lottery.values()):
        return "no candidates available for lottery"
    while acc.left > 0:
        for owner in list(lottery):
            lottery[owner] = [g for g in lottery[owner] if eligible(g)]
        if not any(lottery.values()):
            return "lottery exhausted before clearing deficit"
        acc.take(CutKind.LOTTERY, acc.draw(lottery), f"RandomPreempt({acc.seed})")
    return None


# ------------------------------------------------------------------------------------------
# Applying a resolution: notice, closure at the deadline, and each victim's new state
# ------------------------------------------------------------------------------------------


def preemption_notices(
    state: FleetState,
    resolution: Resolution,
    *,
    beneficiary: str,
    source: str,
    now: Instant,
    settings: Settings,
) -> list[LeasePreemptionScheduled]:
    """One notice per cut, due after the victim run's effective grace (DESIGN decision 3)."""
    conflict = resolution.conflict_set
    return [
        LeasePreemptionScheduled(
            at=now,
            lease=c.lease,
            run=c.run,
            deadline=now + effective_grace(state.runs.get(c.run), settings),
            reason=c.reason,
            kind=c.kind.value,
            seed=resolution.seed,
            conflict_set=conflict,
            beneficiary=beneficiary,
            source=source,
        )
        for c in resolution.cuts
    ]


def apply_resolution(
    state: FleetState,
    resolution: Resolution,
    *,
    beneficiary: str,
    source: str,
    now: Instant,
    settings: Settings,
) -> list[Event]:
    """The notices, then the closures (and victims' states) of every cut already due."""
    notices = preemption_notices(
        state, resolution, beneficiary=beneficiary, source=source, now=now, settings=settings
    )
    due = [n for n in notices if n.deadline <= now]
    later: dict[str, list[LeasePreemptionScheduled]] = defaultdict(list)
    for n in notices:
        if n.deadline > now:
            later[n.run].append(n)
    told: list[Event] = [
        commentary(
            state,
            run_key,
            now,
            f"preemption notice: {sum(state.leases[n.lease].width for n in hits)} GPUs close at "
            f"{format_instant(hits[0].deadline)} ({', '.join(sorted({n.reason for n in hits}))})"
            f" to make room for {beneficiary}",
        )
        for run_key, hits in sorted(later.items())
    ]
    return [*notices, *told, *close_preempted(state, due, now)]


def stale_preemptions(state: FleetState, now: Instant) -> list[LeasePreemptionCanceled]:
    """Cancel the pending notices whose beneficiary no longer waits for the room.

    A beneficiary that was deleted, finished, failed or started by other means would otherwise
    have people cut for nothing; the victims simply keep their leases.
    """
    out: list[LeasePreemptionCanceled] = []
    for p in state.pending_preemptions():
        status = state.status.get(p.beneficiary)
        if p.beneficiary in state.runs and status is not None and status.phase == "Pending":
            continue
        why = "beneficiary gone" if p.beneficiary not in state.runs else "no longer needed"
        out.append(LeasePreemptionCanceled(at=now, lease=p.lease, reason=why))
    return out


def close_preempted(
    state: FleetState, notices: Sequence[LeasePreemptionScheduled], now: Instant
) -> list[Event]:
    """Close the noticed leases that are still open, then settle every victim run (B.12).

    Per victim, with ``runnable`` = open active GPUs after the closures:

    * only spares dropped → a commentary; the gang is untouched (SPEC §F.2.3);
    * ``runnable >= min`` → ``Shrunk`` (Running);
    * only reclaimed as Unfunded → ``Reclaimed`` (Pending), its other leases released with the
      same reason, so it re-admits whole when quota allows;
    * inside an unexpired checkpoint grace → stays ``CheckpointGrace`` and keeps the rest of
      its leases until the deadline (SPEC §F.1.13);
    * otherwise → ``EndedByResolver`` (Failed), every remaining lease closed ``RunFailed``.
    """
    live = [n for n in notices if n.lease in state.open_leases]
    if not live:
        return []
    events: list[Event] = [LeaseClosed(at=now, lease=n.lease, reason=n.reason) for n in live]
    closed = {n.lease for n in live}
    by_run: dict[str, list[LeasePreemptionScheduled]] = defaultdict(list)
    for n in live:
        by_run[n.run].append(n)
    for run_key in sorted(by_run):
        hits = by_run[run_key]
        events.extend(_settle_victim(state, run_key, hits, closed, now))
    return events


def _settle_victim(
    state: FleetState,
    run_key: str,
    hits: Sequence[LeasePreemptionScheduled],
    closed: Collection[str],
    now: Instant,
) -> list[Event]:
    run = state.runs.get(run_key)
    status = state.status.get(run_key)
    if run is None or (status is not None and status.phase in ("Completed", "Failed")):
        return []
    remaining = [x for x in state.leases_of(run_key, open_only=True) if x.id not in closed]
    runnable = sum(x.width for x in remaining if x.role is LeaseRole.ACTIVE)
    kinds = {n.kind for n in hits}
    reasons = sorted({n.reason for n in hits})
    detail: dict[str, object] = {
        "seed": hits[0].seed,
        "conflictSet": list(hits[0].conflict_set),
        "closureReasons": reasons,
        "beneficiary": hits[0].beneficiary,
    }
    freed = sum(state.leases[n.lease].width for n in hits)
    if kinds == {CutKind.DROP_SPARE.value}:
        return [
            commentary(
                state,
                run_key,
                now,
                f"resolver dropped {freed} spare GPUs for {hits[0].beneficiary}",
            )
        ]
    if runnable >= run.min_width and runnable > 0:
        return [status_event(run_key, now, "Running", "Shrunk", "shrunk by resolver", **detail)]
    if kinds == {CutKind.RECLAIM_UNFUNDED.value}:
        events: list[Event] = [
            LeaseClosed(at=now, lease=x.id, reason=reasons[0]) for x in remaining
        ]
        events.append(
            status_event(
                run_key,
                now,
                "Pending",
                "Reclaimed",
                "reclaimed by funded demand; will re-admit when quota allows",
                **detail,
            )
        )
        events.extend(release_reservations(state, run_key, now, "Reclaimed"))
        return events
    deadline = checkpoint_deadline(state, run_key)
    if deadline is not None and deadline > now:
        kept = dict(status.detail) if status is not None else {}
        kept.update(detail)
        # The cut groups join the lost ones, so a top-up re-places everything the run is missing.
        lost_raw = kept.get("lostGroups")
        lost = {str(k): int(v) for k, v in lost_raw.items()} if isinstance(lost_raw, dict) else {}
        for n in hits:
            cut_lease = state.leases[n.lease]
            if cut_lease.role is LeaseRole.ACTIVE:
                g = str(cut_lease.group)
                lost[g] = lost.get(g, 0) + cut_lease.width
        kept["lostGroups"] = lost
        return [
            status_event(
                run_key,
                now,
                "Pending",
                "CheckpointGrace",
                "resolver cut during checkpoint grace; holding containers until the deadline",
                **kept,
            )
        ]
    events = [LeaseClosed(at=now, lease=x.id, reason="RunFailed") for x in remaining]
    events.append(
        status_event(run_key, now, "Failed", "EndedByResolver", "ended by resolver", **detail)
    )
    events.extend(release_reservations(state, run_key, now, "run failed"))
    return events


def waiting_for_preemptions(state: FleetState, run_key: str) -> list[LeasePreemptionScheduled]:
    """Notices still pending in ``run_key``'s favour: it waits for them instead of re-cutting."""
    return [p for p in state.pending_preemptions() if p.beneficiary == run_key]


WAITING_FOR_PREEMPTIONS = "waiting for preemptions in its favour"


def awaiting_notices(
    state: FleetState, run_key: str, events: Sequence[Event], now: Instant
) -> RunStatusChanged | None:
    """A commentary for a beneficiary whose room frees only when the notices run out."""
    deadlines = [e.deadline for e in events if isinstance(e, LeasePreemptionScheduled)]
    if not deadlines or max(deadlines) <= now:
        return None
    gpus = sum(
        state.leases[e.lease].width for e in events if isinstance(e, LeasePreemptionScheduled)
    )
    return commentary(
        state,
        run_key,
        now,
        f"waiting for {gpus} GPUs under preemption notice until {format_instant(max(deadlines))}",
    )
