"""``RankedRows`` against a plain sorted list: every version reads as the list it stands for,
and building a new version never changes an old one (matchings share them)."""

from __future__ import annotations

import bisect
from unittest.mock import patch

from hypothesis import given, seed, settings
from hypothesis import strategies as st

from gpu_fleet.core.funding import ranked_rows
from gpu_fleet.core.funding.fill_result import Accepted
from gpu_fleet.core.funding.ranked_rows import CHUNK, EMPTY_ROWS, RankedRows


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
    starts = [sum(r.width for r in model[:i]) for i in range(len(model))]
    for limit in {0, 1, 7, rows.total_width() // 2, rows.total_width(), rows.total_width() + 1}:
        ahead = [a for a in starts if a < limit]
        assert rows.last_start(lambda a, limit=limit: a < limit) == max(ahead, default=None)


ops = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "insert", "drop", "read"]),
        st.integers(0, 60),
        st.integers(1, 8),
        # which earlier version to build on: mostly the newest (long chains), else any
        st.none() | st.none() | st.integers(0, 1_000),
    ),
    max_size=150,
)


@seed(7)
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 8)), max_size=90),
    ops,
    st.sampled_from([ranked_rows.CHUNK, 1, 2, 3]),
)
def test_every_version_reads_as_its_sorted_list(
    held: list[tuple[int, int]], steps: list[tuple[str, int, int, int | None]], chunk: int
) -> None:
    """From no rows and from a matching's rows, any chain of insertions (junior ones to the
    tail, senior ones near the end or far inside the shared rows), removals and reads, each
    built on any earlier version (siblings share chunks).  With the real chunk size and with
    tiny ones, under which chunks split all the time."""
    with patch.object(ranked_rows, "CHUNK", chunk):
        chain(held, steps)


def chain(held: list[tuple[int, int]], steps: list[tuple[str, int, int, int | None]]) -> None:
    first = sorted(
        (row(rank, f"h{i:02d}", width) for i, (rank, width) in enumerate(held)), key=rank_of
    )
    versions: list[tuple[RankedRows, list[Accepted]]] = [
        (EMPTY_ROWS, []),
        (RankedRows.adopt(list(first)), first),
    ]
    for i, (op, rank, width, pick) in enumerate(steps):
        rows, model = versions[-1 if pick is None else pick % len(versions)]
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


def at(rank: int, lease: str, width: int = 1) -> Accepted:
    return Accepted((0, rank, lease), width, 0)


def test_a_newcomer_anywhere_shares_every_chunk_but_its_own() -> None:
    """Junior (the end), a thousand rows from the end, or near the start: one chunk is new,
    the rest are the base's (a plain list was copied whole, 8 % of the manager's CPU)."""
    held = [at(2 * i, f"h{i:04d}", 1 + i % 2) for i in range(5_000)]
    base = RankedRows.adopt(list(held))
    chunks = -(-5_000 // CHUNK)
    for rank in (99_999, 2 * 4_000 + 1, 3):
        version = base.inserted(at(rank, "n", 4))
        assert version.chunks_shared_with(base) == chunks - 1
        assert version.total_width() == base.total_width() + 4
        assert version.width_up_to(at(rank, "n").rank) == base.width_up_to((0, rank, "n")) + 4
    assert list(base) == held


def test_a_chunk_splits_past_twice_its_size() -> None:
    rows = RankedRows.adopt([at(i, f"h{i:03d}") for i in range(CHUNK)])
    for i in range(CHUNK):
        rows = rows.inserted(at(1_000 + i, f"j{i:03d}"))
    assert len(rows._chunks) == 1
    rows = rows.inserted(at(5_000, "last"))
    assert [len(c) for c in rows._chunks] == [CHUNK, CHUNK + 1]
    assert rows[-1] == at(5_000, "last")
    assert rows.bisect_left(at(1_000, "j000").rank) == CHUNK
    assert rows.width_up_to(at(1_000, "j000").rank) == CHUNK + 1


def test_siblings_built_on_one_version_do_not_read_each_others_rows() -> None:
    base = RankedRows.adopt([at(3 * i, f"h{i:02d}") for i in range(200)])
    one, two = base, base
    for i in range(200):
        one = one.inserted(at(1_000 + 3 * i, f"a{i:03d}"))
        two = two.inserted(at(1_001 + 3 * i, f"b{i:03d}", 2))
    assert [r.rank[-1] for r in one[200:]] == [f"a{i:03d}" for i in range(200)]
    assert [r.rank[-1] for r in two[200:]] == [f"b{i:03d}" for i in range(200)]
    assert (one.total_width(), two.total_width(), base.total_width()) == (400, 600, 200)
