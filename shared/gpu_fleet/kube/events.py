"""Kubernetes Events (``events.k8s.io/v1``) on Runs, derived from the ledger.  Pure.

What a team sees with ``kubectl describe run`` / ``kubectl get events``: Admitted, Bound,
Reserved, PreemptionNotice (deadline, seed and conflict set), Preempted, Swapped, Expired,
Retrying (failurePolicy Retry), and Completed / Failed.  Every Event except Bound comes from
one ledger event, so it is named after that event's address in the ledger (its message's
stream sequence, and its index in that message when it is not the first:
``runtime.ledger_packing``): ``<run>.<seq in hex>.<reason>``, or
``<run>.<seq in hex>-<index in hex>.<reason>`` - a gang preempted in one decision is one
message holding a Preempted per lease.  A replay (a restarted bridge
folds the ledger from the start) derives the same names and the API server answers the second
create with AlreadyExists, so a crash anywhere creates none twice.  Bound is the pods half's own
act (all of a gang's pods bound); it is named after the sequence of the newest lease the gang
holds, or of its last admission or retry restart if later, so binding the same leases again
after a crash mid-bind reuses the name, and each retry attempt gets its own.

``eventTime`` is the ledger event's own instant (the fleet's clock, virtual in tests) as a
MicroTime - exactly six fractional digits, or the API server rejects the Event.  Events expire
(the API server keeps them an hour by default), so a replay only re-creates those whose instant
is within ``horizon`` of the ledger's clock (``due``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.ledger.events import (
    Event,
    LeaseClosed,
    LeaseMinted,
    LeasePreemptionScheduled,
    ReservationCreated,
    RunRestarted,
    RunRetried,
    RunStatusChanged,
)
from gpu_fleet.core.model import API_VERSION, Instant, MintReason
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.kube.objects import A_UID, Obj

REPORTING_CONTROLLER = "rq.davidlangworthy.io/gpu-fleet"
NOTE_MAX = 1024  # the API server's limit on ``note``
DEFAULT_HORIZON = 3600  # seconds: the API server's default Event TTL


def micro_time(at: Instant) -> str:
    """A MicroTime: RFC 3339 with exactly six fractional digits (the API server insists)."""
    return dt.datetime.fromtimestamp(at, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class RunEvent:
    """One Event the ledger calls for on one Run."""

    namespace: str
    run: str
    run_uid: str
    seq: int
    reason: str  # CamelCase, as Kubernetes reasons are
    action: str
    type: str  # Normal | Warning
    note: str
    at: Instant
    index: int = 0  # the ledger event's place in its message (``seq``)

    @property
    def name(self) -> str:
        # A hex sequence has no "-", so "<seq>-<index>" cannot be read as another address.
        where = f"{self.seq:x}" if self.index == 0 else f"{self.seq:x}-{self.index:x}"
        return f"{self.run}.{where}.{self.reason.lower()}"

    def body(self, instance: str) -> Obj:
        return {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "eventTime": micro_time(self.at),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": instance,
            "action": self.action,
            "reason": self.reason,
            "type": self.type,
            "note": self.note[:NOTE_MAX],
            "regarding": {
                "apiVersion": API_VERSION,
                "kind": "Run",
                "name": self.run,
                "namespace": self.namespace,
                "uid": self.run_uid,
            },
        }


class EventLog:
    """Turns folded ledger events into Run Events (``observe`` is the follower's callback)
    and keeps those not yet created.  Only runs that came from Kubernetes (their ledger
    manifest carries the object's uid) get Events: nothing else has an object to point at."""

    def __init__(
        self, *, derive: bool = True, horizon: int = DEFAULT_HORIZON, limit: int = 10_000
    ) -> None:
        self.derive = derive  # False: only remember mint sequences (the pods half's Bound)
        self.horizon = horizon
        self.limit = limit
        self.pending: dict[tuple[str, str], RunEvent] = {}
        self.phases: dict[str, str] = {}  # run key -> last phase seen (for transitions)
        self.mint_seq: dict[str, int] = {}  # lease id -> the sequence that minted it
        # run key -> the sequence of its last admission or retry restart
        self.restart_seq: dict[str, int] = {}
        self.dropped = 0

    def observe(self, seq: int, event: Event, state: FleetState, index: int = 0) -> None:
        if isinstance(event, LeaseMinted):
            self.mint_seq[event.lease.id] = seq
        if isinstance(event, RunRestarted):
            self.restart_seq[event.run] = seq
        if (
            isinstance(event, RunStatusChanged)
            and event.phase == "Running"
            and self.phases.get(event.run) != "Running"
        ):
            self.restart_seq[event.run] = seq  # admitted (again): Bound comes after it
        if self.derive:
            for ev in derive(seq, event, state, self.phases, index):
                if len(self.pending) >= self.limit:
                    self.dropped += 1
                    continue
                self.pending[(ev.namespace, ev.name)] = ev
        if isinstance(event, RunStatusChanged):
            self.phases[event.run] = event.phase

    def due(self, clock: Instant) -> list[RunEvent]:
        """Pending Events still worth creating (within the horizon), oldest first; the rest
        are dropped (an Event that old would have expired anyway)."""
        for key in [k for k, e in self.pending.items() if e.at < clock - self.horizon]:
            del self.pending[key]
        return sorted(self.pending.values(), key=lambda e: (e.seq, e.index, e.name))

    def done(self, ev: RunEvent) -> None:
        self.pending.pop((ev.namespace, ev.name), None)


def _run_uid(state: FleetState, key: str) -> str:
    run = state.runs.get(key)
    return run.metadata.annotations.get(A_UID, "") if run is not None else ""


# reason -> (action, type)
KINDS = {
    "Admitted": ("Admit", "Normal"),
    "Bound": ("Bind", "Normal"),
    "Reserved": ("Reserve", "Normal"),
    "PreemptionNotice": ("NoticePreemption", "Warning"),
    "Preempted": ("Preempt", "Warning"),
    "Swapped": ("Swap", "Normal"),
    "Expired": ("Expire", "Warning"),
    "Failed": ("Fail", "Warning"),
    "Completed": ("Complete", "Normal"),
    "Retrying": ("Retry", "Warning"),
}


def _make(
    state: FleetState, key: str, *, seq: int, at: Instant, reason: str, note: str, index: int = 0
) -> RunEvent | None:
    uid = _run_uid(state, key)
    if not uid:
        return None
    ns, _, name = key.partition("/")
    action, kind = KINDS[reason]
    return RunEvent(ns, name, uid, seq, reason, action, kind, note, at, index)


def derive(
    seq: int, event: Event, state: FleetState, phases: dict[str, str], index: int = 0
) -> list[RunEvent]:
    """The Run Events one folded ledger event, at ``(seq, index)``, calls for (``state``:
    after the fold; ``phases``: each run's phase before it)."""

    def make(key: str, *, at: Instant, reason: str, note: str) -> RunEvent | None:
        return _make(state, key, seq=seq, index=index, at=at, reason=reason, note=note)

    out: list[RunEvent | None] = []
    match event:
        case RunStatusChanged(run=key, phase=phase, reason=reason, message=message, at=at):
            before = phases.get(key, "Pending")
            if phase == "Running" and before != "Running":
                leases = state.leases_of(key, open_only=True)
                gpus = sum(x.width for x in leases if x.role.value == "Active")
                nodes = ", ".join(sorted({x.node for x in leases})) or "-"
                note = f"admitted: {gpus} GPUs on {nodes}"
                out.append(make(key, at=at, reason="Admitted", note=note))
            elif reason == "Expired" and before != "Failed":
                out.append(make(key, at=at, reason="Expired", note=message))
            elif phase == "Failed" and before != "Failed":
                note = f"{reason}: {message}" if message else reason
                out.append(make(key, at=at, reason="Failed", note=note))
            elif phase == "Completed" and before != "Completed":
                note = message or "all workload pods succeeded"
                out.append(make(key, at=at, reason="Completed", note=note))
        case ReservationCreated(reservation=res, at=at):
            note = (
                f"reservation {res.name}: {res.kind} wait, earliest start "
                f"{format_instant(res.earliest_start)}, deficit {res.deficit_gpus} GPUs"
                + (f", slice {res.domain}" if res.domain else "")
                + (f" ({res.reason})" if res.reason else "")
            )
            out.append(make(res.run, at=at, reason="Reserved", note=note))
        case LeasePreemptionScheduled() as p:
            note = (
                f"lease {p.lease} will close {p.reason} at {format_instant(p.deadline)} "
                f"({p.kind}); seed {p.seed}; conflict set [{', '.join(p.conflict_set)}]"
                + (f"; for {p.beneficiary}" if p.beneficiary else "")
            )
            out.append(make(p.run, at=p.at, reason="PreemptionNotice", note=note))
        case LeaseClosed(lease=lease_id, reason=reason, at=at):
            notice = state.preemptions.get(lease_id)
            lease = state.leases.get(lease_id)
            if notice is not None and lease is not None and notice.reason == reason:
                note = f"lease {lease_id} on {lease.node} closed: {reason}"
                out.append(make(lease.run, at=at, reason="Preempted", note=note))
        case RunRetried(run=key, attempt=attempt, retry_after=after, pod=pod, at=at):
            note = f"workload pod {pod or '?'} failed; retry {attempt} at {format_instant(after)}"
            out.append(make(key, at=at, reason="Retrying", note=note))
        case LeaseMinted(lease=lease, at=at) if lease.reason is MintReason.SWAP:
            note = f"swapped in: {lease.width} GPUs on {lease.node} (lease {lease.id})"
            out.append(make(lease.run, at=at, reason="Swapped", note=note))
        case _:
            pass
    return [e for e in out if e is not None]


def bound_event(
    state: FleetState,
    key: str,
    *,
    lease_ids: list[str],
    pods: int,
    mint_seq: dict[str, int],
    at: Instant,
    restart_seq: int = 0,
) -> RunEvent | None:
    """The Bound Event for a gang whose pods are all bound (``None`` if the sequence of its
    leases is unknown, which only a lease older than the follower's history can be)."""
    seqs = [mint_seq[i] for i in lease_ids if i in mint_seq]
    if not seqs or len(seqs) != len(lease_ids):
        return None
    nodes = sorted({state.leases[i].node for i in lease_ids if i in state.leases})
    note = f"{pods} pods bound on {', '.join(nodes)}"
    return _make(state, key, seq=max(*seqs, restart_seq), at=at, reason="Bound", note=note)


NODE_EVENTS_NAMESPACE = "default"  # where Events about cluster-scoped objects go


def node_left_out_event(node: Obj, message: str, now: float, instance: str) -> Obj:
    """A Warning Event on a GPU Node the topology leaves out (a missing label, say).

    Named after the node and the reason (``<node>.<hash>.leftout``), so a restarted bridge
    reporting the same problem re-creates nothing, and a new problem gets a new Event."""
    meta = node.get("metadata") or {}
    name = str(meta.get("name", ""))
    digest = hashlib.sha256(message.encode()).hexdigest()[:10]
    return {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{digest}.leftout", "namespace": NODE_EVENTS_NAMESPACE},
        "eventTime": dt.datetime.fromtimestamp(now, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "reportingController": REPORTING_CONTROLLER,
        "reportingInstance": instance,
        "action": "Map",
        "reason": "LeftOut",
        "type": "Warning",
        "note": f"GPU node left out of the topology: {message}"[:NOTE_MAX],
        "regarding": {"apiVersion": "v1", "kind": "Node", "name": name, "uid": meta.get("uid", "")},
    }
