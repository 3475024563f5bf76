"""``failurePolicy: Retry``: a failed workload pod restarts the gang on the same leases.

The bridge reports "a pod of attempt N failed"; the decision - retry after a backoff, or fail
the run once ``retries`` are used up - is made here and recorded on the ledger, so a replay
reproduces every retry and its timing, and a failure reported twice (two bridges, a replayed
pass) counts once: a report for an attempt other than the current one changes nothing.

The gang keeps its leases (and so its GPUs and its place) while it waits: a retry is a restart
of the workload, not a new admission.  Backoff: ``backoff`` (default ``0s``) doubled for each
retry already made - ``backoff``, ``2×backoff``, ``4×backoff`` ...  When it is over the
reconcile loop records ``RunRestarted`` and the bridge creates the pods again.
"""

from __future__ import annotations

from gpu_fleet.core.engine.gang import fail_events, status_event
from gpu_fleet.core.ledger.events import Event, RunRestarted, RunRetried
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import Instant
from gpu_fleet.core.timeutil import format_instant, parse_duration


class RetryRefusedError(Exception):
    """The run cannot be retried (not Running, or its policy is not Retry)."""


def retry_events(state: FleetState, key: str, at: Instant, attempt: int, pod: str) -> list[Event]:
    """What a failed pod of ``attempt`` (0 = the first run) calls for; [] when that attempt
    was already handled."""
    run = state.runs[key]
    st = state.status[key]
    if st.phase != "Running":
        raise RetryRefusedError(f"cannot retry run {key}: it is {st.phase}")
    role = run.spec.roles[0] if run.spec.roles else None
    if role is None or role.failure_policy != "Retry":
        raise RetryRefusedError(f"cannot retry run {key}: its failurePolicy is not Retry")
    last = state.retries.get(key)
    done = last.attempt if last is not None else 0
    if attempt != done:
        return []  # a late or repeated report of a failure already handled
    retries = role.retries or 0
    if done >= retries:
        why = f"workload pod {pod or '?'} failed after {done} retries (retries: {retries})"
        return fail_events(state, key, at, "WorkloadFailed", why, "WorkloadFailed")
    delay = parse_duration(role.backoff or "0s") * 2**done
    after = at + delay
    note = (
        f"workload pod {pod or '?'} failed; retry {done + 1} of {retries}"
        f" at {format_instant(after)}"
    )
    events: list[Event] = [
        RunRetried(at=at, run=key, attempt=done + 1, retry_after=after, pod=pod),
        status_event(key, at, st.phase, st.reason, note),
    ]
    if after <= at:
        events.append(RunRestarted(at=at, run=key, attempt=done + 1))
    return events


def waiting_retry(state: FleetState, key: str) -> RunRetried | None:
    """The run's retry whose backoff is not over yet (its gang has no pods meanwhile)."""
    r = state.retries.get(key)
    if r is None or state.restarts.get(key, 0) >= r.attempt:
        return None
    return r


def next_restart(state: FleetState, after: Instant) -> Instant | None:
    times = [
        r.retry_after
        for key in state.retries
        if (r := waiting_retry(state, key)) is not None and r.retry_after > after
    ]
    return min(times) if times else None


def due_restarts(state: FleetState, now: Instant) -> list[Event]:
    """``RunRestarted`` for every Running run whose retry backoff ends by ``now``."""
    events: list[Event] = []
    for key in sorted(state.retries):
        r = waiting_retry(state, key)
        st = state.status.get(key)
        if r is None or r.retry_after > now or st is None or st.phase != "Running":
            continue
        events.append(RunRestarted(at=now, run=key, attempt=r.attempt))
    return events
