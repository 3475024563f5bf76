"""``RankedRows`` against a plain sorted list: every version reads as the list it stands for,
and building a new version never changes an old one (matchings share them)."""

from __future__ import annotations

import bisect

from hypothesis import given, seed, settings
from hypothesis import strategies as st

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
        st.sampled_from(["insert", "insert", "insert", "drop"]),
        st.integers(0, 60),
        st.integers(1, 8),
        st.integers(0, 1_000),  # which earlier version to build on (modulo their number)
    ),
    max_size=120,
)


@seed(7)
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), max_size=40), ops)
def test_every_version_reads_as_its_sorted_list(
    held: list[tuple[int, int]], steps: list[tuple[str, int, int, int]]
) -> None:
    """From no rows and from a matching's rows (a head), any chain of insertions (junior
    ones to the tail, senior ones into the head) and removals."""
    first = sorted(
        (row(rank, f"h{i:02d}", width) for i, (rank, width) in enumerate(held)), key=rank_of
    )
    versions: list[tuple[RankedRows, list[Accepted]]] = [
        (EMPTY_ROWS, []),
        (RankedRows.adopt(list(first)), first),
    ]
    for i, (op, rank, width, pick) in enumerate(steps):
        rows, model = versions[pick % len(versions)]
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


def test_a_junior_row_shares_the_head_and_a_senior_one_copies_it() -> None:
    base = RankedRows.adopt([row(3, "a", 1), row(6, "b", 2)])
    junior = base.inserted(row(9, "c", 4))
    assert junior.shares_head_with(base)
    assert junior.width_up_to(junior[-1].rank) == 7
    senior = base.inserted(row(0, "d", 8))
    assert not senior.shares_head_with(base)
    assert list(base) == [row(3, "a", 1), row(6, "b", 2)]


def test_a_long_tail_is_folded_into_a_new_head() -> None:
    """Past ``max(32, sqrt(2n))`` tail rows the tail becomes part of a new head."""
    rows = first = EMPTY_ROWS.inserted(row(0, "l00", 1))
    for i in range(1, 40):
        rows = rows.inserted(row(3 * i, f"l{i:02d}", 1))
        assert rows.shares_head_with(first) == (i < 32)
    assert len(rows) == 40
    assert rows.total_width() == 40
