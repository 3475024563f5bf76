"""The incremental paths decide exactly what the reference paths decide (issue 11).

The reference is funding's one deferred-acceptance loop (``fill``) run afresh over everything,
and a fresh fold of the ledger.  The incremental paths - ``extend_fill`` (a junior newcomer
joins a known matching), the known matching reused by the meter and the evaluation - must give
the same result at every step; these properties check it over generated worlds and over
generated event sequences (admit, close, window open/close, budget change, hours exhausted).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from builders import HOUR, MINUTE, T0, World, budget, cap, env, lease, node, run
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gpu_fleet.core.engine import CommandError, Fleet, Settings, gang
from gpu_fleet.core.funding import (
    FillResult,
    HoursView,
    build_index,
    evaluate,
    fill,
    incremental,
    metering,
)
from gpu_fleet.core.funding.incremental import extend_fill, shrink_fill
from gpu_fleet.core.funding.matching import senior_width
from gpu_fleet.core.ledger import Event, FleetState, fold
from gpu_fleet.core.ledger import state as state_module
from gpu_fleet.core.ledger.reservation_line import SliceEntry
from gpu_fleet.core.ledger.waiting_line import parked_need
from gpu_fleet.core.model import Budget, EnvelopeKey, Instant, Lease, Payer, Run

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENGINE = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

NODES = [node("n1", 64, region="r1"), node("n2", 64, region="r2", fabric="f2")]
TEAMS = [  # (namespace, owner, parents); org:s is a sponsor outside the family
    ("p", "org:p", ()),
    ("c1", "org:c1", ("org:p",)),
    ("c2", "org:c2", ("org:p",)),
    ("s", "org:s", ()),
]


def same_fill(a: FillResult, b: FillResult) -> None:
    assert a.payer == b.payer
    assert a.funding_class == b.funding_class
    # the order the meter charges in: float sums depend on it
    assert a.classes_by_id() == b.classes_by_id() == sorted(b.funding_class.items())
    assert a.funding_class == b.funding_class
    assert a.rejections == b.rejections
    assert {k: v for k, v in a.accepted.items() if v} == {k: v for k, v in b.accepted.items() if v}
    # what the meter's next piece reads (an extension hands it on when its base had it),
    # looked at without materializing it, so a chain of extensions keeps handing on parts
    assert pairs_of(a) == pairs_of(b) == {(k, v) for k, v in b.payer.items() if v is not None}


def pairs_of(f: FillResult) -> frozenset[tuple[str, EnvelopeKey]]:
    if f._pairs is None and f._pairs_parts is not None:
        known, added = f._pairs_parts
        return known | added
    return f.funded_pairs()


# ------------------------------------------------------------------------------------------
# extend_fill against fill, over generated worlds
# ------------------------------------------------------------------------------------------


@st.composite
def budgets_of(draw: st.DrawFn) -> list[Budget]:
    out = []
    for ns, owner, parents in TEAMS:
        envs: list[dict[str, Any]] = []
        for i in range(draw(st.integers(1, 2))):
            kw: dict[str, Any] = {
                "selector": {"region": draw(st.sampled_from(["r1", "r2", "*"]))},
                "sharing": draw(st.sampled_from(["", "", "none"])),
                "gpu_hours": draw(st.one_of(st.none(), st.none(), st.floats(1, 400))),
            }
            if ns == "s":
                kw["lend"] = True
                kw["lend_to"] = draw(st.sampled_from([["*"], ["org:c*"], ["org:x"]]))
                kw["lend_max"] = draw(st.one_of(st.none(), st.integers(1, 8)))
            envs.append(env(f"e{i}", draw(st.integers(1, 16)), **kw))
        caps = []
        if len(envs) == 2 and draw(st.booleans()):
            caps = [
                cap(
                    "both",
                    ["e0", "e1"],
                    max_concurrency=draw(st.one_of(st.none(), st.integers(1, 20))),
                    gpu_hours=draw(st.one_of(st.none(), st.floats(1, 400))),
                )
            ]
        out.append(budget(ns, owner, envs, parents=parents, caps=caps))
    return out


@st.composite
def new_run(draw: st.DrawFn, name: str, slots: dict[str, int]) -> tuple[Run, int, list[Lease]]:
    """A run (maybe borrowing), its admission time, and 1-3 leases on free slots."""
    ns = draw(st.sampled_from(["p", "c1", "c2"]))
    borrow = ns != "p" and draw(st.booleans())
    r = run(
        ns,
        name,
        8,
        sponsors=["org:s"] if borrow else (),
        max_borrow=draw(st.one_of(st.none(), st.integers(1, 8))) if borrow else None,
    )
    admitted = T0 + draw(st.integers(0, 30)) * MINUTE
    leases = []
    for k in range(draw(st.integers(1, 3))):
        n = draw(st.sampled_from(["n1", "n2"]))
        width = draw(st.integers(1, 4))
        minted = None
        if draw(st.integers(0, 3)) == 0:
            minted = Payer(namespace="s", budget="s", envelope="e0", owner="")
        leases.append(
            lease(
                f"{r.key}#{k}",
                r.key,
                width,
                node_name=n,
                first=slots[n],
                group=draw(st.integers(0, 2)),
                minted=minted,
            )
        )
        slots[n] += width
    return r, admitted, leases


@st.composite
def hours_views(draw: st.DrawFn, budgets: list[Budget]) -> HoursView:
    index = build_index(budgets)
    rem_env = {
        k: draw(hours_left(e.gpu_hours or 1))
        for k, e in index.envelopes.items()
        if e.gpu_hours is not None
    }
    rem_cap = {
        k: draw(hours_left(c.gpu_hours or 1))
        for k, c in index.caps.items()
        if c.gpu_hours is not None
    }
    return HoursView(draw(st.sampled_from([1.0, 24.0])), rem_env, rem_cap)


def hours_left(most: float) -> st.SearchStrategy[float]:
    """Hours left, whole ones too: over a 1-hour period a check then meets its bound exactly,
    where the check's two forms (funded there before or not) differ."""
    return st.one_of(st.floats(0, most), st.integers(0, 40).map(float))


@dataclass
class Drawn:
    """Runs drawn one after another on the two nodes (``slots``: each node's next free slot)."""

    slots: dict[str, int] = field(default_factory=lambda: {"n1": 0, "n2": 0})
    runs: dict[str, Run] = field(default_factory=dict)
    admitted: dict[str, int] = field(default_factory=dict)
    leases: list[Lease] = field(default_factory=list)

    def add(self, data: st.DataObject, name: str) -> list[Lease]:
        r, t, xs = data.draw(new_run(name, self.slots))
        self.runs[r.key], self.admitted[r.key] = r, t
        self.leases += xs
        return xs


def drawn_runs(data: st.DataObject, prefix: str, most: int, least: int = 0) -> Drawn:
    out = Drawn()
    for i in range(data.draw(st.integers(least, most))):
        out.add(data, f"{prefix}{i}")
    return out


def drawn_world(data: st.DataObject, most: int, least: int = 0) -> tuple[World, Drawn, HoursView]:
    """Budgets, GPU-hours left and up to ``most`` runs already holding leases, drawn."""
    budgets = data.draw(budgets_of())
    hours = data.draw(hours_views(budgets))
    drawn = drawn_runs(data, "old", most, least=least)
    world = World(budgets, drawn.runs.values(), drawn.leases, nodes=NODES, admitted=drawn.admitted)
    return world, drawn, hours


def newcomers_funded_before(
    data: st.DataObject, world: World
) -> frozenset[tuple[str, EnvelopeKey]]:
    """Pairs of leases ``Drawn.add`` may yet draw (``new0``..``new3``) with envelopes, as if
    funded there in the last piece: such a newcomer passes its own GPU-hour check more easily
    than the claims ranked below it."""
    rng = data.draw(st.randoms(use_true_random=False))
    keys = sorted(world.index.envelopes)
    return frozenset(
        (f"{ns}/new{i}#{k}", key)
        for ns in ("p", "c1", "c2")
        for i in range(4)
        for k in range(3)
        for key in keys
        if rng.random() < 0.3
    )


@PROPS
@given(st.data())
def test_extend_fill_is_fill(data: st.DataObject) -> None:
    """Whenever ``extend_fill`` answers, it answers what ``fill`` over everything answers -
    chained over several newcomers, each extending the previous result."""
    world, drawn, hours = drawn_world(data, 6)
    runs, admitted = drawn.runs, drawn.admitted
    if data.draw(st.booleans()):  # some newcomers were funded in the last piece, as a replay
        hours = dataclasses.replace(hours, previously_funded=newcomers_funded_before(data, world))
    current = world.fill(T0, hours)
    for i in range(data.draw(st.integers(1, 4))):
        xs = drawn.add(data, f"new{i}")
        for key, rows in current.accepted.items():  # running totals an extension hands on
            if rows and data.draw(st.booleans()):
                current.width_up_to(key, rows[-1].rank)
        if data.draw(st.booleans()):
            current.funded_pairs()  # handed on too
        ext = extend_fill(world.index, current, xs, runs, admitted, world.node_labels, T0, hours)
        reference = fill(world.index, drawn.leases, runs, admitted, world.node_labels, T0, hours)
        event("extended" if ext is not None else "matched afresh")
        if ext is not None:
            same_fill(ext, reference)
            for key, rows in reference.accepted.items():
                for row in rows:
                    expected = senior_width(rows, row.rank)
                    assert ext.width_up_to(key, row.rank) == expected
                    assert reference.width_up_to(key, row.rank) == expected
        current = ext if ext is not None and data.draw(st.booleans()) else reference


@PROPS
@given(st.data(), st.integers(1, 4))
def test_a_chain_of_layered_extensions_is_fill(data: st.DataObject, limit: int) -> None:
    """Extensions lay newcomers over their base's maps instead of copying them, and unite the
    layers past a limit (tiny here, so chains cross it).  Read one lease at a time at every
    step - which keeps the layers - and whole only at the end, a chain is still ``fill``."""
    world, drawn, hours = drawn_world(data, 4)
    runs, admitted = drawn.runs, drawn.admitted
    current = world.fill(T0, hours)
    if data.draw(st.booleans()):
        current.classes_by_id()  # handed on as parts from here
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(incremental, "_layer_limit", lambda _base: limit)
        for i in range(data.draw(st.integers(1, 8))):
            xs = drawn.add(data, f"new{i}")
            layered = current._added is not None
            ext = extend_fill(
                world.index, current, xs, runs, admitted, world.node_labels, T0, hours
            )
            if layered and current._added is None:
                event("the base's layers united")
            reference = world_fill(world, drawn, hours)
            if ext is None:
                event("matched afresh")
                current = reference
                continue
            for lid, payer in reference.payer.items():
                assert ext.payer_of(lid) == payer
                assert ext.class_of(lid) is reference.funding_class[lid]
                assert ext.holds(lid)
            assert not ext.holds("nobody")
            assert ext.payer_of("nobody") is None
            whole = copy.copy(ext)  # united on the side: ``ext`` keeps its layers
            assert ext.last_id() == next(reversed(whole.payer), None)
            current = ext
    same_fill(current, world_fill(world, drawn, hours))


@settings(PROPS, max_examples=400)
@given(st.data())
def test_rebase_fill_is_fill(data: st.DataObject) -> None:
    """Whenever ``rebase_fill`` answers, it answers what ``fill`` answers under the hours left
    it was given - over a chain of meters moved on (hours left the same, a little less, much
    less, none, or more), the pairs funded before kept, copied, or changed, and an extension
    in between now and then."""
    world, drawn, hours = drawn_world(data, 6)
    runs, admitted = drawn.runs, drawn.admitted
    before = list(world.fill(T0, hours).funded_pairs())  # some funded in the last piece
    kept = data.draw(st.lists(st.booleans(), min_size=len(before), max_size=len(before)))
    hours = dataclasses.replace(
        hours, previously_funded=frozenset(p for p, keep in zip(before, kept, strict=True) if keep)
    )
    current = world.fill(T0, hours)
    rebased = 0
    for i in range(data.draw(st.integers(1, 6))):
        factor = st.sampled_from([1.0, 1.0, 0.9999, 0.99, 0.9, 0.5, 0.0, 1.0001, 1.1, 3.0])
        pairs = current.funded_pairs()
        funded_before = data.draw(
            st.sampled_from(
                [
                    hours.previously_funded,
                    frozenset(hours.previously_funded),
                    pairs,
                    frozenset(list(pairs)[1:]),
                    pairs | {("old0#0", EnvelopeKey("p", "p", "e0"))},
                    pairs  # and where it was turned away: such a check would pass more easily
                    | {(lid, r.envelope) for lid, rs in current.rejections.items() for r in rs},
                ]
            )
        )
        hours = HoursView(
            hours.period_hours,
            {k: v * data.draw(factor) for k, v in hours.remaining_envelope.items()},
            {k: v * data.draw(factor) for k, v in hours.remaining_cap.items()},
            funded_before,
        )
        if data.draw(st.booleans()):
            current.rejections  # noqa: B018 - a settled log is restated too
        got = incremental.rebase_fill(current, world.index, hours)
        reference = world_fill(world, drawn, hours)
        if got is None:
            current = reference
            continue
        rebased += 1
        same_fill(got, reference)
        exhausted = any("GPU-hours" in r.template for rs in got.rejections.values() for r in rs)
        event(f"rebased where GPU-hours turned a claim away: {exhausted}")
        current = got
        if data.draw(st.booleans()):
            xs = drawn.add(data, f"new{i}")
            ext = extend_fill(
                world.index, current, xs, runs, admitted, world.node_labels, T0, hours
            )
            reference = world_fill(world, drawn, hours)
            if ext is not None:
                same_fill(ext, reference)
            current = reference if ext is None else ext
    event(f"rebased: {min(rebased, 3)}+")


def test_a_period_too_short_to_ease_a_check_is_not_rebased() -> None:
    """Counting a pair as funded before eases its check only while the period times its width
    exceeds twice ``HOURS_EPSILON``; below that (no setting allows it: a period is at least a
    second) the reuse refuses when the pairs funded before change, as ``fill`` would turn the
    junior claim away (found by a review's differential driver)."""
    period = 1e-7
    a, b = run("p", "a", 8), run("p", "b", 8)
    world = World(
        [budget("p", "org:p", [env("e", 16, selector={"region": "*"}, gpu_hours=100.0)])],
        [a, b],
        [lease("A", a.key, 5), lease("B", b.key, 1, first=5)],
        nodes=[node("n1", 64, region="r1")],
        admitted={a.key: T0, b.key: T0 + 60},
    )
    k = EnvelopeKey("p", "p", "e")
    base = world.fill(T0, HoursView(period, {k: 1.2e-6}, {}, frozenset()))
    assert base.payer == {"A": k, "B": k}
    later = HoursView(period, {k: 1.2e-6}, {}, base.funded_pairs())
    assert world.fill(T0, later).payer == {"A": k, "B": None}
    assert incremental.rebase_fill(base, world.index, later) is None


def world_fill(world: World, drawn: Drawn, hours: HoursView) -> FillResult:
    return fill(world.index, drawn.leases, drawn.runs, drawn.admitted, world.node_labels, T0, hours)


@PROPS
@given(st.data())
def test_shrink_fill_is_fill(data: st.DataObject) -> None:
    """Whenever ``shrink_fill`` answers, it answers what ``fill`` over what is left answers -
    chained with newcomers and departures in any order."""
    world, drawn, hours = drawn_world(data, 6, least=1)
    runs, admitted = drawn.runs, drawn.admitted
    current: FillResult | None = world.fill(T0, hours)
    for i in range(data.draw(st.integers(1, 5))):
        if drawn.leases and data.draw(st.booleans()):
            gone = data.draw(st.lists(st.sampled_from(drawn.leases), min_size=1, max_size=3))
            drawn.leases = [x for x in drawn.leases if x not in gone]
            nxt = shrink_fill(current, gone) if current is not None else None
        else:
            xs = drawn.add(data, f"new{i}")
            nxt = (
                extend_fill(world.index, current, xs, runs, admitted, world.node_labels, T0, hours)
                if current is not None
                else None
            )
        leases = drawn.leases
        reference = fill(world.index, leases, runs, admitted, world.node_labels, T0, hours)
        event("derived" if nxt is not None else "matched afresh")
        if nxt is not None:
            same_fill(nxt, reference)
        current = nxt if nxt is not None and data.draw(st.booleans()) else reference


def test_extension_totals_when_newcomers_straddle_a_held_row() -> None:
    """Two newcomers on one envelope, one ranked above a held row (a loan the sponsor granted)
    and one below it (a plain sponsor claim): the handed-on running totals must start at the
    most senior newcomer (found by review: a property run never drew this)."""
    budgets = [
        budget("c1", "org:c1", [env("e", 8, flavor="A100")]),
        budget("s", "org:s", [env("e0", 16, selector={"region": "*"}, lend=True, lend_to=["*"])]),
    ]
    old, new = run("c1", "old", 8, sponsors=["org:s"]), run("c1", "new", 8, sponsors=["org:s"])
    runs = {old.key: old, new.key: new}
    admitted = {old.key: T0, new.key: T0 + MINUTE}
    held = [lease("a", old.key, 2)]
    world = World(
        budgets, runs.values(), held, nodes=[node("n1", 64, region="r1")], admitted=admitted
    )
    base = world.fill()
    key = base.payer["a"]
    assert key is not None
    base.width_up_to(key, base.accepted[key][-1].rank)  # totals the extension hands on
    loan = Payer(namespace="s", budget="s", envelope="e0", owner="")
    newcomers = [
        lease("b", new.key, 3, first=2, minted=loan),
        lease("c", new.key, 1, first=5, group=1),
    ]
    ext = extend_fill(world.index, base, newcomers, runs, admitted, world.node_labels, T0)
    reference = fill(world.index, held + newcomers, runs, admitted, world.node_labels, T0)
    assert ext is not None
    same_fill(ext, reference)
    rows = reference.accepted[key]
    assert [r.rank[-1] for r in rows] == ["b", "a", "c"]  # the newcomers straddle "a"
    for row in rows:
        assert ext.width_up_to(key, row.rank) == senior_width(rows, row.rank)


def totals_world(
    names: Sequence[str], held: Sequence[tuple[str, int, int]]
) -> tuple[World, list[Run], dict[str, Run], dict[str, Instant], FillResult, EnvelopeKey]:
    """One 32-GPU envelope shared by runs admitted a minute apart in ``names`` order; the first
    run holds ``held`` (lease id, width, first ordinal).  Returns the world, the runs (a list
    and by key), their admission instants, the base matching with its running totals built
    (what an extension hands on) and the envelope's key."""
    budgets = [budget("p", "org:p", [env("e", 32, selector={"region": "*"})])]
    runs_ = [run("p", name, 8) for name in names]
    runs = {r.key: r for r in runs_}
    admitted = {r.key: T0 + i * MINUTE for i, r in enumerate(runs_)}
    leases = [lease(lid, runs_[0].key, width, first=first) for lid, width, first in held]
    world = World(budgets, runs.values(), leases, nodes=NODES, admitted=admitted)
    base = world.fill()
    key = base.payer[leases[0].id]
    assert key is not None
    base.width_up_to(key, base.accepted[key][-1].rank)
    return world, runs_, runs, admitted, base, key


def test_sibling_extensions_of_one_matching_keep_their_own_totals() -> None:
    """An extension by junior newcomers extends its base's running totals in place (the base
    reads only its own prefix); a second extension of the same base - a decision checked and
    then not taken, and another one - must not build on the first one's entries."""
    world, runs_, runs, admitted, base, key = totals_world(("old", "one", "two"), [("a", 4, 0)])
    held = world.leases
    one = [lease("b", runs_[1].key, 2, first=4)]
    two = [lease("c", runs_[2].key, 6, first=4, node_name="n2")]
    ext_one = extend_fill(world.index, base, one, runs, admitted, world.node_labels, T0)
    ext_two = extend_fill(world.index, base, two, runs, admitted, world.node_labels, T0)
    assert ext_one is not None
    assert ext_two is not None
    for result, leases in ((base, held), (ext_one, held + one), (ext_two, held + two)):
        reference = fill(world.index, leases, runs, admitted, world.node_labels, T0)
        rows = reference.accepted[key]
        for row in rows:
            assert result.width_up_to(key, row.rank) == senior_width(rows, row.rank)


def test_the_same_extension_twice_reads_the_right_totals() -> None:
    """An admission's check extends the matching by the new leases, then the fold extends the
    same base by the same leases: both, and the base, read the right running totals (the
    rows they share are ``RankedRows`` chunks, ``tests/core/test_ranked_rows.py``)."""
    held_spec = [("a", 4, 0), ("a2", 2, 4)]
    world, runs_, runs, admitted, base, key = totals_world(("old", "new"), held_spec)
    held = world.leases
    new = [lease("b", runs_[1].key, 8, first=8)]
    checked = extend_fill(world.index, base, new, runs, admitted, world.node_labels, T0)
    folded = extend_fill(world.index, base, new, runs, admitted, world.node_labels, T0)
    assert checked is not None
    assert folded is not None
    reference = fill(world.index, held + new, runs, admitted, world.node_labels, T0)
    rows = reference.accepted[key]
    for result in (checked, folded):
        for row in rows:
            assert result.width_up_to(key, row.rank) == senior_width(rows, row.rank)
    for row in base.accepted[key]:
        assert base.width_up_to(key, row.rank) == senior_width(base.accepted[key], row.rank)


def test_extend_fill_takes_the_newcomer_that_fits() -> None:
    """The shortcut fires for the common cases - a later run that fits its own envelope, or
    any run where everyone fits together - and refuses where the answer could differ."""
    budgets = [budget("p", "org:p", [env("e", 16, selector={"region": "*"})])]
    old, new = run("p", "old", 8), run("p", "new", 8)
    runs = {old.key: old, new.key: new}
    admitted = {old.key: T0, new.key: T0 + MINUTE}
    world = World(budgets, runs.values(), [lease("a", old.key, 8)], nodes=NODES, admitted=admitted)
    base = world.fill()
    newcomer = [lease("b", new.key, 8, first=8)]
    ext = extend_fill(world.index, base, newcomer, runs, admitted, world.node_labels, T0)
    assert ext is not None
    same_fill(
        ext, fill(world.index, [*world.leases, *newcomer], runs, admitted, world.node_labels, T0)
    )
    # a senior newcomer where everyone fits together (nobody was ever turned away): taken too
    senior = {**admitted, new.key: T0 - MINUTE}
    ext = extend_fill(world.index, base, newcomer, runs, senior, world.node_labels, T0)
    assert ext is not None
    same_fill(
        ext, fill(world.index, [*world.leases, *newcomer], runs, senior, world.node_labels, T0)
    )
    # a junior newcomer that does not fit: the long way
    wide = [lease("b", new.key, 9, first=8)]
    assert extend_fill(world.index, base, wide, runs, admitted, world.node_labels, T0) is None
    # a senior newcomer where the envelope already turned someone away: it might displace
    # someone, so the long way
    late = run("p", "late", 8)
    crowded = [*world.leases, lease("c", late.key, 12, first=16)]
    runs2 = {**runs, late.key: late}
    adm2 = {**senior, late.key: T0 + HOUR}
    base2 = fill(world.index, crowded, runs2, adm2, world.node_labels, T0)
    assert base2.payer["c"] is None  # turned away: 8 + 12 > 16
    small = [lease("b", new.key, 4, first=8)]
    assert extend_fill(world.index, base2, small, runs2, adm2, world.node_labels, T0) is None


AMID_CASES = {
    # name: (GPU-hours on the envelope or on a cap over it, hours left, the claims held, the
    # newcomers extended one after another, whether each extension is taken).  A claim is
    # run:width, with a * where it was funded there in the last piece; runs admitted at one
    # instant rank by name.
    "plenty of hours": ("envelope", 100.0, "a:4 c:4", "b:4", [True]),
    # the newcomer, funded there before, passes with 4 GPUs ahead of it (10 > 8), but the
    # claim below it now needs 12: its own check is not enough
    "the claim below turned away": ("envelope", 10.0, "a:4 c:4", "b:4*", [False]),
    "the same on a cap": ("cap", 10.0, "a:4 c:4", "b:4*", [False]),
    # a claim funded before needs strictly more than period * (4 + 8) + HOURS_EPSILON
    "exactly at the bound": ("envelope", 12.0, "a:4 c:1*", "b:8*", [False]),
    "just past the bound": ("envelope", 12.5, "a:4 c:1*", "b:8*", [True]),
    # the first extension's record carries the width it put ahead of the claims below
    "one after another": ("envelope", 14.0, "a:4 c:4", "b1:4* b2:4*", [True, False]),
}


@pytest.mark.parametrize("case", AMID_CASES)
def test_a_newcomer_amid_claims_under_gpu_hours_is_taken_only_where_every_check_holds(
    case: str,
) -> None:
    """Runs admitted at the same instant rank by name, so a newcomer is often ranked amid the
    claims held (the services decide a burst of admissions at one instant).  Where GPU-hours
    are set, each claim ranked below it counts its width ahead: the extension is taken only
    where every check made there still passes with it (``HoursChecks.top``), and is then
    exactly ``fill``."""
    where, left, held_spec, new_spec, taken = AMID_CASES[case]
    k = EnvelopeKey("p", "p", "e")
    on_env = where == "envelope"
    caps = [] if on_env else [cap("all", ["e"], gpu_hours=100.0)]
    e = env("e", 16, selector={"region": "*"}, gpu_hours=100.0 if on_env else None)
    world_budgets = [budget("p", "org:p", [e], caps=caps)]
    claims = [c.split(":") for c in f"{held_spec} {new_spec}".split()]
    runs = {r.key: r for r in (run("p", name, 8) for name, _ in claims)}
    admitted = dict.fromkeys(runs, T0)
    every, slot = [], 0
    for name, width in claims:
        every.append(lease(name, f"p/{name}", int(width.rstrip("*")), first=slot))
        slot += every[-1].width
    held, new = every[: len(held_spec.split())], every[len(held_spec.split()) :]
    before = frozenset((name, k) for name, width in claims if width.endswith("*"))
    world = World(world_budgets, runs.values(), held, nodes=NODES, admitted=admitted)
    cap_id = next(iter(world.index.caps), "")
    key: EnvelopeKey | str = k if on_env else cap_id
    hours = HoursView(1.0, {k: left} if on_env else {}, {} if on_env else {cap_id: left}, before)
    current = fill(world.index, held, runs, admitted, world.node_labels, T0, hours)
    assert all(current.payer.values()), "every claim held is funded before the newcomers"
    for i, x in enumerate(new):
        ext = extend_fill(world.index, current, [x], runs, admitted, world.node_labels, T0, hours)
        reference = fill(
            world.index, [*held, *new[: i + 1]], runs, admitted, world.node_labels, T0, hours
        )
        assert (ext is not None) is taken[i]
        if ext is None:
            assert not all(reference.payer.values()), "refused only where fill differs"
            break
        same_fill(ext, reference)
        assert ext.trace is not None
        assert ext.trace.hours is not None
        assert ext.trace.hours.strict[key] > 1.0 * ext.trace.hours.top[key]
        current = ext


def test_a_matching_made_ahead_of_the_meter_is_not_extended_by_leases_minted_since() -> None:
    """An evaluation of a later instant is made under the meter advanced to it; leases minted
    since (at the meter's own instant) would have been charged by that advance, so the
    matching is not extended by them under the meter as it stands - which had funded a lease
    the GPU-hours cannot pay for (found by a review)."""
    period = Settings(accounting_period=HOUR)
    fleet = Fleet(period)
    fleet.register_node(node("n1", 64, region="r1"), T0)
    fleet.apply(budget("p", "org:p", [env("e", 32, selector={"region": "*"}, gpu_hours=10.0)]), T0)
    fleet.apply(run("p", "a", 4), T0)
    cut = len(fleet.state.history)
    fleet.apply(run("p", "b", 4), T0)
    history = fleet.state.history
    follower = FleetState(settings_period_hours=period.period_hours)
    for e in history[:cut]:
        fold(follower, e)
    follower.evaluation(T0 + HOUR)  # known: a matching ahead of the meter
    for e in history[cut:]:
        fold(follower, e)
    reference = FleetState(settings_period_hours=period.period_hours, incremental=False)
    for e in history:
        fold(reference, e)
    want = evaluate(reference.meter, reference.funding_inputs(), T0 + HOUR)
    assert None in want.fill.payer.values()  # 10 hours pay for one 4-GPU run over the hour
    same_fill(follower.evaluation(T0 + HOUR).fill, want.fill)


# ------------------------------------------------------------------------------------------
# The engine with its shortcuts against the engine without, and against a fresh fold
# ------------------------------------------------------------------------------------------

SETTINGS = Settings(accounting_period=HOUR)  # GPU-hour hysteresis over one hour: it moves


def fleet_budgets(params: dict[str, Any]) -> list[Budget]:
    p = params
    return [
        budget(
            "p",
            "org:p",
            [
                env("e0", p["p0"], selector={"region": "*"}, gpu_hours=p["hours"]),
                env(
                    "e1",
                    p["p1"],
                    selector={"region": "r2"},
                    start=T0 + p["opens"] * HOUR,
                    end=T0 + (p["opens"] + p["lasts"]) * HOUR,
                ),
            ],
            caps=[cap("both", ["e0", "e1"], max_concurrency=p["cap"])] if p["cap"] else [],
        ),
        budget("c1", "org:c1", [env("e0", p["c1"], selector={"region": "r1"})], parents=["org:p"]),
        budget(
            "s",
            "org:s",
            [env("e0", p["s"], selector={"region": "*"}, lend=True, lend_to=["*"], lend_max=6)],
        ),
    ]


budget_params = st.fixed_dictionaries(
    {
        "p0": st.integers(2, 24),
        "p1": st.integers(0, 16),
        "hours": st.one_of(st.none(), st.floats(4, 60), st.floats(0.25, 4)),  # some run out
        "opens": st.integers(0, 3),
        "lasts": st.integers(1, 4),
        "cap": st.one_of(st.none(), st.integers(4, 30)),
        "c1": st.integers(0, 12),
        "s": st.integers(0, 12),
    }
)

submit = st.tuples(
    st.just("submit"),
    st.sampled_from(["p", "c1"]),
    st.integers(1, 12),
    st.booleans(),  # borrows from org:s
    st.sampled_from([None, "30m", "2h"]),
)
op = st.one_of(
    submit,
    submit,
    submit,
    st.tuples(
        st.just("submit"),
        st.sampled_from(["p", "c1"]),
        st.integers(1, 12),
        st.booleans(),  # borrows from org:s
        st.sampled_from([None, "30m", "2h"]),
    ),
    st.tuples(st.just("complete"), st.integers(0, 50)),
    st.tuples(st.just("delete"), st.integers(0, 50)),
    st.tuples(st.just("budget"), budget_params),
    st.tuples(st.just("advance"), st.sampled_from([1, 7, MINUTE, 20 * MINUTE, HOUR, 3 * HOUR])),
)


def apply_op(fleet: Fleet, step: tuple[Any, ...], i: int, now: int) -> None:
    kind = step[0]
    running = sorted(k for k, s in fleet.state.status.items() if s.phase == "Running")
    if kind == "submit":
        _, ns, width, borrow, duration = step
        fleet.apply(
            run(ns, f"r{i}", width, sponsors=["org:s"] if borrow else (), max_duration=duration),
            now,
        )
    elif kind == "complete" and running:
        fleet.complete(running[step[1] % len(running)], now)
    elif kind == "delete" and fleet.state.runs:
        keys = sorted(fleet.state.runs)
        ns, name = keys[step[1] % len(keys)].split("/")
        fleet.delete("Run", ns, name, now)
    elif kind == "budget":
        for b in fleet_budgets(step[1]):
            fleet.apply(b, now)
    elif kind == "advance":
        fleet.advance_to(now)


def fresh_fold(history: list[Event]) -> FleetState:
    state = FleetState(settings_period_hours=SETTINGS.period_hours, incremental=False)
    for e in history:
        fold(state, e)
    return state


@ENGINE
@given(budget_params, st.lists(op, min_size=8, max_size=30))
def test_engine_with_shortcuts_decides_what_the_reference_decides(
    monkeypatch: pytest.MonkeyPatch, params: dict[str, Any], ops: list[tuple[Any, ...]]
) -> None:
    """Same commands, same events - with the incremental paths and without them - and at every
    step the funding picture equals a fresh fold's (payers, classes, usage, hours metered)."""
    extended = [0]
    real = gang.extend_fill

    def counting(*args: Any, **kwargs: Any) -> FillResult | None:
        out = real(*args, **kwargs)
        extended[0] += out is not None
        return out

    monkeypatch.setattr(gang, "extend_fill", counting)
    rebased = [0]
    exhausted = [False]
    real_rebase = incremental.rebase_fill

    def counting_rebase(*args: Any, **kwargs: Any) -> FillResult | None:
        out = real_rebase(*args, **kwargs)
        rebased[0] += out is not None and args[0].trace.hours is not None
        return out

    for module in (state_module, metering):
        monkeypatch.setattr(module, "rebase_fill", counting_rebase)
    fleets = [Fleet(SETTINGS), Fleet(SETTINGS)]
    fleets[0].check_shortcuts = True
    fleets[1].state.incremental = False
    now = T0
    for f in fleets:
        for n in NODES:
            f.register_node(n, now)
        for b in fleet_budgets(params):
            f.apply(b, now)
    for i, step in enumerate(ops):
        now += step[1] if step[0] == "advance" else 1
        outcomes = []
        for f in fleets:
            try:
                apply_op(f, step, i, now)
                outcomes.append("ok")
            except CommandError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
        fast, ref = fleets[0].state, fleets[1].state
        assert fast.history == ref.history
        check_reservation_views(fast)
        if i % 2 == 0:
            continue  # leave the engine's caches alone every other step (as production does)
        fresh = fresh_fold(fast.history)
        at = fast.clock
        got = fast.evaluation(at)
        want = evaluate(fresh.meter, fresh.funding_inputs(), at)
        same_fill(got.fill, want.fill)
        exhausted[0] |= any(
            "GPU-hours" in r.template for rs in got.fill.rejections.values() for r in rs
        )
        assert got.envelopes == want.envelopes
        assert got.caps == want.caps
        assert got.runs == want.runs
        assert _meter(fast) == _meter(fresh)
    minted = sum(1 for e in fleets[0].state.history if type(e).__name__ == "LeaseMinted")
    event(f"leases minted: {min(minted // 4 * 4, 16)}+")
    event(f"matchings extended: {min(extended[0] // 4 * 4, 16)}+")
    event(f"matchings reused under GPU-hours left since: {min(rebased[0] // 4 * 4, 16)}+")
    event(f"GPU-hours turned a claim away: {exhausted[0]}")


def _meter(state: FleetState) -> tuple[object, ...]:
    m = state.meter
    return (
        m.t,
        dict(m.envelope_hours),
        {k: dict(v) for k, v in m.envelope_class_hours.items()},
        dict(m.cap_hours),
        {k: dict(v) for k, v in m.run_hours.items()},
        {k: dict(v) for k, v in m.run_lender_hours.items()},
        m.previously_funded,
    )


def test_envelope_keys_are_what_the_budgets_say() -> None:
    """The generated budgets name the envelopes the engine property relies on."""
    index = build_index(
        fleet_budgets(
            {"p0": 4, "p1": 2, "hours": 8.0, "opens": 1, "lasts": 2, "cap": 6, "c1": 2, "s": 3}
        )
    )
    assert EnvelopeKey("p", "p", "e1") in index.envelopes
    assert EnvelopeKey("s", "s", "e0") in index.envelopes


# ------------------------------------------------------------------------------------------
# Deep queues: skipped admission attempts must be no-ops
# ------------------------------------------------------------------------------------------

SMALL = [
    node("a1", 8, region="r1", fabric="fa"),
    node("a2", 8, region="r1", fabric="fa"),
    node("b1", 8, region="r2", fabric="fb"),
    node("b2", 4, region="r2", fabric="fb"),
]

queue_op = st.one_of(
    st.tuples(
        st.just("submit"),
        st.sampled_from(["p", "c1"]),
        st.integers(1, 20),
        st.sampled_from([None, 4, 8]),  # group size
        st.integers(0, 1),  # spares per group
        st.sampled_from([None, "10m", "1h", "3h"]),
    ),
    st.tuples(st.just("complete"), st.integers(0, 50)),
    st.tuples(st.just("advance"), st.sampled_from([1, MINUTE, 10 * MINUTE, HOUR])),
)


@ENGINE
@given(st.booleans(), st.lists(queue_op, min_size=10, max_size=40))
def test_queues_decide_the_same_with_skipped_attempts(
    tight_budget: bool, ops: list[tuple[Any, ...]]
) -> None:
    """A small fleet with a deep queue (groups, spares, maxDuration, reservations, activation,
    the resolver): every attempt the engine skips is run anyway and emits nothing, and the
    events are those of the engine without shortcuts."""
    fleets = [Fleet(SETTINGS), Fleet(SETTINGS)]
    fleets[0].check_shortcuts = True
    fleets[1].state.incremental = False
    now = T0
    conc = 12 if tight_budget else 100
    for f in fleets:
        for n in SMALL:
            f.register_node(n, now)
        f.apply(budget("p", "org:p", [env("e", conc, selector={"region": "*"})]), now)
        f.apply(
            budget("c1", "org:c1", [env("e", 8, selector={"region": "*"})], parents=["org:p"]),
            now,
        )
    for i, step in enumerate(ops):
        now += step[1] if step[0] == "advance" else 1
        outcomes = []
        for f in fleets:
            try:
                running = sorted(k for k, s in f.state.status.items() if s.phase == "Running")
                if step[0] == "submit":
                    _, ns, width, group, spares, duration = step
                    f.apply(
                        run(
                            ns,
                            f"q{i}",
                            width,
                            group_gpus=group,
                            spares=spares if group else 0,
                            max_duration=duration,
                        ),
                        now,
                    )
                elif step[0] == "complete" and running:
                    f.complete(running[step[1] % len(running)], now)
                else:
                    f.advance_to(now)
                outcomes.append("ok")
            except CommandError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1]
        assert fleets[0].state.history == fleets[1].state.history
        check_reservation_views(fleets[0].state)
    event(f"attempts skipped: {min(fleets[0].skipped_attempts // 10 * 10, 50)}+")
    event(f"slices: {min(len(fleets[0].state.protected_slices()), 3)}")


def check_reservation_views(state: FleetState) -> None:
    """What the fold keeps about pending reservations, runs and leases equals what a scan of
    them gives (the reconcile loop and the shortcuts read these indexes)."""
    status = state.status
    assert state.waiting_runs == {
        k for k, st in status.items() if st.phase in ("Pending", "Waiting") and k in state.runs
    }
    assert {k for k in state.checkpoint_runs if gang.checkpoint_deadline(state, k) is not None} == {
        k for k in status if gang.checkpoint_deadline(state, k) is not None
    }
    assert state.elastic_runs == {
        k
        for k, st in status.items()
        if st.phase == "Running" and k in state.runs and state.runs[k].spec.malleable
    }
    malleable: dict[str, set[str]] = {}
    for r in state.runs.values():
        if r.spec.malleable is not None:
            malleable.setdefault(r.flavor, set()).add(r.key)
    assert {f: ks for f, ks in state.malleable_runs.items() if ks} == malleable
    for key in {x.run for x in state.leases.values()}:
        assert state.leases_of(key, open_only=True) == sorted(
            (x for x in state.open_leases.values() if x.run == key), key=lambda x: (x.start, x.id)
        )
        assert state.lease_count(key) == sum(1 for x in state.leases.values() if x.run == key)
    assert state.pending_preemptions() == [
        p for p in state.preemptions.values() if p.lease in state.open_leases
    ]
    for t in {state.clock, state.clock + HOUR}:
        assert state.leases_ending(t) == sorted(
            (x for x in state.open_leases.values() if x.end is not None and x.end <= t),
            key=lambda x: (x.end or 0, x.id),
        )
    pending = list(state.pending_reservations.values())
    order = state.promise_order()
    assert sorted(order, key=lambda name: order[name]) == [r.name for r in pending]
    rank = {r.name: i for i, r in enumerate(pending)}
    slices: dict[tuple[str, ...], list[SliceEntry]] = {}
    for r in pending:
        if r.holds_slice:
            slices.setdefault(tuple(r.nodes), []).append(
                SliceEntry(r.earliest_start, r.name, r.run, rank[r.name])
            )
    kept = {
        nodes: sorted(e._replace(line=rank[e.name]) for e in entries)
        for nodes, entries in state.protected_slices().items()
    }
    assert kept == {nodes: sorted(entries) for nodes, entries in slices.items()}
    assert list(state.protected_slices()) == sorted(slices)
    for key in {*state.runs, *(r.run for r in pending)}:
        mine = [r for r in pending if r.run == key]
        newest = max(mine, key=lambda r: (r.created_at, r.name)) if mine else None
        assert state.pending_reservation(key) == newest
        assert gang.closed_slices(state, key) == reference_closed(state, key)
    starts = sorted({state.clock, *(r.earliest_start for r in pending)})
    for t in starts:
        due = sorted(
            (r for r in pending if r.earliest_start <= t), key=lambda r: (r.earliest_start, r.name)
        )
        assert state.due_reservations(t) == due
    check_waiting_line(state)
    firsts = {e.name for e in state.firsts_in_line()}
    assert firsts == {
        min(entries, key=lambda e: e.line).name for entries in state.protected_slices().values()
    }


def check_waiting_line(state: FleetState) -> None:
    """The waiting line the fold keeps equals one filed afresh from the waiting runs."""
    line = state.waiting_line()
    promise = state.promise_order()
    parked = {}
    for key in state.waiting_runs:
        need = parked_need(state, state.runs[key])
        if need is not None:
            res = state.pending_reservation(key)
            assert res is not None
            fenced = gang.max_duration(state.runs[key]) is None
            parked[key] = (state.runs[key].flavor, fenced, need, promise[res.name])
    assert line.parked == parked
    assert line.unparked == state.waiting_runs - parked.keys()
    by_need: dict[tuple[str, bool], dict[int, list[tuple[int, str]]]] = {}
    for key, (flavor, fenced, need, place) in sorted(parked.items()):
        by_need.setdefault((flavor, fenced), {}).setdefault(need, []).append((place, key))
    assert line.by_need == {
        flavor: {need: sorted(entries) for need, entries in needs.items()}
        for flavor, needs in by_need.items()
    }


def reference_closed(state: FleetState, key: str) -> tuple[tuple[str, ...], ...]:
    """``gang.closed_slices`` the long way: ``protects`` over every slice."""
    r = state.runs.get(key)
    duration = gang.max_duration(r) if r is not None else None
    own = state.pending_reservation(key)
    mine = (own.earliest_start, own.name) if own is not None else None
    return tuple(
        nodes
        for nodes, entries in state.protected_slices().items()
        if reference_protects(entries, key, mine, duration, state.clock)
    )


def reference_protects(
    entries: list[SliceEntry],
    key: str,
    mine: tuple[int, str] | None,
    duration: int | None,
    now: int,
) -> bool:
    """``gang.protects`` the long way: the walk of every entry of the slice."""
    own = next((e for e in entries if e.run == key), None)
    for bound, name, owner, line in entries:
        if owner == key:
            continue
        if own is not None and own.line < line:
            continue  # promised the slice after this run: behind it in line
        if mine is not None and mine[0] <= now and mine <= (bound, name):
            return False
        return duration is None or now + duration > bound
    return False


slice_entries = st.lists(
    st.tuples(st.integers(0, 6), st.sampled_from(["a", "b", "c"])), max_size=8
).map(
    lambda rows: sorted(
        SliceEntry(bound, f"r{i}", run_key, line)
        for i, ((bound, run_key), line) in enumerate(
            zip(rows, list(range(len(rows)))[::-1], strict=True)
        )
    )
)


@given(
    slice_entries,
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.one_of(
            st.none(), st.tuples(st.integers(0, 6), st.sampled_from(["r0", "r1", "r3", "x"]))
        ),
        st.one_of(st.none(), st.integers(0, 6)),
        st.integers(0, 6),
    ),
    st.randoms(use_true_random=False),
)
def test_protects_decides_what_the_walk_of_every_entry_decides(
    entries: list[SliceEntry],
    question: tuple[str, tuple[int, str] | None, int | None, int],
    rnd: Any,
) -> None:
    """``gang.protects`` bisects to a due run's promise instead of walking the line; over
    any slice (places in line shuffled against activation order) it answers as the walk."""
    key, mine, duration, now = question
    lines = [e.line for e in entries]
    rnd.shuffle(lines)
    entries = [e._replace(line=line) for e, line in zip(entries, lines, strict=True)]
    if mine is not None and rnd.random() < 0.5:
        own = [e for e in entries if e.run == key]
        if own:
            pick = rnd.choice(own)
            mine = (pick.earliest_start, pick.name)
    assert gang.protects(entries, key, mine, duration, now) == reference_protects(
        entries, key, mine, duration, now
    )
