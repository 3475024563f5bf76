"""Run Events derived from ledger events (pure): names, reasons, notes and MicroTime.

The end-to-end path (a bridge creating them, a replay creating none twice) is in
``test_bridge_memory.py``; here every mapping is checked on a hand-built state.
"""

from __future__ import annotations

import re

import msgspec

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.ledger.events import (
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    Reservation,
    ReservationCreated,
    RunStatusChanged,
)
from gpu_fleet.core.model import Lease, LeaseRole, MintReason, Run
from gpu_fleet.kube.events import EventLog, bound_event, derive, micro_time
from gpu_fleet.kube.mirrors import lease_object_name, sanitised_reason

T = 1_767_225_600  # 2026-01-01T00:00:00Z


def _state(uid: str = "u-1") -> FleetState:
    state = FleetState()
    annotations = {"rq.davidlangworthy.io/uid": uid} if uid else {}
    state.runs["rai/train"] = msgspec.convert(
        {
            "kind": "Run",
            "metadata": {"name": "train", "namespace": "rai", "annotations": annotations},
            "spec": {"resources": {"gpuType": "H100", "totalGPUs": 8}},
        },
        Run,
    )
    return state


def _lease(i: int, reason: MintReason = MintReason.START) -> Lease:
    return Lease(
        id=f"rai/train@{T}#{i:03d}",
        run="rai/train",
        node=f"n{i}",
        slots=tuple(f"n{i}#{k}" for k in range(4)),
        role=LeaseRole.ACTIVE,
        group=0,
        reason=reason,
        start=T,
    )


def test_micro_time_has_exactly_six_fractional_digits() -> None:
    assert micro_time(T) == "2026-01-01T00:00:00.000000Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", micro_time(T + 61))


def test_admitted_once_per_transition_to_running_named_by_sequence() -> None:
    state = _state()
    state.leases[_lease(0).id] = _lease(0)
    phases: dict[str, str] = {}
    ev = RunStatusChanged(at=T, run="rai/train", phase="Running", reason="GangBound")
    (admitted,) = derive(0x2A, ev, state, phases)
    assert admitted.name == "train.2a.admitted"
    assert (admitted.reason, admitted.type, admitted.run_uid) == ("Admitted", "Normal", "u-1")
    body = admitted.body("bridge-0")
    assert body["eventTime"] == "2026-01-01T00:00:00.000000Z"
    assert body["regarding"] == {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "name": "train",
        "namespace": "rai",
        "uid": "u-1",
    }
    assert body["reportingController"] == "rq.davidlangworthy.io/gpu-fleet"
    assert body["reportingInstance"] == "bridge-0"
    phases["rai/train"] = "Running"
    assert derive(0x2B, ev, state, phases) == []  # a commentary update is no new admission


def test_runs_not_from_kubernetes_get_no_events() -> None:
    ev = RunStatusChanged(at=T, run="rai/train", phase="Running", reason="GangBound")
    assert derive(1, ev, _state(uid=""), {}) == []


def test_reserved_preemption_notice_preempted_swapped_expired() -> None:
    state = _state()
    lease = _lease(1)
    state.leases[lease.id] = lease
    res = Reservation(
        name="train-res-1",
        run="rai/train",
        kind="capacity",
        domain="r/c/A",
        earliest_start=T + 3600,
        deficit_gpus=4,
        created_at=T,
    )
    (reserved,) = derive(5, ReservationCreated(at=T, reservation=res), state, {})
    assert reserved.name == "train.5.reserved"
    assert "earliest start 2026-01-01T01:00:00Z" in reserved.note
    assert "deficit 4 GPUs" in reserved.note
    notice = LeasePreemptionScheduled(
        at=T,
        lease=lease.id,
        run="rai/train",
        deadline=T + 300,
        reason="RandomPreempt(0x00000000000000ff)",
        kind="Lottery",
        seed="0xabc",
        conflict_set=(lease.id, "rai/other@1#000"),
    )
    (noticed,) = derive(6, notice, state, {})
    assert (noticed.reason, noticed.type, noticed.name) == (
        "PreemptionNotice",
        "Warning",
        "train.6.preemptionnotice",
    )
    assert "2026-01-01T00:05:00Z" in noticed.note  # the deadline
    assert "seed 0xabc" in noticed.note
    assert f"[{lease.id}, rai/other@1#000]" in noticed.note  # the conflict set
    state.preemptions[lease.id] = notice
    closed = LeaseClosed(at=T + 300, lease=lease.id, reason=notice.reason)
    (preempted,) = derive(7, closed, state, {})
    assert (preempted.reason, preempted.at) == ("Preempted", T + 300)
    # A closure that is not the noticed preemption is not "Preempted".
    assert derive(8, LeaseClosed(at=T, lease=lease.id, reason="Completed"), state, {}) == []
    swap = _lease(2, MintReason.SWAP)
    (swapped,) = derive(9, LeaseMinted(at=T, lease=swap), state, {})
    assert swapped.reason == "Swapped"
    assert "n2" in swapped.note
    expired = RunStatusChanged(
        at=T, run="rai/train", phase="Failed", reason="Expired", message="maxDuration"
    )
    (ex,) = derive(10, expired, state, {"rai/train": "Running"})
    assert (ex.reason, ex.type, ex.note) == ("Expired", "Warning", "maxDuration")


def test_event_log_keeps_pending_until_done_and_drops_beyond_the_horizon() -> None:
    state = _state()
    log = EventLog(horizon=600)
    log.observe(3, LeaseMinted(at=T, lease=_lease(0)), state)
    state.leases[_lease(0).id] = _lease(0)
    log.observe(4, RunStatusChanged(at=T, run="rai/train", phase="Running", reason="X"), state)
    assert [e.name for e in log.due(T)] == ["train.4.admitted"]
    assert log.mint_seq == {_lease(0).id: 3}
    bound = bound_event(
        state,
        "rai/train",
        lease_ids=[_lease(0).id],
        pods=2,
        mint_seq=log.mint_seq,
        at=T,
        restart_seq=log.restart_seq.get("rai/train", 0),
    )
    assert bound is not None
    assert bound.name == "train.4.bound"  # after the admission it belongs to
    assert log.due(T + 601) == []  # too old to be worth creating after a long outage
    log.observe(5, RunStatusChanged(at=T, run="rai/train", phase="Failed", reason="X"), state)
    (failed,) = log.due(T)
    log.done(failed)
    assert log.due(T) == []


def test_mirror_names_and_sanitised_closure_reasons() -> None:
    assert lease_object_name(f"rai/train@{T}#007") == f"train-{T}-007"
    assert sanitised_reason("RandomPreempt(0x00ff)") == "RandomPreempt"
    assert sanitised_reason("Completed") == "Completed"
    assert sanitised_reason("(x)") == "Closed"


def test_events_of_one_packed_message_are_named_apart_and_due_in_ledger_order() -> None:
    """A gang preempted in one decision is one ledger message holding a LeaseClosed per lease
    (``runtime.ledger_packing``): each gets its own Event, named by its address, in order."""
    state = _state()
    log = EventLog()
    leases = [_lease(i) for i in range(12)]
    for lease in leases:
        state.leases[lease.id] = lease
        state.preemptions[lease.id] = LeasePreemptionScheduled(
            at=T,
            lease=lease.id,
            run="rai/train",
            deadline=T + 300,
            reason="Reclaim",
            kind="Reclaim",
            seed="0x1",
            conflict_set=(lease.id,),
        )
    for index, lease in enumerate(leases):
        log.observe(0x1F, LeaseClosed(at=T + 300, lease=lease.id, reason="Reclaim"), state, index)
    due = log.due(T + 300)
    assert [e.name for e in due] == [
        "train.1f.preempted",
        *(f"train.1f-{i:x}.preempted" for i in range(1, 12)),
    ]
    assert [e.note.split()[1] for e in due] == [lease.id for lease in leases]
    # A one-event message keeps the name it always had.
    closed = LeaseClosed(at=T + 300, lease=leases[0].id, reason="Reclaim")
    assert derive(0x1F, closed, state, {}) == [due[0]]
