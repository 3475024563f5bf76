"""The resolver: phase order, the SPEC §F traps it must avoid, and how activation applies it.

The first half drives ``resolve`` directly on hand-built leases (what gets cut, in what order);
the second drives ``Fleet`` through reservation activation and admission (who is cut when,
with what notice, and who is never cut).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

import msgspec
import pytest
from builders import HOUR, MINUTE, T0, budget, env, lease, node, run

from gpu_fleet.core.engine import UNFUNDED_DEMAND, Fleet, Settings, activate_reservation
from gpu_fleet.core.engine.resolver import (
    CutKind,
    Resolution,
    attested_seed,
    resolve,
    unbound_bucket,
)
from gpu_fleet.core.ledger import (
    EVENT_DECODER,
    EVENT_ENCODER,
    LeaseClosed,
    LeasePreemptionScheduled,
    Reservation,
    check_invariants,
    fold_all,
)
from gpu_fleet.core.model import FundingClass, Lease, LeaseRole, Node, NodeHealth, Run, Runtime
from gpu_fleet.views import build_report

H100 = "H100"
NODES: dict[str, Node] = {
    n.name: n for n in (node("n1", 16), node("n2", 16), node("x1", 16, fabric="f2"))
}
OWNERS = {"a": "org:a", "b": "org:b", "m": "org:m", "u": "org:u"}


def owner_of(namespace: str) -> str:
    return OWNERS.get(namespace, "")


def cut(
    leases: Sequence[Lease],
    runs: Sequence[Run],
    *,
    deficit: int,
    classes: Mapping[str, FundingClass] | None = None,
    scope: Mapping[str, str] | None = None,
    source: str = "res-1",
    now: int = T0,
    nodes: Mapping[str, Node] | None = None,
    **extra: object,
) -> Resolution:
    return resolve(
        deficit=deficit,
        flavor=H100,
        scope=scope or {},
        seed_source=source,
        now=now,
        nodes=nodes or NODES,
        leases=leases,
        runs={r.key: r for r in runs},
        owner_of=owner_of,
        classes=classes,
        **extra,  # type: ignore[arg-type]
    )


def kinds(resolution: Resolution) -> list[tuple[CutKind, str]]:
    return [(c.kind, c.lease) for c in resolution.cuts]


# ------------------------------------------------------------------------------------------
# A small world: one unfunded run, one with a spare, one elastic run, one fixed run
# ------------------------------------------------------------------------------------------

U = run("u", "opportunist", 1)
S = run("a", "steady", 2, spares=1)
M = run("m", "elastic", 4, group_gpus=1, malleable=(2, 4, 1))
F = run("b", "fixed", 2)
WORLD_RUNS = [U, S, M, F]
WORLD = [
    lease("u0", U.key, 1, node_name="n1", first=0),
    lease("s0", S.key, 2, node_name="n1", first=1),
    lease("s-spare", S.key, 1, node_name="n1", first=3, role=LeaseRole.SPARE),
    *(lease(f"m{g}", M.key, 1, node_name="n1", first=4 + g, group=g) for g in range(4)),
    lease("f0", F.key, 2, node_name="n2", first=0),
]
CLASSES = {x.id: FundingClass.OWNED for x in WORLD} | {"u0": FundingClass.UNFUNDED}


class TestPhaseOrder:
    """Reclaim Unfunded, then drop spares, then shrink malleable runs, then the lottery;
    every phase stops as soon as the deficit is cleared (SPEC §B.11)."""

    def test_unfunded_work_goes_first(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=1, classes=CLASSES)
        assert kinds(r) == [(CutKind.RECLAIM_UNFUNDED, "u0")]
        assert r.cuts[0].reason == f"ReclaimUnfunded({r.seed})"

    def test_then_spares(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=2, classes=CLASSES)
        assert kinds(r) == [(CutKind.RECLAIM_UNFUNDED, "u0"), (CutKind.DROP_SPARE, "s-spare")]

    def test_then_elastic_runs_shrink_to_their_minimum(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=4, classes=CLASSES)
        assert kinds(r)[2:] == [(CutKind.SHRINK, "m3"), (CutKind.SHRINK, "m2")]
        assert r.freed == 4
        assert not r.error

    def test_then_the_lottery_over_whole_groups(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=5, classes=CLASSES)
        assert [k for k, _ in kinds(r)][:4] == [
            CutKind.RECLAIM_UNFUNDED,
            CutKind.DROP_SPARE,
            CutKind.SHRINK,
            CutKind.SHRINK,
        ]
        lottery = [c for c in r.cuts if c.kind is CutKind.LOTTERY]
        # The elastic run is at its minimum, so only a fixed gang can be drawn - whole.
        assert {c.run for c in lottery} < {S.key, F.key}
        assert len({c.run for c in lottery}) == 1
        assert all(c.reason == f"RandomPreempt({r.seed})" for c in lottery)

    def test_without_an_evaluation_nothing_is_reclaimed(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=1, classes=None)
        assert kinds(r) == [(CutKind.DROP_SPARE, "s-spare")]

    def test_only_unfunded_stops_after_phase_zero(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=3, classes=CLASSES, only_unfunded=True)
        assert kinds(r) == [(CutKind.RECLAIM_UNFUNDED, "u0")]
        assert not r.error

    def test_a_group_is_a_reclaim_token_only_if_all_its_actives_are_unfunded(self) -> None:
        classes = dict(CLASSES) | {"s-spare": FundingClass.UNFUNDED, "f0": FundingClass.UNFUNDED}
        r = cut(WORLD, WORLD_RUNS, deficit=10, classes=classes, only_unfunded=True)
        # steady's group has a funded active (its unfunded spare alone is not a token).
        assert {c.lease for c in r.cuts} == {"u0", "f0"}


class TestTraps:
    def test_dropped_spare_is_counted_once_and_the_minimum_counts_actives_only(self) -> None:
        """SPEC §F.2.1: a spare dropped in phase 1 does not count again in its group, and the
        minimum-width guard does not count spare GPUs as width."""
        m = run("m", "elastic", 6, group_gpus=4, malleable=(5, 6, 1))
        f = run("b", "fixed", 1)
        leases = [
            lease("g0", m.key, 4, node_name="n1", first=0, group=0),
            lease("g0-spare", m.key, 2, node_name="n1", first=4, group=0, role=LeaseRole.SPARE),
            lease("g1", m.key, 2, node_name="n1", first=6, group=1),
            lease("f0", f.key, 1, node_name="n2", first=0),
        ]
        r = cut(leases, [m, f], deficit=3)
        # Cutting g1 would leave 4 active GPUs < min 5 (the reference counted the spare and
        # cut it); the lottery takes the fixed run instead.
        assert kinds(r) == [(CutKind.DROP_SPARE, "g0-spare"), (CutKind.LOTTERY, "f0")]
        assert r.freed == 3
        assert len({c.lease for c in r.cuts}) == len(r.cuts)

    def test_drop_spare_touches_nothing_else(self) -> None:
        """SPEC §F.2.3: dropping a spare does not cut the active members of its group."""
        r = cut(WORLD, WORLD_RUNS, deficit=1)
        assert [c.lease for c in r.cuts] == ["s-spare"]
        assert all(c.kind is CutKind.DROP_SPARE for c in r.cuts)

    def test_groups_shrink_in_numeric_order(self) -> None:
        """SPEC §F.1.6: group 11 and 10 go before 9 (a lexical order would start at 9)."""
        wide = run("m", "wide", 12, group_gpus=1, malleable=(9, 12, 1))
        leases = [
            lease(f"w{g:02d}", wide.key, 1, node_name="n1", first=g, group=g) for g in range(12)
        ]
        r = cut(leases, [wide], deficit=3)
        assert [c.group for c in r.cuts] == [11, 10, 9]
        assert {c.kind for c in r.cuts} == {CutKind.SHRINK}

    @pytest.mark.parametrize("seed", range(6))
    def test_order_of_the_input_does_not_matter(self, seed: int) -> None:
        """SPEC §F.1.7: sorted walks everywhere, so a shuffled ledger picks the same victims."""
        shuffled = list(WORLD)
        random.Random(seed).shuffle(shuffled)
        runs = list(WORLD_RUNS)
        random.Random(seed + 100).shuffle(runs)
        assert cut(shuffled, runs, deficit=6, classes=CLASSES) == cut(
            WORLD, WORLD_RUNS, deficit=6, classes=CLASSES
        )

    def test_unbound_namespaces_do_not_share_a_lottery_bucket(self) -> None:
        """SPEC §F.1.14: each unbound namespace is its own bucket, never a real owner."""
        assert unbound_bucket("x") != unbound_bucket("y")
        assert unbound_bucket("") == unbound_bucket("default")
        assert not unbound_bucket("x").startswith("org")
        runs = [run("x", "one", 1), run("y", "two", 1), run("a", "three", 1)]
        leases = [lease(f"l{i}", r.key, 1, node_name="n1", first=i) for i, r in enumerate(runs)]
        hits = {r.key: 0 for r in runs}
        for t in range(300):
            hits[cut(leases, runs, deficit=1, now=T0 + t).cuts[0].run] += 1
        # Three buckets of one token each: every run is drawn about a third of the time.  Had
        # the two unbound namespaces pooled, the owned run would be drawn half of the time.
        assert all(70 <= n <= 130 for n in hits.values()), hits


class TestLottery:
    def test_seed_is_attested(self) -> None:
        digest = hashlib.sha256(f"res-1|{T0 * 1_000_000_000}".encode()).digest()[:8]
        text, value = attested_seed("res-1", T0)
        assert text == "0x" + digest.hex()
        assert len(text) == 18
        assert value == int.from_bytes(digest, "big", signed=True)
        assert cut(WORLD, WORLD_RUNS, deficit=1).seed == text

    def test_same_inputs_draw_the_same_victims(self) -> None:
        a = cut(WORLD, WORLD_RUNS, deficit=6, classes=CLASSES)
        b = cut(WORLD, WORLD_RUNS, deficit=6, classes=CLASSES)
        assert a == b

    def test_an_owner_is_drawn_first_then_one_of_its_groups(self) -> None:
        """Two-stage draw: an owner with nine groups is not nine times likelier than one with
        a single group."""
        lone = run("a", "lone", 1)
        many = run("b", "many", 9, group_gpus=1)
        leases = [lease("a0", lone.key, 1, node_name="n1")]
        leases += [lease(f"b{g}", many.key, 1, node_name="n2", first=g, group=g) for g in range(9)]
        drawn = sum(
            cut(leases, [lone, many], deficit=1, now=T0 + t).cuts[0].run == lone.key
            for t in range(200)
        )
        assert 70 <= drawn <= 130

    def test_no_ticket_is_an_error_and_cuts_nobody(self) -> None:
        r = cut([], [], deficit=2)
        assert r.error == "no candidates available for lottery"
        assert r.cuts == ()

    def test_an_exhausted_lottery_discards_the_whole_result(self) -> None:
        r = cut(WORLD, WORLD_RUNS, deficit=50, classes=CLASSES)
        assert r.error == "lottery exhausted before clearing deficit"
        assert r.cuts == ()


class TestCandidates:
    def test_scope_keeps_out_leases_of_other_domains(self) -> None:
        x = run("b", "far", 2)
        leases = [lease("x0", x.key, 2, node_name="x1")]
        assert cut(leases, [x], deficit=2, scope={"fabric.domain": "f1"}).error
        assert cut(leases, [x], deficit=2, scope={"fabric.domain": "f2"}).freed == 2

    def test_leases_on_unready_nodes_free_nothing_and_are_not_cut(self) -> None:
        nodes = dict(NODES)
        nodes["n2"] = msgspec.structs.replace(nodes["n2"], health=NodeHealth.CORDONED)
        r = cut(WORLD, WORLD_RUNS, deficit=5, classes=CLASSES, nodes=nodes)
        assert "f0" not in {c.lease for c in r.cuts}

    def test_the_beneficiary_and_noticed_leases_are_not_candidates(self) -> None:
        r = cut(
            WORLD,
            WORLD_RUNS,
            deficit=1,
            classes=CLASSES,
            exclude_runs={U.key},
            exclude_leases={"s-spare"},
        )
        assert kinds(r) == [(CutKind.SHRINK, "m3")]


# ------------------------------------------------------------------------------------------
# Through the Fleet: reservation activation and admission
# ------------------------------------------------------------------------------------------


def fleet(
    nodes: Sequence[Node], objects: Sequence[object], settings: Settings | None = None
) -> Fleet:
    f = Fleet(settings)
    for n in nodes:
        f.register_node(n, T0)
    for obj in objects:
        f.apply(obj, T0)  # type: ignore[arg-type]
    return f


def closures(f: Fleet, run_key: str) -> list[str | None]:
    return [x.closure_reason for x in f.state.leases_of(run_key)]


def phase(f: Fleet, run_key: str) -> str:
    return f.state.status[run_key].phase


def open_width(f: Fleet, run_key: str) -> int:
    return sum(x.width for x in f.state.leases_of(run_key, open_only=True))


TEAM = budget("a", "org:a", [env("e", 16)])
VICTIM = budget("b", "org:b", [env("e", 16)])


def waiter_behind_holder(
    *, holder: Run | None = None, settings: Settings | None = None
) -> tuple[Fleet, Reservation]:
    """``a/waiter`` (4 GPUs) reserved behind ``b/holder`` on one 4-GPU node."""
    f = fleet([node("n1", 4)], [TEAM, VICTIM, holder or run("b", "holder", 4)], settings)
    f.apply(run("a", "waiter", 4), T0 + MINUTE)
    res = f.state.pending_reservation("a/waiter")
    assert res is not None
    return f, res


class TestActivation:
    def test_a_due_reservation_cuts_and_starts_at_the_same_instant(self) -> None:
        holder = run("b", "holder", 4)
        f, res = waiter_behind_holder(holder=holder)
        assert res.deficit_gpus == 4
        f.advance_to(res.earliest_start)
        assert f.state.status["a/waiter"].phase == "Running"
        assert f.state.status["b/holder"].reason == "EndedByResolver"
        (victim,) = f.state.leases_of("b/holder")
        assert victim.closure_reason is not None
        assert victim.closure_reason.startswith("RandomPreempt(0x")
        notice = f.state.preemptions[victim.id]
        assert notice.seed == attested_seed(res.name, res.earliest_start)[0]
        assert notice.conflict_set == (victim.id,)
        assert notice.beneficiary == "a/waiter"
        assert notice.source == res.name
        assert f.state.reservations[res.name].state == "Released"

    def test_reservations_due_together_in_one_slice_share_the_room_made_for_them(self) -> None:
        """Two reservations protecting the same node fall due at one instant: the first in
        activation order is not kept out of the freed room by the second's protection, and
        the second then starts in what is left (it used to re-reserve both, cutting for no one).
        """
        f = fleet([node("n1", 8)], [TEAM, VICTIM, run("b", "holder", 8)])
        f.apply(run("a", "w1", 1), T0 + MINUTE)
        f.apply(run("a", "w2", 1), T0 + MINUTE)
        first = f.state.pending_reservation("a/w1")
        second = f.state.pending_reservation("a/w2")
        assert first is not None
        assert second is not None
        assert (first.earliest_start, first.nodes) == (second.earliest_start, second.nodes)
        f.advance_to(first.earliest_start)
        assert f.state.status["a/w1"].phase == "Running"
        assert f.state.status["a/w2"].phase == "Running"
        assert f.state.reservations[first.name].reason == "Activated"
        assert f.state.reservations[second.name].reason == "Activated"
        assert f.state.status["b/holder"].reason == "EndedByResolver"

    def test_a_later_reservation_still_protects_its_slice_from_one_not_yet_due(self) -> None:
        """The exception is for a run whose own reservation is due: before that, the slice of
        a reservation it would come before in activation order stays closed to it."""
        f = fleet([node("n1", 8)], [TEAM, VICTIM, run("b", "holder", 6)])
        f.apply(run("a", "big", 8), T0 + MINUTE)  # deficit 6: bound 15 min + 3 min
        f.apply(run("a", "small", 2), T0 + 2 * MINUTE)  # deficit 2: bound 16 min, earlier
        big = f.state.pending_reservation("a/big")
        small = f.state.pending_reservation("a/small")
        assert big is not None
        assert small is not None
        assert small.earliest_start < big.earliest_start
        f.reconcile(T0 + 3 * MINUTE)
        assert f.state.status["a/small"].phase == "Pending"  # 2 free GPUs, both big's

    def test_the_report_shows_the_preemption_with_seed_and_conflict_set(self) -> None:
        f = fleet([node("n1", 4)], [TEAM, VICTIM, run("b", "holder", 4)])
        f.apply(run("a", "waiter", 4), T0 + MINUTE)
        f.advance_to(T0 + 2 * HOUR)
        report = build_report(f.state, "final", T0 + 2 * HOUR)
        (event,) = [e for e in report["events"] if e["type"] == "Preempted"]
        assert event["run"] == "b/holder"
        assert event["detail"]["closureReason"] == f"RandomPreempt({event['detail']['seed']})"
        assert event["detail"]["conflictSet"] == [x.id for x in f.state.leases_of("b/holder")]

    def test_drop_spare_leaves_the_gang_and_its_state_alone(self) -> None:
        """SPEC §F.2.3 through the engine: the holder keeps its actives and its state."""
        f = fleet([node("n1", 4)], [TEAM, VICTIM, run("b", "holder", 2, spares=2)])
        f.apply(run("a", "waiter", 2), T0 + MINUTE)
        f.advance_to(T0 + 2 * HOUR)
        assert closures(f, "b/holder") == [None, "DropSpare"]
        st = f.state.status["b/holder"]
        assert (st.phase, st.reason) == ("Running", "GangBound")
        assert "spare" in st.message
        assert f.state.status["a/waiter"].phase == "Running"

    def test_budget_only_wait_starts_unfunded_and_cuts_nobody(self) -> None:
        """SPEC §F.1.10: a budget shortfall never preempts funded work."""
        small = budget("a", "org:a", [env("e", 2)])
        f = fleet([node("n1", 16)], [small, VICTIM, run("b", "holder", 8)])
        f.apply(run("a", "waiter", 6), T0 + MINUTE)
        res = f.state.pending_reservation("a/waiter")
        assert res is not None
        assert res.kind == "budget"
        f.advance_to(T0 + 2 * HOUR)
        assert f.state.status["a/waiter"].phase == "Running"
        assert closures(f, "b/holder") == [None]
        assert not f.state.preemptions

    def test_unfundable_physical_deficit_cuts_nobody(self) -> None:
        """SPEC §F.1.10: a physical deficit only cuts for demand that could be funded."""
        small = budget("a", "org:a", [env("e", 2)])
        f = fleet([node("n1", 8)], [small, VICTIM, run("b", "holder", 8)])
        f.apply(run("a", "waiter", 4), T0 + MINUTE)
        f.advance_to(T0 + 2 * HOUR)
        assert closures(f, "b/holder") == [None]
        assert not f.state.preemptions
        res = f.state.pending_reservation("a/waiter")
        assert res is not None
        assert res.reason == UNFUNDED_DEMAND

    def test_a_stale_reservation_never_resurrects_a_failed_run(self) -> None:
        """SPEC §F.1.11."""
        f, res = waiter_behind_holder()
        f.fail("a/waiter", T0 + 2 * MINUTE)
        stale: Reservation = msgspec.structs.replace(res, state="Pending")
        act = activate_reservation(f.state, stale, T0 + HOUR, f.planner, f.settings)
        assert [type(e).__name__ for e in act.events] == ["ReservationReleased"]
        assert open_width(f, "b/holder") == 4

    def test_a_deleted_beneficiary_cancels_its_pending_notices(self) -> None:
        f, res = waiter_behind_holder(settings=Settings(preemption_grace=10 * MINUTE))
        f.advance_to(res.earliest_start)
        assert f.state.pending_preemptions()
        f.delete("Run", "a", "waiter", res.earliest_start + MINUTE)
        assert not f.state.pending_preemptions()
        f.advance_to(T0 + 3 * HOUR)
        assert closures(f, "b/holder") == [None]
        assert f.state.status["b/holder"].phase == "Running"


class TestPreemptionNotice:
    """DESIGN decision 3: a cut is announced first and takes effect at its deadline."""

    def test_the_cut_waits_for_the_grace_and_the_run_starts_then(self) -> None:
        f, res = waiter_behind_holder(settings=Settings(preemption_grace=5 * MINUTE))
        due = res.earliest_start
        f.advance_to(due)
        (notice,) = f.state.pending_preemptions()
        assert notice.deadline == due + 5 * MINUTE
        assert open_width(f, "b/holder") == 4
        assert phase(f, "a/waiter") == "Pending"
        assert "preemption notice" in f.state.status["b/holder"].message
        assert f.next_due(due) == due + 5 * MINUTE
        f.advance_to(due + 5 * MINUTE - 1)
        assert open_width(f, "b/holder") == 4  # nobody re-cuts while the notice runs
        assert len(f.state.preemptions) == 1
        f.advance_to(due + 5 * MINUTE)
        assert open_width(f, "b/holder") == 0
        assert phase(f, "a/waiter") == "Running"
        closed = [e for e in f.state.history if isinstance(e, LeaseClosed)]
        assert closed[-1].at == due + 5 * MINUTE

    def test_a_runs_own_grace_is_capped_by_the_cluster(self) -> None:
        holder = run("b", "holder", 4)
        holder = msgspec.structs.replace(
            holder,
            spec=msgspec.structs.replace(holder.spec, runtime=Runtime(preemption_grace="3h")),
        )
        f, res = waiter_behind_holder(
            holder=holder, settings=Settings(preemption_grace=0, preemption_grace_max=HOUR)
        )
        f.advance_to(res.earliest_start)
        notices = [e for e in f.state.history if isinstance(e, LeasePreemptionScheduled)]
        assert [n.deadline - n.at for n in notices] == [HOUR]


class TestReclaimForAdmission:
    """SPEC §B.8 step 13: admission reclaims Unfunded work once, only if the run then fits."""

    @staticmethod
    def _world(waiter_width: int) -> Fleet:
        closing = budget("u", "org:u", [env("e", 4, end=T0 + 30 * MINUTE)])
        f = fleet([node("n1", 4)], [TEAM, closing, run("u", "squatter", 2)])
        f.advance_to(T0 + 45 * MINUTE)  # the squatter's window closed: it runs Unfunded
        f.apply(run("a", "waiter", waiter_width), T0 + 45 * MINUTE)
        return f

    def test_reclaims_when_that_makes_the_run_fit(self) -> None:
        f = self._world(4)
        assert f.state.status["a/waiter"].phase == "Running"
        (closed,) = closures(f, "u/squatter")
        assert closed is not None
        assert closed.startswith("ReclaimUnfunded(0x")
        assert f.state.status["u/squatter"].reason == "Reclaimed"

    def test_cuts_nobody_when_the_run_would_still_not_fit(self) -> None:
        f = self._world(5)  # 2 free + 2 reclaimable < 5
        assert f.state.status["a/waiter"].reason == "Reserved"
        assert closures(f, "u/squatter") == [None]
        assert not f.state.preemptions


class TestReplay:
    @pytest.mark.parametrize("withdraw", [False, True])
    def test_the_ledger_replays_notices_cancellations_and_cuts(self, withdraw: bool) -> None:
        """New event types survive the wire and fold to the same state (DESIGN: the ledger is
        the system of record; a replay reproduces every decision)."""
        f, res = waiter_behind_holder(settings=Settings(preemption_grace=5 * MINUTE))
        f.advance_to(res.earliest_start)
        if withdraw:
            f.delete("Run", "a", "waiter", res.earliest_start + MINUTE)
        f.advance_to(T0 + 3 * HOUR)
        seen = {type(e).__name__ for e in f.state.history}
        assert "LeasePreemptionScheduled" in seen
        assert ("LeasePreemptionCanceled" in seen) is withdraw
        wire = [EVENT_ENCODER.encode(e) for e in f.state.history]
        replayed = fold_all([EVENT_DECODER.decode(b) for b in wire], f.settings.period_hours)
        assert replayed.leases == f.state.leases
        assert replayed.preemptions == f.state.preemptions
        assert replayed.status == f.state.status
        assert not check_invariants(replayed)
