"""The ledger: events, the fold and its refusals, the codec, replay (DESIGN decisions 6, 7)."""

from __future__ import annotations

import copy
import json

import msgspec
import pytest
from builders import HOUR, MINUTE, T0, budget, env, key, lease, node, payer, run

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import (
    EVENT_DECODER,
    EVENT_ENCODER,
    BudgetApplied,
    BudgetDeleted,
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionCanceled,
    LeasePreemptionScheduled,
    LedgerError,
    NodeHealthChanged,
    NodeRegistered,
    Reservation,
    ReservationCreated,
    ReservationReleased,
    RunDeleted,
    RunStatusChanged,
    RunSubmitted,
    RunUpdated,
    check_invariants,
    fold,
    fold_all,
)
from gpu_fleet.core.model import FundingClass, Lease, LeaseRole, MintReason, NodeHealth

RUN = run("t", "r", 4)
OTHER = run("t", "other", 2)


def base_state() -> FleetState:
    """Two nodes, one budget, two submitted runs, one open lease of RUN on n1#0-3."""
    return fold_all(
        [
            NodeRegistered(at=T0, node=node("n1", 8)),
            NodeRegistered(at=T0, node=node("n2", 8)),
            BudgetApplied(at=T0, budget=budget("t", "org:t", [env("e", 8)])),
            RunSubmitted(at=T0, run=RUN),
            RunSubmitted(at=T0, run=OTHER),
            LeaseMinted(at=T0, lease=lease("L1", RUN.key, 4, minted=payer("t"))),
        ]
    )


def refuse(state: FleetState, event: Event, match: str) -> None:
    """The fold raises LedgerError and leaves the state exactly as it was."""
    before = copy.deepcopy(state)
    with pytest.raises(LedgerError, match=match):
        fold(state, event)
    assert state == before


class TestRefusals:
    def test_double_booked_slot(self) -> None:
        """A lease on a slot an open lease holds is refused (slots are physical, unique)."""
        state = base_state()
        clash = lease("L2", OTHER.key, 2, first=3)
        refuse(state, LeaseMinted(at=T0 + 1, lease=clash), "slot n1#3 is held by lease L1")

    def test_slot_freed_by_closure_can_be_reused(self) -> None:
        """Once the holder closes, the same slot may be minted again."""
        state = base_state()
        fold(state, LeaseClosed(at=T0 + 1, lease="L1", reason="Completed"))
        fold(state, LeaseMinted(at=T0 + 2, lease=lease("L2", OTHER.key, 2, first=3, start=T0 + 2)))
        assert state.slot_holder["n1#3"] == "L2"

    def test_second_closure(self) -> None:
        """Closure is final: a second LeaseClosed is refused."""
        state = base_state()
        fold(state, LeaseClosed(at=T0 + 1, lease="L1", reason="Completed"))
        refuse(state, LeaseClosed(at=T0 + 2, lease="L1", reason="RunDeleted"), "already closed")
        assert state.leases["L1"].closure_reason == "Completed"

    def test_closing_unknown_lease(self) -> None:
        """Closing a lease that never existed is refused."""
        refuse(base_state(), LeaseClosed(at=T0 + 1, lease="nope", reason="x"), "does not exist")

    def test_lease_for_missing_run(self) -> None:
        """A lease for a run that was never submitted is refused."""
        refuse(
            base_state(),
            LeaseMinted(at=T0 + 1, lease=lease("L2", "t/ghost", 1, first=6)),
            "run t/ghost does not exist",
        )

    @pytest.mark.parametrize("phase", ["Completed", "Failed"])
    def test_lease_for_terminal_run(self, phase: str) -> None:
        """A lease for a Completed or Failed run is refused."""
        state = base_state()
        fold(state, RunStatusChanged(at=T0 + 1, run=OTHER.key, phase=phase, reason="x"))  # type: ignore[arg-type]
        refuse(
            state,
            LeaseMinted(at=T0 + 2, lease=lease("L2", OTHER.key, 1, first=6)),
            f"run {OTHER.key} is terminal",
        )

    @pytest.mark.parametrize(
        ("slots", "match"),
        [
            (("n1#8",), "slot n1#8 is not a GPU of n1"),
            (("n2#0",), "slot n2#0 is not a GPU of n1"),
            (("n1#x",), "slot n1#x is not a GPU of n1"),
            (("n1#-1",), "is not a GPU of n1"),
        ],
    )
    def test_slot_outside_node(self, slots: tuple[str, ...], match: str) -> None:
        """Every slot must be an ordinal below the node's GPU count on the lease's own node."""
        bad = msgspec.structs.replace(lease("L2", OTHER.key, 1, first=6), slots=slots)
        refuse(base_state(), LeaseMinted(at=T0 + 1, lease=bad), match)

    def test_unknown_node_and_empty_slots(self) -> None:
        """A lease on an unregistered node, or holding no slot, is refused."""
        state = base_state()
        refuse(
            state,
            LeaseMinted(at=T0 + 1, lease=lease("L2", OTHER.key, 1, node_name="n9")),
            "unknown node n9",
        )
        empty = msgspec.structs.replace(lease("L3", OTHER.key, 1, first=6), slots=())
        refuse(state, LeaseMinted(at=T0 + 1, lease=empty), "holds no slot")

    def test_duplicate_lease_id(self) -> None:
        """A lease id is minted once."""
        dup = lease("L1", OTHER.key, 1, first=6)
        refuse(base_state(), LeaseMinted(at=T0 + 1, lease=dup), "already exists")

    def test_event_before_ledger_clock(self) -> None:
        """Time only moves forward: an event earlier than the clock is refused."""
        state = base_state()
        fold(
            state, RunStatusChanged(at=T0 + HOUR, run=RUN.key, phase="Running", reason="GangBound")
        )
        refuse(
            state, BudgetDeleted(at=T0, namespace="t", name="t"), "earlier than the ledger clock"
        )

    def test_other_refusals(self) -> None:
        """Unknown node health change, unknown reservation release, bad preemption notices."""
        state = base_state()
        refuse(
            state, NodeHealthChanged(at=T0 + 1, node="n9", health=NodeHealth.FENCED), "unknown node"
        )
        refuse(state, ReservationReleased(at=T0 + 1, name="nope"), "unknown reservation")
        notice = LeasePreemptionScheduled(
            at=T0 + 10,
            lease="L1",
            run=RUN.key,
            deadline=T0 + 5,
            reason="Shrink",
            kind="Shrink",
            seed="0x1",
        )
        refuse(state, notice, "deadline before its notice")
        ok = msgspec.structs.replace(notice, deadline=T0 + 20)
        fold(state, ok)
        refuse(state, msgspec.structs.replace(ok, at=T0 + 11), "already has a preemption")
        refuse(
            state,
            msgspec.structs.replace(ok, lease="gone", at=T0 + 11),
            "is not open",
        )
        refuse(state, LeasePreemptionCanceled(at=T0 + 12, lease="nope"), "no pending preemption")

    def test_refusal_leaves_meter_untouched_when_time_advanced(self) -> None:
        """A refused event dated later does not advance the meter or the clock."""
        state = base_state()
        clock, meter_t = state.clock, state.meter.t
        with pytest.raises(LedgerError):
            fold(state, LeaseMinted(at=T0 + 5 * HOUR, lease=lease("X", "t/ghost", 1, first=7)))
        assert (state.clock, state.meter.t) == (clock, meter_t)
        assert sum(state.meter.envelope_hours.values()) == 0.0


class TestFold:
    def test_closure_stamps_and_frees(self) -> None:
        """LeaseClosed stamps closed_at and reason, drops the lease from open leases and slots."""
        state = base_state()
        fold(state, LeaseClosed(at=T0 + HOUR, lease="L1", reason="Completed"))
        closed = state.leases["L1"]
        assert (closed.closed_at, closed.closure_reason) == (T0 + HOUR, "Completed")
        assert "L1" not in state.open_leases
        assert not any(h == "L1" for h in state.slot_holder.values())
        assert check_invariants(state) == []

    def test_meter_charges_before_a_closure(self) -> None:
        """GPU-hours up to the closing event are charged with the lease still open."""
        state = base_state()
        fold(state, LeaseClosed(at=T0 + 2 * HOUR, lease="L1", reason="Completed"))
        fold(state, RunStatusChanged(at=T0 + 5 * HOUR, run=RUN.key, phase="Completed", reason="x"))
        assert state.meter.envelope_hours[key("t")] == pytest.approx(8.0)
        assert state.meter.run_hours[RUN.key][FundingClass.OWNED] == pytest.approx(8.0)

    def test_an_unmetered_state_folds_the_same_fleet_and_charges_nothing(self) -> None:
        """``metered=False`` (the binder's) moves the clock without charging GPU-hours; nodes,
        leases, slots and the topology placements read come out as in a metered fold."""
        history = [*base_state().history]
        history += [
            LeaseMinted(at=T0 + HOUR, lease=lease("L2", OTHER.key, 2, node_name="n2")),
            LeaseClosed(at=T0 + 2 * HOUR, lease="L1", reason="Completed"),
            RunStatusChanged(at=T0 + 5 * HOUR, run=RUN.key, phase="Completed", reason="x"),
        ]
        metered = fold_all(history)
        unmetered = FleetState(metered=False)
        for event in history:
            fold(unmetered, event)
        assert metered.meter.run_hours[RUN.key][FundingClass.OWNED] == pytest.approx(8.0)
        assert not unmetered.meter.run_hours
        assert not unmetered.meter.envelope_hours
        assert unmetered.meter.t == 0.0
        assert unmetered.clock == metered.clock == T0 + 5 * HOUR
        assert (unmetered.leases, unmetered.open_leases) == (metered.leases, metered.open_leases)
        assert unmetered.slot_holder == metered.slot_holder
        assert unmetered.topology("H100").free_counts(["n1", "n2"]) == metered.topology(
            "H100"
        ).free_counts(["n1", "n2"])
        assert check_invariants(unmetered) == []

    def test_run_submitted_records_admission_time_and_pending(self) -> None:
        """RunSubmitted sets admitted = event time and a Pending status."""
        state = base_state()
        late = run("t", "late", 1)
        fold(state, RunSubmitted(at=T0 + MINUTE, run=late))
        assert state.admitted[late.key] == T0 + MINUTE
        assert state.status[late.key].phase == "Pending"

    def test_run_deleted_drops_run_and_status(self) -> None:
        """RunDeleted forgets the run and its status; its lease records stay for audit."""
        state = base_state()
        fold(state, LeaseClosed(at=T0 + 1, lease="L1", reason="RunDeleted"))
        fold(state, RunDeleted(at=T0 + 1, run=RUN.key))
        assert RUN.key not in state.runs
        assert RUN.key not in state.status
        assert "L1" in state.leases

    def test_check_invariants_flags_half_stamped_closure_and_orphans(self) -> None:
        """The checker reports open leases of missing runs and half-stamped closures."""
        state = base_state()
        state.runs.pop(RUN.key)
        bad = msgspec.structs.replace(lease("X", OTHER.key, 1, first=7), closed_at=T0)
        state.leases["X"] = bad
        problems = check_invariants(state)
        assert any("belongs to missing run t/r" in p for p in problems)
        assert any("closure is half-stamped" in p for p in problems)


def sample_events() -> list[Event]:
    res = Reservation(
        name="r-res",
        run=RUN.key,
        kind="budget",
        earliest_start=T0 + 900,
        created_at=T0,
        nodes=("n1",),
        remedies=("Run fair lottery if deficit remains",),
    )
    minted = Lease(
        id="L9",
        run=RUN.key,
        node="n1",
        slots=("n1#0", "n1#1"),
        role=LeaseRole.SPARE,
        group=3,
        reason=MintReason.PROMISE,
        cohort=2,
        minted_payer=payer("t", owner="org:t"),
        start=T0,
        end=T0 + HOUR,
    )
    return [
        NodeRegistered(at=T0, node=node("n1", 8)),
        NodeHealthChanged(at=T0, node="n1", health=NodeHealth.CORDONED),
        BudgetApplied(
            at=T0,
            budget=budget(
                "t", "org:t", [env("e", 8, gpu_hours=12.5, lend=True, lend_to=["x*"], lend_max=2)]
            ),
        ),
        BudgetDeleted(at=T0, namespace="t", name="t"),
        RunSubmitted(
            at=T0, run=run("t", "r", 4, sponsors=["org:s"], max_borrow=2, malleable=(2, 4, 2))
        ),
        RunUpdated(at=T0, run=run("t", "r", 4, max_duration="2h")),
        RunDeleted(at=T0, run=RUN.key),
        RunStatusChanged(
            at=T0,
            run=RUN.key,
            phase="Pending",
            reason="Reserved",
            detail={"why": "x", "tried": ["a"]},
        ),
        LeaseMinted(at=T0, lease=minted),
        LeaseClosed(at=T0, lease="L9", reason="Expired"),
        ReservationCreated(at=T0, reservation=res),
        ReservationReleased(at=T0, name="r-res", state="Failed", reason="run deleted"),
        LeasePreemptionScheduled(
            at=T0,
            lease="L9",
            run=RUN.key,
            deadline=T0 + 60,
            reason="RandomPreempt(0xab)",
            kind="Lottery",
            seed="0xab",
            conflict_set=("L9", "L8"),
            beneficiary="t/b",
            source="r-res",
        ),
        LeasePreemptionCanceled(at=T0, lease="L9", reason="beneficiary started"),
    ]


class TestCodec:
    @pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
    def test_round_trip(self, event: Event) -> None:
        """Every event type encodes to JSON and decodes back to an equal value."""
        assert EVENT_DECODER.decode(EVENT_ENCODER.encode(event)) == event

    def test_type_tag_on_the_wire(self) -> None:
        """The tagged union is keyed by 'type' with the event's class name."""
        raw = json.loads(EVENT_ENCODER.encode(LeaseClosed(at=T0, lease="L", reason="Completed")))
        assert raw == {"type": "LeaseClosed", "at": T0, "lease": "L", "reason": "Completed"}

    @pytest.mark.parametrize("event", sample_events(), ids=lambda e: type(e).__name__)
    def test_old_decoder_ignores_unknown_top_level_field(self, event: Event) -> None:
        """An event written by a newer service with an extra field decodes on an older one."""
        raw = json.loads(EVENT_ENCODER.encode(event))
        raw["addedLater"] = {"anything": [1, 2]}
        assert EVENT_DECODER.decode(json.dumps(raw).encode()) == event

    def test_old_decoder_ignores_unknown_lease_field(self) -> None:
        """A newer field inside an embedded Lease record is ignored too."""
        event = LeaseMinted(at=T0, lease=lease("L", RUN.key, 2))
        raw = json.loads(EVENT_ENCODER.encode(event))
        raw["lease"]["addedLater"] = "x"
        assert EVENT_DECODER.decode(json.dumps(raw).encode()) == event

    @pytest.mark.parametrize(
        ("event", "path"),
        [
            (NodeRegistered(at=T0, node=node("n1")), ("node",)),
            (BudgetApplied(at=T0, budget=budget("t", "org:t")), ("budget", "spec")),
            (RunSubmitted(at=T0, run=RUN), ("run", "spec")),
        ],
        ids=["node", "budget", "run"],
    )
    def test_old_decoder_ignores_unknown_nested_record_field(
        self, event: Event, path: tuple[str, ...]
    ) -> None:
        """A newer field inside an embedded Node/Budget/Run does not stop an older fold."""
        raw = json.loads(EVENT_ENCODER.encode(event))
        target = raw
        for part in path:
            target = target[part]
        target["addedLater"] = 1
        assert EVENT_DECODER.decode(json.dumps(raw).encode()) == event

    def test_unknown_event_type_is_refused(self) -> None:
        """An event type the decoder does not know is an error, not silently dropped."""
        with pytest.raises(msgspec.ValidationError):
            EVENT_DECODER.decode(b'{"type": "SomethingNew", "at": 1}')


class TestReplay:
    def _busy_fleet(self) -> Fleet:
        fleet = Fleet()
        fleet.register_node(node("n1", 8), T0)
        fleet.register_node(node("n2", 8, fabric="f2"), T0)
        fleet.register_node(node("n3", 8, fabric="f3"), T0)
        fleet.apply(budget("p", "org:p", [env("e", 8, gpu_hours=400)]), T0)
        fleet.apply(budget("c", "org:c", [env("e", 4)], parents=["org:p"]), T0)
        fleet.apply(run("c", "kid", 8), T0 + MINUTE)
        fleet.apply(run("p", "own", 4), T0 + 2 * MINUTE)
        fleet.apply(run("p", "wait", 4), T0 + 3 * MINUTE)
        fleet.apply(run("p", "extra", 4), T0 + 4 * MINUTE)  # budget-only wait, then a promise
        fleet.advance_to(T0 + 2 * HOUR)
        fleet.complete("c/kid", T0 + 3 * HOUR)
        fleet.apply(run("c", "later", 2, max_duration="1h"), T0 + 3 * HOUR)
        fleet.advance_to(T0 + 6 * HOUR)
        fleet.delete("Run", "p", "wait", T0 + 6 * HOUR)
        return fleet

    def test_replay_reproduces_state(self) -> None:
        """fold_all(history) reproduces leases, statuses, reservations and metered hours."""
        fleet = self._busy_fleet()
        live = fleet.state
        kinds = {type(e).__name__ for e in live.history}
        assert {"ReservationCreated", "ReservationReleased", "LeaseClosed"} <= kinds
        replayed = fold_all(live.history, live.settings_period_hours)
        assert replayed.leases == live.leases
        assert replayed.open_leases == live.open_leases
        assert replayed.slot_holder == live.slot_holder
        assert {k: (s.phase, s.reason, s.message) for k, s in replayed.status.items()} == {
            k: (s.phase, s.reason, s.message) for k, s in live.status.items()
        }
        assert replayed.reservations == live.reservations
        assert dict(replayed.meter.envelope_hours) == pytest.approx(dict(live.meter.envelope_hours))
        assert check_invariants(replayed) == []

    def test_replay_through_the_codec(self) -> None:
        """The history survives encode/decode and folds to the same leases."""
        live = self._busy_fleet().state
        wire = [EVENT_DECODER.decode(EVENT_ENCODER.encode(e)) for e in live.history]
        assert fold_all(wire, live.settings_period_hours).leases == live.leases

    def test_two_fleets_fed_the_same_commands_agree(self) -> None:
        """Decisions are deterministic: the same commands yield the same event history."""
        a, b = self._busy_fleet(), self._busy_fleet()
        assert EVENT_ENCODER.encode(a.state.history) == EVENT_ENCODER.encode(b.state.history)
