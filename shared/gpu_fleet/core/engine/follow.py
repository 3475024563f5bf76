"""Follow: a run chained behind upstream runs starts only when they are done (SPEC §A.2 follow).

The gate is a decision like any other: it reads folded state and returns the status events of a
run held, released or failed by its upstreams (``onUpstreamFailure``), detecting cycles.
"""

from __future__ import annotations

from gpu_fleet.core.engine.gang import fail_events, status_event
from gpu_fleet.core.ledger.events import (
    Event,
)
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import (
    Instant,
    Run,
)
from gpu_fleet.core.timeutil import format_instant, parse_duration


def follow_gate(state: FleetState, run: Run, now: Instant) -> list[Event] | None:
    """None when the run may proceed; else the events that keep it waiting or fail it."""
    follow = run.spec.follow
    if follow is None:
        return None
    ns = run.metadata.namespace
    cycle = _follow_cycle(state, run)
    if cycle:
        return fail_events(
            state, run.key, now, "FollowCycle", "follow cycle: " + " -> ".join(cycle)
        )
    failed: list[str] = []
    pending: list[str] = []
    for name in follow.after:
        up = f"{ns}/{name}"
        st = state.status.get(up)
        if up not in state.runs:
            failed.append(f"{name} (deleted)")
        elif st is not None and st.phase == "Completed":
            continue
        elif st is not None and st.phase == "Failed":
            failed.append(name)
        else:
            pending.append(name)
    current = state.status.get(run.key)
    if failed:
        listing = ", ".join(failed)
        if follow.on_upstream_failure == "fail":
            return fail_events(state, run.key, now, "UpstreamFailed", f"upstream failed: {listing}")
        deadline_raw = current.detail.get("followDeadline") if current is not None else None
        deadline = (
            int(deadline_raw)  # type: ignore[call-overload]
            if deadline_raw is not None
            else now + parse_duration(follow.upstream_failure_grace)
        )
        if now >= deadline:
            return fail_events(
                state,
                run.key,
                now,
                "UpstreamFailed",
                f"upstream failed and grace expired: {listing}",
            )
        msg = (
            f"waiting: upstream failed ({listing}); fails at {format_instant(deadline)} "
            "if unresolved"
        )
        if current is not None and current.message == msg:
            return []
        return [status_event(run.key, now, "Waiting", "FollowWait", msg, followDeadline=deadline)]
    if pending:
        msg = "waiting for: " + ", ".join(pending)
        if current is not None and current.message == msg:
            return []
        return [status_event(run.key, now, "Waiting", "FollowWait", msg)]
    return None


def _follow_cycle(state: FleetState, run: Run) -> list[str]:
    ns = run.metadata.namespace

    def walk(name: str, seen: tuple[str, ...]) -> list[str]:
        if name in seen:
            return [*seen[seen.index(name) :], name]
        r = state.runs.get(f"{ns}/{name}")
        if r is None or r.spec.follow is None:
            return []
        for up in r.spec.follow.after:
            found = walk(up, (*seen, name))
            if found:
                return found
        return []

    return walk(run.metadata.name, ())
