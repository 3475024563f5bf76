"""A known matching changed by a little, without running the deferred acceptance again.

``extend_fill`` adds newcomers (an admission's leases) and ``shrink_fill`` removes leases that
closed, each only when the result is provably what ``fill`` over everything would give (the
reasoning is on each function), and ``None`` otherwise - the caller then runs ``fill``.
``tests/core/test_incremental.py`` checks both against ``fill`` over generated worlds and event
sequences.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import math
import operator
from collections import defaultdict
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import TypeVar

from gpu_fleet.core.funding.accepted_rows import with_changes
from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, location_of
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import (
    _REWRITING,
    Accepted,
    FillResult,
    FillTrace,
    HoursChecks,
    Rejection,
    RewordedLog,
    merge_by_id,
)
from gpu_fleet.core.funding.matching import (
    _HOURS,
    CLASS_OF_RANK,
    HOURS_EPSILON,
    LOAN,
    SPONSOR,
    HoursView,
    _Claim,
    _hours_ok,
    _new_claim,
    _passed,
)
from gpu_fleet.core.funding.ranked_rows import EMPTY_ROWS, RankedRows
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Instant, Lease, Run

_K = TypeVar("_K")

_ACCEPTED_RANK = operator.attrgetter("rank")


def extend_fill(  # noqa: PLR0917 - fill's inputs, plus the matching they extend
    index: EnvelopeIndex,
    base: FillResult,
    new: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
    hours: HoursView | None = None,
    *,
    runs_alone: bool = True,
) -> FillResult | None:
    """``fill`` over the leases ``base`` matched plus ``new``, without running it again - or
    ``None`` when that cannot be proven equal, and the caller runs ``fill``.

    ``base`` must be ``fill`` of the other leases at the same ``t`` with the same ``runs``,
    ``admitted``, labels and hours (the caller guarantees it); ``runs_alone`` says that no lease
    in ``base`` belongs to a run of ``new``.

    Why the shortcut is exact.  Each new claim must fit - after the new claims ranked above it -
    on top of the highest counters any decision of its first envelope's acceptor group left in
    ``base``'s run (``FillTrace`` peaks), under every limit acceptance checks (concurrency,
    lending cap, the run's borrow limit, aggregate caps; each only gets harder as counters
    grow), and one of these holds there:

    * it is junior to every claim that ever proposed to that group (``FillTrace.junior``), and
      fits its GPU-hours too: then it is considered after every other candidate of each of the
      group's decisions, so it changes no decision about anyone else, and it fits every time;
    * the group never turned anyone away (``FillTrace.rejected_at``), so its peaks are what it
      holds at the end and everyone who ever proposed there is held: then everything that can
      ever propose there, the newcomer included, fits together, every decision accepts every
      candidate, whatever their order, and nothing turned away elsewhere changes.  Where its
      envelope or a cap over it sets GPU-hours, those checks depend on rank order: a claim
      ranked below the newcomer counts the newcomer's width ahead of it.  So every check made
      there must still pass with all the new width there ahead of it: the hours left exceed
      the period times the largest width a passing check counted (``HoursChecks.top``) plus
      the new width, plus ``HOURS_EPSILON`` - which passes both of ``_hours_ok``'s forms,
      whether or not the claim was funded there before.  Only that envelope's and its caps'
      counters grow: the other envelopes of the group check other counters.

    Either way it is accepted in round 1 and never turned away: the matching is ``base`` plus
    each new claim held by its first envelope.  A loan's borrow limit counts the run's other
    loans, which live in other acceptors, so a new claim that borrows needs ``runs_alone``.
    """
    trace = base.trace
    if trace is None:
        return None
    hours = hours or HoursView()
    period = hours.period_hours
    proposer = base.proposer(index, t)
    if base._added is not None and len(base._added[0]) + len(new) > _layer_limit(base):
        base._unite()  # one copy of every open lease now and then, not one per admission
    payer: dict[str, EnvelopeKey | None] = {}
    cls: dict[str, FundingClass] = {}
    rejections: dict[str, list[Rejection]] = {}
    if base._added is not None:
        payer, cls, rejections = (dict(base._added[0]), dict(base._added[1]), dict(base._added[2]))
    claims: list[tuple[tuple[object, ...], _Claim, EnvelopeInfo, Tier]] = []
    live: list[Lease] = []
    for lease in sorted(new, key=lambda x: x.id):
        if not lease.live_at(t):
            continue
        if lease.id in payer or lease.id in base._payer:
            return None  # not new: the caller's promise is broken, do it the long way
        live.append(lease)
        run = runs.get(lease.run)
        payer[lease.id] = None
        cls[lease.id] = FundingClass.UNFUNDED
        rejections[lease.id] = []
        if run is None:
            continue
        owner = index.family.owner_of(run.metadata.namespace)
        labels = node_labels.get(lease.node)
        location = location_of(labels) if labels is not None else None
        claim = _new_claim(
            lease,
            run,
            run.key,
            admitted.get(run.key, lease.start),
            proposer.envelopes_for(run, owner, location),
        )
        if not claim.proposals:
            continue
        env = index.envelopes[claim.proposals[0]]
        tier = index.family.tier(env.owner, owner)
        claims.append((claim.rank_at(env, tier), claim, env, tier))
    claims.sort(key=lambda r: r[0])
    used: dict[EnvelopeKey, int] = defaultdict(int)
    lent: dict[EnvelopeKey, int] = defaultdict(int)
    cap_used: dict[str, int] = defaultdict(int)
    borrowed: dict[str, int] = defaultdict(int)
    junior = dict(trace.junior)
    # The base's GPU-hour checks and the newcomers' (each at the bound the extension checked,
    # which is at least the one ``fill`` would check: a stricter bound, so a safe one).
    checks = _checks_copy(trace.hours)
    already_copied = False
    # Envelopes and caps setting GPU-hours where a newcomer is ranked amid the claims held.
    amid: set[EnvelopeKey | str] = set()
    for rank, c, env, _tier in claims:
        acceptor = index.acceptor_of[env.key]
        last = junior.get(acceptor)
        is_junior = last is None or rank > last
        if not is_junior:
            if acceptor in trace.rejected_at:
                return None
            if env.gpu_hours is not None:
                amid.add(env.key)
            amid.update(cap_id for cap_id in env.caps if index.caps[cap_id].gpu_hours is not None)
        junior[acceptor] = rank if last is None or rank > last else last
        w = c.lease.width
        key = env.key
        above = trace.used.get(key, 0) + used[key]
        if above + w > env.concurrency:
            return None
        already = (c.lease.id, key) in hours.previously_funded
        if already and checks is not None and not already_copied:
            checks = dataclasses.replace(checks, already=set(checks.already))
            already_copied = True
        if rank[0] in (LOAN, SPONSOR):
            if not runs_alone:
                return None
            if env.lending_max is not None and (
                trace.lent.get(key, 0) + lent[key] + w > env.lending_max
            ):
                return None
            if c.borrow_cap is not None and borrowed[c.run_key] + w > c.borrow_cap:
                return None
            lent[key] += w
            borrowed[c.run_key] += w
        for cap_id in env.caps:
            cap = index.caps[cap_id]
            cap_above = trace.cap.get(cap_id, 0) + cap_used[cap_id]
            if cap.max_concurrency is not None and cap_above + w > cap.max_concurrency:
                return None
            if cap.gpu_hours is not None and not _hours_pass(
                checks,
                cap_id,
                (c.lease.id, key),
                (hours.remaining_cap.get(cap_id, cap.gpu_hours), period, cap_above, w, already),
            ):
                return None
            cap_used[cap_id] += w
        if env.gpu_hours is not None and not _hours_pass(
            checks,
            key,
            (c.lease.id, key),
            (hours.remaining_envelope.get(key, env.gpu_hours), period, above, w, already),
        ):
            return None
        used[key] += w
    if amid and not _still_pass_amid(trace.hours, checks, amid, hours, index, (used, cap_used)):
        return None
    changed: dict[EnvelopeKey, RankedRows] = {}
    for rank, c, env, _ in claims:
        row = Accepted(rank, c.lease.width, int(rank[0]))  # type: ignore[call-overload]
        rows = changed.get(env.key)
        if rows is None:
            rows = base.accepted.get(env.key, EMPTY_ROWS)
        changed[env.key] = rows.inserted(row)
        payer[c.lease.id] = env.key
        cls[c.lease.id] = CLASS_OF_RANK[row.rank_class]
    new_trace = FillTrace(
        junior,
        _plus(trace.used, used),
        _plus(trace.lent, lent),
        _plus(trace.cap, cap_used),
        trace.rejected_any,
        trace.rejected_at,
        checks,
    )
    ordered = base.ordered
    last_id = base.last_id()
    if ordered and last_id is not None:
        ordered = not any(x.id < last_id for x in new if x.id in payer)
    # The log before the map: a base settled by another thread in between then hands on its
    # log with the settled map, which is what that log settles to (never the placeholder and
    # no log).
    log = base._rejection_log
    accepted = with_changes(base.accepted, changed)
    out = FillResult(
        base._payer, base._funding_class, base._rejections, accepted, new_trace, ordered
    )
    out._added = (payer, cls, rejections)  # the base's maps are shared, never written
    out._rejection_log = log
    out._proposer = proposer
    out._derived = base.derived(tuple(live), frozenset())
    _hand_on(base, out, new, claims)
    return out


def _hand_on(
    base: FillResult,
    out: FillResult,
    new: Sequence[Lease],
    claims: Sequence[tuple[tuple[object, ...], _Claim, EnvelopeInfo, Tier]],
) -> None:
    """Give ``out`` what ``base`` already computed, updated for the newcomers, instead of
    rebuilding it from every open lease: the lease-id order (each newcomer inserted where it
    sorts) and the funded pairs.  Each envelope's rows and running totals are shared through
    ``RankedRows`` already."""
    # The lease-id order and the funded pairs, each as what the base knew and what was added
    # since; the added part is folded in past the layer limit (many admissions at one
    # instant), not copied whole at every admission.
    limit = _layer_limit(base)
    ids = base._by_id_parts or ((base._by_id, []) if base._by_id is not None else None)
    if ids is not None:
        known, added = ids[0], list(ids[1])
        for lease in new:
            cls = out.class_of(lease.id)
            if cls is not None:  # a lease not live at the instant is left out
                bisect.insort(added, (lease.id, cls))
        out._by_id_parts = (merge_by_id(known, added), []) if len(added) > limit else (known, added)
    pairs = frozenset((c.lease.id, env.key) for _, c, env, _ in claims)
    parts = base._pairs_parts or ((base._pairs, frozenset()) if base._pairs is not None else None)
    if parts is not None:
        known_pairs, added_pairs = parts[0], parts[1] | pairs
        if len(added_pairs) > limit:
            known_pairs, added_pairs = known_pairs | added_pairs, frozenset()
        out._pairs_parts = (known_pairs, added_pairs)


def _hours_pass(
    checks: HoursChecks | None,
    key: EnvelopeKey | str,
    pair: tuple[str, EnvelopeKey],
    check: tuple[float, float, int, int, bool],
) -> bool:
    """``_hours_ok(*check)``, a pass noted in ``checks`` (if any) as ``fill`` notes its own."""
    if not _hours_ok(*check):
        return False
    if checks is not None:
        _remaining, period, above, width, already = check
        _passed(checks, key, pair, period, above, width, already)
    return True


def _still_pass_amid(  # noqa: PLR0917 - the extension's state
    known: HoursChecks | None,
    checks: HoursChecks | None,
    amid: AbstractSet[EnvelopeKey | str],
    hours: HoursView,
    index: EnvelopeIndex,
    new_width: tuple[Mapping[EnvelopeKey, int], Mapping[str, int]],
) -> bool:
    """Does every GPU-hour check ``known`` notes on ``amid`` pass with the extension's new width
    there ahead of it (``extend_fill``)?  Noted in ``checks``, the extension's record, as
    bounds a reuse under other hours left must keep (``rebase_fill``): each at least the bound
    of a check it stands for."""
    if known is None or checks is None:
        return False  # the base noted no checks: nothing shows they pass
    period = known.period_hours
    for key in amid:
        if isinstance(key, str):
            extra = new_width[1][key]
            left = hours.remaining_cap.get(key, index.caps[key].gpu_hours)
        else:
            extra = new_width[0][key]
            left = hours.remaining_envelope.get(key, index.envelopes[key].gpu_hours)
        top = known.top.get(key)
        if top is None:
            continue  # no claim held before checked it
        assert left is not None, "an envelope or cap amid sets GPU-hours"
        bound = period * (top + extra) + HOURS_EPSILON
        if not left > bound:
            return False
        checks.passed(key, bound, None)
        checks.top[key] = max(checks.top.get(key, -1), top + extra)
    return True


def _checks_copy(known: HoursChecks | None) -> HoursChecks | None:
    """``known`` to add an extension's checks to: its bounds copied (one per envelope or cap
    that sets GPU-hours), its sets shared - a newcomer never was funded before, so it adds to
    neither (``extend_fill`` copies ``already`` if one ever does).  ``None`` stays ``None``: a
    base that noted no checks cannot be reused under other hours left, nor can its extension."""
    if known is None:
        return None
    return dataclasses.replace(
        known, strict=dict(known.strict), weak=dict(known.weak), top=dict(known.top)
    )


def _layer_limit(base: FillResult) -> int:
    """Newcomers laid over a matching's maps before they are united: about the square root
    of twice the open leases, which balances copying the layer at every extension against
    copying every lease at each union (both then cost ~sqrt(2n) per admission)."""
    return max(32, math.isqrt(2 * len(base._payer)))


def _plus(base: Mapping[_K, int], extra: Mapping[_K, int]) -> dict[_K, int]:
    out = dict(base)
    for k, v in extra.items():
        if v:
            out[k] = out.get(k, 0) + v
    return out


def shrink_fill(base: FillResult, gone: Sequence[Lease]) -> FillResult | None:
    """``fill`` over the leases ``base`` matched minus ``gone``, without running it again - or
    ``None`` when that cannot be proven equal, and the caller runs ``fill``.

    ``base`` must be ``fill`` at some instant with the same other inputs.  Exact when no
    envelope turned anyone away in ``base``'s run (``FillTrace.rejected_any``): then every claim
    was held by its first envelope in round 1, every acceptance check passed, and with fewer
    claims every counter is lower, so every check passes again (each only gets easier as
    counters fall).  The matching is ``base`` without the leases gone; the trace's junior ranks
    and peaks stay valid as bounds.
    """
    trace = base.trace
    if trace is None or trace.rejected_any:
        return None
    ids = {x.id for x in gone if x.id in base.payer}
    if not ids:
        return base
    payer = {k: v for k, v in base.payer.items() if k not in ids}
    cls = {k: v for k, v in base.funding_class.items() if k not in ids}
    rejections = {k: v for k, v in base.rejections.items() if k not in ids}
    gone_from: dict[EnvelopeKey, set[str]] = defaultdict(set)
    for lid in ids:
        env = base.payer[lid]
        if env is not None:
            gone_from[env].add(lid)
    accepted = with_changes(
        base.accepted,
        # a row's rank ends in its lease id
        {env: base.accepted[env].without(lids) for env, lids in gone_from.items()},
    )
    out = FillResult(payer, cls, rejections, accepted, trace, base.ordered)
    out._derived = base.derived((), frozenset(ids))
    return out


def rebase_fill(base: FillResult, index: EnvelopeIndex, hours: HoursView) -> FillResult | None:
    """``fill`` over ``base``'s inputs under the GPU-hours left that ``hours`` says, without
    running it again - or ``None`` when that cannot be proven equal, and the caller runs
    ``fill``.  The caller guarantees that nothing else changed (leases, budgets, nodes, runs,
    and no window bound or lease end in between).

    Why it is exact.  Only the GPU-hour checks read the hours left (``_hours_ok``), and each
    passes more easily with more hours left, and more easily for a claim that was funded there
    in the last piece.  ``base`` noted what its checks read (``HoursChecks``).  Under ``hours``
    every check comes out as it did - so ``fill`` makes the same decisions, one after another,
    to the same end - when:

    * no envelope or cap has more hours left than ``base`` read: a check that failed fails
      again (the meter only ever adds hours used);
    * every bound a passing check compared with still holds;
    * the claims counted as funded in the last piece are the same, or they are exactly the
      pairs ``base`` funds and include every pair that passed as previously funded: a pair
      ``base`` funds passed every check it met there (a claim turned away never proposes there
      again), so counting it as previously funded only eases checks that passed (while the
      period times the claim's width exceeds twice ``HOURS_EPSILON``: always, for a period of
      at least a second and a claim of a GPU), and no check that passed that way gets
      stricter.

    Then the matching is ``base``, with the reasons naming the hours left of an envelope
    restated (``RewordedLog``).  A fleet whose budgets set GPU-hours otherwise matched every
    open lease again at every instant the clock moved (issue 11: 1.2 s at 100k open leases).
    """
    trace = base.trace
    if trace is None:
        return None
    checks = trace.hours
    if checks is None:  # no hours left were read: none may be read now
        return None if hours.remaining_envelope or hours.remaining_cap else base
    if hours.period_hours != checks.period_hours:
        return None
    if not _still_pass(checks, hours.remaining_envelope, checks.remaining_envelope):
        return None
    if not _still_pass(checks, hours.remaining_cap, checks.remaining_cap):
        return None
    funded_before = hours.previously_funded
    already = checks.already
    if funded_before is not checks.previously_funded and funded_before != checks.previously_funded:
        if funded_before != base.funded_pairs() or not checks.already <= funded_before:
            return None
        if checks.period_hours * checks.narrowest <= 2 * HOURS_EPSILON:
            return None  # a period so short that being funded before would not ease a check
        already = funded_before  # every pair that passes as previously funded now
    stated = checks.stated if checks.stated is not None else checks.remaining_envelope
    reworded: dict[Rejection, Rejection] = {}
    for key in checks.exhausted:
        full = index.envelopes[key].gpu_hours
        was, now = stated.get(key, full), hours.remaining_envelope.get(key, full)
        if was != now:
            reworded[Rejection(key, _HOURS, (was,))] = Rejection(key, _HOURS, (now,))
    out = copy.copy(base)
    out.trace = dataclasses.replace(
        trace,
        hours=dataclasses.replace(
            checks,
            previously_funded=funded_before,
            already=already,
            stated=hours.remaining_envelope,
        ),
    )
    if reworded:
        _reword(base, out, reworded)
    return out


def _still_pass(checks: HoursChecks, now: Mapping[_K, float], then: Mapping[_K, float]) -> bool:
    """Every check against the hours left in ``now`` comes out as against ``then``: the same
    envelopes or caps, none with more hours left, every passing check's bounds still held."""
    if now is then:
        return True
    if now.keys() != then.keys():
        return False
    strict, weak = checks.strict, checks.weak
    for key, left in now.items():
        if left > then[key]:
            return False
        bound = strict.get(key)  # type: ignore[call-overload]
        if bound is not None and not left > bound:
            return False
        bound = weak.get(key)  # type: ignore[call-overload]
        if bound is not None and not left + HOURS_EPSILON >= bound:
            return False
    return True


def _reword(base: FillResult, out: FillResult, reworded: dict[Rejection, Rejection]) -> None:
    """Give ``out`` ``base``'s rejections with ``reworded`` restated, read when first asked.
    A log that restates another's is composed with it, so matchings reused one after another
    refer to the one they all came from, not to a chain of every one in between."""
    with _REWRITING:
        log = base._rejection_log
        if isinstance(log, RewordedLog) and log.source is not None:
            source = log.source
            reworded = {
                **reworded,
                **{was: reworded.get(now, now) for was, now in log.reworded.items()},
            }
        else:
            source = base
        out._rejections = {}
        out._rejection_log = RewordedLog(source, reworded)
