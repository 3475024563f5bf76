"""Cover: who pays for a new claim at admission, and why not (SPEC §B.5, DESIGN 1, 8, 9)."""

from __future__ import annotations

from builders import A100, HOUR, T0, World, budget, cap, env, key, lease, payer, run

from gpu_fleet.core.funding import CoverFailure, CoverPlan, CoverReason, CoverRequest, cover
from gpu_fleet.core.model import Run

R1 = {"region": "r1", "cluster": "c1", "fabric.domain": "f1"}


def plan_for(
    w: World,
    r: Run,
    quantity: int,
    *,
    location: dict[str, str] | None = R1,
    now: int = T0,
    admitted: int | None = None,
    conservative: bool = True,
    remaining_hours: dict[object, float] | None = None,
    period_hours: float = 24.0,
    already_borrowed: int = 0,
) -> CoverPlan | CoverFailure:
    w.runs[r.key] = r
    ev = w.evaluate(now)
    req = CoverRequest(
        run=r,
        quantity=quantity,
        location=location,
        now=now,
        admitted=admitted if admitted is not None else now,
        conservative=conservative,
        already_borrowed=already_borrowed,
    )
    return cover(
        w.index,
        ev,
        req,
        remaining_hours=remaining_hours,  # type: ignore[arg-type]
        period_hours=period_hours,
    )


class TestPlans:
    def test_own_envelope_covers(self) -> None:
        """An owner with headroom gets one owned segment naming its envelope."""
        w = World([budget("t", "org:t", [env("e", 8)])])
        plan = plan_for(w, run("t", "r", 4), 4)
        assert isinstance(plan, CoverPlan)
        assert [(s.payer.key, s.quantity, s.borrowed) for s in plan.segments] == [
            (key("t"), 4, False)
        ]
        assert plan.quantity == 4
        assert plan.borrowed == 0

    def test_attempts_in_proximity_order_with_availability(self) -> None:
        """Attempts list own, then parent, same-location before other, with what each offered."""
        parent = budget(
            "p",
            "org:p",
            [
                env("a-far", 8, selector={"region": "r9"}),
                env("z-near", 3, selector={"region": "r1"}),
            ],
        )
        child = budget("c", "org:c", [env("e", 2)], parents=["org:p"])
        plan = plan_for(World([parent, child]), run("c", "r", 7), 7)
        assert isinstance(plan, CoverPlan)
        got = [(a.envelope, a.relation, a.available, a.taken) for a in plan.attempts]
        assert got == [
            (key("c"), "own", 2, 2),
            (key("p", "z-near"), "child", 3, 3),
            (key("p", "a-far"), "child", 8, 2),
        ]
        assert [s.quantity for s in plan.segments] == [2, 3, 2]

    def test_no_location_puts_everything_in_other_location_pass(self) -> None:
        """Without a location nothing is same-location; envelope order within an owner is by key."""
        b = budget(
            "t",
            "org:t",
            [env("a", 1, selector={"region": "r9"}), env("b", 8, selector={"region": "r1"})],
        )
        plan = plan_for(World([b]), run("t", "r", 2), 2, location=None)
        assert isinstance(plan, CoverPlan)
        assert [a.envelope.envelope for a in plan.attempts] == ["a", "b"]

    def test_owner_recall_counts_only_senior_width(self) -> None:
        """Junior family width on the owner's envelope is recallable: the owner sees full room."""
        parent = budget("p", "org:p", [env("e", 4)])
        child = budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:p"])
        kid = run("c", "kid", 4)
        w = World([parent, child], [kid], [lease("K", kid.key, 4)], admitted={kid.key: T0 - HOUR})
        plan = plan_for(w, run("p", "own", 4), 4)
        assert isinstance(plan, CoverPlan)
        assert plan.attempts[0].available == 4

    def test_family_claim_does_not_count_owner_free_room_twice(self) -> None:
        """A family newcomer sees the envelope net of every senior (owner) claim."""
        parent = budget("p", "org:p", [env("e", 4)])
        child = budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:p"])
        own = run("p", "own", 3)
        w = World([parent, child], [own], [lease("O", own.key, 3)])
        result = plan_for(w, run("c", "kid", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.attempts[0].available == 1

    def test_conservative_request_counts_same_instant_peers_as_senior(self) -> None:
        """Ordinary admission (no run key) treats a same-tier, same-instant peer as senior."""
        b = budget("t", "org:t", [env("e", 4)])
        peer = run("t", "zzz", 4)
        w = World([b], [peer], [lease("P", peer.key, 4)], admitted={peer.key: T0})
        newcomer = run("t", "aaa", 4)
        assert isinstance(plan_for(w, newcomer, 4, admitted=T0), CoverFailure)
        assert isinstance(plan_for(w, newcomer, 4, admitted=T0, conservative=False), CoverPlan)

    def test_segments_respect_shared_aggregate_cap_within_one_plan(self) -> None:
        """Two members of one cap never together plan more than the cap allows."""
        b = budget(
            "t",
            "org:t",
            [env("e1", 4), env("e2", 4)],
            caps=[cap("c", ["e1", "e2"], max_concurrency=5)],
        )
        result = plan_for(World([b]), run("t", "r", 6), 6)
        assert isinstance(result, CoverFailure)
        assert result.coverable == 5
        assert result.reason is CoverReason.INSUFFICIENT_CAPACITY
        assert [(a.available, a.taken) for a in result.attempts] == [(4, 4), (1, 1)]

    def test_pre_activation_admission_plans_before_window(self) -> None:
        """preActivation.allowAdmission lets cover plan against an envelope before its start."""
        b = budget(
            "t", "org:t", [env("e", 8, start=T0 + HOUR, end=T0 + 9 * HOUR, allow_admission=True)]
        )
        plan = plan_for(World([b]), run("t", "r", 4), 4)
        assert isinstance(plan, CoverPlan)
        assert plan.segments[0].payer.key == key("t")

    def test_borrow_from_sponsor_after_family(self) -> None:
        """Sponsor envelopes are tried after family and their segments are marked borrowed."""
        own = budget("b", "org:b", [env("e", 2)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True, lend_to=["org:b"])])
        plan = plan_for(World([own, sponsor]), run("b", "r", 5, sponsors=["org:s"]), 5)
        assert isinstance(plan, CoverPlan)
        assert [(s.payer.key, s.quantity, s.borrowed) for s in plan.segments] == [
            (key("b"), 2, False),
            (key("s"), 3, True),
        ]
        assert plan.attempts[1].relation == "sponsor"
        assert plan.borrowed == 3

    def test_sponsor_offers_only_free_headroom(self) -> None:
        """A new loan only uses free headroom: the owner's junior work is not displaced."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True)])
        owner_run = run("s", "own", 6)
        w = World(
            [own, sponsor],
            [owner_run],
            [lease("O", owner_run.key, 6)],
            admitted={owner_run.key: T0 + HOUR},
        )
        result = plan_for(w, run("b", "r", 4, sponsors=["org:s"]), 4, admitted=T0)
        assert isinstance(result, CoverFailure)
        assert result.attempts[0].available == 2


class TestFailures:
    def test_no_envelope_of_flavor(self) -> None:
        """NoEnvelope: the owner has no envelope of the run's flavor, and none opens later."""
        w = World([budget("t", "org:t", [env("e", 8, flavor=A100)])])
        result = plan_for(w, run("t", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.NO_ENVELOPE
        assert result.attempts == ()
        assert result.shortfall == 2

    def test_window_closed_names_when_it_opens(self) -> None:
        """WindowClosed with window_opens = the earliest future start of the owner's envelopes."""
        b = budget(
            "t",
            "org:t",
            [
                env("later", 8, start=T0 + 5 * HOUR, end=T0 + 9 * HOUR),
                env("soon", 8, start=T0 + HOUR, end=T0 + 9 * HOUR),
            ],
        )
        result = plan_for(World([b]), run("t", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.WINDOW_CLOSED
        assert result.window_opens == T0 + HOUR

    def test_ended_window_is_no_envelope(self) -> None:
        """A window that has ended never admits and is not 'opening later'."""
        b = budget("t", "org:t", [env("old", 8, start=T0 - 9 * HOUR, end=T0)])
        result = plan_for(World([b]), run("t", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.NO_ENVELOPE

    def test_headroom_short_is_insufficient_capacity_not_no_envelope(self) -> None:
        """A fully committed envelope gives InsufficientCapacity, not NoEnvelope (§F.2.9)."""
        b = budget("t", "org:t", [env("e", 4)])
        other = run("t", "other", 4)
        w = World([b], [other], [lease("O", other.key, 4)], admitted={other.key: T0 - HOUR})
        result = plan_for(w, run("t", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.INSUFFICIENT_CAPACITY
        assert "short by 2" in result.message
        assert [(a.envelope, a.available, a.taken) for a in result.attempts] == [(key("t"), 0, 0)]

    def test_all_or_nothing_partial_coverage_fails(self) -> None:
        """If any quantity remains the plan fails, reporting how much was coverable."""
        b = budget("t", "org:t", [env("e", 3)])
        result = plan_for(World([b]), run("t", "r", 5), 5)
        assert isinstance(result, CoverFailure)
        assert (result.quantity, result.coverable, result.shortfall) == (5, 3, 2)
        assert result.attempts[0].note == "limited by concurrency"

    def test_acl_denied(self) -> None:
        """ACLDenied when the only reachable envelope is a sponsor whose ACL excludes the owner."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True, lend_to=["org:friend*"])])
        result = plan_for(World([own, sponsor]), run("b", "r", 2, sponsors=["org:s"]), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.ACL_DENIED

    def test_borrow_limit(self) -> None:
        """BorrowLimit when maxBorrowGPUs stops a sponsor segment short."""
        own = budget("b", "org:b", [env("e", 2)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True)])
        r = run("b", "r", 6, sponsors=["org:s"], max_borrow=2)
        result = plan_for(World([own, sponsor]), r, 6)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.BORROW_LIMIT
        assert result.coverable == 4
        assert "maxBorrowGPUs" in result.attempts[-1].note

    def test_borrow_limit_counts_already_borrowed_width(self) -> None:
        """maxBorrowGPUs is net of the run's current Borrowed width."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget("s", "org:s", [env("e", 8, lend=True)])
        r = run("b", "r", 2, sponsors=["org:s"], max_borrow=3)
        assert isinstance(plan_for(World([own, sponsor]), r, 2), CoverPlan)
        result = plan_for(World([own, sponsor]), r, 2, already_borrowed=2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.BORROW_LIMIT

    def test_hours_exhausted(self) -> None:
        """HoursExhausted when remaining GPU-hours cannot cover one period of the width."""
        b = budget("t", "org:t", [env("e", 8, gpu_hours=1000)])
        r = run("t", "r", 4)
        ok = plan_for(World([b]), r, 4, remaining_hours={key("t"): 96.0})
        assert isinstance(ok, CoverPlan)
        result = plan_for(World([b]), r, 4, remaining_hours={key("t"): 95.0})
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.HOURS_EXHAUSTED
        assert result.coverable == 3
        assert (result.attempts[0].available, result.attempts[0].note) == (
            3,
            "limited by GPU-hours",
        )

    def test_hours_count_senior_claims(self) -> None:
        """The hours bound is floor(remaining/P) minus the width funded above the newcomer."""
        b = budget("t", "org:t", [env("e", 8, gpu_hours=1000)])
        senior = run("t", "senior", 2)
        w = World([b], [senior], [lease("S", senior.key, 2)], admitted={senior.key: T0 - HOUR})
        result = plan_for(w, run("t", "r", 4), 4, remaining_hours={key("t"): 24.0 * 5})
        assert isinstance(result, CoverFailure)
        assert result.attempts[0].available == 3

    def test_unbound_namespace_is_invalid_request_with_conflict(self) -> None:
        """A namespace with two owners: InvalidRequest naming the binding conflict."""
        b1 = budget("t", "org:a", [env("e", 8)], name="a")
        b2 = budget("t", "org:b", [env("e", 8)], name="b")
        result = plan_for(World([b1, b2]), run("t", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.INVALID_REQUEST
        assert "bound to more than one owner (org:a, org:b)" in result.message

    def test_namespace_without_budget_is_invalid_request(self) -> None:
        """A run in a namespace no Budget binds has no funding principal."""
        result = plan_for(World([budget("t", "org:t")]), run("nobody", "r", 2), 2)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.INVALID_REQUEST
        assert "has no Budget" in result.message

    def test_non_positive_quantity_is_invalid(self) -> None:
        """Quantity <= 0 is refused up front."""
        result = plan_for(World([budget("t", "org:t")]), run("t", "r", 2), 0)
        assert isinstance(result, CoverFailure)
        assert result.reason is CoverReason.INVALID_REQUEST


class TestCoverAgreesWithMatching:
    def test_loan_outranks_owner_in_availability(self) -> None:
        """A granted loan counts against the owner's availability (it holds ahead of the owner)."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget("s", "org:s", [env("e", 4, lend=True)])
        loan = run("b", "loan", 3, sponsors=["org:s"])
        w = World(
            [own, sponsor],
            [loan],
            [lease("L", loan.key, 3, minted=payer("s"))],
            admitted={loan.key: T0 + HOUR},
        )
        result = plan_for(w, run("s", "own", 4), 4, admitted=T0 - HOUR)
        assert isinstance(result, CoverFailure)
        assert result.attempts[0].available == 1

    def test_owner_sees_past_ungranted_sponsor_claim(self) -> None:
        """An ungranted sponsor claim is junior: the owner's availability ignores it."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget("s", "org:s", [env("e", 4, lend=True)])
        loan = run("b", "loan", 4, sponsors=["org:s"])
        w = World([own, sponsor], [loan], [lease("L", loan.key, 4)])
        plan = plan_for(w, run("s", "own", 4), 4)
        assert isinstance(plan, CoverPlan)

    def test_owner_sees_past_ungranted_sponsor_claim_under_aggregate_cap(self) -> None:
        """Under an aggregate cap, an ungranted sponsor claim still does not block the owner."""
        own = budget("b", "org:b", [env("e", 1, flavor=A100)])
        sponsor = budget(
            "s", "org:s", [env("e", 4, lend=True)], caps=[cap("c", ["e"], max_concurrency=4)]
        )
        loan = run("b", "loan", 4, sponsors=["org:s"])
        w = World([own, sponsor], [loan], [lease("L", loan.key, 4)])
        newcomer = run("s", "own", 4)
        # the matching funds the owner's claim and turns the ungranted sponsor claim away ...
        after = World(
            [own, sponsor],
            [loan, newcomer],
            [lease("L", loan.key, 4), lease("N", newcomer.key, 4, first=4)],
            admitted={loan.key: T0 - HOUR, newcomer.key: T0},
        )
        assert after.fill().payer["N"] == key("s")
        # ... so cover must offer the owner the same 4 GPUs
        assert isinstance(plan_for(w, newcomer, 4), CoverPlan)
