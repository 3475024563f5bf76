"""The production ``fill`` decides exactly what the reference deferred acceptance decides.

``fill`` resumes an acceptor's greedy scan where its first newcomer ranks instead of re-deciding
everything it holds (issue 11); ``reference_matching.reference_fill`` is the matching as it was,
re-deciding from scratch.  Over generated worlds - family sharing, sponsors with lending caps
and borrow limits, loans, aggregate caps, GPU-hours with the hysteresis of claims funded just
before - both must give the same payers, classes, rejections (in order), accepted rows and the
trace ``extend_fill`` builds on.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Iterator
from typing import Any

import msgspec
import numpy as np
import pytest
from builders import T0, World, budget, cap, env, key, lease, payer, run
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reference_matching import reference_fill
from test_incremental import NODES, budgets_of, drawn_runs, hours_views

from gpu_fleet.core.funding import FillResult, HoursView, fill, matching
from gpu_fleet.core.model import Budget

REGIONS = ["r1", "r2", "*"]

FillArgs = tuple[Any, ...]
"""``fill``'s arguments, in order."""

EQUIV = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WAYS = ["in-python", "in-arrays", "in-c"]
BOTH_WAYS = pytest.mark.parametrize("way", WAYS)
"""Run a test as a small matching proposes (in Python), as a large one does in Python (in
arrays), and as a large one does where the C matching is built (``matching._match_native``)."""


def require_native() -> None:
    """Skip where the C matching is not built (an install without a C compiler) - except
    under CI, which builds it, where its absence fails the test instead."""
    if matching.NATIVE is None:
        if os.environ.get("CI"):
            pytest.fail("the C matching is not built (gpu_fleet.core.funding._native)")
        pytest.skip("the C matching is not built here (no C compiler at install)")


@contextlib.contextmanager
def matching_in(way: str) -> Iterator[None]:
    """Matchings of any size run ``way`` (``matching.ARRAYS_FROM``, ``NATIVE_MATCH_FROM``; the
    Python ways without the C module at all).  The C way is skipped where the module is not
    built, except under CI, where it fails."""
    if way == "in-c":
        require_native()
    was = matching.ARRAYS_FROM, matching.NATIVE_MATCH_FROM, matching.NATIVE
    matching.ARRAYS_FROM = sys.maxsize if way == "in-python" else 0
    matching.NATIVE_MATCH_FROM = 0 if way == "in-c" else sys.maxsize
    if way != "in-c":  # the Python ways are Python throughout: the walk and the table too
        matching.NATIVE = None
    try:
        yield
    finally:
        matching.ARRAYS_FROM, matching.NATIVE_MATCH_FROM, matching.NATIVE = was


def proposing_in(arrays: bool) -> contextlib.AbstractContextManager[None]:
    """``matching_in`` one of the Python ways: in arrays or not."""
    return matching_in("in-arrays" if arrays else "in-python")


def same_matching(a: FillResult, b: FillResult) -> None:
    assert list(a.payer.items()) == list(b.payer.items())
    assert list(a.funding_class.items()) == list(b.funding_class.items())
    # the same envelopes, in the same order, for the same reasons (kept as templates in ``a``)
    assert {k: [(r.envelope, r.reason) for r in v] for k, v in a.rejections.items()} == {
        k: [(r.envelope, r.reason) for r in v] for k, v in b.rejections.items()
    }
    assert list(a.rejections) == list(b.rejections)
    assert {k: v for k, v in a.accepted.items() if v} == {k: v for k, v in b.accepted.items() if v}
    assert a.trace is not None
    assert b.trace is not None
    assert a.trace.junior == b.trace.junior
    assert a.trace.used == b.trace.used
    assert a.trace.lent == b.trace.lent
    assert a.trace.cap == b.trace.cap
    assert a.trace.rejected_any == b.trace.rejected_any
    assert a.trace.rejected_at == b.trace.rejected_at


@BOTH_WAYS
@EQUIV
@given(st.data())
def test_fill_is_the_reference_matching(way: str, data: st.DataObject) -> None:
    budgets = data.draw(budgets_of())
    hours = data.draw(hours_views(budgets))
    drawn = drawn_runs(data, "r", 14)
    runs, admitted, leases = drawn.runs, drawn.admitted, drawn.leases
    world = World(budgets, runs.values(), leases, nodes=NODES, admitted=admitted)
    pairs = sorted((x.id, k) for x in leases for k in world.index.envelopes)
    funded = data.draw(st.sets(st.sampled_from(pairs))) if pairs else set()
    hours = HoursView(
        hours.period_hours, hours.remaining_envelope, hours.remaining_cap, frozenset(funded)
    )
    args = (world.index, leases, runs, admitted, world.node_labels, T0, hours)
    with matching_in(way):
        got = fill(*args)
    same_matching(got, reference_fill(*args))
    rejected = sum(len(x) for x in got.rejections.values())
    event(f"rejections: {'none' if not rejected else '1-3' if rejected < 4 else '4+'}")


@BOTH_WAYS
@EQUIV
@given(st.data())
def test_rows_read_one_envelope_at_a_time_are_the_references(way: str, data: st.DataObject) -> None:
    """A fresh matching makes an acceptor group's rows when one of its envelopes is first
    read (``AcceptedRows``): envelopes read one by one, in any order and any way, before
    anything reads them all, answer what the reference holds - envelopes of one group under a
    cap included, and those that fund nothing have no rows."""
    world, args = crowded_world(data)
    with matching_in(way):
        got = fill(*args)
    want = {k: v for k, v in reference_fill(*args).accepted.items() if v}
    keys = data.draw(st.permutations(sorted(world.index.envelopes)))
    for envelope in keys:
        how = data.draw(st.sampled_from(["get", "item", "in"]))
        if how == "get":
            assert got.accepted.get(envelope) == want.get(envelope)
        elif how == "in":
            assert (envelope in got.accepted) == (envelope in want)
        elif envelope in want:
            assert got.accepted[envelope] == want[envelope]
        else:
            with pytest.raises(KeyError):
                got.accepted[envelope]
    assert dict(got.accepted) == want
    event(f"groups of several envelopes funding: {sum(len(a) > 1 for a in world.index.acceptors)}")


@st.composite
def crowded_budgets(draw: st.DrawFn) -> list[Budget]:
    """The parent's envelopes under one tight aggregate cap, small children's envelopes that
    overflow into them, and a sponsor's envelopes under a cap and lending limits: acceptors
    that fill up and keep turning claims away over many rounds (the paths that turn newcomers
    away without a scan)."""
    parent = [
        env(f"e{i}", draw(st.integers(1, 6)), selector={"region": draw(st.sampled_from(REGIONS))})
        for i in range(draw(st.integers(2, 3)))
    ]
    tight = cap("tight", [e["name"] for e in parent], max_concurrency=draw(st.integers(0, 6)))
    out = [budget("p", "org:p", parent, caps=[tight])]
    for ns in ("c1", "c2"):
        children = [env("e0", draw(st.integers(1, 2)), selector={"region": "*"})]
        out.append(budget(ns, f"org:{ns}", children, parents=["org:p"]))
    lending = [
        env(
            f"e{i}",
            draw(st.integers(1, 4)),
            selector={"region": "*"},
            lend=True,
            lend_to=["*"],
            lend_max=draw(st.one_of(st.none(), st.integers(0, 3))),
        )
        for i in range(2)
    ]
    lent = cap("lent", ["e0", "e1"], max_concurrency=draw(st.integers(0, 5)))
    out.append(budget("s", "org:s", lending, caps=[lent]))
    return out


def crowded_world(data: st.DataObject) -> tuple[World, FillArgs]:
    """A world of ``crowded_budgets`` and drawn runs, and ``fill``'s arguments for it."""
    budgets = data.draw(crowded_budgets())
    drawn = drawn_runs(data, "r", 14, least=4)
    runs, admitted, leases = drawn.runs, drawn.admitted, drawn.leases
    world = World(budgets, runs.values(), leases, nodes=NODES, admitted=admitted)
    return world, (world.index, leases, runs, admitted, world.node_labels, T0, HoursView())


@BOTH_WAYS
@EQUIV
@given(st.data())
def test_fill_is_the_reference_matching_when_acceptors_fill_up(
    way: str, data: st.DataObject
) -> None:
    _, args = crowded_world(data)
    with matching_in(way):
        got = fill(*args)
    same_matching(got, reference_fill(*args))
    reasons = {r.template.split()[0] for v in got.rejections.values() for r in v}
    event(f"turned away for: {sorted(reasons)}")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["n1", "n2", "a#b", "n1#", ""]),
            st.one_of(st.integers(0, 12).map(str), st.sampled_from(["x", "", "\u00b2", "07"])),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_leases_first_slot_is_its_least_node_and_ordinal(parts: list[tuple[str, str]]) -> None:
    """The rank's tie-breaker: the least (node, ordinal) of the lease's slots, an ordinal that
    is not a decimal number counting as -1 - whether the slots share a node (the quick path)
    or not."""
    slots = tuple(f"{node}#{ordinal}" for node, ordinal in parts)

    def key(s: str) -> tuple[str, int]:
        node, _, ordinal = s.rpartition("#")
        return node, int(ordinal) if ordinal.isdecimal() else -1

    assert matching._first_slot(slots) == min(map(key, slots))


def test_the_first_slots_kept_are_emptied_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parsed first slots are kept in a process-wide dict; once it holds as many as it
    keeps it starts afresh, so it never grows past that, and answers stay right across it."""
    monkeypatch.setattr(matching, "_FIRST_SLOTS", {})
    monkeypatch.setattr(matching, "_FIRST_SLOTS_KEPT", 3)
    firsts = [matching._first_slot((f"n{i}#{7 - i}", f"n{i}#9")) for i in range(7)]
    assert firsts == [(f"n{i}", 7 - i) for i in range(7)]
    assert len(matching._FIRST_SLOTS) == 1  # emptied at the 4th and the 7th
    assert matching._first_slot(("n0#7", "n0#9")) == ("n0", 7)
    assert len(matching._FIRST_SLOTS) == 2


@BOTH_WAYS
def test_a_lease_without_slots_is_funded_as_the_reference_funds_it(way: str) -> None:
    """The ledger refuses such a lease, but the matching is a pure function of what it is
    given: width 0, funded by its own envelope, as the reference does."""
    budgets = [budget("p", "org:p", [env("e0", 1, selector={"region": "r1"})])]
    r = run("p", "r0", 8)
    leases = [
        lease("p/r0#0", r.key, 1, node_name="n1", first=0),
        msgspec.structs.replace(lease("p/r0#1", r.key, 1, node_name="n1", first=1), slots=()),
    ]
    admitted = {r.key: T0}
    world = World(budgets, [r], leases, nodes=NODES, admitted=admitted)
    args = (world.index, leases, {r.key: r}, admitted, world.node_labels, T0, HoursView())
    with matching_in(way):
        got = fill(*args)
    same_matching(got, reference_fill(*args))
    assert got.payer["p/r0#1"] is not None


def test_rejections_are_sorted_out_once_and_copy_with_the_matching() -> None:
    """A matching keeps its rejections as a log until first read (``RejectionLog``): read
    twice it gives the very same lists, and a deep copy - the ledger's refusal checks copy the
    state - gives equal ones, read before or after the original was."""
    budgets = [budget("p", "org:p", [env("e0", 2, selector={"region": "r1"})])]
    r = run("p", "r0", 8)
    leases = [lease(f"p/r0#{i}", r.key, 1, node_name="n1", first=i) for i in range(4)]
    admitted = {r.key: T0}
    world = World(budgets, [r], leases, nodes=NODES, admitted=admitted)
    got = fill(world.index, leases, {r.key: r}, admitted, world.node_labels, T0, HoursView())
    unread = copy.deepcopy(got)
    first = got.rejections
    assert [len(first[x.id]) for x in leases] == [0, 0, 1, 1]
    assert got.rejections is first
    assert unread.rejections == first == copy.deepcopy(got).rejections
    assert first["p/r0#3"][0].reason == "concurrency 2 full (2 funded ahead)"


def test_a_full_envelope_turns_a_rounds_newcomers_away_at_once_in_arrays() -> None:
    """In arrays, a group of one envelope that is full for every newcomer of a round, all
    ranking below what it holds, turns them away in one log entry before the scans
    (``_SoloGroups``), for the reason and with the trace a scan would leave."""
    budgets = [
        budget("p", "org:p", [env("e", 1, selector={"region": "*"})]),
        budget("c", "org:c", [env("e", 1, selector={"region": "*"})], parents=["org:p"]),
    ]
    senior, child = run("p", "senior", 1), run("c", "child", 3)
    leases = [lease("p/senior#0", senior.key, 1, node_name="n1")] + [
        lease(f"c/child#{i}", child.key, 1, node_name="n2", first=i) for i in range(3)
    ]
    admitted = {senior.key: T0, child.key: T0}
    world = World(budgets, [senior, child], leases, nodes=NODES, admitted=admitted)
    args = (world.index, leases, world.runs, admitted, world.node_labels, T0, HoursView())
    with proposing_in(True):
        got = fill(*args)
    log = got._rejection_log
    assert log is not None
    batches = [r.tolist() for r in log.ranks if isinstance(r, np.ndarray)]
    assert [len(b) for b in batches] == [2]  # the child's two turned away by its own envelope
    same_matching(got, reference_fill(*args))
    assert [r.reason for r in got.rejections["c/child#2"]] == [
        "concurrency 1 full (1 funded ahead)",
        "concurrency 1 full (1 funded ahead)",
    ]


def test_a_loan_newcomer_under_a_full_cap_meets_the_lending_limit_first() -> None:
    """Under caps a round's newcomers are turned away at once only if none borrows: a loan
    (ranked above every family claim, so below only the loans held) that would fit the
    envelope meets its lending limit before the cap, and is turned away for that; then the
    sponsor's other envelope, whose cap is full."""
    lending = [
        env("e0", 4, selector={"region": "*"}, lend=True, lend_to=["*"], lend_max=1),
        env("e1", 4, selector={"region": "*"}, lend=True, lend_to=["*"]),
    ]
    budgets = [
        budget("s", "org:s", lending, caps=[cap("lent", ["e0", "e1"], max_concurrency=1)]),
        budget("x", "org:x", [env("e", 1, flavor="A100")]),
        budget("y", "org:y", [env("e", 1, selector={"region": "*"})]),
    ]
    loan = payer("s", "e0", owner="org:s")
    first = run("x", "first", 1, sponsors=["org:s"])
    later = run("y", "later", 2, sponsors=["org:s"])
    leases = [
        lease("x/first#0", first.key, 1, minted=loan),
        lease("y/later#0", later.key, 1, node_name="n2"),
        lease("y/later#1", later.key, 1, node_name="n2", first=1, minted=loan),
    ]
    admitted = {first.key: T0, later.key: T0 + 60}
    world = World(budgets, [first, later], leases, nodes=NODES, admitted=admitted)
    args = (world.index, leases, world.runs, admitted, world.node_labels, T0, HoursView())
    for way in WAYS:
        with matching_in(way):
            got = fill(*args)
        same_matching(got, reference_fill(*args))
        assert [r.reason for r in got.rejections["y/later#1"]] == [
            "concurrency 1 full (1 funded ahead)",
            "lending cap 1 reached (1 lent)",
            "aggregate cap lent 1 full",
        ]


@BOTH_WAYS
def test_a_run_not_admitted_ranks_each_lease_by_its_own_start(way: str) -> None:
    """A run with no admission on record ranks each lease by the lease's start: its older
    lease ranks above an admitted run, its newer one below; the rows and the junior ranks
    (``Tails``) say so, as the reference does."""
    budgets = [budget("p", "org:p", [env("e", 2, selector={"region": "*"})])]
    admitted_run, unadmitted = run("p", "a", 1), run("p", "b", 2)
    leases = [
        lease("p/a#0", admitted_run.key, 1, start=T0 - 100),
        lease("p/b#0", unadmitted.key, 1, first=1, start=T0 - 50),
        lease("p/b#1", unadmitted.key, 1, first=2, start=T0 - 200),
    ]
    admitted = {admitted_run.key: T0 - 100}
    world = World(budgets, [admitted_run, unadmitted], leases, nodes=NODES, admitted=admitted)
    args = (world.index, leases, world.runs, admitted, world.node_labels, T0, HoursView())
    with matching_in(way):
        got = fill(*args)
    same_matching(got, reference_fill(*args))
    rows = got.accepted[world.index.acceptors[0][0]]
    assert [(r.rank[1], r.rank[-1]) for r in rows] == [(T0 - 200, "p/b#1"), (T0 - 100, "p/a#0")]


@BOTH_WAYS
def test_one_lease_id_twice_is_funded_and_turned_away_in_walk_order(way: str) -> None:
    """The ledger refuses a lease id twice, but the matching is a pure function of what it is
    given: two claims of one id that tie on the whole tail keep the order of the walk by id,
    and their rejections interleave as the scans meet them (review cases of the thirteenth
    session, against the code before the change)."""
    budgets = [budget("p", "org:p", [env("e", 3, selector={"region": "*"})])]
    r = run("p", "r", 8)
    leases = [
        lease("p/r#0", r.key, 1, first=10, start=T0 - 100),
        lease("p/r#1", r.key, 1, first=0, start=T0 - 200),
        lease("p/r#1", "p/missing", 1, first=20, start=T0 - 200),
        lease("p/r#1", r.key, 3, first=0, start=T0 - 200),
    ]
    world = World(budgets, [r], leases)
    with matching_in(way):
        got = fill(world.index, leases, {r.key: r}, {}, world.node_labels, T0, HoursView())
    assert [(row.rank[-1], row.width) for row in got.accepted[key("p")]] == [
        ("p/r#1", 1),
        ("p/r#0", 1),
    ]

    star = {"region": "*"}
    budgets = [
        budget("a", "org:a", [env("e", 3, selector=star)]),
        budget("b", "org:b", [env("e", 1, selector=star)]),
        budget("ca", "org:ca", [env("e", 0, selector=star)], parents=["org:a"]),
        budget("cb", "org:cb", [env("e", 0, selector=star)], parents=["org:b"]),
    ]
    runs = [run("a", "s", 8), run("b", "s", 8), run("ca", "r", 8), run("ca", "z", 8)]
    runs.append(run("cb", "r", 8))
    leases = [
        lease("a/s#0", "a/s", 1, first=0),
        lease("b/s#0", "b/s", 1, first=1),
        lease("ca/z#0", "ca/z", 1, first=2),
        lease("d", "ca/r", 3, first=10),  # scanned by a/e in the second round
        lease("d", "cb/r", 1, first=20),  # turned away by a full b/e in the second round
    ]
    admitted = {"a/s": T0 - 100, "b/s": T0 - 100, "ca/r": T0, "ca/z": T0, "cb/r": T0}
    world = World(budgets, runs, leases, admitted=admitted)
    with matching_in(way):
        got = world.fill()
    assert [r.envelope for r in got.rejections["d"]] == [key("ca"), key("cb"), key("a"), key("b")]
