"""Elastic growth and voluntary shrink of Running malleable runs (SPEC §B.14)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from builders import MINUTE, T0, budget, env, node, run

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.funding import evaluate
from gpu_fleet.core.model import Funding, FundingClass, Lease, LeaseRole, MintReason, Node, Run


def fleet(nodes: Sequence[Node], objects: Sequence[object]) -> Fleet:
    f = Fleet()
    for n in nodes:
        f.register_node(n, T0)
    for obj in objects:
        f.apply(obj, T0)  # type: ignore[arg-type]
    return f


def elastic(total: int, lo: int, hi: int, step: int, *, desired: int) -> Run:
    """A malleable ``a/train`` in 4-GPU groups: (base width, min, max, step) and its desired."""
    r = run("a", "train", total, group_gpus=4, malleable=(lo, hi, step))
    m = r.spec.malleable
    assert m is not None
    return msgspec.structs.replace(
        r,
        spec=msgspec.structs.replace(
            r.spec, malleable=msgspec.structs.replace(m, desired_total_gpus=desired)
        ),
    )


def open_actives(f: Fleet, key: str = "a/train") -> list[Lease]:
    return [x for x in f.state.leases_of(key, open_only=True) if x.role is LeaseRole.ACTIVE]


def width(f: Fleet, key: str = "a/train") -> int:
    return sum(x.width for x in open_actives(f, key))


FOUR_NODES = [node(f"n{i}", 4) for i in range(4)]
TEAM = budget("a", "org:a", [env("e", 64)])


class TestGrow:
    def test_grows_a_step_at_a_time_right_after_the_base_gang(self) -> None:
        f = fleet(FOUR_NODES, [TEAM, elastic(4, 4, 16, 4, desired=12)])
        rows = [(x.group, x.reason, x.cohort, x.start) for x in open_actives(f)]
        assert rows == [
            (0, MintReason.START, 0, T0),
            (1, MintReason.GROW, 1, T0),
            (2, MintReason.GROW, 2, T0),
        ]
        st = f.state.status["a/train"]
        assert (st.phase, st.reason, st.message) == ("Running", "GangBound", "grew to 12 GPUs")

    def test_a_grow_waits_for_capacity_and_resumes_when_it_frees(self) -> None:
        other = budget("b", "org:b", [env("e", 8)])
        f = fleet(FOUR_NODES, [TEAM, other, run("b", "hog", 8, group_gpus=4)])
        f.apply(elastic(4, 4, 16, 4, desired=16), T0 + MINUTE)
        assert width(f) == 8
        assert f.state.status["a/train"].message.startswith("waiting to grow:")
        f.complete("b/hog", T0 + 2 * MINUTE)
        assert width(f) == 16
        assert [x.group for x in open_actives(f)] == [0, 1, 2, 3]

    def test_growth_is_never_born_unfunded(self) -> None:
        small = budget("a", "org:a", [env("e", 8)])
        f = fleet(FOUR_NODES, [small, elastic(4, 4, 16, 4, desired=16)])
        assert width(f) == 8
        ev = evaluate(f.state.meter, f.state.funding_inputs(), T0)
        assert {ev.lease_class(x.id) for x in open_actives(f)} == {FundingClass.OWNED}
        assert "waiting to grow" in f.state.status["a/train"].message


class TestVoluntaryShrink:
    def test_closes_whole_groups_highest_first_down_to_the_target(self) -> None:
        f = fleet(FOUR_NODES, [TEAM, elastic(4, 4, 16, 4, desired=16)])
        f.shrink("a/train", 8, T0 + MINUTE)
        assert [x.group for x in open_actives(f)] == [0, 1]
        closed = [x for x in f.state.leases_of("a/train") if x.closure_reason == "Shrink"]
        assert sorted(x.group for x in closed) == [2, 3]
        st = f.state.status["a/train"]
        assert (st.phase, st.message) == ("Running", "shrunk to 8 GPUs")

    def test_non_owned_groups_go_first(self) -> None:
        team = budget("a", "org:a", [env("e", 8)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True)])
        r = elastic(4, 4, 16, 4, desired=12)
        funding = Funding(allow_borrow=True, sponsors=("org:s",))
        r = msgspec.structs.replace(r, spec=msgspec.structs.replace(r.spec, funding=funding))
        f = fleet(FOUR_NODES, [team, sponsor, r])
        ev = evaluate(f.state.meter, f.state.funding_inputs(), T0)
        borrowed = [
            x.group for x in open_actives(f) if ev.lease_class(x.id) is FundingClass.BORROWED
        ]
        assert borrowed == [2]
        f.shrink("a/train", 8, T0 + MINUTE)
        assert [x.group for x in open_actives(f)] == [0, 1]

    def test_never_goes_below_the_target(self) -> None:
        f = fleet(FOUR_NODES, [TEAM, elastic(4, 4, 16, 4, desired=12)])
        assert width(f) == 12
        f.shrink("a/train", 6, T0 + MINUTE)  # off the step ladder: whole groups cannot hit it
        assert width(f) == 8  # 4 would undershoot 6
        st = f.state.status["a/train"]
        assert st.phase == "Running"
        assert st.message.startswith("unable to shrink: insufficient groups")

    def test_regrowth_numbers_groups_after_those_in_use(self) -> None:
        f = fleet(FOUR_NODES, [TEAM, elastic(4, 4, 16, 4, desired=16)])
        f.shrink("a/train", 8, T0 + MINUTE)
        f.shrink("a/train", 12, T0 + 2 * MINUTE)
        grown = [x for x in open_actives(f) if x.start == T0 + 2 * MINUTE]
        assert [(x.group, x.reason) for x in grown] == [(2, MintReason.GROW)]
        assert grown[0].cohort == 4  # cohorts keep counting; a cohort number is never reused
