"""Node failure (SPEC §B.13): spare swaps, conflicts, the no-spare path, checkpoint grace.

Every test drives ``Fleet`` the way the scenario runner does; a few inject a lease straight
into the folded state to stand for a ledger written by older code (per-pod slot ordinals,
SPEC §F.2.2), which is the only way two open leases can name the same slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from builders import HOUR, MINUTE, T0, budget, env, node, run

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.ledger import LeaseClosed, LeaseMinted, RunStatusChanged, RunSubmitted
from gpu_fleet.core.model import Lease, LeaseRole, MintReason, Node, NodeHealth, Run, Runtime
from gpu_fleet.views import build_report

TEAM = budget("a", "org:a", [env("e", 16)])


def fleet(
    nodes: Sequence[Node], objects: Sequence[object], settings: Settings | None = None
) -> Fleet:
    f = Fleet(settings)
    for n in nodes:
        f.register_node(n, T0)
    for obj in objects:
        f.apply(obj, T0)  # type: ignore[arg-type]
    return f


def with_checkpoint(r: Run, checkpoint: str) -> Run:
    return msgspec.structs.replace(
        r, spec=msgspec.structs.replace(r.spec, runtime=Runtime(checkpoint=checkpoint))
    )


def leases(f: Fleet, run_key: str = "a/train") -> list[Lease]:
    return f.state.leases_of(run_key)


def by_closure(f: Fleet, reason: str | None, run_key: str = "a/train") -> list[Lease]:
    return [x for x in leases(f, run_key) if x.closure_reason == reason]


def active_width(f: Fleet, run_key: str = "a/train") -> int:
    return sum(
        x.width for x in f.state.leases_of(run_key, open_only=True) if x.role is LeaseRole.ACTIVE
    )


# Two 2-GPU nodes in one domain hold the 4-GPU group; its 2 spares spill to s1 (other domain).
GANG_NODES = [node("a1", 2), node("a2", 2), node("s1", 4, fabric="f2")]


def gang(spares: int = 2, checkpoint: str | None = None) -> Fleet:
    train = run("a", "train", 4, group_gpus=4, spares=spares)
    if checkpoint is not None:
        train = with_checkpoint(train, checkpoint)
    return fleet(GANG_NODES, [TEAM, train])


class TestSwap:
    def test_the_failed_lease_moves_onto_the_spares_exact_slots(self) -> None:
        f = gang()
        (spare,) = [x for x in leases(f) if x.role is LeaseRole.SPARE]
        (failed,) = [x for x in leases(f) if x.node == "a1"]
        f.set_node_health("a1", NodeHealth.FENCED, T0 + 5 * MINUTE)
        assert f.state.leases[failed.id].closure_reason == "NodeFailure"
        assert f.state.leases[spare.id].closure_reason == "Swap"
        (new,) = [x for x in leases(f) if x.reason is MintReason.SWAP]
        assert (new.node, new.slots, new.role, new.group) == ("s1", spare.slots, "Active", 0)
        assert (new.start, new.cohort, new.end) == (T0 + 5 * MINUTE, failed.cohort, failed.end)
        assert new.minted_payer is not None
        assert new.minted_payer.owner == "org:a"
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Running", "GangBound")
        assert "swapping to spare after node a1 failure" in st.message
        assert active_width(f) == 4

    def test_a_wider_spare_is_split_so_no_insurance_is_lost(self) -> None:
        f = gang(spares=4)
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        minted = [x for x in leases(f) if x.reason is MintReason.SWAP]
        assert [(x.role, x.width) for x in minted] == [(LeaseRole.ACTIVE, 2), (LeaseRole.SPARE, 2)]
        assert active_width(f) == 4
        assert sum(x.width for x in f.state.leases_of("a/train", open_only=True)) == 6

    def test_a_narrower_spare_does_not_pass_for_a_wider_lease(self) -> None:
        """SPEC §F.2.4: a 2-GPU spare cannot stand in for a 4-GPU member."""
        train = run("a", "train", 4, group_gpus=4, spares=2)
        f = fleet([node("a1", 4), node("s1", 2, fabric="f2")], [TEAM, train])
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        assert f.state.status["a/train"].reason == "NodeFailureNoSpare"
        assert not [x for x in leases(f) if x.reason is MintReason.SWAP]

    def test_losing_only_a_spare_leaves_the_gang_and_its_state_alone(self) -> None:
        f = gang()
        before = f.state.status["a/train"]
        f.set_node_health("s1", NodeHealth.FENCED, T0 + MINUTE)
        assert [x.closure_reason for x in leases(f) if x.role is LeaseRole.SPARE] == ["NodeFailure"]
        assert f.state.status["a/train"] == before
        assert active_width(f) == 4

    def test_a_cordon_is_not_a_failure(self) -> None:
        """SPEC §F.1.4 / DESIGN decision 7."""
        f = gang()
        before = f.state.status["a/train"]
        events = f.set_node_health("a1", NodeHealth.CORDONED, T0 + MINUTE)
        assert not [e for e in events if isinstance(e, LeaseClosed)]
        assert f.state.status["a/train"] == before
        assert f.state.nodes["a1"].health is NodeHealth.CORDONED

    def test_fencing_a_fenced_node_again_does_nothing(self) -> None:
        f = gang()
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        events = f.set_node_health("a1", NodeHealth.FENCED, T0 + 2 * MINUTE)
        assert not [e for e in events if isinstance(e, (LeaseClosed, LeaseMinted))]

    def test_the_report_records_the_swap(self) -> None:
        f = gang()
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        report = build_report(f.state, "x", T0 + 2 * MINUTE)
        (swap,) = [e for e in report["events"] if e["type"] == "NodeFailureSwap"]
        assert swap["run"] == "a/train"
        assert swap["detail"]["node"] == "s1"


class TestSlotConflicts:
    """SPEC §F.1.3: only the spare's exact slots matter, and only Unfunded holders leave."""

    @staticmethod
    def _squat(f: Fleet, namespace: str) -> Lease:
        """Put another run on the spare's first slot, as a per-pod-ordinal ledger would."""
        squatter = run(namespace, "squatter", 1)
        f.commit(
            [
                RunSubmitted(at=T0 + MINUTE, run=squatter),
                RunStatusChanged(
                    at=T0 + MINUTE, run=squatter.key, phase="Running", reason="GangBound"
                ),
            ]
        )
        (spare,) = [x for x in leases(f) if x.role is LeaseRole.SPARE]
        legacy = Lease(
            id="legacy",
            run=squatter.key,
            node="s1",
            slots=(spare.slots[0],),
            role=LeaseRole.ACTIVE,
            group=0,
            start=T0 + MINUTE,
        )
        f.state.leases[legacy.id] = legacy
        f.state.open_leases[legacy.id] = legacy
        f.state.slot_holder[spare.slots[0]] = legacy.id
        f.state.rebuild_indexes()  # the per-run index, as a fold would have kept it
        return legacy

    def test_an_unfunded_squatter_is_reclaimed_and_the_swap_proceeds(self) -> None:
        f = gang()
        legacy = self._squat(f, "nobody")  # no Budget in "nobody": its work is Unfunded
        f.set_node_health("a1", NodeHealth.FENCED, T0 + 5 * MINUTE)
        assert f.state.leases[legacy.id].closure_reason == "ReclaimedBySpare"
        reasons = [
            e.reason
            for e in f.state.history
            if isinstance(e, RunStatusChanged) and e.run == "nobody/squatter"
        ]
        assert reasons[-2:] == ["Reclaimed", "Unfunded"]  # then it waits for a funding principal
        assert [x.reason for x in f.state.leases_of("a/train", open_only=True)] == [
            MintReason.START,
            MintReason.SWAP,
        ]

    def test_a_funded_holder_declines_the_swap(self) -> None:
        other = budget("o", "org:o", [env("e", 4)])
        f = gang(checkpoint="10m")
        f.apply(other, T0)
        legacy = self._squat(f, "o")
        f.set_node_health("a1", NodeHealth.FENCED, T0 + 5 * MINUTE)
        assert f.state.leases[legacy.id].closure_reason is None
        assert [x.closure_reason for x in leases(f) if x.role is LeaseRole.SPARE] == [
            "SwapDeclined"
        ]
        assert f.state.status["a/train"].reason == "CheckpointGrace"


class TestNoSpare:
    def test_without_spare_or_checkpoint_the_run_fails_and_holds_nothing(self) -> None:
        f = fleet(GANG_NODES, [TEAM, run("a", "train", 4, group_gpus=2, cross_spread=False)])
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Failed", "NodeFailureNoSpare")
        assert sorted(x.closure_reason or "" for x in leases(f)) == ["NodeFailure", "RunFailed"]

    def _two_groups_one_spare(self, drop_group: int, checkpoint: str | None = None) -> Fleet:
        """Two 2-GPU groups on a1, 2 spares each on s1; the spares of ``drop_group`` are gone."""
        train = run("a", "train", 4, group_gpus=2, spares=2)
        if checkpoint is not None:
            train = with_checkpoint(train, checkpoint)
        f = fleet([node("a1", 4), node("s1", 4, fabric="f2")], [TEAM, train])
        (gone,) = [x for x in leases(f) if x.role is LeaseRole.SPARE and x.group == drop_group]
        f.commit([LeaseClosed(at=T0 + MINUTE, lease=gone.id, reason="WorkloadEvicted")])
        return f

    def test_verdicts_fold_worst_wins_whatever_the_order(self) -> None:
        """SPEC §F.1.7: one group could swap, the other cannot - the run fails either way,
        and nothing is swapped or burnt for a run that stops."""
        outcomes = []
        for drop in (0, 1):
            f = self._two_groups_one_spare(drop)
            f.set_node_health("a1", NodeHealth.FENCED, T0 + 2 * MINUTE)
            st = f.state.status["a/train"]
            outcomes.append((st.phase, st.reason))
            assert not [x for x in leases(f) if x.reason is MintReason.SWAP]
            assert not f.state.leases_of("a/train", open_only=True)
            assert "Swap" not in {x.closure_reason for x in leases(f)}
        assert outcomes == [("Failed", "NodeFailureNoSpare")] * 2

    def test_with_checkpoint_the_covered_group_swaps_and_the_other_is_topped_up(self) -> None:
        f = self._two_groups_one_spare(1, checkpoint="10m")
        f.set_node_health("a1", NodeHealth.FENCED, T0 + 2 * MINUTE)
        grace = [
            e
            for e in f.state.history
            if isinstance(e, RunStatusChanged) and e.reason == "CheckpointGrace"
        ]
        assert [e.detail["lostGroups"] for e in grace] == [{"1": 2}]
        # The dropped spare's slots are free again, so the lost group is re-placed at once.
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Running", "GangBound")
        assert [(x.group, x.reason) for x in f.state.leases_of("a/train", open_only=True)] == [
            (0, MintReason.SWAP),
            (1, MintReason.START),
        ]


class TestCheckpointGrace:
    def _grace(self) -> Fleet:
        train = with_checkpoint(run("a", "train", 4, group_gpus=2), "10m")
        return fleet([node("a1", 2), node("a2", 2, fabric="f2")], [TEAM, train])

    def test_an_uncovered_failure_holds_the_survivors_until_the_deadline(self) -> None:
        f = self._grace()
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Pending", "CheckpointGrace")
        assert st.detail["checkpointDeadline"] == T0 + 11 * MINUTE
        assert active_width(f) == 2
        assert f.next_due(T0 + MINUTE) == T0 + 11 * MINUTE
        f.advance_to(T0 + 11 * MINUTE - 1)
        assert f.state.status["a/train"].reason == "CheckpointGrace"
        f.advance_to(T0 + 11 * MINUTE)
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Failed", "CheckpointExpired")
        assert [x.closure_reason for x in leases(f)] == ["NodeFailure", "RunFailed"]

    def test_capacity_that_returns_tops_up_only_the_lost_group(self) -> None:
        f = self._grace()
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        f.register_node(node("a3", 2), T0 + 3 * MINUTE)
        f.reconcile(T0 + 3 * MINUTE)
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Running", "GangBound")
        assert "checkpointDeadline" not in st.detail
        topped = [x for x in f.state.leases_of("a/train", open_only=True) if x.node == "a3"]
        assert [(x.group, x.width, x.reason) for x in topped] == [(0, 2, MintReason.START)]
        assert active_width(f) == 4
        f.advance_to(T0 + HOUR)
        assert f.state.status["a/train"].phase == "Running"

    def test_a_resolver_cut_during_grace_keeps_the_rest_until_the_deadline(self) -> None:
        """SPEC §F.1.13: the run is not released early because the resolver cut it."""
        train = with_checkpoint(run("a", "train", 6, group_gpus=2), "3h")
        other = budget("b", "org:b", [env("e", 8)])
        f = fleet([node("a1", 2), node("a2", 2), node("a3", 2)], [TEAM, other, train])
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)
        f.apply(run("b", "waiter", 2), T0 + 2 * MINUTE)
        f.advance_to(T0 + 2 * HOUR)
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Pending", "CheckpointGrace")
        assert next(x.closure_reason for x in leases(f)) == "NodeFailure"
        assert (
            sum(1 for x in leases(f) if (x.closure_reason or "").startswith("RandomPreempt")) == 1
        )
        assert active_width(f) == 2
        assert f.state.status["b/waiter"].phase == "Running"
        cut_group = next(
            x.group for x in leases(f) if (x.closure_reason or "").startswith("RandomPreempt")
        )
        assert st.detail["lostGroups"] == {"0": 2, str(cut_group): 2}

    def test_spares_never_count_as_width_when_the_gang_reassembles(self) -> None:
        """SPEC §F.1.2: a run left holding only a spare is not runnable; it re-assembles its
        lost group and keeps the spare beside it."""
        train = with_checkpoint(run("a", "train", 2, group_gpus=2, spares=1), "10m")
        f = fleet([node("a1", 2), node("s1", 1, fabric="f2")], [TEAM, train])
        f.set_node_health("a1", NodeHealth.FENCED, T0 + MINUTE)  # 1-GPU spare cannot cover 2
        st = f.state.status["a/train"]
        assert (st.phase, st.reason) == ("Pending", "CheckpointGrace")
        assert active_width(f) == 0
        assert [x.role for x in f.state.leases_of("a/train", open_only=True)] == [LeaseRole.SPARE]
        f.reconcile(T0 + 2 * MINUTE)
        assert f.state.status["a/train"].reason == "CheckpointGrace"  # nothing to place yet
        f.register_node(node("a2", 2), T0 + 3 * MINUTE)
        f.reconcile(T0 + 3 * MINUTE)
        assert f.state.status["a/train"].reason == "GangBound"
        held = f.state.leases_of("a/train", open_only=True)
        assert sorted((x.role, x.node, x.group) for x in held) == [
            (LeaseRole.ACTIVE, "a2", 0),
            (LeaseRole.SPARE, "s1", 0),
        ]
