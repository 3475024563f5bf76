"""``AcceptedRows``: a fresh matching's rows per envelope, made per acceptor group when first
read, and new mappings laid over it that leave it as it was."""

from __future__ import annotations

from builders import World, budget, cap, env, key, lease, node, run

from gpu_fleet.core.funding import FillResult
from gpu_fleet.core.funding.accepted_rows import AcceptedRows, with_changes
from gpu_fleet.core.funding.ranked_rows import EMPTY_ROWS, RankedRows


def capped_pair() -> FillResult:
    """Two envelopes tied by a cap (one acceptor group), each funding one lease, and a third
    envelope of its own that funds nothing."""
    b = budget(
        "t",
        "org:t",
        [env("a", 2), env("b", 2, selector={"region": "r2"}), env("idle", 4, flavor="A100")],
        caps=[cap("both", ["a", "b"], max_concurrency=4)],
    )
    r1, r2 = run("t", "one", 2), run("t", "two", 2)
    nodes = [node("n1", 8, region="r1"), node("n2", 8, region="r2")]
    leases = [lease("x", r1.key, 2), lease("y", r2.key, 2, node_name="n2")]
    w = World([b], [r1, r2], leases, nodes=nodes)
    return w.fill()


def test_a_fresh_matching_makes_nothing_until_an_envelope_is_read() -> None:
    f = capped_pair()
    accepted = f.accepted
    assert isinstance(accepted, AcceptedRows)
    assert accepted._rows == {}  # nothing made yet
    assert [r.rank[-1] for r in accepted[key("t", "b")]] == ["y"]
    # reading one envelope of the group makes the whole group, and only that group
    assert set(accepted._rows) == {key("t", "a"), key("t", "b")}
    assert key("t", "idle") not in accepted
    assert accepted.get(key("t", "idle")) is None
    assert len(accepted) == 2


def test_rows_laid_over_a_group_not_made_yet_keep_the_groups_other_envelope() -> None:
    """A change to one envelope of a group still to be made: the new mapping answers the
    change for it and the matching's rows for the group's other envelope, and the mapping it
    came from still answers the matching's rows for both."""
    f = capped_pair()
    base = f.accepted
    a, b = key("t", "a"), key("t", "b")
    changed = with_changes(base, {a: EMPTY_ROWS})
    assert changed[a] == EMPTY_ROWS
    assert [r.rank[-1] for r in changed[b]] == ["y"]
    assert dict(changed) == {a: EMPTY_ROWS, b: base[b]}
    assert [r.rank[-1] for r in base[a]] == ["x"]
    assert dict(base) == {a: base[a], b: base[b]}


def test_a_plain_dict_is_laid_over_as_a_new_dict() -> None:
    a, b = key("t", "a"), key("t", "b")
    rows = RankedRows()
    plain = {a: rows}
    assert with_changes(plain, {b: rows}) == {a: rows, b: rows}
    assert plain == {a: rows}
