"""The C matching (``gpu_fleet.core.funding._native``) decides exactly what the Python one does.

The Python functions stay the reference: ``matching._walk`` for the walk that makes every
lease's claim, ``matching._match`` for the deferred acceptance.  Over generated worlds - family
sharing, sponsors with lending caps and borrow limits, loans, aggregate caps, GPU-hours with the
hysteresis of claims funded just before - the C ones must give the same claims, element by
element, and the same matching: payers, classes, rejections in order, accepted rows, the trace
and the GPU-hour checks ``rebase_fill`` reuses a matching by.  ``test_fill_equivalence`` runs
its own properties the C way too (``matching_in("in-c")``).

Where the module is not built (no C compiler at install), these tests skip; under CI they fail
instead, so CI always checks the build.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NoReturn, cast

import numpy as np
import pytest
from builders import T0, World, budget, cap, env, lease, run
from hypothesis import event, given
from hypothesis import strategies as st
from test_fill_equivalence import EQUIV, matching_in, require_native, same_matching
from test_incremental import NODES, budgets_of, drawn_runs, hours_views

from gpu_fleet.core.funding import HoursView, fill, matching, native
from gpu_fleet.core.funding.proposals import Proposer
from gpu_fleet.core.model import Lease, LeaseRole


@pytest.fixture
def built() -> None:
    require_native()


@contextlib.contextmanager
def python_matching_refused() -> Iterator[None]:
    """The C way decides by itself: calling the Python matching fails the test (a world with
    valid limits is never handed back to it: ``_native_reads``)."""
    was = matching._match

    def refused(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("the C matching fell back to the Python one")

    matching._match = refused  # type: ignore[assignment]
    try:
        yield
    finally:
        matching._match = was


def test_the_fallback_is_refused_where_it_would_hide_the_c_matching() -> None:
    """``python_matching_refused`` can fail: the Python way calls ``_match``."""
    world = World(
        [budget("a", "org:a", [env("e", 8)])], [run("a", "j", 1)], [lease("a/j#0", "a/j", 1)]
    )
    with matching_in("in-python"), python_matching_refused(), pytest.raises(AssertionError):
        world.fill()


@pytest.mark.usefixtures("built")
def test_a_world_with_every_kind_of_limit_is_decided_in_c() -> None:
    """Lending and borrow limits, a cap's concurrency and GPU-hours, an envelope's GPU-hours, no
    limit at all: none sends the matching back to Python."""
    world = World(
        [
            budget(
                "a",
                "org:a",
                [env("e", 4, gpu_hours=50), env("f", 4, lend=True, lend_to=["*"], lend_max=2)],
                caps=[cap("c", ["e", "f"], max_concurrency=6, gpu_hours=80)],
            ),
            budget("b", "org:b", [env("g", 8)]),
        ],
        [run("a", "j", 4), run("b", "k", 4, sponsors=["org:a"], max_borrow=2)],
        [lease("a/j#0", "a/j", 2), lease("b/k#0", "b/k", 2, first=4)],
    )
    with matching_in("in-c"), python_matching_refused():
        got = world.fill()
    with matching_in("in-arrays"):
        want = world.fill()
    same_matching(got, want)


def _world(data: st.DataObject) -> tuple[World, HoursView]:
    budgets = data.draw(budgets_of())
    hours = data.draw(hours_views(budgets))
    drawn = drawn_runs(data, "r", 14)
    world = World(budgets, drawn.runs.values(), drawn.leases, nodes=NODES, admitted=drawn.admitted)
    pairs = sorted((x.id, k) for x in drawn.leases for k in world.index.envelopes)
    funded = data.draw(st.sets(st.sampled_from(pairs))) if pairs else set()
    return world, HoursView(
        hours.period_hours, hours.remaining_envelope, hours.remaining_cap, frozenset(funded)
    )


@pytest.mark.usefixtures("built")
@EQUIV
@given(st.data())
def test_the_c_walk_makes_the_python_walks_claims(data: st.DataObject) -> None:
    """Every row equal, the very same proposal lists, and the same stretches, runs and ids -
    at an instant where some leases have not started or have ended."""
    world, _ = _world(data)
    t = T0 + data.draw(st.sampled_from([-60, 0, 1, 3_600, 86_400]))
    proposer = Proposer.at(world.index, t)
    owner_of = world.index.family.owner_of

    def context(run):  # type: ignore[no-untyped-def]
        lists = proposer.lists_for(run, owner_of(run.metadata.namespace))
        cap = run.spec.funding.max_borrow_gpus if run.spec.funding is not None else None
        return run.key, world.admitted.get(run.key), cap, lists, lists.by_place

    leases = sorted(world.leases, key=lambda x: x.id)
    args = (leases, t, world.runs, context, world.node_labels, proposer)
    want = matching._walk(*args)
    got = matching._walk_native(*args)
    assert got == want  # tails, columns, stretches, runs, ids
    for mine, theirs in zip(got[1][4], want[1][4], strict=True):
        assert mine is theirs  # the proposal list every claim of it shares
    event(f"claims: {'none' if not want[0] else 'some'}; live: {len(want[5])}/{len(leases)}")


@pytest.mark.usefixtures("built")
@EQUIV
@given(st.data())
def test_the_c_matching_is_the_python_matching(data: st.DataObject) -> None:
    """``same_matching``, and the GPU-hour checks too (``HoursChecks``: bounds, widths, pairs
    funded before, envelopes whose hours ran out)."""
    world, hours = _world(data)
    args = (world.index, world.leases, world.runs, world.admitted, world.node_labels, T0, hours)
    with matching_in("in-arrays"):
        want = fill(*args)
    with matching_in("in-c"), python_matching_refused():
        got = fill(*args)
    same_matching(got, want)
    assert got.trace is not None
    assert want.trace is not None
    assert got.trace.hours == want.trace.hours
    checks = want.trace.hours
    event(f"GPU-hour checks: {'none' if checks is None else len(checks.strict)}")
    event(f"passed as funded before: {'some' if checks and checks.already else 'none'}")


def test_setting_gpu_fleet_native_to_0_runs_the_python_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(native.DISABLE_VARIABLE, "0")
    assert native.load() is None
    monkeypatch.setenv(native.DISABLE_VARIABLE, "1")
    assert native.load() is matching.NATIVE  # built or not, as this install is


@pytest.mark.usefixtures("built")
def test_the_c_matching_refuses_arrays_of_another_type() -> None:
    """A float array where an integer one belongs is refused by name, not read as integers, and
    an index out of range raises instead of reading past an array."""
    assert matching.NATIVE is not None
    arrays = [np.zeros(1, dtype=np.int64) for _ in range(17)] + [np.zeros(1)] * 2
    arrays[0] = np.zeros(1)  # the widths
    with pytest.raises(TypeError, match="widths must be a contiguous int64 array"):
        matching.NATIVE.match_core(1, *arrays, *([None] * 3), (), (), (), None, 0, 9, 24.0, 1e-6)
    arrays[0] = np.zeros(1, dtype=np.int64)  # now every array's type is right: one envelope,
    arrays[14] = np.array([0, 1], dtype=np.int64)  # one group of it, one claim whose list...
    arrays[11] = np.zeros(2, dtype=np.int64)  # (and no caps: env_cap_starts 0, 0)
    arrays[12], arrays[13] = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    arrays[18] = np.zeros(0)  # no cap sets GPU-hours
    rejections = ((),), ((),), (None,)
    with pytest.raises(ValueError, match=r"row_acceptor \(a list without its end row\)"):
        matching.NATIVE.match_core(1, *arrays, *([None] * 3), *rejections, None, 0, 9, 24.0, 1e-6)
    arrays[5] = np.array([7], dtype=np.int64)  # ...names group 7 and has no end row either
    with pytest.raises(ValueError, match="out of range"):
        matching.NATIVE.match_core(1, *arrays, *([None] * 3), *rejections, None, 0, 9, 24.0, 1e-6)
    with pytest.raises(TypeError, match=r"takes 31 arguments \(1 given\)"):
        matching.NATIVE.match_core(1)


@pytest.mark.usefixtures("built")
def test_the_c_walk_reads_a_lease_of_another_type_by_name() -> None:
    """Leases of the type the first one has are read at their fields' offsets; any other object
    through ``getattr``, with the same result."""
    world = World(
        [budget("a", "org:a", [env("e", 8)])],
        [run("a", "job", 4)],
        [lease("a/job#0", "a/job", 2), lease("a/job#1", "a/job", 2, first=2, group=1)],
    )

    class Other:
        def __init__(self, source: object) -> None:
            for name in ("start", "end", "closed_at", "id", "run", "node", "slots", "role"):
                setattr(self, name, getattr(source, name))
            self.group = source.group  # type: ignore[attr-defined]

    proposer = Proposer.at(world.index, T0)
    owner_of = world.index.family.owner_of

    def context(run):  # type: ignore[no-untyped-def]
        lists = proposer.lists_for(run, owner_of(run.metadata.namespace))
        return run.key, world.admitted.get(run.key), None, lists, lists.by_place

    leases = sorted(world.leases, key=lambda x: x.id)
    mixed = cast("list[Lease]", [leases[0], Other(leases[1])])
    got = matching._walk_native(mixed, T0, world.runs, context, world.node_labels, proposer)
    want = matching._walk(mixed, T0, world.runs, context, world.node_labels, proposer)
    assert got == want
    assert got[1][7] == [0, 0]  # both active: the role compared by identity
    assert mixed[1].role is LeaseRole.ACTIVE
    assert not isinstance(mixed[1], Lease)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("limit", ["cap", "hours"])
def test_a_negative_limit_or_nan_hours_are_decided_in_python(
    limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C matching reads -1 and NaN as "no limit"; validated manifests allow neither, and a
    library caller that passes one gets the Python matching's decisions (always full, always
    spent), not the C one's reading of them."""
    caps = [cap("c", ["e"], max_concurrency=-1)] if limit == "cap" else []
    world = World(
        [
            budget(
                "a", "org:a", [env("e", 8, gpu_hours=100 if limit == "hours" else None)], caps=caps
            )
        ],
        [run("a", "job", 4)],
        [lease("a/job#0", "a/job", 2), lease("a/job#1", "a/job", 2, first=2, group=1)],
    )
    nan = dict.fromkeys(world.index.envelopes, math.nan)
    hours = HoursView(1.0, nan if limit == "hours" else {})
    args = (world.index, world.leases, world.runs, world.admitted, world.node_labels, T0, hours)
    with matching_in("in-python"):
        want = fill(*args)
    called = []
    monkeypatch.setattr(matching, "_match", lambda *a, **k: called.append(1) or real(*a, **k))
    with matching_in("in-c"):
        got = fill(*args)
    assert called  # the C matching was not asked, the Python one decided
    same_matching(got, want)
    assert want.payer == {"a/job#0": None, "a/job#1": None}


real = matching._match


@pytest.mark.usefixtures("built")
@EQUIV
@given(st.lists(st.integers(), max_size=30), st.data())
def test_the_c_gather_and_take_are_the_python_ones(items: list[int], data: st.DataObject) -> None:
    """Stretches gathered in any order, and columns taken in any order, as the Python helpers
    do; the C ones refuse a stretch or an index outside the items (``_claims`` gives either only
    valid ones)."""
    assert matching.NATIVE is not None
    bounds = st.integers(0, len(items))
    spans = data.draw(st.lists(st.tuples(bounds, bounds), max_size=8))
    starts, ends = [min(s) for s in spans], [max(s) for s in spans]
    assert matching.NATIVE.gather(items, starts, ends) == matching._gather(items, starts, ends)
    columns = (items, [str(i) for i in items])
    order = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=30)) if items else []
    want = matching._take(columns, order)
    assert matching.NATIVE.take(columns, order) == want
    assert [len(c) for c in want] == [len(order)] * 2
    with pytest.raises(ValueError, match="stretch outside"):
        matching.NATIVE.gather(items, [0], [len(items) + 1])
    with pytest.raises(ValueError, match="an index is outside it"):
        matching.NATIVE.take(columns, [len(items)])
