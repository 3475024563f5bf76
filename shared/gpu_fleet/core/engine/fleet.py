"""``Fleet``: the in-memory committer of decisions, and the order of work at one instant.

``Fleet`` is the committer the scenario runner and the CLI's local mode use; the manager service
commits the same events to JetStream (with an expected-last-sequence check) and folds them the
same way.  Because decisions read only folded state and the instant passed in, a replay of the
ledger reproduces every one of them.

Order of work at one instant (scenario-format.md): first what ends (lease expiry, preemption
deadlines, checkpoint deadlines, voluntary shrinks), then reservation activations (earliest
start, then name), then admissions of pending runs (runs with a pending reservation in the
order they were promised their slices, then the others by admission time and run key), then
elastic growth; a step scheduled at that instant comes after all of them.  So whatever frees
at an instant, by any path, is offered to every waiting run at that same instant (work
conservation).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import msgspec

from gpu_fleet.core.engine.activation import activate_reservation
from gpu_fleet.core.engine.elastic import elastic_step
from gpu_fleet.core.engine.failures import handle_node_failure
from gpu_fleet.core.engine.gang import (
    TERMINAL,
    Settings,
    checkpoint_deadline,
    fail_events,
    status_event,
)
from gpu_fleet.core.engine.resolver import close_preempted, stale_preemptions
from gpu_fleet.core.engine.retry import RetryRefusedError, due_restarts, next_restart, retry_events
from gpu_fleet.core.engine.waiting import admit_waiting, unchanged_status
from gpu_fleet.core.funding.cycles import parent_cycle
from gpu_fleet.core.ledger.events import (
    BudgetApplied,
    BudgetDeleted,
    ChannelApplied,
    ChannelDeleted,
    Event,
    LeaseClosed,
    NodeHealthChanged,
    NodeRegistered,
    ReservationReleased,
    RunDeleted,
    RunEtaReported,
    RunSubmitted,
    RunUpdated,
)
from gpu_fleet.core.ledger.fold import fold
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    Budget,
    Instant,
    LeaseRole,
    Manifest,
    Node,
    NodeHealth,
    NotificationChannel,
    Run,
)
from gpu_fleet.core.placement.pack import Planner, pack_greedy
from gpu_fleet.core.timeutil import format_instant

CommandErrorCode = Literal["not_found", "rejected", "bad_request"]


class CommandError(ValueError):
    """A command that cannot apply; nothing was changed.

    ``code`` says why, for the API's error code and the CLI's exit status: ``not_found`` (no
    such object), ``rejected`` (the object's state refuses the command: a Failed run cannot
    complete, Failed is terminal) or ``bad_request`` (the command itself is wrong).  Without an
    explicit code, a message saying "not found" is ``not_found``, anything else ``bad_request``.
    """

    def __init__(self, message: str, code: CommandErrorCode | None = None) -> None:
        super().__init__(message)
        self.code: CommandErrorCode = code or (
            "not_found" if "not found" in message else "bad_request"
        )


class Fleet:
    """Folded state plus the decision loop; what the scenario runner and local CLI drive."""

    def __init__(self, settings: Settings | None = None, planner: Planner | None = None) -> None:
        self.settings = settings or Settings()
        self.planner: Planner = planner or pack_greedy
        self.state = FleetState(settings_period_hours=self.settings.period_hours)
        # Tests set this to make every skipped admission attempt run anyway and prove it
        # would have changed nothing (``certain_to_wait`` must never be wrong).
        self.check_shortcuts = False
        self.skipped_attempts = 0

    # -- committing ---------------------------------------------------------------------------
    def commit(self, events: Iterable[Event]) -> list[Event]:
        done: list[Event] = []
        for e in events:
            fold(self.state, e)
            done.append(e)
        return done

    # -- commands -----------------------------------------------------------------------------
    def register_node(self, node: Node, at: Instant) -> None:
        self.commit([NodeRegistered(at=at, node=node)])

    def apply(self, manifest: Manifest, at: Instant) -> list[Event]:
        if isinstance(manifest, NotificationChannel):
            # A channel decides nothing about scheduling: recorded, nothing to reconcile.
            return self.commit([ChannelApplied(at=at, channel=manifest)])
        if isinstance(manifest, Budget):
            cycle = parent_cycle(self.state.budgets.values(), [manifest])
            if cycle is not None:
                raise CommandError(f"budget {manifest.key}: parents form a cycle: {cycle[1]}")
            events = self.commit([BudgetApplied(at=at, budget=manifest)])
        elif manifest.key in self.state.runs:
            events = self.commit([RunUpdated(at=at, run=manifest)])
        else:
            events = self.commit([RunSubmitted(at=at, run=manifest)])
        return events + self.reconcile(at)

    def delete(self, kind: str, namespace: str, name: str, at: Instant) -> list[Event]:
        key = f"{namespace}/{name}"
        if kind == "NotificationChannel":
            if key not in self.state.channels:
                raise CommandError(f"notification channel {key} not found")
            return self.commit([ChannelDeleted(at=at, namespace=namespace, name=name)])
        if kind == "Budget":
            if key not in self.state.budgets:
                raise CommandError(f"budget {key} not found")
            events = self.commit([BudgetDeleted(at=at, namespace=namespace, name=name)])
        else:
            if key not in self.state.runs:
                raise CommandError(f"run {key} not found")
            closing: list[Event] = [
                LeaseClosed(at=at, lease=x.id, reason="RunDeleted")
                for x in self.state.leases_of(key, open_only=True)
            ]
            closing += [
                ReservationReleased(at=at, name=r.name, state="Failed", reason="run deleted")
                for r in self.state.pending_by_name(key)
            ]
            events = self.commit([*closing, RunDeleted(at=at, run=key)])
        return events + self.reconcile(at)

    def complete(self, key: str, at: Instant) -> list[Event]:
        self._require_running(key, "complete")
        events: list[Event] = [
            LeaseClosed(at=at, lease=x.id, reason="Completed")
            for x in self.state.leases_of(key, open_only=True)
        ]
        events.append(
            status_event(
                key, at, "Completed", "AllSucceeded", "run completed: all active pods succeeded"
            )
        )
        return self.commit(events) + self.reconcile(at)

    def fail(self, key: str, at: Instant) -> list[Event]:
        self._require_running(key, "fail")
        events = fail_events(
            self.state,
            key,
            at,
            "WorkloadFailed",
            "workload failed; failing the gang",
            "WorkloadFailed",
        )
        return self.commit(events) + self.reconcile(at)

    def retry(self, key: str, at: Instant, attempt: int, pod: str = "") -> list[Event]:
        """A workload pod of ``attempt`` failed under ``failurePolicy: Retry`` (see
        ``engine.retry``): retry after the backoff, or fail once the retries are used up."""
        self._require_running(key, "retry")
        try:
            events = retry_events(self.state, key, at, attempt, pod)
        except RetryRefusedError as exc:
            raise CommandError(str(exc), "rejected") from exc
        return self.commit(events) + self.reconcile(at)

    def set_node_health(self, node: str, health: NodeHealth, at: Instant) -> list[Event]:
        """Record a node's health; a node newly *fenced* has failed (SPEC §B.13).

        Cordoning only stops new work landing there (topology offers no free slot on it); the
        leases on a cordoned node are untouched - cordon is not failure (DESIGN decision 7).
        """
        if node not in self.state.nodes:
            raise CommandError(f"node {node} not found")
        before = self.state.nodes[node].health
        events = self.commit([NodeHealthChanged(at=at, node=node, health=health)])
        if health is NodeHealth.FENCED and before is not NodeHealth.FENCED:
            events += self.commit(handle_node_failure(self.state, node, at, self.settings))
        return events + self.reconcile(at)

    def report_eta(self, key: str, eta: Instant, at: Instant) -> list[Event]:
        """Record a run's expected completion (the forecaster plans with it)."""
        self._require_running(key, "report an eta for")
        if eta < at:
            raise CommandError(f"eta {format_instant(eta)} is in the past")
        return self.commit([RunEtaReported(at=at, run=key, eta=eta)])

    def require_run(self, key: str) -> Run:
        """The run ``key``, or a ``CommandError`` a caller can show as it is."""
        run = self.state.runs.get(key)
        if run is None:
            raise CommandError(f"run {key} not found")
        return run

    def shrink(self, key: str, desired: int, at: Instant) -> list[Event]:
        run = self.require_run(key)
        m = run.spec.malleable
        if m is None:
            raise CommandError(f"run {key} is not malleable")
        if not m.min_total_gpus <= desired <= m.max_total_gpus:
            raise CommandError(
                f"desired GPUs {desired} must be within [{m.min_total_gpus}, {m.max_total_gpus}]"
            )
        updated = msgspec.structs.replace(
            run,
            spec=msgspec.structs.replace(
                run.spec, malleable=msgspec.structs.replace(m, desired_total_gpus=desired)
            ),
        )
        return self.commit([RunUpdated(at=at, run=updated)]) + self.reconcile(at)

    def _require_running(self, key: str, verb: str) -> None:
        """Refuse ``verb`` on a run that does not exist or has ended (DESIGN decision 7: Failed
        is terminal, so a late completion is refused, never recorded)."""
        st = self.state.status.get(key)
        if key not in self.state.runs or st is None:
            raise CommandError(f"run {key} not found")
        if st.phase in TERMINAL:
            raise CommandError(
                f"cannot {verb} run {key}: it is already {st.phase}, which is terminal",
                "rejected",
            )

    # -- time ---------------------------------------------------------------------------------
    def next_due(self, after: Instant) -> Instant | None:
        """The earliest instant after ``after`` at which something falls due by itself:
        a reservation, a lease's scheduled end, a preemption deadline, a checkpoint deadline."""
        state = self.state
        times: list[Instant] = []
        start = state.next_reservation_start(after)
        if start is not None:
            times.append(start)
        end = state.next_scheduled_end(after)
        if end is not None:
            times.append(end)
        times += [p.deadline for p in state.pending_preemptions() if p.deadline > after]
        for key in state.checkpoint_runs:
            deadline = checkpoint_deadline(state, key)
            if deadline is not None and deadline > after:
                times.append(deadline)
        restart = next_restart(state, after)
        if restart is not None:
            times.append(restart)
        return min(times) if times else None

    def advance_to(self, until: Instant) -> list[Event]:
        """Run everything that falls due up to and including ``until``, in time order."""
        events: list[Event] = []
        while True:
            t = self.next_due(self.state.clock)
            if t is None or t > until:
                break
            events += self.reconcile(t)
        if until > self.state.clock:
            events += self.reconcile(until)
        return events

    def reconcile(self, now: Instant) -> list[Event]:
        """Everything due at ``now``: what ends (expiries, preemption and checkpoint deadlines,
        voluntary shrinks), then activations, then pending admissions, then elastic growth."""
        state = self.state
        done: list[Event] = []
        state.clock = max(state.clock, now)
        expired = sorted(state.leases_ending(now), key=lambda x: x.id)
        for run_key in sorted({x.run for x in expired}):
            done += self.commit(
                fail_events(
                    state, run_key, now, "Expired", "reached spec.runtime.maxDuration", "Expired"
                )
            )
        done += self.commit(stale_preemptions(state, now))
        due_cuts = [p for p in state.pending_preemptions() if p.deadline <= now]
        if due_cuts:
            done += self.commit(close_preempted(state, due_cuts, now))
        for key in sorted(state.checkpoint_runs):
            deadline = checkpoint_deadline(state, key)
            if deadline is not None and deadline <= now and state.status[key].phase == "Pending":
                done += self.commit(
                    fail_events(
                        state,
                        key,
                        now,
                        "CheckpointExpired",
                        f"checkpoint grace expired at {format_instant(deadline)}",
                    )
                )
        done += self.commit(due_restarts(state, now))
        done += self._shrink(now)
        done += self._activate_due(now)
        done += self._admit_pending(now)
        done += self._elastic(now)
        return done

    def _admit_pending(self, now: Instant) -> list[Event]:
        """Offer every waiting run a start: runs with a pending reservation first, in the order
        their slices were promised (``FleetState.promise_order``), then the others in
        admission order (``waiting.admit_waiting``: event-driven, or every run in turn).

        Work conservation: whatever has freed by now goes to the reservations that fit, and not
        only when they fall due.  The order matters: a reservation behind another in a shared
        slice is kept out until the one ahead has started (``gang.protects``), so trying it
        first would leave it waiting until the next instant anything happens.
        """
        return admit_waiting(self, now)

    def _activate_due(self, now: Instant) -> list[Event]:
        state = self.state
        done: list[Event] = []
        for res in state.due_reservations(now):
            if state.reservations[res.name].state != "Pending":
                continue
            act = activate_reservation(state, res, now, self.planner, self.settings)
            done += self.commit([e for e in act.events if not unchanged_status(state, e)])
            current = state.reservations[res.name]
            if act.retry and current.state == "Pending":
                again = activate_reservation(
                    state, current, now, self.planner, self.settings, make_room=False
                )
                done += self.commit([e for e in again.events if not unchanged_status(state, e)])
        return done

    def _shrink(self, now: Instant) -> list[Event]:
        """Voluntary shrinks, with what ends: the GPUs they give back are free for this
        instant's activations and admissions, not only for the next instant's."""
        return self._elastic(now, shrinking=True)

    def _elastic(self, now: Instant, *, shrinking: bool = False) -> list[Event]:
        state = self.state
        done: list[Event] = []
        running = sorted(state.elastic_runs, key=lambda k: (state.admitted.get(k, 0), k))
        for key in running:
            run = state.runs[key]
            m = run.spec.malleable
            assert m is not None
            if shrinking and run.desired_width >= _allocated(state, key):
                continue
            for _ in range(2 + m.max_total_gpus // max(1, m.step_gpus)):
                step = elastic_step(state, state.runs[key], now, self.planner, self.settings)
                done += self.commit([e for e in step.events if not unchanged_status(state, e)])
                if not step.progressed:
                    break
        return done


def _allocated(state: FleetState, key: str) -> int:
    return sum(x.width for x in state.leases_of(key, open_only=True) if x.role is LeaseRole.ACTIVE)
