"""The placement planner, greedy edition: SPEC §B.3 to the letter, on physical slots.

Planning is split in two layers, and both planners (this greedy one and the CP-SAT optimiser in
``packing_cpsat``) share the second:

1. **Domain decisions** (``decide_greedy`` here, a CP-SAT model there): which fabric domain hosts
   each group, and which domains give each group its spares.  Only per-domain free counts matter
   at this layer, which is what keeps the optimiser's model independent of the fleet size.
2. **Realisation** (``realize``): per-domain node allocation (SPEC §B.3.4: nodes by free GPUs
   descending then name, taken greedily from the largest; allocations listed by GPUs descending
   then node name) and slot choice (lowest free ordinals first, so a replay picks the same slots).

Greedy domain rules (SPEC §B.3):

* single domain (``allow_cross_group_spread=False``): the first domain in sorted order (free desc,
  key asc) with ``free >= total``; every group goes there.  A grow (``preferred_domains`` set)
  stays inside the run's own domains: a single-domain run may not spread just because it grew.
* with ``group_gpus``: each group in order goes to a domain already used by this plan (preferred
  domains count as used) with room, the one with most free GPUs (tie: smaller key); else to any
  domain with room, same tie-break.
* without ``group_gpus`` (fill-to-empty): repeatedly take the first sorted domain with free GPUs
  (preferred ones first) and assign ``min(free, remaining)`` as a new group, so each domain is
  drained before anything spills.
* spares, after all groups: per group, from its own domain, then from the other domains in sorted
  order.  Spares may therefore spill across domains (the SPEC allows it; actives never do).

Pack is all-or-nothing and works on an overlay of the snapshot: a failing request changes nothing
and a successful one returns a plan whose slots are pairwise distinct and were all free.

A failure says what would have to be freed, where (``PackError.shortfall``): for a single-domain
request, the domain closest to fitting (most free GPUs among the domains big enough) and its
missing GPUs; with groups, the planner keeps going as if the missing GPUs were freed in the domain
closest to fitting each unplaceable group; without groups, the missing GPUs are charged to the
domains holding busy GPUs, largest first.  The forecaster turns this into ``deficitGPUs``.
"""

from __future__ import annotations

import enum
import heapq
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import msgspec

from gpu_fleet.core.model import slot
from gpu_fleet.core.placement.topology import Topology, parse_slot


class PackErrorKind(enum.StrEnum):
    INVALID_REQUEST = "InvalidRequest"
    INSUFFICIENT_TOPOLOGY = "InsufficientTopology"
    INSUFFICIENT_CAPACITY = "InsufficientCapacity"


class PackRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What to place: a run's active width lowered to groups, plus spares (SPEC §B.2, §B.3)."""

    flavor: str
    total_gpus: int
    group_gpus: int | None = None
    allow_cross_group_spread: bool = True
    spares_per_group: int = 0
    group_index_offset: int = 0
    # Domains the run already uses (a grow): treated as "already used in this plan".
    preferred_domains: tuple[str, ...] = ()
    # Slots reserved for others (backfill protection): treated as not free.
    excluded_slots: frozenset[str] = frozenset()


class NodeAllocation(msgspec.Struct, frozen=True):
    node: str
    slots: tuple[str, ...]


class GroupPlacement(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    size: int
    domain: str
    allocations: tuple[NodeAllocation, ...]
    spare_allocations: tuple[NodeAllocation, ...] = ()


class PackPlan(msgspec.Struct, frozen=True, kw_only=True):
    groups: tuple[GroupPlacement, ...]
    total_gpus: int
    total_spares: int
    solver: str = "greedy"

    def nodes(self) -> tuple[str, ...]:
        """Sorted unique nodes the plan uses, actives and spares."""
        return tuple(sorted({a.node for g in self.groups for a in _allocs(g)}))

    def slots(self) -> tuple[str, ...]:
        """Every slot of the plan (actives then spares, group order)."""
        return tuple(s for g in self.groups for a in _allocs(g) for s in a.slots)


def _allocs(group: GroupPlacement) -> tuple[NodeAllocation, ...]:
    return group.allocations + group.spare_allocations


class PackError(Exception):
    """A request that cannot be placed now, with what would have to be freed where."""

    def __init__(
        self, kind: PackErrorKind, message: str, shortfall: Mapping[str, int] | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.shortfall: dict[str, int] = {k: v for k, v in (shortfall or {}).items() if v > 0}

    @property
    def deficit(self) -> int:
        return sum(self.shortfall.values())

    def __repr__(self) -> str:
        return f"PackError({self.kind.value}, {self.message!r}, shortfall={self.shortfall})"


def groups(total: int, group_gpus: int | None) -> list[int]:
    """SPEC §B.2: one group of ``total`` without a group size, else consecutive groups of
    ``group_gpus`` with only the last possibly short.  No groups for a non-positive input."""
    if total <= 0:
        return []
    if group_gpus is None:
        return [total]
    if group_gpus <= 0:
        return []
    full, rest = divmod(total, group_gpus)
    return [group_gpus] * full + ([rest] if rest else [])


def validate(topology: Topology, request: PackRequest) -> list[int]:
    """Raise ``InvalidRequest`` for a malformed request; return the group sizes otherwise."""

    def bad(message: str) -> PackError:
        return PackError(PackErrorKind.INVALID_REQUEST, message)

    if not request.flavor:
        raise bad("flavor is required")
    if request.flavor != topology.flavor:
        raise bad(
            f"flavor mismatch: request asks for {request.flavor}, topology is {topology.flavor}"
        )
    if request.total_gpus <= 0:
        raise bad(f"totalGPUs must be positive, got {request.total_gpus}")
    if request.group_gpus is not None and request.group_gpus <= 0:
        raise bad(f"groupGPUs must be positive, got {request.group_gpus}")
    if request.spares_per_group < 0:
        raise bad(f"sparesPerGroup must not be negative, got {request.spares_per_group}")
    if request.group_index_offset < 0:
        raise bad(f"group index offset must not be negative, got {request.group_index_offset}")
    sizes = groups(request.total_gpus, request.group_gpus)
    if not sizes:  # pragma: no cover - excluded by the checks above
        raise bad("the request lowers to no groups")
    return sizes


# --------------------------------------------------------------------------------------------
# The working overlay
# --------------------------------------------------------------------------------------------


_MEMO_MIN = 32
_MEMO_SIZE = 16
_EXCLUDED: dict[tuple[Topology, frozenset[str]], tuple[dict[str, list[int]], dict[str, int]]] = {}


class Work:
    """Copy-on-write view of a snapshot: only touched nodes are copied, so planning a small run
    on a 10k-node fleet costs what the run touches, not what the fleet holds."""

    __slots__ = ("_dom_free", "_free", "topology")

    def __init__(self, topology: Topology, excluded: Collection[str] = ()) -> None:
        self.topology = topology
        self._free: dict[str, list[int]] = {}
        self._dom_free: dict[str, int] = {}
        if isinstance(excluded, frozenset) and len(excluded) >= _MEMO_MIN:
            # Waiting runs are planned one after another against the same snapshot and the
            # same protected slots: parse those once (a pure memo, invisible but in speed).
            key = (topology, excluded)
            hit = _EXCLUDED.get(key)
            if hit is None:
                self.exclude(excluded)
                _EXCLUDED[key] = (dict(self._free), dict(self._dom_free))
                while len(_EXCLUDED) > _MEMO_SIZE:
                    del _EXCLUDED[next(iter(_EXCLUDED))]
            else:
                self._free, self._dom_free = dict(hit[0]), dict(hit[1])
        else:
            self.exclude(excluded)

    def untouched(self) -> bool:
        """Are the free counts the snapshot's own (nothing excluded or taken in this view)?"""
        return not self._dom_free

    def fork(self) -> Work:
        """An independent copy (lists are never mutated in place, so a shallow copy suffices)."""
        other = Work(self.topology)
        other._free = dict(self._free)
        other._dom_free = dict(self._dom_free)
        return other

    def exclude(self, slots: Collection[str]) -> None:
        """Mark ``slots`` as not free (reserved for others, or taken by an earlier plan)."""
        by_node: dict[str, set[int]] = {}
        for s in slots:
            parsed = parse_slot(s)
            if parsed is not None and self.topology.has_node(parsed[0]):
                by_node.setdefault(parsed[0], set()).add(parsed[1])
        for node in sorted(by_node):
            before = self._free.get(node)
            if before is None:
                before = list(self.topology.free_ordinals(node))
            after = [i for i in before if i not in by_node[node]]
            if len(after) != len(before):
                self._free[node] = after
                dom = self.topology.domain_of(node)
                self._dom_free[dom] = self.domain_free(dom) - (len(before) - len(after))

    def node_free(self, node: str) -> int:
        own = self._free.get(node)
        return len(own) if own is not None else self.topology.free_gpus(node)

    def domain_free(self, domain: str) -> int:
        own = self._dom_free.get(domain)
        return own if own is not None else self.topology.domain_free(domain)

    def domain_frees(self) -> dict[str, int]:
        """Free GPUs of every domain (a fresh dict the caller may mutate, in no particular
        order): the snapshot's, with this plan's own counts over it."""
        out = self.topology.domain_frees()
        for key, free in self._dom_free.items():
            if key in out:
                out[key] = free
        return out

    def take(self, node: str, n: int) -> tuple[str, ...]:
        """Take the ``n`` lowest free ordinals of ``node``."""
        free = self._free.get(node)
        if free is None:
            free = list(self.topology.free_ordinals(node))
        if n > len(free):
            raise AssertionError(f"node {node}: asked for {n} GPUs, {len(free)} free")
        taken, self._free[node] = free[:n], free[n:]
        dom = self.topology.domain_of(node)
        self._dom_free[dom] = self.domain_free(dom) - n
        return tuple(slot(node, i) for i in taken)

    def allocate(self, domain: str, n: int) -> tuple[NodeAllocation, ...]:
        """SPEC §B.3.4: nodes by free desc then name, greedily from the largest; allocations by
        GPUs desc then node name."""
        names = self.topology.domain(domain).nodes
        frees = self.topology.free_counts(names)
        own = self._free
        if own:
            frees = [len(own[m]) if m in own else f for m, f in zip(names, frees, strict=True)]
        # (-free, name) sorted as plain tuples: free descending, then name, with no key
        # function called per node (this runs for every admission, issue 11).
        nodes = sorted(zip(map(operator.neg, frees), names, strict=True))
        out: list[NodeAllocation] = []
        left = n
        for minus_free, name in nodes:
            free = -minus_free
            if left == 0 or free == 0:
                break
            k = min(free, left)
            out.append(NodeAllocation(name, self.take(name, k)))
            left -= k
        if left:
            raise AssertionError(f"domain {domain}: {left} of {n} GPUs could not be allocated")
        out.sort(key=lambda a: (-len(a.slots), a.node))
        return tuple(out)


# --------------------------------------------------------------------------------------------
# Domain decisions
# --------------------------------------------------------------------------------------------


class Decision(msgspec.Struct, frozen=True):
    """Domain-level outcome of a planner: ``groups[i] = (size, domain)`` in index order and
    ``spares[i] = ((domain, gpus), ...)`` for group i."""

    groups: tuple[tuple[int, str], ...]
    spares: tuple[tuple[tuple[str, int], ...], ...]


def _best(frees: Mapping[str, int], keys: Iterable[str]) -> str | None:
    """Max free, tie -> smaller key."""
    best: str | None = None
    best_free = -1
    for k in keys:
        f = frees[k]
        if f > best_free or (f == best_free and best is not None and k < best):
            best, best_free = k, f
    return best


def _sorted_keys(frees: Mapping[str, int]) -> list[str]:
    return sorted(frees, key=lambda k: (-frees[k], k))


def preferred_present(topology: Topology, request: PackRequest) -> list[str]:
    seen: list[str] = []
    for d in request.preferred_domains:
        if topology.has_domain(d) and d not in seen:
            seen.append(d)
    return seen


def single_domain_candidates(topology: Topology, request: PackRequest) -> list[str]:
    """Domains a single-domain request may use: the run's own (when growing), else all."""
    return preferred_present(topology, request) or list(topology.domain_keys())


def decide_spares(
    frees: dict[str, int], placed: Sequence[tuple[int, str]], spares_per_group: int
) -> tuple[tuple[tuple[str, int], ...], ...] | None:
    """SPEC §B.3.5 at the domain level; mutates ``frees``; ``None`` when spares do not fit."""
    if spares_per_group == 0:
        return tuple(() for _ in placed)
    if sum(frees.values()) < spares_per_group * len(placed):
        return None
    out: list[tuple[tuple[str, int], ...]] = []
    for _, own in placed:
        need = spares_per_group
        parts: list[tuple[str, int]] = []
        for d in [own, *(k for k in _sorted_keys(frees) if k != own)]:
            if need == 0:
                break
            k = min(need, frees[d])
            if k > 0:
                parts.append((d, k))
                frees[d] -= k
                need -= k
        out.append(tuple(parts))
    return tuple(out)


def _closest(
    topology: Topology, frees: Mapping[str, int], keys: Sequence[str], size: int
) -> str | None:
    """The domain closest to hosting ``size``: most free among those big enough, else most free."""
    big = [k for k in keys if topology.domain_capacity(k) >= size]
    return _best(frees, big or keys)


def _charge_busy(topology: Topology, frees: Mapping[str, int], missing: int) -> dict[str, int]:
    """Charge ``missing`` GPUs to domains with busy GPUs (largest free first); a remainder that no
    freeing can cover lands on the first domain, so the deficit is never under-reported."""
    shortfall: dict[str, int] = {}
    order = _sorted_keys(frees)
    for d in order:
        if missing == 0:
            break
        busy = max(0, topology.domain_capacity(d) - frees[d])
        k = min(busy, missing)
        if k:
            shortfall[d] = k
            missing -= k
    if missing and order:
        shortfall[order[0]] = shortfall.get(order[0], 0) + missing
    return shortfall


def _spares_error(
    topology: Topology,
    frees: dict[str, int],
    request: PackRequest,
    placed: Sequence[tuple[int, str]],
) -> PackError:
    need = request.spares_per_group * len(placed)
    have = sum(frees.values())
    return PackError(
        PackErrorKind.INSUFFICIENT_CAPACITY,
        f"spares: {need} spare GPUs needed ({request.spares_per_group} per group), "
        f"{have} free after placing the groups",
        _charge_busy(topology, frees, need - have),
    )


def decide_greedy(
    topology: Topology, request: PackRequest, sizes: Sequence[int], frees: dict[str, int]
) -> Decision:
    """SPEC §B.3 domain choices; mutates ``frees``; raises ``PackError`` (all-or-nothing)."""
    if not request.allow_cross_group_spread:
        return _decide_single(topology, request, sizes, frees)
    if request.group_gpus is not None:
        return _decide_groups(topology, request, sizes, frees)
    return _decide_fill(topology, request, frees)


def _decide_single(
    topology: Topology, request: PackRequest, sizes: Sequence[int], frees: dict[str, int]
) -> Decision:
    total = request.total_gpus
    cands = single_domain_candidates(topology, request)
    chosen = next(
        (k for k in _sorted_keys({k: frees[k] for k in cands}) if frees[k] >= total), None
    )
    if chosen is None:
        best = _closest(topology, frees, cands, total)
        scope = (
            f"no domain of the run ({', '.join(cands)})"
            if preferred_present(topology, request)
            else "no single domain"
        )
        where = (
            f" (closest: {best} with {frees[best]} free)"
            if best is not None
            else f" (flavor {topology.flavor} has no domain)"
        )
        raise PackError(
            PackErrorKind.INSUFFICIENT_TOPOLOGY,
            f"{scope} has {total} free GPUs{where}",
            {best: total - frees[best]} if best is not None else {},
        )
    placed = [(s, chosen) for s in sizes]
    frees[chosen] -= total
    spares = decide_spares(frees, placed, request.spares_per_group)
    if spares is None:
        raise _spares_error(topology, frees, request, placed)
    return Decision(tuple(placed), spares)


def _decide_groups(
    topology: Topology, request: PackRequest, sizes: Sequence[int], frees: dict[str, int]
) -> Decision:
    used = preferred_present(topology, request)
    placed: list[tuple[int, str]] = []
    failed_at: int | None = None
    shortfall: dict[str, int] = {}
    for i, size in enumerate(sizes):
        chosen = _best(frees, (k for k in used if frees[k] >= size))
        if chosen is None:
            chosen = _best(frees, (k for k in frees if frees[k] >= size))
        if chosen is None:
            # Keep going as if the missing GPUs were freed where it is cheapest, so the error
            # reports the whole shortfall, not just the first group's.
            failed_at = i if failed_at is None else failed_at
            chosen = _closest(topology, frees, list(frees), size)
            if chosen is None:
                break
            shortfall[chosen] = shortfall.get(chosen, 0) + size - frees[chosen]
            frees[chosen] = size
        frees[chosen] -= size
        placed.append((size, chosen))
        if chosen not in used:
            used.append(chosen)
    if failed_at is not None:
        idx = request.group_index_offset + failed_at
        raise PackError(
            PackErrorKind.INSUFFICIENT_CAPACITY,
            f"group {idx} ({sizes[failed_at]} GPUs): no domain has {sizes[failed_at]} free GPUs",
            shortfall,
        )
    spares = decide_spares(frees, placed, request.spares_per_group)
    if spares is None:
        raise _spares_error(topology, frees, request, placed)
    return Decision(tuple(placed), spares)


def _decide_fill(topology: Topology, request: PackRequest, frees: dict[str, int]) -> Decision:
    total = request.total_gpus
    have = sum(frees.values())
    if have < total:
        raise PackError(
            PackErrorKind.INSUFFICIENT_CAPACITY,
            f"{total} GPUs requested, {have} free in flavor {topology.flavor}",
            _charge_busy(topology, frees, total - have),
        )
    preferred = set(preferred_present(topology, request))
    # Domains in (not preferred, free descending, key) order, popped only as far as needed:
    # a fill usually ends in its first domain, and sorting all of them was most of a plan.
    order = [(k not in preferred, -f, k) for k, f in frees.items()]
    heapq.heapify(order)
    placed: list[tuple[int, str]] = []
    left = total
    while order:
        if left == 0:
            break
        d = heapq.heappop(order)[2]
        k = min(frees[d], left)
        if k > 0:
            placed.append((k, d))
            frees[d] -= k
            left -= k
    spares = decide_spares(frees, placed, request.spares_per_group)
    if spares is None:
        raise _spares_error(topology, frees, request, placed)
    return Decision(tuple(placed), spares)


# --------------------------------------------------------------------------------------------
# Realisation and the public entry point
# --------------------------------------------------------------------------------------------


def realize(work: Work, request: PackRequest, decision: Decision, solver: str) -> PackPlan:
    """Turn domain decisions into node allocations and slots (actives of all groups first, in
    index order, then spares), so both planners share one slot-choosing rule."""
    actives = [work.allocate(d, size) for size, d in decision.groups]
    out: list[GroupPlacement] = []
    for i, ((size, d), allocs) in enumerate(zip(decision.groups, actives, strict=True)):
        spare: list[NodeAllocation] = []
        for sd, k in decision.spares[i]:
            spare.extend(work.allocate(sd, k))
        out.append(
            GroupPlacement(
                index=request.group_index_offset + i,
                size=size,
                domain=d,
                allocations=allocs,
                spare_allocations=tuple(spare),
            )
        )
    return PackPlan(
        groups=tuple(out),
        total_gpus=request.total_gpus,
        total_spares=request.spares_per_group * len(out),
        solver=solver,
    )


Planner = Callable[[Topology, PackRequest], PackPlan]
"""A placement planner: the greedy packer, or CP-SAT seeded by it; the engine takes either."""


def pack_greedy(topology: Topology, request: PackRequest) -> PackPlan:
    """SPEC §B.3 greedy pack; raises ``PackError`` and never returns a partial width."""
    sizes = validate(topology, request)
    work = Work(topology, request.excluded_slots)
    decision = decide_greedy(topology, request, sizes, work.domain_frees())
    return realize(work, request, decision, "greedy")


# --------------------------------------------------------------------------------------------
# The shared objective
# --------------------------------------------------------------------------------------------


class PlanCost(msgspec.Struct, frozen=True, order=True):
    """Lexicographic quality of a plan, smaller is better (the optimiser's objective).

    ``span``: domains touched (actives or spares) that the run did not already use.
    ``stranded``: free GPUs left behind in the touched domains - a tight best fit strands little
    and leaves large free domains whole for the next gang.
    ``nodes``: distinct nodes touched.
    """

    span: int
    stranded: int
    nodes: int


def plan_cost(topology: Topology, request: PackRequest, plan: PackPlan) -> PlanCost:
    """Score ``plan`` against the snapshot it was made from (excluded slots count as not free)."""
    return plan_cost_on(Work(topology, request.excluded_slots), request, plan)


def plan_cost_on(work: Work, request: PackRequest, plan: PackPlan) -> PlanCost:
    """Score ``plan`` against a working overlay (in a batch, earlier plans count as taken)."""
    taken: dict[str, int] = {}
    for g in plan.groups:
        for a in _allocs(g):
            d = work.topology.domain_of(a.node)
            taken[d] = taken.get(d, 0) + len(a.slots)
    preferred = set(request.preferred_domains)
    return PlanCost(
        span=sum(1 for d in taken if d not in preferred),
        stranded=sum(work.domain_free(d) - n for d, n in taken.items()),
        nodes=len(plan.nodes()),
    )
