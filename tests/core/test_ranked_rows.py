"""``RankedRows`` against a plain sorted list: every version reads as the list it stands for,
and building a new version never changes an old one (matchings share them)."""

from __future__ import annotations

import bisect
from typing import Any
from unittest.mock import patch

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from gpu_fleet.core.funding import ranked_rows
from gpu_fleet.core.funding.fill_result import Accepted
from gpu_fleet.core.funding.ranked_rows import EMPTY_ROWS, RankedRows


def row(rank: int, lease: str, width: int) -> Accepted:
    return Accepted((rank % 3, rank, lease), width, rank % 3)


def rank_of(r: Accepted) -> tuple[object, ...]:
    return r.rank


def reads_as(rows: RankedRows, model: list[Accepted]) -> None:
    assert len(rows) == len(model)
    assert list(rows) == model
    assert rows == model
    assert model == rows
    assert rows.as_list() == model
    assert [rows[i] for i in range(-len(model), len(model))] == model + model
    assert rows[1:-1] == model[1:-1]
    assert rows.total_width() == sum(r.width for r in model)
    probes = [r.rank for r in model] + [(-1,), (9, 0, ""), (1, 50, "m")]
    for rank in probes:
        left = bisect.bisect_left(model, rank, key=rank_of)
        right = bisect.bisect_right(model, rank, key=rank_of)
        assert rows.bisect_left(rank) == left
        assert rows.bisect_right(rank) == right
        assert rows.width_up_to(rank) == sum(r.width for r in model[:right])


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "insert", "drop", "read"]),
        st.integers(0, 60),
        st.integers(1, 8),
        st.integers(0, 1_000),  # which earlier version to build on (modulo their number)
    ),
    max_size=150,
)


@seed(7)
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), max_size=90),
    ops,
    st.sampled_from([ranked_rows._tail_limit, lambda n: 1 + n % 3]),
)
def test_every_version_reads_as_its_sorted_list(
    held: list[tuple[int, int]], steps: list[tuple[str, int, int, int]], limit: Any
) -> None:
    """From no rows and from a matching's rows, any chain of insertions (junior ones to the
    tail, senior ones near the end or far inside the shared rows), removals and reads, each
    built on any earlier version (siblings share and extend the same rows).  With the real
    tail limit and with a tiny one, under which tails fold into the shared rows all the time."""
    with patch.object(ranked_rows, "_tail_limit", limit):
        chain(held, steps)


def chain(held: list[tuple[int, int]], steps: list[tuple[str, int, int, int]]) -> None:
    first = sorted(
        (row(rank, f"h{i:02d}", width) for i, (rank, width) in enumerate(held)), key=rank_of
    )
    versions: list[tuple[RankedRows, list[Accepted]]] = [
        (EMPTY_ROWS, []),
        (RankedRows.adopt(list(first)), first),
    ]
    for i, (op, rank, width, pick) in enumerate(steps):
        rows, model = versions[pick % len(versions)]
        if op == "read":  # running totals are built as far as they are read
            assert rows.width_up_to((rank % 3, rank, "")) == sum(
                r.width for r in model if r.rank <= (rank % 3, rank, "")
            )
            continue
        if op == "insert":
            new = row(rank, f"l{i:03d}", width)
            built, expected = rows.inserted(new), list(model)
            bisect.insort_right(expected, new, key=rank_of)
        else:
            gone = {r.rank[-1] for r in model[::3]}
            built = rows.without(gone)
            expected = [r for r in model if r.rank[-1] not in gone]
        versions.append((built, expected))
    for rows, model in versions:  # old versions are untouched by what was built on them
        reads_as(rows, model)


def test_a_newcomer_shares_the_rows_unless_it_ranks_far_inside_them() -> None:
    def at(rank: int, lease: str, width: int) -> Accepted:
        return Accepted((0, rank, lease), width, 0)

    held = [at(i, f"h{i:02d}", 1) for i in range(40)]
    base = RankedRows.adopt(list(held))
    junior = base.inserted(at(99, "j", 4))
    assert junior.shares_rows_with(base)
    assert junior.total_width() == 44
    near = base.inserted(at(35, "n", 2))  # after h35: h36..h39 move to the tail
    assert near.shares_rows_with(base)
    assert [r.rank[-1] for r in near[35:]] == ["h35", "n", "h36", "h37", "h38", "h39"]
    assert near.width_up_to(near[37].rank) == 39
    far = base.inserted(at(1, "f", 8))  # after h01: a new list
    assert not far.shares_rows_with(base)
    assert list(base) == held


def test_a_long_tail_is_folded_into_a_new_head() -> None:
    """Past ``max(32, sqrt(2n))`` tail rows the tail becomes part of a new head."""
    rows = first = EMPTY_ROWS.inserted(row(0, "l00", 1))
    for i in range(1, 40):
        rows = rows.inserted(row(3 * i, f"l{i:02d}", 1))
        assert rows.shares_rows_with(first) == (i < 32)
    assert len(rows) == 40
    assert rows.total_width() == 40


def test_siblings_that_fold_do_not_read_each_others_rows() -> None:
    """Two versions built on one version both fold their tails: the first appends to the
    shared rows in place, the second must copy (its prefix is no longer the whole list)."""
    base = RankedRows.adopt([row(3 * i, f"h{i:02d}", 1) for i in range(40)])
    one, two = base, base
    for i in range(40):
        one = one.inserted(row(200 + 3 * i, f"a{i:02d}", 1))
        two = two.inserted(row(200 + 3 * i, f"b{i:02d}", 2))
    assert [r.rank[-1] for r in one[40:]] == [f"a{i:02d}" for i in range(40)]
    assert [r.rank[-1] for r in two[40:]] == [f"b{i:02d}" for i in range(40)]
    assert (one.total_width(), two.total_width(), base.total_width()) == (80, 120, 40)


def test_the_same_rows_folded_twice_are_shared_not_copied() -> None:
    """An admission's check extends the matching, then the fold extends the same base by the
    same leases: the second fold finds its rows already appended and reads them in place."""
    base = RankedRows.adopt([row(3 * i, f"h{i:02d}", 1) for i in range(40)])
    checked, folded = base, base
    for i in range(40):
        checked = checked.inserted(row(200 + 3 * i, f"n{i:02d}", 2))
        folded = folded.inserted(row(200 + 3 * i, f"n{i:02d}", 2))
    assert checked.shares_rows_with(base)
    assert folded.shares_rows_with(base)
    assert checked == folded
    assert folded.total_width() == 120


def test_a_new_list_keeps_only_the_totals_of_the_rows_it_shares() -> None:
    """A senior newcomer far inside, and a fold after a near one, copy the rows: the running
    totals already built for the old list are reused only as far as the rows are the same."""
    held = [row(3 * i, f"h{i:02d}", 1 + i % 2) for i in range(60)]
    base = RankedRows.adopt(list(held))
    assert base.total_width() == 90  # every total of the shared list built
    far = base.inserted(row(3, "f", 5))  # after h01
    near = base.inserted(row(3 * 58, "n", 7))  # after h58: h59 moves to the tail
    for i in range(40):  # ... and more junior ones until the tail folds into a new list
        near = near.inserted(row(300 + 3 * i, f"j{i:02d}", 1))
    assert not near.shares_rows_with(base)
    for version in (far, near):
        model = list(version)
        for i, r in enumerate(model):
            assert version.width_up_to(r.rank) == sum(x.width for x in model[: i + 1])
