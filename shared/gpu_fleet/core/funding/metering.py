"""GPU-hour metering and the funding evaluation at an instant.

The meter is *folded* forward in time, never recomputed from the beginning: each ``advance``
charges the interval since the last one to whichever envelope paid for it during that interval
(DESIGN decision 9: payers are derived per interval).  Intervals are split wherever the funding
could change by itself - a lease starting or ending, a window opening or closing, and the
instant an envelope's remaining GPU-hours cross a hysteresis threshold (DESIGN decision 1) - so
funded consumption never exceeds an allowance.

Folding rather than re-deriving is a deliberate departure from the reference (SPEC §F.2 item 12):
editing a window or re-binding a namespace changes the future, not hours already attributed.
Hours used while Unfunded are metered per run and charge no envelope.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import cast

import numpy as np

from gpu_fleet.core.funding.charges import (
    LENT_CLASSES,
    Charges,
    add_flat,
    add_nested,
    add_pieces,
)
from gpu_fleet.core.funding.envelopes import EnvelopeIndex
from gpu_fleet.core.funding.fill_result import (
    ROLE_CODES,
    Accepted,
    Changes,
    ClaimColumns,
    FillResult,
)
from gpu_fleet.core.funding.incremental import rebase_fill
from gpu_fleet.core.funding.matching import CLASS_OF_RANK, HoursView, fill
from gpu_fleet.core.funding.ranked_rows import RankedRows
from gpu_fleet.core.gcpause import paused_gc
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Instant, Lease, LeaseRole, Run

_MIN_STEP = 1e-3  # seconds; keeps a float crossing from stalling the fold
PENDING_MOST = 32
"""Pieces whose runs' totals wait to be read (``Meter.flush``) before they are written anyway:
each holds an array over the open leases (32 x 100k floats: 26 MB)."""


@dataclass
class Meter:
    """Hours charged so far, and the funded set of the last instant (for hysteresis)."""

    t: float
    envelope_hours: dict[EnvelopeKey, float] = field(default_factory=lambda: defaultdict(float))
    envelope_class_hours: dict[EnvelopeKey, dict[FundingClass, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    cap_hours: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # The runs' totals (``run_hours``, ``run_lender_hours``: read through them).
    _run_hours: dict[str, dict[FundingClass, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    _run_lender_hours: dict[str, dict[str, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    previously_funded: frozenset[tuple[str, EnvelopeKey]] = frozenset()
    # Summaries of runs no lease was charged to since they were made (``summarize``): a run's
    # hours only move while it holds leases, so the many finished runs are summarised once.
    # ``_settled`` and ``_unsettled`` split the runs metered so far (self-healing if not).
    _settled: dict[str, RunFunding] = field(default_factory=dict, repr=False, compare=False)
    _unsettled: set[str] = field(default_factory=set, repr=False, compare=False)
    # Pieces charged from arrays whose runs' totals are not written yet (``flush``): the fold
    # charges a piece at every instant the clock moves, and writing every run's totals each
    # time cost a read and a write per run; they are written when read, all pieces at once.
    _pending: list[tuple[Charges, np.ndarray]] = field(
        default_factory=list, repr=False, compare=False
    )

    @property
    def run_hours(self) -> dict[str, dict[FundingClass, float]]:
        """Hours charged per run and class."""
        self.flush()
        return self._run_hours

    @property
    def run_lender_hours(self) -> dict[str, dict[str, float]]:
        """Hours charged per run from each lender (shared and borrowed classes)."""
        self.flush()
        return self._run_lender_hours

    def __eq__(self, other: object) -> bool:
        """The fields compared, with the runs' totals written first."""
        if not isinstance(other, Meter):
            return NotImplemented
        self.flush()
        other.flush()
        return all(
            getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.compare
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def flush(self) -> None:
        """Write the runs' totals of the pieces charged and not written yet: the additions of
        each piece in turn, as if each had been written when charged (``charges.add_pieces``),
        and the runs they charged marked as charged since their summary."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        charged = add_pieces(
            self._run_hours,
            [(c.run_classes, c.run_log, c.run_class_of, values) for c, values in pending],
        )
        add_pieces(
            self._run_lender_hours,
            [
                (c.lenders, c.lender_log, c.lender_of, values[c.funded][c.lent_source])
                for c, values in pending
            ],
        )
        settled, unsettled = self._settled, self._unsettled
        for run in charged:
            if run not in unsettled:
                settled.pop(run, None)
                unsettled.add(run)

    def copy(self) -> Meter:
        """An independent copy (the nested dicts too; floats and keys are immutable).

        Written out rather than ``copy.deepcopy``, which walked every value and took ~10x as
        long - it runs once per instant the engine evaluates before anything is folded there.
        """
        self.flush()
        out = Meter(t=self.t, previously_funded=self.previously_funded)
        out.envelope_hours.update(self.envelope_hours)
        for env, by_class in self.envelope_class_hours.items():
            out.envelope_class_hours[env].update(by_class)
        out.cap_hours.update(self.cap_hours)
        for run, by_run_class in self.run_hours.items():
            out.run_hours[run].update(by_run_class)
        for run, lenders in self.run_lender_hours.items():
            out.run_lender_hours[run].update(lenders)
        out._settled = dict(self._settled)
        out._unsettled = set(self._unsettled)
        return out

    def copy_for_matching(self) -> Meter:
        """A copy of what a matching reads of the meter (each envelope's and cap's hours, the
        pairs funded in the last piece), to advance and read a view of; its runs' hours start
        empty and mean nothing (``matching_at``)."""
        out = Meter(t=self.t, previously_funded=self.previously_funded)
        out.envelope_hours.update(self.envelope_hours)
        out.cap_hours.update(self.cap_hours)
        return out

    def hours_view(self, index: EnvelopeIndex, period_hours: float) -> HoursView:
        rem_env = {
            k: e.gpu_hours - self.envelope_hours.get(k, 0.0)
            for k, e in index.envelopes.items()
            if e.gpu_hours is not None
        }
        rem_cap = {
            k: c.gpu_hours - self.cap_hours.get(k, 0.0)
            for k, c in index.caps.items()
            if c.gpu_hours is not None
        }
        return HoursView(period_hours, rem_env, rem_cap, self.previously_funded)


@dataclass(frozen=True)
class FundingInputs:
    """Everything the evaluation reads; the engine assembles it from the folded ledger."""

    index: EnvelopeIndex
    leases: Sequence[Lease]  # open leases and leases closed after the meter's last instant
    runs: Mapping[str, Run]
    admitted: Mapping[str, Instant]
    node_labels: Mapping[str, Mapping[str, str]]
    period_hours: float = 24.0


def _boundaries(inputs: FundingInputs, after: float) -> list[float]:
    """Every instant after ``after`` at which a lease starts or ends or an envelope's window
    opens or closes, in order: where the matching can change with nothing folded."""
    points = _points(inputs)
    return points[bisect.bisect_right(points, after) :]


def _points(inputs: FundingInputs) -> list[float]:
    """Every lease start and end and window bound, sorted.  Kept by the index for the last
    tuple of leases asked about: the meter asks at every instant the clock moves, and the open
    leases - a tuple the fold keeps until they change - are the same at most of them (a walk
    over 100k was a fifth of an instant's cost, issue 11)."""
    leases, index = inputs.leases, inputs.index
    kept = index.points_of
    known = kept[0] if kept else None
    if known is not None and known[0] is leases:
        return known[1]
    points: set[float] = set()
    for lease in leases:
        points.add(lease.start)
        end = lease.effective_end()
        if end is not None:
            points.add(end)
    for env in index.envelopes.values():
        for b in (env.start, env.end):
            if b is not None:
                points.add(b)
    out = sorted(points)
    if isinstance(leases, tuple):  # immutable: the same object is the same leases
        kept[:] = [(leases, out)]
    return out


def _crossing_seconds(inputs: FundingInputs, f: FillResult, view: HoursView) -> float | None:
    """Seconds until some funded claim's hysteresis threshold is crossed at the current burn."""
    best: float | None = None
    period = view.period_hours

    def scan(rows: Sequence[Accepted], remaining: float) -> None:
        nonlocal best
        if isinstance(rows, RankedRows):
            # The gap only shrinks as the width ahead grows (float products and differences
            # are monotone), so the nearest crossing is at the last row with a gap: found by
            # chunks, not a walk over every funded row at every instant (issue 11).
            burn = rows.total_width()
            above_last = rows.last_start(lambda above: remaining - period * above > 0)
            if burn > 0 and above_last is not None:
                secs = (remaining - period * above_last) / burn * 3600.0
                if best is None or secs < best:
                    best = secs
            return
        burn = sum(r.width for r in rows)
        if burn <= 0:
            return
        above = 0
        for r in rows:
            gap = remaining - period * above
            if gap > 0:
                secs = gap / burn * 3600.0
                if best is None or secs < best:
                    best = secs
            above += r.width

    for key, remaining in view.remaining_envelope.items():
        scan(f.accepted.get(key, []), remaining)
    for cap_id, remaining in view.remaining_cap.items():
        cap = inputs.index.caps[cap_id]
        rows = sorted((r for m in cap.members for r in f.accepted.get(m, [])), key=lambda r: r.rank)
        scan(rows, remaining)
    return best


def advance_meter(
    meter: Meter, inputs: FundingInputs, to: float, *, first: FillResult | None = None
) -> tuple[float, FillResult] | None:
    """Charge ``[meter.t, to)`` to whoever paid during each piece of it.  Mutates ``meter``.

    ``first``, if given, is the matching at ``meter.t`` under this meter (the caller knows it
    already: the last evaluation, or the check of the decision just committed); it is used for
    the first piece instead of matching again.  Returns the last piece's start and matching
    (``None`` if there was no piece), which a caller may keep when nothing changes after it.
    """
    return _advance(meter, inputs, to, first)[0]


def _advance(
    meter: Meter, inputs: FundingInputs, to: float, first: FillResult | None
) -> tuple[tuple[float, FillResult] | None, bool]:
    """``advance_meter``, and whether its last piece's matching holds at ``to`` but for the
    hours it charged (no window bound or lease start or end at ``to`` itself; one before it
    would have begun a piece)."""
    index = inputs.index
    bounds = _boundaries(inputs, meter.t)
    t = meter.t
    last: tuple[float, FillResult] | None = None
    while t < to:
        view = meter.hours_view(index, inputs.period_hours)
        if first is not None and t == meter.t:
            f = first
        else:
            f = fill(
                index, inputs.leases, inputs.runs, inputs.admitted, inputs.node_labels, t, view
            )
        pos = bisect.bisect_right(bounds, t)
        nxt = min(to, bounds[pos]) if pos < len(bounds) else to
        if view.remaining_envelope or view.remaining_cap:
            crossing = _crossing_seconds(inputs, f, view)
            if crossing is not None and t + crossing < nxt:
                nxt = max(t + crossing, t + _MIN_STEP)
        _accrue(meter, inputs, f, t, nxt)
        meter.previously_funded = f.funded_pairs()
        last = (t, f)
        t = nxt
    meter.t = max(meter.t, to)
    return last, bisect.bisect_left(bounds, to) == bisect.bisect_right(bounds, to)


def evaluate(
    meter: Meter,
    inputs: FundingInputs,
    at: float,
    *,
    first: FillResult | None = None,
    final: FillResult | None = None,
) -> Evaluation:
    """The funding picture at ``at`` (advancing a copy of the meter if ``at`` is later).

    ``first`` is the matching at ``meter.t`` and ``final`` the one at ``at`` (under the meter
    advanced to ``at``), when the caller already knows them; either is then not recomputed.
    """
    with paused_gc():  # per-lease temporaries over every open lease (core.gcpause)
        last: tuple[float, FillResult] | None = None
        holds = False
        if at > meter.t:
            meter = meter.copy()
            last, holds = _advance(meter, inputs, at, first)
        if final is not None:
            return summarize(meter, inputs, final, at)
        return summarize(meter, inputs, _match_at(meter, inputs, at, last, holds=holds), at)


def matching_at(
    meter: Meter, inputs: FundingInputs, at: float, *, first: FillResult | None = None
) -> FillResult:
    """``evaluate(meter, inputs, at, first=first).fill`` without the summaries, which most
    decisions never read.  The meter is advanced to ``at`` on a copy of what the matching
    reads of it only - each envelope's and cap's hours and the pairs funded in the last piece
    - which the advance leaves exactly as on a whole copy (each total is added to lease by
    lease in the same order; nothing it does reads a run's hours): under GPU-hours a decision
    at an instant the clock has not reached yet costs no copy of every run's hours and no
    summary of every run (issue 11)."""
    with paused_gc():
        last: tuple[float, FillResult] | None = None
        holds = False
        if at > meter.t:
            meter = meter.copy_for_matching()
            last, holds = _advance(meter, inputs, at, first)
        return _match_at(meter, inputs, at, last, holds=holds)


def _match_at(
    meter: Meter,
    inputs: FundingInputs,
    at: float,
    last: tuple[float, FillResult] | None,
    *,
    holds: bool,
) -> FillResult:
    """The matching at ``at`` under ``meter`` (advanced to ``at``): the last piece's, if the
    hours it charged changed no decision (``holds``: no bound at ``at``), else a new one."""
    view = meter.hours_view(inputs.index, inputs.period_hours)
    if last is not None and holds:
        f = rebase_fill(last[1], inputs.index, view)
        if f is not None:
            return f
    return fill(
        inputs.index, inputs.leases, inputs.runs, inputs.admitted, inputs.node_labels, at, view
    )


def _accrue(meter: Meter, inputs: FundingInputs, f: FillResult, t0: float, t1: float) -> None:
    """Charge ``[t0, t1)``: each live lease's width times the piece's hours, added lease by
    lease in lease-id order to its run's hours of its class, and if funded to its payer's, the
    payer's of its class, each of the payer's caps', and to the run's hours from a lender.

    Float sums depend on their order, so the order is that one exactly: the walk
    (``_accrue_walk``), or the same additions by ``numpy.add.at`` from the matching's
    ``Charges`` (``_charges_for``).  ``tests/core/test_metering.py`` holds the two to the same
    sums, bit for bit, key order included."""
    hours = (t1 - t0) / 3600.0
    if hours <= 0:
        return
    charges = _charges_for(f, inputs)
    if charges is None:
        _accrue_walk(meter, inputs, f, hours)
        return
    values = charges.widths * hours
    meter._pending.append((charges, values))  # the runs' totals: written when read
    if len(meter._pending) >= PENDING_MOST:
        meter.flush()  # or unread totals would keep a copy of every piece
    funded = values[charges.funded]
    add_flat(meter.envelope_hours, charges.envelopes, charges.envelope_of, funded)
    add_nested(
        meter.envelope_class_hours, charges.envelope_classes, charges.envelope_class_of, funded
    )
    add_flat(meter.cap_hours, charges.caps, charges.cap_of, funded[charges.cap_source])


def _charges_for(f: FillResult, inputs: FundingInputs) -> Charges | None:
    """The charges of ``f``, kept on it - or ``None``: walk this once.

    Working charges out from scratch costs 1.1-1.8 walks, which a matching charged only once
    never earns back - a new one at every instant, while admissions flow.  But each such
    matching is derived from the one before (``FillResult._derived``: an extension by the
    leases just minted, a shrink by those closed), so its charges are that one's with those
    leases inserted or removed (``Charges.derived``: array operations, no walk over every open
    lease; 0.15-0.3 s per instant at 100k open leases).  So: a matching with charges reads them;
    one derived, down a line of matchings not charged yet, from one with charges derives them;
    one derived from one without works them out (the line goes on from it); a fresh one walks
    the first time it is charged and works them out the second (kept while the clock moves)."""
    index = inputs.index
    known = f._charges
    if known is not None and known[0] is index and known[1] is not None:
        return cast("Charges", known[1])
    charges: Charges | None = None
    derived = f._derived
    if derived is not None and _has_charges(derived[0], index):
        root = derived[0]
        link: Changes | None = derived[1]
        steps: list[tuple[tuple[Lease, ...], frozenset[str]]] = []
        while link is not None:
            link, new, closed = link
            steps.append((new, closed))
        added: dict[str, Lease] = {}
        gone: set[str] = set()
        for new, closed in reversed(steps):  # from the root on
            added.update((x.id, x) for x in new)
            for lease_id in closed:
                if added.pop(lease_id, None) is None:
                    gone.add(lease_id)
        base = cast("Charges", cast("tuple[object, object]", root._charges)[1])
        charges = base.derived(f, list(added.values()), frozenset(gone), index.envelopes)
    elif derived is not None or (known is not None and known[0] is index):
        charges = Charges.of(f, inputs.leases, index.envelopes)
    f._derived = None  # charged: the line back is not needed any more
    f._charges = (index, charges)
    return charges


def _has_charges(f: FillResult, index: EnvelopeIndex) -> bool:
    known = f._charges
    return known is not None and known[0] is index and known[1] is not None


def _accrue_walk(meter: Meter, inputs: FundingInputs, f: FillResult, hours: float) -> None:
    """``_accrue`` lease by lease in lease-id order, each addition onto the running totals.

    The loop runs over every open lease, so the lookups it repeats are bound to locals once;
    the arithmetic and its order are exactly the straightforward ones."""
    by_id = {lease.id: lease for lease in inputs.leases}
    run_hours, run_lender_hours = meter.run_hours, meter.run_lender_hours  # flushed first
    settled, unsettled = meter._settled, meter._unsettled
    envelope_hours, envelope_class_hours = meter.envelope_hours, meter.envelope_class_hours
    cap_hours = meter.cap_hours
    envelopes, payer = inputs.index.envelopes, f.payer
    lent_classes = LENT_CLASSES
    for lease_id, cls in f.classes_by_id():
        lease = by_id[lease_id]
        run = lease.run
        gpu_hours = len(lease.slots) * hours
        run_hours[run][cls] += gpu_hours
        if run not in unsettled:
            settled.pop(run, None)
            unsettled.add(run)
        env_key = payer.get(lease_id)
        if env_key is None:
            continue
        env = envelopes[env_key]
        envelope_hours[env_key] += gpu_hours
        envelope_class_hours[env_key][cls] += gpu_hours
        for cap_id in env.caps:
            cap_hours[cap_id] += gpu_hours
        if cls in lent_classes:
            run_lender_hours[run][env.owner] += gpu_hours


# ------------------------------------------------------------------------------------------
# Summaries: what budget status and run status show
# ------------------------------------------------------------------------------------------


@dataclass
class EnvelopeUsage:
    key: EnvelopeKey
    owner: str
    flavor: str
    concurrency: int
    owned: int = 0
    shared: int = 0
    borrowed: int = 0
    unfunded: int = 0  # unfunded width whose minted payer names this envelope (referenced)
    spare: int = 0  # funded spare width
    gpu_hours_used: float = 0.0
    gpu_hours: float | None = None

    @property
    def funded(self) -> int:
        return self.owned + self.shared + self.borrowed

    @property
    def headroom(self) -> int:
        return max(0, self.concurrency - self.funded)


@dataclass
class CapUsage:
    id: str
    name: str
    flavor: str
    max_concurrency: int | None
    funded: int = 0
    gpu_hours_used: float = 0.0
    gpu_hours: float | None = None

    @property
    def headroom(self) -> int | None:
        if self.max_concurrency is None:
            return None
        return max(0, self.max_concurrency - self.funded)


@dataclass
class RunFunding:
    owned: int = 0
    shared: int = 0
    borrowed: int = 0
    unfunded: int = 0
    spares: int = 0
    lenders: dict[str, int] = field(default_factory=dict)
    hours: dict[FundingClass, float] = field(default_factory=dict)
    lender_hours: dict[str, float] = field(default_factory=dict)

    def by_class(self, cls: FundingClass) -> int:
        return int(getattr(self, cls.value))


@dataclass
class Evaluation:
    """The funding picture at one instant: per lease, per envelope, per cap, per run."""

    at: float
    fill: FillResult
    envelopes: dict[EnvelopeKey, EnvelopeUsage]
    caps: dict[str, CapUsage]
    runs: dict[str, RunFunding]

    def lease_class(self, lease_id: str) -> FundingClass:
        return self.fill.funding_class.get(lease_id, FundingClass.UNFUNDED)

    def lease_payer(self, lease_id: str) -> EnvelopeKey | None:
        return self.fill.payer.get(lease_id)


_COLUMN = {
    FundingClass.OWNED: 0,
    FundingClass.SHARED: 1,
    FundingClass.BORROWED: 2,
    FundingClass.UNFUNDED: 3,
}
"""Each funding class's column in ``summarize``'s counters (the field it counts in)."""
_SPARES = 4  # a run's spare width, an envelope's funded spare width
_FUNDED = 5  # an envelope's funded width (what its aggregate caps count)


def summarize(meter: Meter, inputs: FundingInputs, f: FillResult, at: float) -> Evaluation:
    """Per envelope, per cap and per run totals of the matching ``f`` at ``at``.

    Every open lease counts (issue 11: 100k), so a matching ``fill`` made is summed as arrays
    (``FillResult.columns``), any other by a walk over its leases that only adds widths into a
    few integer columns per run and per payer; the usage objects get their fields once each at
    the end, and a cap's funded width is the sum of its envelopes'.  Integer sums do not depend
    on their order, and both keep the run and lender dicts in the order of the matching's
    per-lease maps (lease-id order for a matching ``fill`` made).
    """
    index = inputs.index
    envelopes = {
        k: EnvelopeUsage(
            k,
            e.owner,
            e.flavor,
            e.concurrency,
            gpu_hours_used=meter.envelope_hours.get(k, 0.0),
            gpu_hours=e.gpu_hours,
        )
        for k, e in index.envelopes.items()
    }
    caps = {
        k: CapUsage(
            k, c.name, c.flavor, c.max_concurrency, 0, meter.cap_hours.get(k, 0.0), c.gpu_hours
        )
        for k, c in index.caps.items()
    }
    sums = _Sums.of(f, inputs)
    for key, owned, shared, borrowed, unfunded, spare in sums.envelopes:
        usage = envelopes[key]
        usage.owned, usage.shared, usage.borrowed = owned, shared, borrowed
        usage.unfunded, usage.spare = unfunded, spare
    for cap_id, funded in sums.caps:
        caps[cap_id].funded = funded
    runs = {
        name: RunFunding(owned, shared, borrowed, unfunded, spares, dict(lenders))
        for name, owned, shared, borrowed, unfunded, spares, lenders in sums.runs
    }
    for run_key, rf in runs.items():
        hours = meter.run_hours.get(run_key)
        if hours is not None:
            rf.hours = dict(hours)
        lender_hours = meter.run_lender_hours.get(run_key)
        if lender_hours is not None:
            rf.lender_hours = dict(lender_hours)
    return Evaluation(at, f, envelopes, caps, {**_settled_runs(meter, runs), **runs})


@dataclass(frozen=True, slots=True)
class _Sums:
    """What ``summarize`` adds up from a matching alone - per envelope it funds or that a
    minted payer names, per cap and per run - worked out once per matching and index (a
    matching kept while the clock moves on is summed again at every instant with other hours
    only; at 100k open leases that was most of an instant's cost, issue 11)."""

    envelopes: list[tuple[EnvelopeKey, int, int, int, int, int]]  # owned .. unfunded, spare
    caps: list[tuple[str, int]]  # funded
    runs: list[tuple[str, int, int, int, int, int, dict[str, int]]]  # .. spares, lenders

    @classmethod
    def of(cls, f: FillResult, inputs: FundingInputs) -> _Sums:
        index = inputs.index
        known = f._sums
        if known is not None and known[0] is index:
            return cast("_Sums", known[1])
        envelopes = {k: EnvelopeUsage(k, "", "", 0) for k in index.envelopes}
        caps = {k: CapUsage(k, "", "", None) for k in index.caps}
        if f.columns is not None:
            runs = _sum_columns(f.columns, index, envelopes, caps)
        else:
            runs = _sum_leases(inputs.leases, f, index, envelopes, caps)
        sums = cls(
            [
                (k, u.owned, u.shared, u.borrowed, u.unfunded, u.spare)
                for k, u in envelopes.items()
                if u.owned or u.shared or u.borrowed or u.unfunded or u.spare
            ],
            [(k, c.funded) for k, c in caps.items() if c.funded],
            [
                (name, rf.owned, rf.shared, rf.borrowed, rf.unfunded, rf.spares, rf.lenders)
                for name, rf in runs.items()
            ],
        )
        f._sums = (index, sums)
        return sums


_CLASS_COLUMN = np.array([_COLUMN[CLASS_OF_RANK[c]] for c in range(len(CLASS_OF_RANK))])
"""The column of each rank class (``matching.CLASS_OF_RANK``)."""


def _sum_columns(
    cols: ClaimColumns,
    index: EnvelopeIndex,
    envelopes: dict[EnvelopeKey, EnvelopeUsage],
    caps: dict[str, CapUsage],
) -> dict[str, RunFunding]:
    """``_sum_leases`` over a fresh matching's columns: the same totals, as array sums."""
    funded = cols.rank_class >= 0
    column = np.full(len(funded), _COLUMN[FundingClass.UNFUNDED], dtype=np.int64)
    column[funded] = _CLASS_COLUMN[cols.rank_class[funded]]
    widths = cols.widths
    spare = cols.roles == ROLE_CODES[LeaseRole.SPARE]
    n_runs = len(cols.run_names)
    slot = np.where(spare, _SPARES, column)
    per_run = np.bincount(cols.runs * 5 + slot, weights=widths, minlength=n_runs * 5)
    numbered = cols.envelopes
    payer, paid_widths = cols.payer[funded], widths[funded]
    per_payer = np.bincount(
        payer * 4 + column[funded], weights=paid_widths, minlength=len(numbered) * 4
    ).reshape(-1, 4)
    paid_spares = np.bincount(
        payer[spare[funded]], weights=paid_widths[spare[funded]], minlength=len(numbered)
    )
    paid = np.bincount(payer, weights=paid_widths, minlength=len(numbered))
    for number in np.flatnonzero(paid).tolist():
        key = numbered[number].key
        usage = envelopes[key]
        owned, shared, borrowed, unfunded = (int(x) for x in per_payer[number])
        usage.owned += owned
        usage.shared += shared
        usage.borrowed += borrowed
        usage.unfunded += unfunded
        usage.spare += int(paid_spares[number])
        for cap_id in index.envelopes[key].caps:
            caps[cap_id].funded += int(paid[number])
    leases, run_names = cols.leases, cols.run_names
    for position in np.flatnonzero(~funded).tolist():
        minted = leases[position].minted_payer
        if minted is not None and minted.key in envelopes:
            envelopes[minted.key].unfunded += int(widths[position])
    runs = {
        name: RunFunding(owned, shared, borrowed, unfunded, spares)
        for name, (owned, shared, borrowed, unfunded, spares) in zip(
            run_names, per_run.astype(np.int64).reshape(-1, 5).tolist(), strict=True
        )
    }
    # Lenders per run in lease-id order, as the walk by id meets them.
    active = cols.roles == ROLE_CODES[LeaseRole.ACTIVE]
    lending = funded & active & ((column == 1) | (column == 2))
    positions = np.flatnonzero(lending)
    positions = positions[np.argsort(cols.id_order[positions])]
    for position in positions.tolist():
        rf = runs[run_names[cols.runs[position]]]
        owner = index.envelopes[numbered[cols.payer[position]].key].owner
        rf.lenders[owner] = rf.lenders.get(owner, 0) + int(widths[position])
    return runs


def _sum_leases(
    leases: Sequence[Lease],
    f: FillResult,
    index: EnvelopeIndex,
    envelopes: dict[EnvelopeKey, EnvelopeUsage],
    caps: dict[str, CapUsage],
) -> dict[str, RunFunding]:
    """The per-run totals of ``f``, adding the per-envelope ones into ``envelopes`` and
    ``caps``, walking the leases in the order of ``f``'s per-lease maps."""
    by_id = {lease.id: lease for lease in leases}
    payer, envelope_info, column = f.payer, index.envelopes, _COLUMN
    spare, active = LeaseRole.SPARE, LeaseRole.ACTIVE
    run_columns: dict[str, list[int]] = {}
    payer_columns: dict[EnvelopeKey, list[int]] = {}
    lenders: dict[str, dict[str, int]] = {}
    run_name: str | None = None
    here: list[int] = []
    for lease_id, cls in f.funding_class.items():
        lease = by_id[lease_id]
        width = len(lease.slots)
        i = column[cls]
        if lease.run != run_name:  # a run's leases come one after another (ids are run#n)
            run_name = lease.run
            got = run_columns.get(run_name)
            if got is None:
                got = run_columns[run_name] = [0, 0, 0, 0, 0]
            here = got
        role = lease.role
        here[_SPARES if role is spare else i] += width
        env_key = payer.get(lease_id)
        if env_key is not None:
            paid = payer_columns.get(env_key)
            if paid is None:
                paid = payer_columns[env_key] = [0, 0, 0, 0, 0, 0]
            paid[i] += width
            paid[_FUNDED] += width
            if role is spare:
                paid[_SPARES] += width
            elif i in {1, 2} and role is active:  # shared or borrowed: a lender's
                lender = envelope_info[env_key].owner
                of_run = lenders.get(run_name)
                if of_run is None:
                    of_run = lenders[run_name] = {}
                of_run[lender] = of_run.get(lender, 0) + width
        elif lease.minted_payer is not None and lease.minted_payer.key in envelopes:
            envelopes[lease.minted_payer.key].unfunded += width
    for env_key, (owned, shared, borrowed, unfunded, spares, funded) in payer_columns.items():
        usage = envelopes[env_key]
        usage.owned += owned
        usage.shared += shared
        usage.borrowed += borrowed
        usage.unfunded += unfunded
        usage.spare += spares
        for cap_id in envelope_info[env_key].caps:
            caps[cap_id].funded += funded
    runs: dict[str, RunFunding] = {}
    for run_key, (owned, shared, borrowed, unfunded, spares) in run_columns.items():
        rf = runs[run_key] = RunFunding(owned, shared, borrowed, unfunded, spares)
        rf.lenders = lenders.get(run_key, rf.lenders)
    return runs


def _settled_runs(meter: Meter, live: Mapping[str, RunFunding]) -> dict[str, RunFunding]:
    """What ``summarize`` shows for runs metered before but holding no live lease now (their
    hours only): kept on the meter, rebuilt only for runs charged since (read-only)."""
    meter.flush()
    settled, unsettled = meter._settled, meter._unsettled
    if len(settled) + len(unsettled) != len(meter.run_hours):
        unsettled.update(k for k in meter.run_hours if k not in settled)
    # In name order: the set's own order follows how its runs were added, which the meter's
    # walk and its array charges (``Charges.derived``) do in different orders.
    for run_key in sorted(k for k in unsettled if k not in live):
        hours = meter.run_hours.get(run_key)
        lenders = meter.run_lender_hours.get(run_key)
        settled[run_key] = RunFunding(
            hours=dict(hours) if hours is not None else {},
            lender_hours=dict(lenders) if lenders is not None else {},
        )
        unsettled.discard(run_key)
    return settled
