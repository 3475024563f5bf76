"""The binder's placement optimiser: greedy first, then a small CP-SAT model over domain classes.

``plan_placement`` is the binder's single entry point; ``plan_batch`` re-plans many pending runs
under one time budget, in priority order, each seeing the allocations of the ones before it.

Why this shape (TOOLING.md §5): a direct group × node model is unusable on two cores, even at
1k nodes.  What works is deciding *domains* first, on aggregated data, and leaving node/slot
choice to the SPEC's per-domain allocation (``pack.realize``), which both planners share.

The model itself (domain classes, patterns, the three-part objective) is in ``cpsat_model``.
The same three criteria, computed exactly on the realised plan (``pack.plan_cost``), decide
between CP-SAT's plan and greedy's: the optimiser's plan is returned only when it is strictly
better, so **ties go to greedy** - greedy's order is the final tie-break.  This is what keeps the
shared scenarios (written against SPEC greedy) true: in pack-fill-domain-before-spilling,
pack-groups-prefer-used-domain, pack-spares-same-domain-then-spill and the golden files, the
greedy placement is either forced or tied on (1)-(3), so greedy's answer is returned.  Where the
optimiser does differ it keeps the SPEC's shape: groups never leave a domain, a fill-to-empty
request still drains every domain but one, a new domain costs more than any amount of stranding
(so the run's used domains stay preferred), and spares still follow the own-domain-then-sorted
rule.  What changes is *which* domain: the tightest that fits instead of the largest.

When greedy fails a groups request although the flavor has enough free GPUs in total, the model
searches the assignments jointly (greedy's early domain choices could, in principle, leave no
domain for the short last group).  A randomised search over thousands of small fleets found no
such instance - with equal groups and one short last group greedy's "fill the used domain" order
is complete in practice - so this is a safety net; every other greedy failure (single domain,
fill-to-empty, total capacity) is exact and returned at once without building a model.

Determinism: one worker by default, a fixed ``random_seed``, a *deterministic* time limit (no
wall-clock limit) and sorted, deterministic model construction.  Same snapshot and request, same
plan.  On UNKNOWN (budget exhausted before a solution) or any other non-solution status the
greedy answer stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from gpu_fleet.core.placement.cpsat_model import (
    DEFAULT_SETTINGS,
    PlacementModel,
    PlannerSettings,
    evident_fill,
)
from gpu_fleet.core.placement.pack import (
    Decision,
    PackError,
    PackErrorKind,
    PackPlan,
    PackRequest,
    PlanCost,
    Work,
    decide_greedy,
    plan_cost_on,
    realize,
    validate,
)
from gpu_fleet.core.placement.topology import Topology

SOLVER = "cp-sat"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def plan_placement(
    topology: Topology, request: PackRequest, settings: PlannerSettings = DEFAULT_SETTINGS
) -> PackPlan:
    """Place one request: greedy, improved by CP-SAT when strictly better.  Raises ``PackError``."""
    return _plan(*_one(topology, request, settings))


def plan_without_search(
    topology: Topology, request: PackRequest, settings: PlannerSettings = DEFAULT_SETTINGS
) -> PackPlan | None:
    """``plan_placement``'s answer when it needs no CP-SAT search, else ``None``.

    Greedy is provably optimal, greedy's failure is exact, or the model's optimum is evident:
    then ``plan_placement`` returns (or raises) exactly this, and a caller that would ask the
    binder for it can skip the round trip (issue 11: the admission path spends solver time, and
    a service hop, only where a search can help).  ``None``: only a search can tell.
    """
    return _plan(*_one(topology, request, settings), search=False)


def _one(
    topology: Topology, request: PackRequest, settings: PlannerSettings
) -> tuple[Work, PackRequest, list[int], PlannerSettings, float]:
    """``_plan``'s inputs for one request on a snapshot, with the whole solver budget."""
    sizes = validate(topology, request)
    return (
        Work(topology, request.excluded_slots),
        request,
        sizes,
        settings,
        settings.deterministic_time,
    )


def plan_batch(
    topology: Topology,
    requests: Sequence[PackRequest],
    settings: PlannerSettings = DEFAULT_SETTINGS,
) -> list[PackPlan | PackError]:
    """Plan ``requests`` in the given (priority) order against one snapshot.

    Each request sees the slots taken by the plans before it; a failing request takes nothing and
    its ``PackError`` takes its place in the result.  The deterministic time budget is split
    evenly, so the whole batch stays within ``settings.deterministic_time`` of solver time.
    """
    base = Work(topology)
    share = settings.deterministic_time / max(1, len(requests))
    out: list[PackPlan | PackError] = []
    for request in requests:
        try:
            sizes = validate(topology, request)
            work = base.fork()
            work.exclude(request.excluded_slots)
            plan = _plan(work, request, sizes, settings, share)
        except PackError as err:
            out.append(err)
            continue
        base.exclude(plan.slots())
        out.append(plan)
    return out


@overload
def _plan(
    work: Work, request: PackRequest, sizes: list[int], settings: PlannerSettings, budget: float
) -> PackPlan: ...


@overload
def _plan(
    work: Work,
    request: PackRequest,
    sizes: list[int],
    settings: PlannerSettings,
    budget: float,
    search: bool,
) -> PackPlan | None: ...


def _plan(  # noqa: PLR0917 - _plan's inputs, plus whether it may search
    work: Work,
    request: PackRequest,
    sizes: list[int],
    settings: PlannerSettings,
    budget: float,
    search: bool = True,
) -> PackPlan | None:
    """Greedy, improved by CP-SAT when strictly better.  Without ``search``, ``None`` where
    only running the solver could decide (everything before that point is the same)."""
    topology = work.topology
    frees = work.domain_frees()
    if settings.enabled and budget > 0:
        evident = evident_fill(
            topology, request, sizes, frees, settings, as_snapshot=work.untouched()
        )
        if evident is not None:
            quick, greedy_s = evident
            return realize(work.fork(), request, quick, "greedy" if greedy_s else SOLVER)
    greedy_decision: Decision | None = None
    greedy_error: PackError | None = None
    try:
        greedy_decision = decide_greedy(topology, request, sizes, dict(frees))
    except PackError as err:
        greedy_error = err
    greedy_plan = (
        realize(work.fork(), request, greedy_decision, "greedy")
        if greedy_decision is not None
        else None
    )
    if not settings.enabled or budget <= 0:
        return _greedy_result(greedy_plan, greedy_error)
    if greedy_plan is None and not _worth_rescuing(frees, request, sizes, greedy_error):
        return _greedy_result(greedy_plan, greedy_error)
    greedy_cost = plan_cost_on(work, request, greedy_plan) if greedy_plan is not None else None
    if greedy_cost is not None and _provably_optimal(frees, request, sizes, greedy_cost):
        return _greedy_result(greedy_plan, greedy_error)
    problem = PlacementModel.build(
        work, request, sizes, frees=frees, greedy=greedy_decision, settings=settings
    )
    decision = None
    if problem is not None:  # what is evident without a search was answered above
        if not search:
            return None
        decision = problem.solve(settings, budget)
    if decision is None:
        return _greedy_result(greedy_plan, greedy_error)
    plan = realize(work.fork(), request, decision, SOLVER)
    if greedy_cost is None or plan_cost_on(work, request, plan) < greedy_cost:
        return plan
    return _greedy_result(greedy_plan, greedy_error)


def _greedy_result(plan: PackPlan | None, error: PackError | None) -> PackPlan:
    if plan is not None:
        return plan
    assert error is not None
    raise error


def _worth_rescuing(
    frees: dict[str, int], request: PackRequest, sizes: list[int], error: PackError | None
) -> bool:
    """Greedy's failure is exact for single-domain and fill requests and whenever total capacity
    is short; only a groups request with enough total capacity may have a placement greedy's
    domain order missed.  (A randomised search over thousands of small fleets found none: with
    equal groups and one short last group, greedy's fill-the-used-domain order is complete in
    practice.  The model stays as a safety net, and costs nothing on the common failures.)"""
    if error is None or error.kind is PackErrorKind.INVALID_REQUEST:
        return False
    if not request.allow_cross_group_spread or request.group_gpus is None:
        return False
    need = sum(sizes) + request.spares_per_group * len(sizes)
    return sum(frees.values()) >= need


def _provably_optimal(
    frees: dict[str, int], request: PackRequest, sizes: list[int], cost: PlanCost
) -> bool:
    """Cheap exits: nothing stranded and no more new domains than the least possible."""
    if cost.stranded != 0:
        return False
    if cost.span == 0:
        return True
    return cost.span <= span_lower_bound(frees, request, sizes)


def span_lower_bound(frees: dict[str, int], request: PackRequest, sizes: Sequence[int]) -> int:
    """Fewest new domains whose free GPUs could hold actives and spares (capacity only)."""
    need = sum(sizes) + request.spares_per_group * len(sizes)
    preferred = set(request.preferred_domains)
    need -= sum(f for d, f in frees.items() if d in preferred)
    n = 0
    for f in sorted((f for d, f in frees.items() if d not in preferred), reverse=True):
        if need <= 0:
            break
        need -= f
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# The size of the model, for tests and the bench
# --------------------------------------------------------------------------------------------


def model_size(
    topology: Topology, request: PackRequest, settings: PlannerSettings = DEFAULT_SETTINGS
) -> int:
    """Decision variables the optimiser would build for ``request`` (for tests and the bench)."""
    sizes = validate(topology, request)
    work = Work(topology, request.excluded_slots)
    frees = work.domain_frees()
    try:
        greedy: Decision | None = decide_greedy(topology, request, sizes, dict(frees))
    except PackError:
        greedy = None
    problem = PlacementModel.build(
        work, request, sizes, frees=frees, greedy=greedy, settings=settings
    )
    if problem is None:
        return 0
    return len(problem.patterns()) + (3 * len(problem.classes) if problem.fill else 0)
