"""Fleet: admission, reservations and lifecycle via the in-memory committer (SPEC §B.6-§B.16)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from builders import (
    A100,
    BORROWED,
    HOUR,
    MINUTE,
    OWNED,
    SHARED,
    T0,
    UNFUNDED,
    budget,
    env,
    key,
    node,
    run,
)

from gpu_fleet.core.engine import CommandError, Fleet, Settings
from gpu_fleet.core.funding import Evaluation, evaluate
from gpu_fleet.core.ledger import (
    Event,
    LeaseClosed,
    LeaseMinted,
    ReservationCreated,
    ReservationReleased,
    RunStatusChanged,
    check_invariants,
)
from gpu_fleet.core.model import FundingClass, MintReason, Node


def fleet_with(
    nodes: Sequence[Node] = (), *budgets: object, settings: Settings | None = None
) -> Fleet:
    fleet = Fleet(settings)
    for n in nodes or [node("n1", 8), node("n2", 8, fabric="f2")]:
        fleet.register_node(n, T0)
    for b in budgets:
        fleet.apply(b, T0)  # type: ignore[arg-type]
    return fleet


def evaluation(fleet: Fleet) -> Evaluation:
    s = fleet.state
    return evaluate(s.meter, s.funding_inputs(), s.clock)


def of_type(events: Sequence[Event], cls: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, cls)]


def run_classes(fleet: Fleet, run_key: str) -> list[FundingClass]:
    ev = evaluation(fleet)
    return sorted(ev.lease_class(x.id) for x in fleet.state.leases_of(run_key, open_only=True))


TEAM = budget("t", "org:t", [env("e", 8)])


class TestAdmission:
    def test_admission_mints_unique_physical_slots_with_one_payer_each(self) -> None:
        """Admission mints leases on distinct node#i slots, each with exactly one minted payer."""
        fleet = fleet_with((), budget("t", "org:t", [env("a", 4), env("b", 8)]))
        events = fleet.apply(run("t", "r", 6), T0)
        events += fleet.apply(run("t", "s", 6), T0 + MINUTE)
        minted = [e.lease for e in of_type(events, LeaseMinted)]
        slots = [s for lease in minted for s in lease.slots]
        assert len(slots) == 12
        assert len(set(slots)) == 12
        for lease in minted:
            assert lease.minted_payer is not None
            assert all(s.startswith(f"{lease.node}#") for s in lease.slots)
            assert lease.reason is MintReason.START
        # the 6-wide run on 'a' (4) spills into 'b': two leases, two payers, never one lease split
        payers_r = {x.minted_payer.envelope for x in minted if x.run == "t/r" and x.minted_payer}
        assert payers_r == {"a", "b"}
        assert check_invariants(fleet.state) == []

    def test_minted_payer_agrees_with_derived_payer_at_admission(self) -> None:
        """At the instant of minting, every new lease is funded by the envelope it names."""
        fleet = fleet_with((), budget("t", "org:t", [env("a", 4), env("b", 8)]))
        fleet.apply(run("t", "r", 6), T0)
        ev = evaluation(fleet)
        for lease in fleet.state.open_leases.values():
            assert lease.minted_payer is not None
            assert ev.lease_payer(lease.id) == lease.minted_payer.key

    def test_running_status_and_no_reservation_on_success(self) -> None:
        """A started run is Running/GangBound and writes no reservation."""
        fleet = fleet_with((), TEAM)
        events = fleet.apply(run("t", "r", 4), T0)
        assert fleet.state.status["t/r"].phase == "Running"
        assert fleet.state.status["t/r"].reason == "GangBound"
        assert not of_type(events, ReservationCreated)

    def test_unbound_namespace_held_unfunded_not_started(self) -> None:
        """A run whose namespace has no owner is held Pending/Unfunded with the conflict text."""
        fleet = fleet_with((), budget("t", "org:a", name="a"), budget("t", "org:b", name="b"))
        events = fleet.apply(run("t", "r", 2), T0)
        assert not of_type(events, LeaseMinted)
        st = fleet.state.status["t/r"]
        assert (st.phase, st.reason) == ("Pending", "Unfunded")
        assert "more than one owner" in st.message

    def test_owner_recall_demotes_family_without_closing(self) -> None:
        """An owner's admission recalls family width: the child keeps running, now Unfunded."""
        fleet = fleet_with(
            (),
            budget("p", "org:p", [env("e", 8)]),
            budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:p"]),
        )
        fleet.apply(run("c", "kid", 8), T0)
        assert run_classes(fleet, "c/kid") == [SHARED]
        events = fleet.apply(run("p", "own", 8), T0 + HOUR)
        assert not of_type(events, LeaseClosed)
        assert run_classes(fleet, "c/kid") == [UNFUNDED]
        assert run_classes(fleet, "p/own") == [OWNED]
        assert fleet.state.status["c/kid"].phase == "Running"

    def test_loan_never_displaces_anyone_at_admission(self) -> None:
        """A borrower is only admitted into free headroom of the sponsor envelope."""
        fleet = fleet_with(
            (),
            budget("s", "org:s", [env("e", 8, lend=True)]),
            budget("b", "org:b", [env("e", 1, flavor=A100)]),
        )
        fleet.apply(run("s", "own", 6), T0 + HOUR)
        events = fleet.apply(run("b", "loan", 4, sponsors=["org:s"]), T0 + HOUR)
        assert not of_type(events, LeaseMinted)
        assert run_classes(fleet, "s/own") == [OWNED]
        events = fleet.apply(run("b", "small", 2, sponsors=["org:s"]), T0 + HOUR)
        assert [e.lease.minted_payer.key for e in of_type(events, LeaseMinted)] == [key("s")]
        assert run_classes(fleet, "b/small") == [BORROWED]


class TestReservations:
    def test_budget_only_wait_reserves_with_zero_deficit(self) -> None:
        """Capacity there, envelope committed: a 'budget' reservation with deficitGPUs 0."""
        fleet = fleet_with((), budget("t", "org:t", [env("e", 4)]))
        fleet.apply(run("t", "first", 4), T0)
        events = fleet.apply(run("t", "second", 4), T0 + MINUTE)
        (created,) = of_type(events, ReservationCreated)
        res = created.reservation
        assert (res.kind, res.deficit_gpus, res.run) == ("budget", 0, "t/second")
        assert res.earliest_start == T0 + MINUTE + Settings().activation_lead
        assert res.paying_envelope == "t/t/e"
        assert fleet.state.status["t/second"].reason == "Reserved"

    def test_budget_only_wait_activates_at_lead_bound_unfunded(self) -> None:
        """At the lead bound the run starts unfunded with Promise leases, cutting nobody."""
        fleet = fleet_with((), budget("t", "org:t", [env("e", 4)]))
        fleet.apply(run("t", "first", 4), T0)
        fleet.apply(run("t", "second", 4), T0 + MINUTE)
        res = fleet.state.pending_reservation("t/second")
        assert res is not None
        assert fleet.advance_to(res.earliest_start - 1) == []
        events = fleet.advance_to(res.earliest_start)
        minted = [e.lease for e in of_type(events, LeaseMinted)]
        assert minted
        assert all(x.reason is MintReason.PROMISE for x in minted)
        assert all(x.start == res.earliest_start for x in minted)
        assert not of_type(events, LeaseClosed)
        assert fleet.state.status["t/second"].phase == "Running"
        assert fleet.state.reservations[res.name].state == "Released"
        assert run_classes(fleet, "t/second") == [UNFUNDED]
        assert run_classes(fleet, "t/first") == [OWNED]

    def test_promise_run_refunds_when_quota_returns(self) -> None:
        """The unfunded promise is re-funded by arithmetic when the senior run completes."""
        fleet = fleet_with((), budget("t", "org:t", [env("e", 4)]))
        fleet.apply(run("t", "first", 4), T0)
        fleet.apply(run("t", "second", 4), T0 + MINUTE)
        fleet.advance_to(T0 + HOUR)
        fleet.complete("t/first", T0 + 2 * HOUR)
        assert run_classes(fleet, "t/second") == [OWNED]

    def test_capacity_wait_deficit_is_the_shortfall(self) -> None:
        """A single domain short by one GPU has a deficit of 1 and a lead of 15m + 30s per GPU."""
        fleet = fleet_with([node("n1", 8)], budget("t", "org:t", [env("e", 16)]))
        fleet.apply(run("t", "small", 1), T0)
        events = fleet.apply(run("t", "big", 8), T0 + MINUTE)
        (created,) = of_type(events, ReservationCreated)
        res = created.reservation
        assert (res.kind, res.deficit_gpus) == ("capacity", 1)
        assert res.earliest_start == T0 + MINUTE + 900 + 30

    def test_window_wait_activates_when_window_opens(self) -> None:
        """A wait for a window to open activates a few seconds after its start and starts funded."""
        opens = T0 + 2 * HOUR
        fleet = fleet_with(
            (), budget("t", "org:t", [env("e", 8, start=opens, end=opens + 9 * HOUR)])
        )
        events = fleet.apply(run("t", "r", 4), T0)
        (created,) = of_type(events, ReservationCreated)
        assert created.reservation.kind == "window"
        assert created.reservation.earliest_start == opens + Settings().window_activation_delay
        fleet.advance_to(opens + HOUR)
        assert fleet.state.status["t/r"].phase == "Running"
        assert run_classes(fleet, "t/r") == [OWNED]

    def test_pre_window_admitted_work_is_unfunded_until_the_window_opens(self) -> None:
        """allowAdmission: work running before the window is Unfunded, Owned once it opens."""
        opens = T0 + 2 * HOUR
        fleet = fleet_with(
            (),
            budget(
                "t", "org:t", [env("e", 8, start=opens, end=opens + 9 * HOUR, allow_admission=True)]
            ),
        )
        fleet.apply(run("t", "r", 4), T0)
        fleet.advance_to(T0 + HOUR)
        assert fleet.state.status["t/r"].phase == "Running"
        assert run_classes(fleet, "t/r") == [UNFUNDED]
        fleet.advance_to(opens)
        assert run_classes(fleet, "t/r") == [OWNED]
        fleet.advance_to(opens + HOUR)
        usage = evaluation(fleet).envelopes[key("t")]
        assert usage.gpu_hours_used == pytest.approx(4.0)

    def test_pre_window_admission_starts_at_once(self) -> None:
        """allowAdmission: a run submitted before the window starts immediately (SPEC §A.1)."""
        opens = T0 + 2 * HOUR
        fleet = fleet_with(
            (),
            budget(
                "t", "org:t", [env("e", 8, start=opens, end=opens + 9 * HOUR, allow_admission=True)]
            ),
        )
        events = fleet.apply(run("t", "r", 4), T0)
        assert not of_type(events, ReservationCreated)
        minted = [e.lease for e in of_type(events, LeaseMinted)]
        assert [(x.start, x.reason) for x in minted] == [(T0, MintReason.START)]
        assert fleet.state.status["t/r"].phase == "Running"


class TestLifecycle:
    def _running(self) -> Fleet:
        fleet = fleet_with((), budget("t", "org:t", [env("e", 16)]))
        fleet.apply(run("t", "r", 12, group_gpus=4), T0)
        assert len(fleet.state.leases_of("t/r", open_only=True)) >= 2
        return fleet

    def test_complete_closes_every_lease_completed(self) -> None:
        """complete closes every open lease of the run with reason Completed."""
        fleet = self._running()
        events = fleet.complete("t/r", T0 + HOUR)
        closed = of_type(events, LeaseClosed)
        assert {e.reason for e in closed} == {"Completed"}
        assert {e.lease for e in closed} == {x.id for x in fleet.state.leases_of("t/r")}
        assert fleet.state.leases_of("t/r", open_only=True) == []
        assert fleet.state.status["t/r"].phase == "Completed"

    def test_fail_closes_workload_failed_and_is_terminal(self) -> None:
        """fail closes every lease WorkloadFailed; later reconciles never restart the run."""
        fleet = self._running()
        events = fleet.fail("t/r", T0 + HOUR)
        assert {e.reason for e in of_type(events, LeaseClosed)} == {"WorkloadFailed"}
        assert fleet.state.leases_of("t/r", open_only=True) == []
        assert fleet.state.status["t/r"].phase == "Failed"
        later = fleet.advance_to(T0 + 30 * HOUR)
        later += fleet.apply(run("t", "r", 12, group_gpus=4, max_duration="9h"), T0 + 31 * HOUR)
        later += fleet.reconcile(T0 + 32 * HOUR)
        assert not [e for e in of_type(later, LeaseMinted) if e.lease.run == "t/r"]
        assert fleet.state.status["t/r"].phase == "Failed"
        with pytest.raises(CommandError, match="already Failed"):
            fleet.fail("t/r", T0 + 33 * HOUR)

    def test_fail_of_waiting_run_releases_its_reservation(self) -> None:
        """A run failed while waiting drops its reservation, which never resurrects it."""
        fleet = fleet_with((), budget("t", "org:t", [env("e", 4)]))
        fleet.apply(run("t", "first", 4), T0)
        fleet.apply(run("t", "second", 4), T0 + MINUTE)
        res = fleet.state.pending_reservation("t/second")
        assert res is not None
        fleet.fail("t/second", T0 + 2 * MINUTE)
        assert fleet.state.reservations[res.name].state == "Released"
        events = fleet.advance_to(res.earliest_start + HOUR)
        assert not [e for e in of_type(events, LeaseMinted) if e.lease.run == "t/second"]

    def test_delete_closes_run_deleted(self) -> None:
        """Deleting a run closes every open lease RunDeleted and forgets the run."""
        fleet = self._running()
        events = fleet.delete("Run", "t", "r", T0 + HOUR)
        closed = of_type(events, LeaseClosed)
        assert closed
        assert {e.reason for e in closed} == {"RunDeleted"}
        assert "t/r" not in fleet.state.runs
        assert fleet.state.open_leases == {}
        assert check_invariants(fleet.state) == []

    def test_delete_frees_capacity_for_the_next_run(self) -> None:
        """A deleted run's slots are reusable immediately by a waiting run."""
        fleet = fleet_with([node("n1", 8)], TEAM)
        fleet.apply(run("t", "a", 8), T0)
        fleet.apply(run("t", "b", 8), T0 + MINUTE)
        assert fleet.state.status["t/b"].phase == "Pending"
        events = fleet.delete("Run", "t", "a", T0 + HOUR)
        assert [e.lease.run for e in of_type(events, LeaseMinted)] == ["t/b"]

    def test_max_duration_expires_leases(self) -> None:
        """A run's leases close Expired at start + maxDuration (DESIGN decision 2)."""
        fleet = fleet_with((), TEAM)
        fleet.apply(run("t", "r", 4, max_duration="90m"), T0)
        assert fleet.advance_to(T0 + 89 * MINUTE) == []
        events = fleet.advance_to(T0 + 2 * HOUR)
        closed = of_type(events, LeaseClosed)
        assert closed
        assert {(e.reason, e.at) for e in closed} == {("Expired", T0 + 90 * MINUTE)}

    def test_commands_on_unknown_runs_are_refused(self) -> None:
        """complete/fail/delete of an unknown run raise CommandError and change nothing."""
        fleet = fleet_with((), TEAM)
        n = len(fleet.state.history)
        with pytest.raises(CommandError):
            fleet.complete("t/nope", T0)
        with pytest.raises(CommandError):
            fleet.fail("t/nope", T0)
        with pytest.raises(CommandError):
            fleet.delete("Run", "t", "nope", T0)
        with pytest.raises(CommandError):
            fleet.delete("Budget", "t", "nope", T0)
        assert len(fleet.state.history) == n


class TestBudgetEdits:
    def test_budget_cut_demotes_never_closes(self) -> None:
        """Shrinking an envelope demotes the junior work to Unfunded; no lease is closed."""
        fleet = fleet_with((), budget("t", "org:t", [env("e", 12)]))
        fleet.apply(run("t", "a", 4), T0)
        fleet.apply(run("t", "b", 8), T0 + MINUTE)
        events = fleet.apply(budget("t", "org:t", [env("e", 6)]), T0 + HOUR)
        assert not of_type(events, LeaseClosed)
        assert run_classes(fleet, "t/a") == [OWNED]
        assert set(run_classes(fleet, "t/b")) == {UNFUNDED}
        assert check_invariants(fleet.state) == []

    def test_budget_delete_demotes_never_closes(self) -> None:
        """Deleting the Budget leaves the run running, Unfunded."""
        fleet = fleet_with((), TEAM)
        fleet.apply(run("t", "a", 4), T0)
        events = fleet.delete("Budget", "t", "t", T0 + HOUR)
        assert not of_type(events, LeaseClosed)
        assert run_classes(fleet, "t/a") == [UNFUNDED]
        assert fleet.state.status["t/a"].phase == "Running"

    def test_status_writes_are_not_repeated(self) -> None:
        """Re-reconciling a waiting run with nothing new writes no duplicate status event."""
        fleet = fleet_with([node("n1", 4)], TEAM)
        fleet.apply(run("t", "big", 8), T0)
        assert fleet.state.status["t/big"].reason == "Reserved"
        events: list[Event] = []
        for m in range(1, 5):
            events += fleet.reconcile(T0 + m * MINUTE)
        assert not of_type(events, RunStatusChanged)
        assert not of_type(events, ReservationReleased)
