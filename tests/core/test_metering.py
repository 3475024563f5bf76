"""GPU-hour metering folded per interval, and funding summaries (DESIGN 1 and 9, SPEC §B.4.5)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, cast

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
    World,
    budget,
    env,
    key,
    lease,
    node,
    payer,
    run,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_incremental import Drawn, drawn_world, same_fill

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.funding import (
    FillResult,
    FundingInputs,
    HoursView,
    Meter,
    advance_meter,
    evaluate,
    fill,
    metering,
)
from gpu_fleet.core.funding import charges as charges_module
from gpu_fleet.core.funding.incremental import extend_fill, shrink_fill
from gpu_fleet.core.ledger import check_invariants
from gpu_fleet.core.model import EnvelopeKey, FundingClass, LeaseRole

PARENT = budget("p", "org:p", [env("e", 4)])
CHILD = budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:p"])


def advanced(w: World, to: int, start: int = T0) -> Meter:
    m = Meter(t=float(start))
    advance_meter(m, w.inputs(), to)
    return m


class TestPerIntervalCharging:
    def test_family_then_unfunded_after_owner_recall(self) -> None:
        """Hours go to the payer of each interval: Shared until the owner recalls, then Unfunded."""
        kid, own = run("c", "kid", 4), run("p", "own", 4)
        w = World(
            [PARENT, CHILD],
            [kid, own],
            [lease("K", kid.key, 4), lease("O", own.key, 4, first=4, start=T0 + 2 * HOUR)],
            admitted={kid.key: T0, own.key: T0 + 2 * HOUR},
        )
        m = advanced(w, T0 + 5 * HOUR)
        assert m.run_hours[kid.key][SHARED] == pytest.approx(8.0)
        assert m.run_hours[kid.key][UNFUNDED] == pytest.approx(12.0)
        assert m.run_hours[own.key][OWNED] == pytest.approx(12.0)
        assert m.envelope_hours[key("p")] == pytest.approx(20.0)
        assert m.envelope_class_hours[key("p")][SHARED] == pytest.approx(8.0)
        assert m.envelope_class_hours[key("p")][OWNED] == pytest.approx(12.0)
        assert dict(m.run_lender_hours[kid.key]) == {"org:p": pytest.approx(8.0)}

    def test_unfunded_hours_charge_no_envelope(self) -> None:
        """Hours used while Unfunded appear in the run's hours by class but charge nothing."""
        parent = budget("p", "org:p", [env("e", 8, sharing="none")])
        kid = run("c", "kid", 3)
        w = World([parent, CHILD], [kid], [lease("K", kid.key, 3)])
        m = advanced(w, T0 + 2 * HOUR)
        assert m.run_hours[kid.key][UNFUNDED] == pytest.approx(6.0)
        assert sum(m.envelope_hours.values()) == 0.0
        assert sum(m.cap_hours.values()) == 0.0
        assert kid.key not in m.run_lender_hours

    def test_window_switch_charges_each_envelope_its_own_interval(self) -> None:
        """A run spanning q1 then q2 charges q1 for q1's interval and q2 for q2's."""
        b = budget(
            "t",
            "org:t",
            [
                env("q1", 8, start=T0 - HOUR, end=T0 + HOUR),
                env("q2", 8, start=T0 + 2 * HOUR, end=T0 + 9 * HOUR),
            ],
        )
        r = run("t", "r", 2)
        w = World([b], [r], [lease("L", r.key, 2, minted=payer("t", "q1"))])
        m = advanced(w, T0 + 4 * HOUR)
        assert m.envelope_hours[key("t", "q1")] == pytest.approx(2.0)
        assert m.envelope_hours[key("t", "q2")] == pytest.approx(4.0)
        assert m.run_hours[r.key][UNFUNDED] == pytest.approx(2.0)
        assert m.run_hours[r.key][OWNED] == pytest.approx(6.0)

    def test_borrowed_hours_credit_the_lender(self) -> None:
        """Borrowed hours are charged to the sponsor envelope and listed under the lender owner."""
        sponsor = budget("s", "org:s", [env("e", 4, lend=True)])
        borrower = budget("b", "org:b", [env("e", 1, flavor=A100)])
        r = run("b", "r", 2, sponsors=["org:s"])
        w = World([sponsor, borrower], [r], [lease("L", r.key, 2, minted=payer("s"))])
        m = advanced(w, T0 + 3 * HOUR)
        assert m.run_hours[r.key][BORROWED] == pytest.approx(6.0)
        assert m.envelope_class_hours[key("s")][BORROWED] == pytest.approx(6.0)
        assert dict(m.run_lender_hours[r.key]) == {"org:s": pytest.approx(6.0)}

    def test_stepwise_advance_equals_one_shot(self) -> None:
        """Folding the meter in many small steps charges the same hours as one advance."""
        b = budget("t", "org:t", [env("e", 8, gpu_hours=30)])
        r1, r2 = run("t", "a", 4), run("t", "b", 4)
        w = World(
            [b],
            [r1, r2],
            [lease("A", r1.key, 4), lease("B", r2.key, 4, first=4, start=T0 + 30 * MINUTE)],
            admitted={r1.key: T0, r2.key: T0 + 30 * MINUTE},
            period_hours=1.0,
        )
        once = advanced(w, T0 + 10 * HOUR)
        steps = Meter(t=float(T0))
        for t in range(T0 + 7 * MINUTE, T0 + 10 * HOUR + 1, 7 * MINUTE):
            advance_meter(steps, w.inputs(), t)
        advance_meter(steps, w.inputs(), T0 + 10 * HOUR)
        assert steps.envelope_hours[key("t")] == pytest.approx(once.envelope_hours[key("t")])
        for rk in (r1.key, r2.key):
            for cls in FundingClass:
                assert steps.run_hours[rk][cls] == pytest.approx(once.run_hours[rk][cls], abs=1e-3)

    def test_evaluate_does_not_mutate_the_meter(self) -> None:
        """evaluate() at a later instant advances a copy, never the caller's meter."""
        b = budget("t", "org:t", [env("e", 8)])
        r = run("t", "r", 2)
        w = World([b], [r], [lease("L", r.key, 2)])
        m = Meter(t=float(T0))
        ev = evaluate(m, w.inputs(), T0 + HOUR)
        assert ev.runs[r.key].hours[OWNED] == pytest.approx(2.0)
        assert m.t == T0
        assert sum(m.envelope_hours.values()) == 0.0


class TestGpuHourAllowance:
    """DESIGN decision 1, driven far past exhaustion (P = 1h, two 4-GPU claims, 100 GPU-hours)."""

    B = budget("t", "org:t", [env("hours", 8, gpu_hours=100)])
    SENIOR, JUNIOR = run("t", "senior", 4), run("t", "junior", 4)

    def world(self) -> World:
        return World(
            [self.B],
            [self.SENIOR, self.JUNIOR],
            [lease("S", self.SENIOR.key, 4), lease("J", self.JUNIOR.key, 4, first=4)],
            admitted={self.SENIOR.key: T0, self.JUNIOR.key: T0 + 1},
            period_hours=1.0,
        )

    def test_funded_consumption_never_exceeds_allowance(self) -> None:
        """After running far past exhaustion, charged hours equal the allowance, never more."""
        m = advanced(self.world(), T0 + 48 * HOUR)
        used = m.envelope_hours[key("t", "hours")]
        assert used <= 100.0 + 1e-6
        assert used == pytest.approx(100.0, abs=1e-3)

    def test_junior_demotes_first_and_senior_spends_to_zero(self) -> None:
        """The junior stops at remaining = P*4 (12h), the senior spends the rest (13h)."""
        m = advanced(self.world(), T0 + 20 * HOUR)
        assert m.run_hours[self.JUNIOR.key][OWNED] == pytest.approx(48.0, abs=1e-2)
        assert m.run_hours[self.SENIOR.key][OWNED] == pytest.approx(52.0, abs=1e-2)
        assert m.run_hours[self.JUNIOR.key][UNFUNDED] == pytest.approx(32.0, abs=1e-2)
        assert m.run_hours[self.SENIOR.key][UNFUNDED] == pytest.approx(28.0, abs=1e-2)

    @pytest.mark.parametrize(
        ("at_hours", "senior", "junior"),
        [
            (6, OWNED, OWNED),
            (12.5, OWNED, UNFUNDED),
            (14, UNFUNDED, UNFUNDED),
        ],
    )
    def test_classes_over_time(
        self, at_hours: float, senior: FundingClass, junior: FundingClass
    ) -> None:
        """Both funded, then only the senior, then neither (demote, not kill)."""
        ev = evaluate(Meter(t=float(T0)), self.world().inputs(), T0 + int(at_hours * HOUR))
        assert (ev.lease_class("S"), ev.lease_class("J")) == (senior, junior)

    def test_no_flapping(self) -> None:
        """Sampled every 5 minutes, a claim that demoted never comes back while hours are low."""
        w = self.world()
        m = Meter(t=float(T0))
        history: dict[str, list[FundingClass]] = {"S": [], "J": []}
        for t in range(T0, T0 + 20 * HOUR, 5 * MINUTE):
            advance_meter(m, w.inputs(), t)
            ev = evaluate(m, w.inputs(), t)
            for lid, seq in history.items():
                seq.append(ev.lease_class(lid))
        for lid, seq in history.items():
            first_unfunded = seq.index(UNFUNDED)
            assert set(seq[first_unfunded:]) == {UNFUNDED}, lid
            assert set(seq[:first_unfunded]) == {OWNED}, lid
        assert history["J"].index(UNFUNDED) < history["S"].index(UNFUNDED)

    def test_fleet_never_overdraws_and_never_closes(self) -> None:
        """Through the Fleet: the invariant checker stays clean and no lease is closed."""
        fleet = Fleet(Settings(accounting_period=3600))
        fleet.register_node(node("n1", 8), T0)
        fleet.apply(self.B, T0)
        events = fleet.apply(self.SENIOR, T0)
        events += fleet.apply(self.JUNIOR, T0 + MINUTE)
        for h in range(1, 40):
            events += fleet.advance_to(T0 + h * HOUR)
            assert check_invariants(fleet.state) == [], h
        ev = evaluate(fleet.state.meter, fleet.state.funding_inputs(), fleet.state.clock)
        assert ev.envelopes[key("t", "hours")].gpu_hours_used == pytest.approx(100.0, abs=1e-3)
        assert len(fleet.state.open_leases) == 2
        assert all(lease.is_open for lease in fleet.state.leases.values())
        assert not [e for e in events if type(e).__name__ == "LeaseClosed"]

    def test_new_claim_refused_when_hours_short_of_one_period(self) -> None:
        """With fewer than P*width hours left, a new claim is not funded (not even alone)."""
        b = budget("t", "org:t", [env("e", 8, gpu_hours=3.5)])
        r = run("t", "r", 4)
        w = World([b], [r], [lease("L", r.key, 4)], period_hours=1.0)
        ev = w.evaluate()
        assert ev.lease_class("L") is UNFUNDED
        m = advanced(w, T0 + 3 * HOUR)
        assert m.envelope_hours[key("t")] == 0.0


class TestSummaries:
    def test_completed_leases_count_in_hours_not_width(self) -> None:
        """A completed run keeps its hours but contributes no width to envelope or run."""
        fleet = Fleet()
        fleet.register_node(node("n1", 8), T0)
        fleet.apply(budget("t", "org:t", [env("e", 8)]), T0)
        r = run("t", "r", 4)
        fleet.apply(r, T0)
        fleet.complete(r.key, T0 + HOUR)
        fleet.advance_to(T0 + 3 * HOUR)
        state = fleet.state
        ev = evaluate(state.meter, state.funding_inputs(), state.clock)
        assert ev.runs[r.key].hours[OWNED] == pytest.approx(4.0)
        assert ev.runs[r.key].owned == 0
        usage = ev.envelopes[key("t")]
        assert usage.funded == 0
        assert usage.headroom == 8
        assert usage.gpu_hours_used == pytest.approx(4.0)

    def test_envelope_usage_by_class_and_headroom(self) -> None:
        """Usage lists width per class; unfunded width is referenced by its minted payer only."""
        kid, own = run("c", "kid", 4), run("p", "own", 2)
        extra = run("p", "extra", 4)
        w = World(
            [PARENT, CHILD],
            [kid, own, extra],
            [
                lease("K", kid.key, 2),
                lease("O", own.key, 2, first=2),
                lease("X", extra.key, 4, first=4, minted=payer("p")),
            ],
            admitted={own.key: T0, kid.key: T0 + 1, extra.key: T0 + 2},
        )
        ev = w.evaluate()
        u = ev.envelopes[key("p")]
        assert (u.owned, u.shared, u.borrowed, u.unfunded) == (2, 2, 0, 4)
        assert u.funded == 4
        assert u.headroom == 0
        rf = ev.runs[kid.key]
        assert (rf.shared, rf.lenders) == (2, {"org:p": 2})
        assert ev.runs[extra.key].by_class(UNFUNDED) == 4

    def test_spare_width_reported_separately(self) -> None:
        """Run spares are counted apart from class width; envelope spare counts funded spares."""
        b = budget("t", "org:t", [env("e", 8)])
        r = run("t", "r", 4, spares=1)
        w = World(
            [b],
            [r],
            [lease("A", r.key, 4), lease("S", r.key, 1, first=4, role=LeaseRole.SPARE)],
        )
        ev = w.evaluate()
        assert (ev.runs[r.key].owned, ev.runs[r.key].spares) == (4, 1)
        assert (ev.envelopes[key("t")].owned, ev.envelopes[key("t")].spare) == (5, 1)


# ------------------------------------------------------------------------------------------
# The charges as arrays add exactly what the walk adds, in its order
# ------------------------------------------------------------------------------------------


def meter_state(m: Meter) -> list[object]:
    """Every total with its key order (a view lists them in that order), compared exactly."""

    def nested(d: dict[Any, dict[Any, float]]) -> list[object]:
        return [(k, list(v.items())) for k, v in d.items()]

    return [
        list(m.envelope_hours.items()),
        nested(m.envelope_class_hours),
        list(m.cap_hours.items()),
        nested(m.run_hours),
        nested(m.run_lender_hours),
        sorted(m._unsettled),
        list(m._settled),
    ]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_charges_add_what_the_walk_adds_in_its_order(data: st.DataObject) -> None:
    """Over generated worlds (family, loans, caps, GPU-hours) and pieces of odd lengths on top
    of totals already there, ``_accrue`` leaves every total bit for bit as the walk does, with
    the keys in the same order - the same matching charged again and again, as a meter does."""
    world, _, hours = drawn_world(data, 8)
    f = world.fill(T0, hours)
    inputs = world.inputs()
    fast, walked = Meter(t=float(T0)), Meter(t=float(T0))
    for m in (fast, walked):
        m._settled["old/run"] = cast("Any", None)
        m.run_hours["old/run"][FundingClass.OWNED] = 0.1
    for _ in range(data.draw(st.integers(2, 5))):  # the first walks, the next read charges
        seconds = data.draw(st.sampled_from([1.0, 7.3, 60.0, 3600.0, 1e-3, 12345.678]))
        metering._accrue(fast, inputs, f, T0, T0 + seconds)
        hours = ((T0 + seconds) - T0) / 3600.0  # as ``_accrue`` works the piece out
        metering._accrue_walk(walked, inputs, f, hours)  # the walk, every time
        assert meter_state(fast) == meter_state(walked)
    assert f._charges is not None
    assert f._charges[1] is not None  # worked out at the second piece


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_derived_charges_add_what_the_walk_adds_in_its_order(data: st.DataObject) -> None:
    """A line of matchings as admissions and closes make them - each an extension by leases
    just minted or a shrink by leases closed, sometimes several before the meter charges one,
    sometimes one charged again - charged as the meter charges them: the charges derived from
    the matching before (``Charges.derived``) leave every total bit for bit as the walk does,
    with the keys in the same order."""
    world, drawn, hours = drawn_world(data, 3, least=1)  # few: shrinks need no one turned away
    with pytest.MonkeyPatch.context() as patch:  # key numberings compacted soon, or not
        patch.setattr(charges_module, "COMPACT_FROM", data.draw(st.sampled_from([64, 1])))
        patch.setattr(charges_module, "COMPACT_SHARE", data.draw(st.sampled_from([0.5, 0.0])))
        charge_a_line(data, world, drawn, hours)


def charge_a_line(data: st.DataObject, world: World, drawn: Drawn, hours: HoursView) -> None:
    """The line of ``test_derived_charges_add_what_the_walk_adds_in_its_order``."""
    runs, admitted, labels = drawn.runs, drawn.admitted, world.node_labels
    current = world.fill(T0, hours)
    fast, walked = Meter(t=float(T0)), Meter(t=float(T0))
    t = float(T0)
    for step in range(data.draw(st.integers(2, 8))):
        inputs = FundingInputs(world.index, tuple(drawn.leases), runs, admitted, labels)
        derived = current._derived is not None
        event(f"charged right after a shrink: {derived and bool(current._derived[1][2])}")  # type: ignore[index]
        if data.draw(st.integers(0, 4)) == 0:  # totals a copy left out (``copy_for_matching``)
            fast, walked = Meter(t=t), Meter(t=t)
        elif data.draw(st.booleans()):  # runs settled by a summary since
            for m in (fast, walked):
                m.flush()  # as ``summarize`` does before it settles
                m._settled.update(dict.fromkeys(sorted(m._unsettled), cast("Any", None)))
                m._unsettled.clear()
        for _ in range(data.draw(st.sampled_from([1, 1, 1, 2]))):
            seconds = data.draw(st.sampled_from([1.0, 7.3, 60.0, 3600.0, 1e-3, 12345.678]))
            metering._accrue(fast, inputs, current, t, t + seconds)
            metering._accrue_walk(walked, inputs, current, ((t + seconds) - t) / 3600.0)
            if data.draw(st.integers(0, 2)) == 0:  # else the runs' totals wait to be read
                assert meter_state(fast) == meter_state(walked)
            t += seconds
        known = current._charges
        from_arrays = known is not None and known[1] is not None
        event(f"derived, then charged from arrays: {derived and from_arrays}")
        for _ in range(data.draw(st.integers(1, 3))):
            nxt: FillResult | None
            if drawn.leases and data.draw(st.booleans()):
                gone = data.draw(
                    st.lists(st.sampled_from(drawn.leases), min_size=1, max_size=3, unique=True)
                )
                drawn.leases = [x for x in drawn.leases if x not in gone]
                nxt = shrink_fill(current, gone)
            else:
                xs = drawn.add(data, f"new{step}_")
                nxt = extend_fill(world.index, current, xs, runs, admitted, labels, T0, hours)
            current = nxt or fill(world.index, drawn.leases, runs, admitted, labels, T0, hours)
    assert meter_state(fast) == meter_state(walked)


def charged_twice(inputs: FundingInputs, base: FillResult) -> tuple[Meter, Meter]:
    """Two meters that charged ``base`` for two minutes: the first charge walks, the second
    works its charges out, so a matching derived from it derives its charges."""
    fast, walked = Meter(t=float(T0)), Meter(t=float(T0))
    for m in (fast, walked):
        metering._accrue(m, inputs, base, T0, T0 + 60)
        metering._accrue(m, inputs, base, T0 + 60, T0 + 120)
    return fast, walked


def test_pieces_of_sibling_matchings_are_written_apart() -> None:
    """Two matchings derived from one, each numbering a different new run with the same
    number, charged one after the other before the runs' totals are read: each run gets its
    own hours (``_Builder`` forks the log where numberings disagree)."""
    team = budget("p", "org:p", [env("e", 64, selector={"region": "*"})])
    old, a, b = run("p", "old", 8), run("p", "a", 8), run("p", "b", 8)
    held = lease("p/old#0", old.key, 2)
    w = World([team], [old, a, b], [held])
    base = w.fill()
    inputs = w.inputs()
    fast, walked = charged_twice(inputs, base)
    t = T0 + 120
    for x in (lease("p/a#0", a.key, 2, first=2), lease("p/b#0", b.key, 4, first=2)):
        sibling = extend_fill(w.index, base, [x], inputs.runs, inputs.admitted, w.node_labels, T0)
        assert sibling is not None
        piece = FundingInputs(w.index, (held, x), inputs.runs, inputs.admitted, inputs.node_labels)
        metering._accrue(fast, piece, sibling, t, t + 60)
        metering._accrue_walk(walked, piece, sibling, 60 / 3600.0)
        t += 60
    assert len(fast._pending) == 3  # nothing read since the arrays were worked out
    for i in range(metering.PENDING_MOST):  # unread, they are written all the same
        metering._accrue(fast, inputs, base, t + i, t + i + 1)
    assert 0 < len(fast._pending) < metering.PENDING_MOST
    for _ in range(metering.PENDING_MOST):
        metering._accrue_walk(walked, inputs, base, 1 / 3600.0)
    assert meter_state(fast) == meter_state(walked)
    assert fast.run_hours[b.key][FundingClass.OWNED] == 4 * 60 / 3600.0


def test_a_line_of_derived_charges_forgets_the_runs_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Key numberings drop the keys no lease refers to any more once they are the larger
    share (``charges._compact``; from 64 keys, here from any), so a long line of admissions
    and closes does not read and write every run it ever met at every charge; the sums stay
    the walk's."""
    monkeypatch.setattr(charges_module, "COMPACT_FROM", 1)
    team = budget("p", "org:p", [env("e", 64, selector={"region": "*"})])
    runs = [run("p", f"r{i}", 8) for i in range(6)]
    leases = [lease(f"{r.key}#0", r.key, 2, first=2 * i) for i, r in enumerate(runs)]
    w = World([team], runs, leases)
    inputs = w.inputs()
    base = w.fill()
    fast, walked = charged_twice(inputs, base)
    gone = leases[1:5]
    shrunk = shrink_fill(base, gone)
    assert shrunk is not None
    left = FundingInputs(
        w.index, (leases[0], leases[5]), inputs.runs, inputs.admitted, inputs.node_labels
    )
    metering._accrue(fast, left, shrunk, T0 + 120, T0 + 180)
    metering._accrue_walk(walked, left, shrunk, 60 / 3600.0)
    assert meter_state(fast) == meter_state(walked)
    assert shrunk._charges is not None
    derived = cast("charges_module.Charges", shrunk._charges[1])
    assert list(derived.run_classes) == [
        (runs[0].key, FundingClass.OWNED),
        (runs[5].key, FundingClass.OWNED),
    ]
    assert derived.run_class_of.tolist() == [0, 1]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_next_crossing_read_by_chunks_is_the_walks(data: st.DataObject) -> None:
    """``_crossing_seconds`` finds an envelope's nearest GPU-hour crossing from its funded
    rows by chunks (``RankedRows.last_start``): exactly what the walk over every row finds."""
    world, _, hours = drawn_world(data, 8)
    f = world.fill(T0, hours)
    walked = copy.copy(f)
    walked.accepted = {k: list(rows) for k, rows in f.accepted.items()}  # the walk reads lists
    inputs = world.inputs()
    assert metering._crossing_seconds(inputs, f, hours) == metering._crossing_seconds(
        inputs, walked, hours
    )


def test_a_claim_with_no_hours_left_ahead_of_it_sets_no_crossing() -> None:
    """Two funded 4-GPU claims burning 8 GPUs against 4 hours left over a 1-hour period: the
    first crosses its threshold in half an hour; the second, with exactly no gap left, is not a
    crossing.  (A matching under these very hours would not have funded it; the function
    answers for the rows and hours it is given.)"""
    e = EnvelopeKey("p", "p", "e")
    team = budget("p", "org:p", [env("e", 8, selector={"region": "*"}, gpu_hours=10.0)])
    a, b = run("p", "a", 4), run("p", "b", 4)
    w = World([team], [a, b], [lease("A", a.key, 4), lease("B", b.key, 4, first=4)])
    f = w.fill(T0, HoursView(1.0, {e: 10.0}, {}, frozenset()))
    assert f.payer == {"A": e, "B": e}
    tight = HoursView(1.0, {e: 4.0}, {}, frozenset())
    assert metering._crossing_seconds(w.inputs(), f, tight) == 1800.0


def test_the_meters_boundaries_follow_the_leases_they_are_asked_about() -> None:
    """Where a piece may end - a lease starting or ending, a window opening or closing - is
    kept by the index for the tuple of leases last asked about, and worked out again for
    another tuple (the fold hands a new one whenever the open leases change)."""
    job = run("p", "job", 4)
    leases = (
        lease("p/job#0", job.key, 2, end=T0 + HOUR),
        lease("p/job#1", job.key, 2, first=2, start=T0 + 2 * HOUR),
    )
    windowed = budget("p", "org:p", [env("e", 4, start=T0 - HOUR, end=T0 + 3 * HOUR)])
    w = World([windowed], [job], leases)
    first = dataclasses.replace(w.inputs(), leases=leases)

    def reference(inputs: FundingInputs, after: float) -> list[float]:
        points = {x.start for x in inputs.leases} | {
            e for x in inputs.leases if (e := x.effective_end()) is not None
        }
        points |= {T0 - HOUR, T0 + 3 * HOUR}
        return sorted(p for p in points if p > after)

    for after in (T0 - 2 * HOUR, T0, T0 + HOUR, T0 + 2.5 * HOUR, T0 + 4 * HOUR):
        assert metering._boundaries(first, after) == reference(first, after)
    assert w.index.points_of[0][0] is leases  # kept for this tuple
    closed = leases[:1]  # a lease closed: the fold hands a new tuple
    fewer = dataclasses.replace(first, leases=closed)
    assert metering._boundaries(fewer, T0) == reference(fewer, T0) == [T0 + HOUR, T0 + 3 * HOUR]
    as_list = dataclasses.replace(first, leases=list(leases))  # not kept: a list can change
    assert metering._boundaries(as_list, T0) == reference(first, T0)
    assert w.index.points_of[0][0] is closed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_matching_summed_again_reads_what_it_read_first(data: st.DataObject) -> None:
    """``summarize`` keeps what it adds up from a matching alone (``_Sums``); summed again
    under other hours it gives what a matching never summed gives, in new objects each time
    (an evaluation's usage and lenders are its own)."""
    world, _, hours = drawn_world(data, 8)
    f = world.fill(T0, hours)
    inputs, meter = world.inputs(), Meter(t=float(T0))
    first = metering.summarize(meter, inputs, f, T0)
    assert f._sums is not None
    metering._accrue(meter, inputs, f, T0, T0 + 3600)
    again = metering.summarize(meter, inputs, f, T0 + 3600)
    fresh = copy.copy(f)
    fresh._sums = None
    assert again == metering.summarize(meter, inputs, fresh, T0 + 3600)
    for run_key, rf in first.runs.items():
        assert again.runs[run_key] is not rf
        assert again.runs[run_key].lenders is not rf.lenders or not rf.lenders
    assert all(again.envelopes[k] is not u for k, u in first.envelopes.items())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_matching_ahead_of_the_meter_is_the_evaluations(data: st.DataObject) -> None:
    """``matching_at`` advances a copy of only what a matching reads of the meter; its matching
    is ``evaluate``'s, given the first piece's matching or not, and the meter is left alone."""
    world, _, _ = drawn_world(data, 8)
    inputs = world.inputs()
    meter = Meter(t=float(T0))
    for _ in range(data.draw(st.integers(0, 3))):  # a meter with hours on it already
        advance_meter(meter, inputs, meter.t + data.draw(st.sampled_from([60.0, 3600.0, 9e4])))
    before = meter_state(meter)
    at = meter.t + data.draw(st.sampled_from([0.0, 1.0, 3600.0, 36000.0, 4e5]))
    first = world.fill(meter.t, meter.hours_view(inputs.index, inputs.period_hours))
    given_first = first if data.draw(st.booleans()) else None
    got = metering.matching_at(meter, inputs, at, first=given_first)
    same_fill(got, evaluate(meter, inputs, at, first=given_first).fill)
    assert meter_state(meter) == before
    light, whole = meter.copy_for_matching(), meter.copy()  # what the matching reads: the same
    advance_meter(light, inputs, at)
    advance_meter(whole, inputs, at)
    assert light.hours_view(inputs.index, 24.0) == whole.hours_view(inputs.index, 24.0)
    assert list(light.cap_hours.items()) == list(whole.cap_hours.items())
    assert list(light.envelope_hours.items()) == list(whole.envelope_hours.items())
