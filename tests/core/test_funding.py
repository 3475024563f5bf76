"""The deferred-acceptance matching ``fill`` (DESIGN decisions 1 and 9, SPEC §B.4.3-§B.4.6)."""

from __future__ import annotations

import pytest
from builders import (
    A100,
    BORROWED,
    HOUR,
    OWNED,
    SHARED,
    T0,
    UNFUNDED,
    World,
    budget,
    cap,
    env,
    key,
    lease,
    node,
    payer,
    run,
)

from gpu_fleet.core.funding import HoursView, build_index, senior_width
from gpu_fleet.core.model import Budget, FundingClass, LeaseRole

PARENT = budget("p", "org:p", [env("e", 8)])


def child_budget(envelopes: list[dict[str, object]] | None = None) -> Budget:
    """The child team 'org:c' in namespace c, under org:p (own A100 envelope only by default)."""
    return budget("c", "org:c", envelopes or [env("e", 4, flavor=A100)], parents=["org:p"])


def classes(w: World, t: int = T0) -> dict[str, FundingClass]:
    return dict(w.fill(t).funding_class)


class TestProximity:
    def test_own_envelope_before_parent(self) -> None:
        """A claim that fits its owner's envelope is Owned there, not Shared from the parent."""
        child = budget("c", "org:c", [env("e", 4)], parents=["org:p"])
        r = run("c", "r", 4)
        w = World([PARENT, child], [r], [lease("L", r.key, 4)])
        f = w.fill()
        assert f.payer["L"] == key("c")
        assert f.funding_class["L"] is OWNED

    def test_own_full_spills_to_parent_as_shared(self) -> None:
        """With its own envelope full (a senior claim), a child claim is Shared by the parent."""
        child = budget("c", "org:c", [env("e", 4)], parents=["org:p"])
        senior, junior = run("c", "senior", 4), run("c", "junior", 4)
        w = World(
            [PARENT, child],
            [senior, junior],
            [lease("S", senior.key, 4), lease("J", junior.key, 4, first=4)],
            admitted={senior.key: T0, junior.key: T0 + 1},
        )
        f = w.fill()
        assert (f.payer["S"], f.funding_class["S"]) == (key("c"), OWNED)
        assert (f.payer["J"], f.funding_class["J"]) == (key("p"), SHARED)

    def test_same_location_before_other_location(self) -> None:
        """Within a tier, an envelope whose selector matches the lease's node comes first."""
        b = budget(
            "t",
            "org:t",
            [
                env("a-far", 8, selector={"region": "r2"}),
                env("z-near", 8, selector={"region": "r1"}),
            ],
        )
        r = run("t", "r", 2)
        nodes = [node("west", region="r1"), node("east", region="r2")]
        w = World(
            [b],
            [r],
            [lease("W", r.key, 2, node_name="west"), lease("E", r.key, 2, node_name="east")],
            nodes=nodes,
        )
        f = w.fill()
        assert f.payer["W"] == key("t", "z-near")
        assert f.payer["E"] == key("t", "a-far")

    def test_tier_is_major_over_location(self) -> None:
        """Own other-location comes before a parent's same-location envelope (proximity-major)."""
        parent = budget("p", "org:p", [env("e", 8, selector={"region": "r1"})])
        child = budget("c", "org:c", [env("e", 8, selector={"region": "r9"})], parents=["org:p"])
        r = run("c", "r", 2)
        w = World([parent, child], [r], [lease("L", r.key, 2)])
        assert w.fill().payer["L"] == key("c")

    def test_wildcard_selector_is_same_location(self) -> None:
        """A '*' selector value matches any location, so it is tried in the same-location pass."""
        b = budget(
            "t",
            "org:t",
            [env("a", 8, selector={"region": "r2"}), env("b", 8, selector={"region": "*"})],
        )
        r = run("t", "r", 2)
        w = World([b], [r], [lease("L", r.key, 2)])
        assert w.fill().payer["L"] == key("t", "b")

    def test_selector_is_a_preference_not_a_filter(self) -> None:
        """An envelope scoped to another region still funds in the other-location pass."""
        b = budget("t", "org:t", [env("e", 8, selector={"region": "r2"})])
        r = run("t", "r", 2)
        w = World([b], [r], [lease("L", r.key, 2)])
        assert w.fill().funding_class["L"] is OWNED

    def test_other_flavor_envelope_never_funds(self) -> None:
        """An A100 envelope does not pay for an H100 lease."""
        b = budget("t", "org:t", [env("e", 8, flavor=A100)])
        r = run("t", "r", 2)
        w = World([b], [r], [lease("L", r.key, 2)])
        assert w.fill().funding_class["L"] is UNFUNDED

    def test_displaced_family_claim_moves_to_next_envelope_before_demoting(self) -> None:
        """Owner recall on one parent envelope moves the child claim to another with room."""
        parent = budget("p", "org:p", [env("e1", 4), env("e2", 4)])
        kid, own = run("c", "kid", 4), run("p", "own", 4)
        w = World(
            [parent, child_budget()],
            [kid, own],
            [lease("K", kid.key, 4), lease("O", own.key, 4, first=4)],
            admitted={kid.key: T0, own.key: T0 + HOUR},
        )
        f = w.fill()
        assert (f.payer["O"], f.funding_class["O"]) == (key("p", "e1"), OWNED)
        assert (f.payer["K"], f.funding_class["K"]) == (key("p", "e2"), SHARED)
        assert [r.envelope for r in f.rejections["K"]] == [key("p", "e1")]


class TestRanking:
    def test_owner_recall_demotes_junior_family_claim(self) -> None:
        """An owner claim outranks an earlier family claim: the family claim becomes Unfunded."""
        kid, own = run("c", "kid", 4), run("p", "own", 8)
        w = World(
            [PARENT, child_budget()],
            [kid, own],
            [lease("K", kid.key, 4), lease("O", own.key, 8, first=4)],
            admitted={kid.key: T0, own.key: T0 + HOUR},
        )
        f = w.fill()
        assert f.funding_class == {"O": OWNED, "K": UNFUNDED}
        assert f.rejections["K"][0].envelope == key("p")
        assert "concurrency 8 full" in f.rejections["K"][0].reason

    def test_family_claim_funded_while_owner_absent(self) -> None:
        """Without an owner claim, a child claim is Shared on its parent's envelope."""
        kid = run("c", "kid", 4)
        w = World([PARENT, child_budget()], [kid], [lease("K", kid.key, 4)])
        assert classes(w) == {"K": SHARED}

    def test_child_tier_beats_earlier_sibling(self) -> None:
        """Tier ranks before admission time: a later child claim beats an earlier sibling claim."""
        # org:p (no H100) -> {org:s, org:x}; org:s -> org:c.  On org:s's envelope, org:c is a
        # child (tier 2) and org:x a sibling (tier 3).
        grand = budget("p", "org:p", [env("e", 1, flavor=A100)])
        mid = budget("s", "org:s", [env("e", 4)], parents=["org:p"])
        kid_budget = budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:s"])
        sib_budget = budget("x", "org:x", [env("e", 1, flavor=A100)], parents=["org:p"])
        kid, sib = run("c", "kid", 4), run("x", "sib", 4)
        w = World(
            [grand, mid, kid_budget, sib_budget],
            [kid, sib],
            [lease("K", kid.key, 4), lease("X", sib.key, 4, first=4)],
            admitted={sib.key: T0, kid.key: T0 + HOUR},
        )
        f = w.fill()
        assert (f.payer["K"], f.funding_class["K"]) == (key("s"), SHARED)
        assert f.funding_class["X"] is UNFUNDED
        assert [r.envelope for r in f.rejections["X"]] == [key("s")]

    def test_admission_time_then_run_key_break_ties(self) -> None:
        """Inside a tier the earlier admission wins; at equal admission the smaller run key wins."""
        b = budget("t", "org:t", [env("e", 4)])
        r1, r2, r3 = run("t", "b", 4), run("t", "a", 4), run("t", "c", 4)
        leases = [
            lease("1", r1.key, 4),
            lease("2", r2.key, 4, first=4),
            lease("3", r3.key, 4, first=8),
        ]
        early = World([b], [r1, r2, r3], leases, admitted={r1.key: T0 - 5, r2.key: T0, r3.key: T0})
        assert classes(early) == {"1": OWNED, "2": UNFUNDED, "3": UNFUNDED}
        tied = World([b], [r1, r2, r3], leases, admitted={r1.key: T0, r2.key: T0, r3.key: T0})
        assert classes(tied) == {"1": UNFUNDED, "2": OWNED, "3": UNFUNDED}

    def test_equal_rank_ties_break_by_group_then_first_slot(self) -> None:
        """Same run, same group: the lease whose first slot sorts first is funded."""
        b = budget("t", "org:t", [env("e", 2)])
        r = run("t", "r", 4)
        w = World(
            [b],
            [r],
            [lease("a", r.key, 2, node_name="n2"), lease("b", r.key, 2, node_name="n1")],
        )
        assert classes(w) == {"a": UNFUNDED, "b": OWNED}

    def test_lowest_groups_fund_first_numerically(self) -> None:
        """A malleable run's low groups fund first; group 9 before group 10 (numeric order)."""
        b = budget("t", "org:t", [env("e", 4)])
        r = run("t", "r", 6, malleable=(2, 6, 2))
        w = World(
            [b],
            [r],
            [
                lease("a-g10", r.key, 2, group=10, first=0),
                lease("b-g9", r.key, 2, group=9, first=2),
                lease("c-g0", r.key, 2, group=0, first=4),
            ],
        )
        assert classes(w) == {"c-g0": OWNED, "b-g9": OWNED, "a-g10": UNFUNDED}

    def test_skip_semantics_oversized_senior_does_not_block_junior(self) -> None:
        """A senior claim too wide to fit is skipped; a smaller junior claim still funds."""
        b = budget("t", "org:t", [env("e", 4)])
        big, small = run("t", "big", 6), run("t", "small", 3)
        w = World(
            [b],
            [big, small],
            [lease("B", big.key, 6), lease("S", small.key, 3, first=6)],
            admitted={big.key: T0, small.key: T0 + HOUR},
        )
        assert classes(w) == {"B": UNFUNDED, "S": OWNED}

    def test_claim_is_funded_whole_or_not_at_all(self) -> None:
        """A lease wider than the headroom left is Unfunded entirely, never split."""
        b = budget("t", "org:t", [env("e", 5)])
        r1, r2 = run("t", "a", 3), run("t", "b", 3)
        w = World(
            [b],
            [r1, r2],
            [lease("A", r1.key, 3), lease("B", r2.key, 3, first=3)],
            admitted={r1.key: T0, r2.key: T0 + 1},
        )
        ev = w.evaluate()
        assert ev.lease_class("B") is UNFUNDED
        assert ev.envelopes[key("t")].funded == 3

    def test_spare_leases_consume_funded_width(self) -> None:
        """A spare lease takes envelope width like an active one (and is reported as spare)."""
        b = budget("t", "org:t", [env("e", 4)])
        r, other = run("t", "r", 3, spares=1), run("t", "other", 1)
        w = World(
            [b],
            [r, other],
            [
                lease("A", r.key, 3),
                lease("S", r.key, 1, first=3, role=LeaseRole.SPARE),
                lease("O", other.key, 1, first=4),
            ],
            admitted={r.key: T0, other.key: T0 + 1},
        )
        ev = w.evaluate()
        assert ev.lease_class("S") is OWNED
        assert ev.lease_class("O") is UNFUNDED
        assert ev.envelopes[key("t")].spare == 1
        assert ev.runs[r.key].spares == 1
        assert ev.runs[r.key].owned == 3

    def test_senior_width_counts_equal_rank_as_senior(self) -> None:
        """senior_width sums funded width ranked at or above a rank (ties count as senior)."""
        b = budget("t", "org:t", [env("e", 8)])
        r1, r2 = run("t", "a", 2), run("t", "b", 3)
        w = World(
            [b],
            [r1, r2],
            [lease("A", r1.key, 2), lease("B", r2.key, 3, first=2)],
            admitted={r1.key: T0, r2.key: T0 + 1},
        )
        rows = w.fill().accepted[key("t")]
        assert [r.width for r in rows] == [2, 3]
        assert senior_width(rows, rows[0].rank) == 2
        assert senior_width(rows, rows[1].rank) == 5
        assert senior_width(rows, (0,)) == 0


class TestSponsors:
    SPONSOR = budget("s", "org:s", [env("e", 4, lend=True)])
    BORROWER = budget("b", "org:b", [env("e", 1, flavor=A100)])

    def test_granted_loan_is_senior_even_to_the_owner(self) -> None:
        """A loan minted on the sponsor envelope holds ahead of the owner's own earlier claim."""
        loan, own = run("b", "loan", 4, sponsors=["org:s"]), run("s", "own", 4)
        w = World(
            [self.SPONSOR, self.BORROWER],
            [loan, own],
            [lease("L", loan.key, 4, minted=payer("s")), lease("O", own.key, 4, first=4)],
            admitted={own.key: T0 - HOUR, loan.key: T0},
        )
        f = w.fill()
        assert (f.payer["L"], f.funding_class["L"]) == (key("s"), BORROWED)
        assert f.funding_class["O"] is UNFUNDED

    def test_ungranted_sponsor_claim_yields_to_the_owner(self) -> None:
        """A sponsor claim the envelope never granted only takes free headroom."""
        loan, own = run("b", "loan", 4, sponsors=["org:s"]), run("s", "own", 4)
        w = World(
            [self.SPONSOR, self.BORROWER],
            [loan, own],
            [lease("L", loan.key, 4, minted=None), lease("O", own.key, 4, first=4)],
            admitted={loan.key: T0 - HOUR, own.key: T0},
        )
        assert classes(w) == {"L": UNFUNDED, "O": OWNED}

    def test_ungranted_sponsor_claim_funds_in_free_headroom(self) -> None:
        """With headroom left after the owner, an ungranted sponsor claim is Borrowed."""
        loan, own = run("b", "loan", 2, sponsors=["org:s"]), run("s", "own", 2)
        w = World(
            [self.SPONSOR, self.BORROWER],
            [loan, own],
            [lease("L", loan.key, 2), lease("O", own.key, 2, first=2)],
        )
        assert classes(w) == {"L": BORROWED, "O": OWNED}

    def test_no_borrow_without_opt_in(self) -> None:
        """A run that did not set allowBorrow with the sponsor never proposes to it."""
        for r in (run("b", "r", 2), run("b", "r", 2, allow_borrow=False, sponsors=["org:s"])):
            w = World([self.SPONSOR, self.BORROWER], [r], [lease("L", r.key, 2)])
            assert classes(w) == {"L": UNFUNDED}

    def test_lending_disallowed_envelope_never_lends(self) -> None:
        """lending.allow false: no loan even with an ACL listing the borrower."""
        sponsor = budget("s", "org:s", [env("e", 4, lend=False, lend_to=["org:b"])])
        r = run("b", "r", 2, sponsors=["org:s"])
        w = World([sponsor, self.BORROWER], [r], [lease("L", r.key, 2, minted=payer("s"))])
        assert classes(w) == {"L": UNFUNDED}

    def test_acl_mismatch_is_unfunded(self) -> None:
        """A sponsor envelope whose ACL does not name the borrower's derived owner funds nothing."""
        sponsor = budget("s", "org:s", [env("e", 4, lend=True, lend_to=["org:other"])])
        r = run("b", "r", 2, sponsors=["org:s"])
        w = World([sponsor, self.BORROWER], [r], [lease("L", r.key, 2, minted=payer("s"))])
        assert classes(w) == {"L": UNFUNDED}

    @pytest.mark.parametrize(
        ("acl", "borrower", "lends"),
        [
            (["org:b"], "org:b", True),
            (["org:b"], "org:bb", False),
            (["org:b*"], "org:bb", True),
            (["org:*"], "org:b", True),
            (["team:*"], "org:b", False),
            (["*"], "anyone", True),
            ([], "anyone", True),
            ([], "", False),
            (["*"], "", False),
            (["org:x", "org:b"], "org:b", True),
        ],
    )
    def test_lending_acl(self, acl: list[str], borrower: str, lends: bool) -> None:
        """ACL: exact, 'prefix*', '*', empty list = anyone; an empty borrower never matches."""
        idx = build_index([budget("s", "org:s", [env("e", 4, lend=True, lend_to=acl)])])
        assert idx.envelopes[key("s")].lends_to(borrower) is lends

    def test_lending_max_concurrency_caps_loans(self) -> None:
        """Loans beyond lending.maxConcurrency are Unfunded although concurrency has room."""
        sponsor = budget("s", "org:s", [env("e", 8, lend=True, lend_max=2)])
        r1 = run("b", "first", 2, sponsors=["org:s"])
        r2 = run("b", "second", 2, sponsors=["org:s"])
        own = run("s", "own", 2)
        w = World(
            [sponsor, self.BORROWER],
            [r1, r2, own],
            [
                lease("A", r1.key, 2, minted=payer("s")),
                lease("B", r2.key, 2, first=2, minted=payer("s")),
                lease("O", own.key, 2, first=4),
            ],
            admitted={r1.key: T0, r2.key: T0 + 1, own.key: T0 + 2},
        )
        f = w.fill()
        assert f.funding_class == {"A": BORROWED, "B": UNFUNDED, "O": OWNED}
        assert "lending cap 2" in f.rejections["B"][0].reason

    def test_max_borrow_gpus_caps_a_runs_borrowed_width(self) -> None:
        """A run's Borrowed width never exceeds maxBorrowGPUs; its junior loan is turned away."""
        r = run("b", "r", 4, sponsors=["org:s"], max_borrow=2)
        w = World(
            [self.SPONSOR, self.BORROWER],
            [r],
            [
                lease("A", r.key, 2, minted=payer("s")),
                lease("B", r.key, 2, first=2, minted=payer("s")),
            ],
        )
        f = w.fill()
        assert f.funding_class == {"A": BORROWED, "B": UNFUNDED}
        assert f.rejections["B"][-1].reason == "run borrow limit 2 reached"

    def test_max_borrow_does_not_count_shared_width(self) -> None:
        """maxBorrowGPUs caps Borrowed only; family Shared width is not counted against it."""
        sponsor = budget("s", "org:s", [env("e", 4, lend=True)])
        r = run("c", "r", 6, sponsors=["org:s"], max_borrow=2)
        parent = budget("p", "org:p", [env("e", 4)])
        w = World(
            [parent, child_budget(), sponsor],
            [r],
            [
                lease("F", r.key, 4),
                lease("L", r.key, 2, first=4, minted=payer("s")),
            ],
        )
        assert classes(w) == {"F": SHARED, "L": BORROWED}

    def test_family_owner_is_not_a_sponsor(self) -> None:
        """A sponsor that is family is walked as family (Shared), never as a loan."""
        r = run("c", "r", 2, sponsors=["org:p"])
        w = World([PARENT, child_budget()], [r], [lease("L", r.key, 2, minted=payer("p"))])
        assert classes(w) == {"L": SHARED}

    def test_borrow_cap_eviction_frees_room_for_turned_away_claims(self) -> None:
        """Headroom freed by a maxBorrowGPUs eviction funds the claim it had turned away."""
        r = run("b", "r", 4, sponsors=["org:s"], max_borrow=2)
        own = run("s", "own", 2)
        w = World(
            [self.SPONSOR, self.BORROWER],
            [r, own],
            [
                lease("A", r.key, 2, minted=payer("s")),
                lease("B", r.key, 2, first=2, minted=payer("s")),
                lease("O", own.key, 2, first=4),
            ],
            admitted={own.key: T0, r.key: T0 + 1},
        )
        ev = w.evaluate()
        assert ev.lease_class("B") is UNFUNDED  # the cap holds...
        assert ev.envelopes[key("s")].funded == 4  # ...and the owner takes the freed room
        assert ev.lease_class("O") is OWNED


class TestCapsAndSharing:
    def test_owner_on_one_member_beats_family_on_another(self) -> None:
        """Aggregate caps rank across members: an owner claim on e1 beats a family claim on e2."""
        parent = budget(
            "p",
            "org:p",
            [env("e1", 8, selector={"region": "r1"}), env("e2", 8, selector={"region": "r2"})],
            caps=[cap("both", ["e1", "e2"], max_concurrency=8)],
        )
        kid, own = run("c", "kid", 6), run("p", "own", 6)
        nodes = [node("west", 16, region="r1"), node("east", 16, region="r2")]
        w = World(
            [parent, child_budget()],
            [kid, own],
            [lease("K", kid.key, 6, node_name="east"), lease("O", own.key, 6, node_name="west")],
            nodes=nodes,
            admitted={kid.key: T0, own.key: T0 + HOUR},
        )
        f = w.fill()
        assert (f.payer["O"], f.funding_class["O"]) == (key("p", "e1"), OWNED)
        assert f.funding_class["K"] is UNFUNDED
        assert any("aggregate cap both" in r.reason for r in f.rejections["K"])

    def test_aggregate_cap_bounds_sum_of_members(self) -> None:
        """Funded width across a cap's members never exceeds its maxConcurrency."""
        b = budget(
            "t",
            "org:t",
            [env("e1", 4), env("e2", 4)],
            caps=[cap("c", ["e1", "e2"], max_concurrency=5)],
        )
        runs = [run("t", f"r{i}", 2) for i in range(4)]
        w = World(
            [b],
            runs,
            [lease(f"L{i}", r.key, 2, first=2 * i) for i, r in enumerate(runs)],
            admitted={r.key: T0 + i for i, r in enumerate(runs)},
        )
        ev = w.evaluate()
        assert ev.caps["t/t/c"].funded == 4
        assert [ev.lease_class(f"L{i}") for i in range(4)] == [OWNED, OWNED, UNFUNDED, UNFUNDED]

    def test_cap_of_other_flavor_does_not_bind(self) -> None:
        """An aggregate cap attaches only to member envelopes of its own flavor."""
        b = budget(
            "t",
            "org:t",
            [env("e1", 4), env("x", 4, flavor=A100)],
            caps=[cap("c", ["e1", "x"], max_concurrency=1, flavor=A100)],
        )
        r = run("t", "r", 4)
        w = World([b], [r], [lease("L", r.key, 4)])
        assert classes(w) == {"L": OWNED}

    def test_sharing_none_blocks_family_not_owner(self) -> None:
        """sharing: none keeps family claims off the envelope; the owner still uses it."""
        parent = budget("p", "org:p", [env("e", 8, sharing="none")])
        kid, own = run("c", "kid", 2), run("p", "own", 2)
        w = World(
            [parent, child_budget()],
            [kid, own],
            [lease("K", kid.key, 2), lease("O", own.key, 2, first=2)],
        )
        assert classes(w) == {"K": UNFUNDED, "O": OWNED}


class TestWindowsAndBinding:
    def test_inactive_window_unfunded_then_funded_when_it_opens(self) -> None:
        """Pre-window admitted work is Unfunded before start, funded on [start, end), then not."""
        b = budget(
            "t", "org:t", [env("e", 8, start=T0 + HOUR, end=T0 + 3 * HOUR, allow_admission=True)]
        )
        r = run("t", "r", 4)
        w = World([b], [r], [lease("L", r.key, 4)])
        assert classes(w, T0) == {"L": UNFUNDED}
        assert classes(w, T0 + HOUR - 1) == {"L": UNFUNDED}
        assert classes(w, T0 + HOUR) == {"L": OWNED}
        assert classes(w, T0 + 3 * HOUR - 1) == {"L": OWNED}
        assert classes(w, T0 + 3 * HOUR) == {"L": UNFUNDED}

    def test_window_missing_a_bound_never_funds(self) -> None:
        """An envelope missing start or end is never active (INV-WINDOW-REQUIRED)."""
        for kw in ({"start": None}, {"end": None}):
            b = budget("t", "org:t", [env("e", 8, **kw)])  # type: ignore[arg-type]
            r = run("t", "r", 2)
            assert classes(World([b], [r], [lease("L", r.key, 2)])) == {"L": UNFUNDED}

    def test_next_window_refunds_after_first_closes(self) -> None:
        """A run outliving envelope q1 is paid by q2 once q2 opens (payers are derived)."""
        b = budget(
            "t",
            "org:t",
            [
                env("q1", 8, start=T0 - HOUR, end=T0 + HOUR),
                env("q2", 8, start=T0 + 2 * HOUR, end=T0 + 5 * HOUR),
            ],
        )
        r = run("t", "r", 4)
        w = World([b], [r], [lease("L", r.key, 4, minted=payer("t", "q1"))])
        assert w.fill(T0).payer["L"] == key("t", "q1")
        assert w.fill(T0 + HOUR).payer["L"] is None
        assert w.fill(T0 + 2 * HOUR).payer["L"] == key("t", "q2")

    def test_orphan_lease_is_unfunded(self) -> None:
        """A lease whose run is missing is Unfunded and proposes nowhere."""
        b = budget("t", "org:t", [env("e", 8)])
        w = World([b], [], [lease("L", "t/gone", 2)])
        f = w.fill()
        assert f.funding_class == {"L": UNFUNDED}
        assert f.payer == {"L": None}
        assert f.rejections == {"L": []}

    def test_unbound_namespace_is_unfunded(self) -> None:
        """A namespace with two owners funds nothing, even on the envelope it was minted on."""
        b1 = budget("t", "org:a", [env("e", 8)], name="a")
        b2 = budget("t", "org:b", [env("e", 8)], name="b")
        r = run("t", "r", 2)
        w = World([b1, b2], [r], [lease("L", r.key, 2, minted=payer("t", budget_name="a"))])
        assert classes(w) == {"L": UNFUNDED}

    def test_lease_not_live_is_not_classified(self) -> None:
        """Only leases live at t are classified: not yet started, ended, or closed are skipped."""
        b = budget("t", "org:t", [env("e", 8)])
        r = run("t", "r", 2)
        w = World(
            [b],
            [r],
            [
                lease("future", r.key, 1, start=T0 + 10),
                lease("ended", r.key, 1, first=1, start=T0 - 10, end=T0),
                lease("live", r.key, 1, first=2, start=T0 - 10, end=T0 + 1),
            ],
        )
        assert classes(w) == {"live": OWNED}


class TestHoursHysteresis:
    B = budget("t", "org:t", [env("e", 8, gpu_hours=100)])
    HI, LO = run("t", "hi", 2), run("t", "lo", 2)
    LEASES = (lease("H", HI.key, 2), lease("L", LO.key, 2, first=2))

    def world(self) -> World:
        return World(
            [self.B],
            [self.HI, self.LO],
            self.LEASES,
            admitted={self.HI.key: T0, self.LO.key: T0 + 1},
        )

    def view(self, remaining: float, funded: tuple[str, ...] = ()) -> HoursView:
        return HoursView(
            period_hours=24.0,
            remaining_envelope={key("t"): remaining},
            previously_funded=frozenset((lid, key("t")) for lid in funded),
        )

    def test_new_claims_need_one_period_of_own_plus_senior_width(self) -> None:
        """A new claim needs P*(own + funded above): 96 h covers both 2-GPU claims at P=24h."""
        f = self.world().fill(hours=self.view(96.0))
        assert f.funding_class == {"H": OWNED, "L": OWNED}

    def test_junior_new_claim_refused_just_below_threshold(self) -> None:
        """Just below P*(2+2), the junior new claim is refused; the senior still funds."""
        f = self.world().fill(hours=self.view(95.5))
        assert f.funding_class == {"H": OWNED, "L": UNFUNDED}
        assert "GPU-hours exhausted" in f.rejections["L"][0].reason

    def test_funded_claim_keeps_payer_while_hours_cover_claims_above(self) -> None:
        """An already-funded junior stays while remaining > P*(width above) (hysteresis)."""
        f = self.world().fill(hours=self.view(48.5, funded=("H", "L")))
        assert f.funding_class == {"H": OWNED, "L": OWNED}
        f = self.world().fill(hours=self.view(48.0, funded=("H", "L")))
        assert f.funding_class == {"H": OWNED, "L": UNFUNDED}

    def test_top_claim_spends_to_zero(self) -> None:
        """The top claim stays funded while any hours remain, and demotes at zero."""
        assert self.world().fill(hours=self.view(0.01, funded=("H",))).funding_class["H"] is OWNED
        assert self.world().fill(hours=self.view(0.0, funded=("H",))).funding_class["H"] is UNFUNDED

    def test_new_top_claim_needs_a_full_period(self) -> None:
        """A new claim at the top still needs P*width hours (47 h < 24*2)."""
        f = self.world().fill(hours=self.view(47.0))
        assert f.funding_class == {"H": UNFUNDED, "L": UNFUNDED}

    def test_demoted_claim_does_not_return_without_new_claim_threshold(self) -> None:
        """A demoted claim is 'new' again: between both thresholds it stays Unfunded (no flap)."""
        f = self.world().fill(hours=self.view(60.0, funded=("H",)))
        assert f.funding_class == {"H": OWNED, "L": UNFUNDED}

    def test_cap_hours_bound_members(self) -> None:
        """An aggregate cap's gpuHours use the same rule over the funded widths of its members."""
        b = budget(
            "t",
            "org:t",
            [env("e1", 8), env("e2", 8)],
            caps=[cap("c", ["e1", "e2"], gpu_hours=1000)],
        )
        w = World(
            [b], [self.HI, self.LO], self.LEASES, admitted={self.HI.key: T0, self.LO.key: T0 + 1}
        )
        view = HoursView(period_hours=24.0, remaining_cap={"t/t/c": 50.0})
        assert w.fill(hours=view).funding_class == {"H": OWNED, "L": UNFUNDED}
