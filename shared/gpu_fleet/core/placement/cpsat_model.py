"""The CP-SAT model of a placement: domain classes, patterns, and the objective.

Domains with the same free GPUs (and the same "already used by the run" flag) are
interchangeable for the decisions that matter, so they form one *class* with a multiplicity.
Candidate classes are pre-filtered to ``max_candidate_domains``: the classes greedy used (so its
answer is always a feasible hint), the run's own domains, then alternately the classes that can
host the most groups (few domains) and those that would strand the fewest GPUs (tight fit).
Multiplicity is capped at the number of groups, so the model never grows with the fleet: for a
10k-node fleet it has the same few hundred variables as for a 1k-node one.

* groups mode: an integer ``y[c, (k, s)]`` counts the domains of class ``c`` hosting ``k`` full
  groups and ``s`` (0/1) short last group; the counts must add up to the groups of the request.
* single-domain mode: the same with exactly one pattern, ``k`` = all groups, and one domain.
* fill-to-empty mode (no group size): per class, how many domains are drained completely, plus
  one domain taking the remainder - so every used domain but one is still filled to empty.

Objective, lexicographic via weights (smaller is better): (1) domains touched that the run did
not already use, a spare overflow counting as one more; (2) GPUs stranded in the touched domains
(free GPUs left there - best fit, so large free domains stay whole for the next gang); (3) nodes
touched (estimated from the class's first domain; for a fill remainder, at its largest size).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from ortools.sat.python import cp_model

from gpu_fleet.core.placement.pack import (
    Decision,
    PackError,
    PackErrorKind,
    PackRequest,
    Work,
    decide_spares,
    preferred_present,
    single_domain_candidates,
)
from gpu_fleet.core.placement.topology import Topology

_RANDOM_SEED = 20240101
_MAX_OBJECTIVE = 1 << 60
_SMALL_K = 6  # k values always offered for a class: 1.._SMALL_K and the top _SMALL_K


class PlannerSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Knobs of the optimiser (cluster settings of the binder).

    ``workers``: CP-SAT search workers (keep 1 for bit-for-bit replays; >1 is faster but only
    deterministic in the objective it reaches).  ``deterministic_time``: CP-SAT's deterministic
    time limit per plan, in its own units (roughly seconds on a modern core); ``plan_batch`` splits
    it across the batch.  ``max_candidate_domains``: cap on candidate domain classes, the knob that
    bounds the model size.  ``enabled=False`` means pure SPEC greedy.
    """

    workers: int = 1
    deterministic_time: float = 0.5
    max_candidate_domains: int = 48
    enabled: bool = True


DEFAULT_SETTINGS = PlannerSettings()
_Term = tuple[cp_model.IntVar, int, int]  # (variable, coefficient, variable upper bound)


@dataclass
class _Class:
    """Interchangeable domains: same free GPUs, same 'run already uses it' flag."""

    free: int
    preferred: bool
    domains: list[str]  # SPEC order within the class: key ascending
    mult: int  # how many of its domains the model may use
    work: Work

    @functools.cached_property
    def profile(self) -> tuple[int, ...]:
        """Node free counts of the first domain, descending.  Computed when a pattern's cost
        needs it: an evident optimum (most admissions) never does, and it is most of a build."""
        nodes = self.work.topology.domain(self.domains[0]).nodes
        return tuple(sorted((self.work.node_free(n) for n in nodes), reverse=True))

    def nodes_for(self, gpus: int) -> int:
        """Nodes SPEC allocation would touch taking ``gpus`` (largest nodes first)."""
        n = 0
        for f in self.profile:
            if gpus <= 0:
                break
            gpus -= f
            n += 1
        return n


@dataclass
class _Pattern:
    """``count`` domains of class ``cls`` each hosting ``k`` full groups and ``s`` short ones
    (fill mode: each drained, ``k`` = its free GPUs)."""

    cls: int
    k: int
    s: int
    cost: tuple[int, int, int]
    ub: int


@dataclass
class PlacementModel:
    work: Work
    request: PackRequest
    sizes: list[int]
    frees: dict[str, int]
    classes: list[_Class]
    greedy: Decision | None

    @property
    def fill(self) -> bool:
        return self.request.allow_cross_group_spread and self.request.group_gpus is None

    @property
    def single(self) -> bool:
        return not self.request.allow_cross_group_spread

    @staticmethod
    def build(
        work: Work,
        request: PackRequest,
        sizes: list[int],
        *,
        frees: dict[str, int],
        greedy: Decision | None,
        settings: PlannerSettings,
    ) -> PlacementModel | None:
        topology = work.topology
        preferred = set(preferred_present(topology, request))
        if not request.allow_cross_group_spread:
            allowed = [
                d
                for d in single_domain_candidates(topology, request)
                if frees[d] >= request.total_gpus
            ]
        else:
            smallest = 1 if request.group_gpus is None else min(sizes)
            allowed = [d for d in topology.domain_keys() if frees[d] >= smallest]
        by_key: dict[tuple[bool, int], list[str]] = {}
        for d in sorted(allowed):
            by_key.setdefault((d in preferred, frees[d]), []).append(d)
        if not by_key:
            return None
        must = {k for k in by_key if k[0]}
        if greedy is not None:
            must |= {(d in preferred, frees[d]) for _, d in greedy.groups}
        chosen = _prefilter(by_key, must, request, sizes, settings.max_candidate_domains)
        classes: list[_Class] = []
        for key in sorted(chosen, key=lambda k: (not k[0], -k[1])):
            doms = by_key[key]
            if not request.allow_cross_group_spread:
                mult = 1
            elif request.group_gpus is None:
                mult = min(len(doms), request.total_gpus // key[1] + 1)
            else:
                mult = min(len(doms), len(sizes))
            classes.append(_Class(key[1], key[0], doms, mult, work))
        return PlacementModel(work, request, sizes, frees, classes, greedy)

    # -- patterns ----------------------------------------------------------------------------

    def shape(self) -> tuple[int, int, int, int]:
        """(full size, number of full groups, short size, number of short groups)."""
        g = self.sizes[0]
        n_full = sum(1 for s in self.sizes if s == g)
        short = self.sizes[-1] if self.sizes[-1] != g else 0
        return g, n_full, short, 1 if short else 0

    def _cost(self, c: _Class, active: int, groups_here: int) -> tuple[int, int, int]:
        """(span, stranded, nodes) of one domain of ``c`` taking ``active`` GPUs of groups."""
        sp = self.request.spares_per_group * groups_here
        room = c.free - active
        inside = min(sp, room)
        span = (0 if c.preferred else 1) + (1 if sp > inside else 0)
        return span, room - inside, c.nodes_for(active + inside)

    def patterns(self) -> list[_Pattern]:
        g, n_full, short, n_short = self.shape()
        out: list[_Pattern] = []
        if self.single:
            for i, c in enumerate(self.classes):
                cost = self._cost(c, self.request.total_gpus, len(self.sizes))
                out.append(_Pattern(i, n_full, n_short, cost, 1))
            return out
        if self.fill:
            # Drained domains only; the one partial remainder has its own variables.
            return [
                _Pattern(i, c.free, 1, self._cost(c, c.free, 1), c.mult)
                for i, c in enumerate(self.classes)
                if c.free <= self.request.total_gpus
            ]
        hinted = self.hint()
        for i, c in enumerate(self.classes):
            kmax = min(n_full, c.free // g)
            ks = set(range(min(kmax, _SMALL_K) + 1))
            ks |= set(range(max(0, kmax - _SMALL_K + 1), kmax + 1))
            ks |= {k for (ci, k, _s) in hinted if ci == i}
            for k in sorted(ks):
                for s in range(n_short + 1):
                    active = k * g + s * short
                    if k + s == 0 or active > c.free:
                        continue
                    ub = min(c.mult, n_full // k if k else n_short)
                    if ub > 0:
                        out.append(_Pattern(i, k, s, self._cost(c, active, k + s), ub))
        return out

    def hint(self) -> dict[tuple[int, int, int], int]:
        """Greedy's decision in pattern coordinates; empty if greedy failed or left the
        candidates (CP-SAT then searches unhinted)."""
        if self.greedy is None:
            return {}
        index = {(c.preferred, c.free): i for i, c in enumerate(self.classes)}
        preferred = set(self.request.preferred_domains)
        g = self.sizes[0]
        per_domain: dict[str, tuple[int, int, int]] = {}
        for size, d in self.greedy.groups:
            k, s, amount = per_domain.get(d, (0, 0, 0))
            full = size == g and not self.fill
            per_domain[d] = (k + 1, s, amount + size) if full else (k, s + 1, amount + size)
        counts: dict[tuple[int, int, int], int] = {}
        for d, (k, s, amount) in per_domain.items():
            ci = index.get((d in preferred, self.frees[d]))
            if ci is None:
                return {}
            if self.fill:
                if amount != self.frees[d]:
                    continue  # the partial remainder: not hinted
                key = (ci, amount, 1)
            else:
                key = (ci, k, s)
            counts[key] = counts.get(key, 0) + 1
        return counts

    # -- solve -------------------------------------------------------------------------------

    def solve(self, settings: PlannerSettings, budget: float) -> Decision | None:
        patterns = self.patterns()
        model = cp_model.CpModel()
        span: list[_Term] = []
        strand: list[_Term] = []
        nodes: list[_Term] = []
        per_class: dict[int, list[cp_model.IntVar]] = {}
        ys: list[cp_model.IntVar] = []
        hint = self.hint()
        for j, p in enumerate(patterns):
            y = model.new_int_var(0, p.ub, f"y{j}")
            ys.append(y)
            per_class.setdefault(p.cls, []).append(y)
            span.append((y, p.cost[0], p.ub))
            strand.append((y, p.cost[1], p.ub))
            nodes.append((y, p.cost[2], p.ub))
            model.add_hint(y, hint.get((p.cls, p.k, p.s), 0))
        partial = self._add_partials(model, per_class, span, strand, nodes) if self.fill else []
        for i, c in enumerate(self.classes):
            if per_class.get(i):
                model.add(sum(per_class[i]) <= c.mult)
        if self.fill:
            model.add(
                sum(p.k * y for p, y in zip(patterns, ys, strict=True)) + sum(a for _, a in partial)
                == self.request.total_gpus
            )
        elif self.single:
            model.add(sum(ys) == 1)
        else:
            _, n_full, _, n_short = self.shape()
            model.add(sum(p.k * y for p, y in zip(patterns, ys, strict=True)) == n_full)
            model.add(sum(p.s * y for p, y in zip(patterns, ys, strict=True)) == n_short)
        model.minimize(_weighted(span, strand, nodes))
        solver = cp_model.CpSolver()
        solver.parameters.num_workers = max(1, settings.workers)
        solver.parameters.max_deterministic_time = budget
        solver.parameters.random_seed = _RANDOM_SEED
        status = solver.solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        uses = [(p.cls, p.k, p.s, int(solver.value(y))) for p, y in zip(patterns, ys, strict=True)]
        partial_use: tuple[int, int] | None = None
        for i, (on, amount) in enumerate(partial):
            if solver.value(on):
                partial_use = (i, int(solver.value(amount)))
        return self._decision([u for u in uses if u[3]], partial_use)

    def _add_partials(
        self,
        model: cp_model.CpModel,
        per_class: dict[int, list[cp_model.IntVar]],
        span: list[_Term],
        strand: list[_Term],
        nodes: list[_Term],
    ) -> list[tuple[cp_model.IntVar, cp_model.IntVar]]:
        """Fill mode: at most one domain takes a remainder ``0 < amount < free``."""
        out: list[tuple[cp_model.IntVar, cp_model.IntVar]] = []
        for i, c in enumerate(self.classes):
            hi = max(0, min(c.free - 1, self.request.total_gpus))
            on = model.new_bool_var(f"p{i}")
            amount = model.new_int_var(0, hi, f"a{i}")
            model.add(amount <= hi * on)
            model.add(amount >= on)
            per_class.setdefault(i, []).append(on)
            span.append((on, 0 if c.preferred else 1, 1))
            strand.append((on, c.free, 1))  # stranded = free - amount
            strand.append((amount, -1, hi))
            # Nodes of the remainder, estimated at its largest size: an element constraint over
            # the exact table made the model 10x slower for a third-rank criterion that the
            # exact comparison with greedy re-checks anyway.
            nodes.append((on, c.nodes_for(hi), 1))
            out.append((on, amount))
        if out:
            model.add(sum(on for on, _ in out) <= 1)
        return out

    def _decision(
        self, uses: list[tuple[int, int, int, int]], partial: tuple[int, int] | None
    ) -> Decision:
        """Map class counts back to concrete domains (key order within a class) and groups."""
        taken: dict[int, int] = {}
        hosted: list[tuple[str, int, int]] = []  # (domain, k, s)
        for ci, k, s, n in sorted(uses, key=lambda u: (u[0], -u[1], -u[2])):
            c = self.classes[ci]
            for _ in range(n):
                hosted.append((c.domains[taken.get(ci, 0)], k, s))
                taken[ci] = taken.get(ci, 0) + 1
        preferred = set(self.request.preferred_domains)
        hosted.sort(key=lambda h: (h[0] not in preferred, -self.frees[h[0]], h[0]))
        placed: list[tuple[int, str]] = []
        if self.fill:
            placed = [(k, d) for d, k, _ in hosted]
            if partial is not None:
                ci, amount = partial
                placed.append((amount, self.classes[ci].domains[taken.get(ci, 0)]))
        else:
            g = self.sizes[0]
            short_domain: str | None = None
            for d, k, s in hosted:
                placed.extend((g, d) for _ in range(k))
                if s:
                    short_domain = d
            if short_domain is not None:
                placed.append((self.sizes[-1], short_domain))
        frees = dict(self.frees)
        for size, d in placed:
            frees[d] -= size
        spares = decide_spares(frees, placed, self.request.spares_per_group)
        if spares is None:
            raise _capacity_bug(self.request)
        return Decision(tuple(placed), spares)


def _capacity_bug(request: PackRequest) -> PackError:  # pragma: no cover - defensive
    return PackError(
        PackErrorKind.INSUFFICIENT_CAPACITY,
        f"spares of {request.total_gpus}-GPU request do not fit",
    )


def _weighted(span: list[_Term], strand: list[_Term], nodes: list[_Term]) -> cp_model.LinearExpr:
    """Lexicographic (span, stranded, nodes) as one weighted sum; weights come from the bounds
    of the lower criteria, and the nodes criterion is dropped if the weights would overflow."""

    def bound(terms: list[_Term]) -> int:
        return sum(abs(coef) * ub for _, coef, ub in terms)

    w_strand = bound(nodes) + 1
    w_span = (bound(strand) + 1) * w_strand
    w_nodes = 1
    if (bound(span) + 1) * w_span > _MAX_OBJECTIVE:
        w_nodes, w_strand, w_span = 0, 1, bound(strand) + 1
    terms = [(v, c * w_span) for v, c, _ in span]
    terms += [(v, c * w_strand) for v, c, _ in strand]
    terms += [(v, c * w_nodes) for v, c, _ in nodes]
    terms = [(v, c) for v, c in terms if c]
    return cp_model.LinearExpr.weighted_sum([v for v, _ in terms], [c for _, c in terms])


def evident_fill(
    topology: Topology,
    request: PackRequest,
    sizes: list[int],
    frees: dict[str, int],
    settings: PlannerSettings,
    *,
    as_snapshot: bool = False,
) -> tuple[Decision, bool] | None:
    """What planning decides for a fill that one domain can hold, without greedy or a model:
    ``(decision, is_greedy_s)``, or ``None`` where greedy and the model must tell.

    A fill-to-empty request with no spares and none of the run's own domains free, that some
    domain can hold whole: every plan over two or more domains has a larger span (the first
    criterion), so the optimum is one domain, and of those the one stranding least - the class
    with the fewest free GPUs that still hold the request, among the classes ``_prefilter``
    keeps for the model (greedy's class, the roomiest, always among them).  Nodes, the third
    criterion, are then the class's own, and the model maps a class to its first domain by key.
    So the answer is that domain: what the solver finds on these models, without building and
    running it (the build alone was a fifth of an admission, issue 11).  Greedy takes the
    roomiest domain; its plan stands when that is the answer's class (the same domain: least
    key of that free count), else the answer strands fewer GPUs and wins.
    ``tests/core/test_packing_cpsat.py`` checks it against the solver and against planning
    without it.  ``as_snapshot``: ``frees`` are ``topology``'s own counts (no plan's over them).
    """
    if request.group_gpus is not None or not request.allow_cross_group_spread:
        return None
    if request.spares_per_group:
        return None
    if any(frees.get(d, 0) for d in preferred_present(topology, request)):
        return None
    need = request.total_gpus
    distinct = set(frees.values())  # C-level passes over the domains, not Python loops:
    roomiest = max(distinct, default=0)  # this runs for every admission (issue 11)
    if roomiest < need:
        return None
    keys = dict.fromkeys((False, f) for f in sorted(distinct, reverse=True) if f)
    chosen = _prefilter(keys, {(False, roomiest)}, request, sizes, settings.max_candidate_domains)
    best = min(k[1] for k in chosen if k[1] >= need)
    # The least key among the domains with ``best`` free (every domain is a key): a binary
    # search in the snapshot's own order when ``frees`` are its counts, else a pass.
    domain = topology.least_key_with(best) if as_snapshot else None
    if domain is None:
        domain = min(itertools.compress(frees, map(best.__eq__, frees.values())))
    return Decision(((need, domain),), ((),)), best == roomiest


def _prefilter(
    by_key: Mapping[tuple[bool, int], object],
    must: set[tuple[bool, int]],
    request: PackRequest,
    sizes: list[int],
    cap: int,
) -> list[tuple[bool, int]]:
    """Keep at most ``cap`` classes (more only if greedy's own classes exceed it): the must-haves,
    then alternately the roomiest (fewest domains) and the tightest (least stranded) classes."""
    chosen = sorted((k for k in must if k in by_key), key=lambda k: (not k[0], -k[1]))
    rest = [k for k in by_key if k not in must]
    if len(chosen) + len(rest) <= cap:
        return chosen + rest
    g = sizes[0]
    need = sum(sizes)

    def waste(k: tuple[bool, int]) -> int:
        free = k[1]
        if request.group_gpus is None or not request.allow_cross_group_spread:
            return free - need if free >= need else 0 if need % free == 0 else free
        full = min(free // g, len(sizes))
        return free - full * g

    roomy = sorted(rest, key=lambda k: (-k[1], k[0]))
    tight = sorted(rest, key=lambda k: (waste(k), -k[1], k[0]))
    seen = set(chosen)
    for a, b in zip(roomy, tight, strict=True):
        for k in (a, b):
            if len(chosen) >= cap:
                return chosen
            if k not in seen:
                seen.add(k)
                chosen.append(k)
    return chosen
