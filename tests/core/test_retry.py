"""failurePolicy Retry in the core: retries are ledger events, counted once per attempt, the
backoff doubles, the restart falls due by itself, and a snapshot keeps it all."""

from __future__ import annotations

import msgspec
import pytest
from builders import T0, budget, env, node, run

from gpu_fleet.core.engine import CommandError, Fleet
from gpu_fleet.core.ledger import RunRestarted, RunRetried, fold, fold_all, snapshot
from gpu_fleet.core.model import Run


def _retrying(retries: int = 2, backoff: str = "1m", policy: str = "Retry") -> Run:
    base = msgspec.to_builtins(run("t", "r", 4))
    role = {"name": "w", "width": 4, "failurePolicy": policy, "template": {}}
    if policy == "Retry":
        role.update({"retries": retries, "backoff": backoff})
    base["spec"]["roles"] = [role]
    return msgspec.convert(base, Run)


def _fleet(r: Run) -> Fleet:
    fleet = Fleet()
    fleet.register_node(node("n1", 8), T0)
    fleet.apply(budget("t", "org:t", [env("e", 8)]), T0)
    fleet.apply(r, T0)
    assert fleet.state.status["t/r"].phase == "Running"
    return fleet


def test_retry_backoff_doubles_restart_falls_due_and_retries_run_out() -> None:
    fleet = _fleet(_retrying())
    leases = fleet.state.leases_of("t/r", open_only=True)
    events = fleet.retry("t/r", T0 + 10, 0, "r-active-1")
    (retried,) = [e for e in events if isinstance(e, RunRetried)]
    assert (retried.attempt, retried.retry_after) == (1, T0 + 70)
    assert fleet.retry("t/r", T0 + 11, 0, "r-active-0") == []  # the same failure again
    assert fleet.next_due(T0 + 11) == T0 + 70
    restarted = [e for e in fleet.advance_to(T0 + 70) if isinstance(e, RunRestarted)]
    assert [(e.attempt, e.at) for e in restarted] == [(1, T0 + 70)]
    assert fleet.state.leases_of("t/r", open_only=True) == leases  # same leases throughout
    events = fleet.retry("t/r", T0 + 100, 1, "r-active-0")
    (retried,) = [e for e in events if isinstance(e, RunRetried)]
    assert retried.retry_after == T0 + 100 + 120  # 1m doubled
    fleet.advance_to(T0 + 220)
    fleet.retry("t/r", T0 + 300, 2, "r-active-2")
    st = fleet.state.status["t/r"]
    assert (st.phase, st.reason) == ("Failed", "WorkloadFailed")
    assert not fleet.state.leases_of("t/r", open_only=True)
    # Replay and snapshot reproduce the retries exactly.
    history = fleet.state.history
    full = fold_all(history)
    assert full.retries == fleet.state.retries
    assert full.restarts == {"t/r": 2}
    cut = next(i for i, e in enumerate(history) if isinstance(e, RunRetried)) + 1
    restored = snapshot.restore(snapshot.take(fold_all(history[:cut]), cut))
    assert restored is not None
    state, _ = restored
    assert state.retries == fold_all(history[:cut]).retries
    for e in history[cut:]:
        fold(state, e)
    assert (state.retries, state.restarts) == (full.retries, full.restarts)


def test_zero_backoff_restarts_at_once() -> None:
    fleet = _fleet(_retrying(backoff="0s"))
    events = fleet.retry("t/r", T0 + 5, 0, "p")
    assert [type(e).__name__ for e in events][:3] == [
        "RunRetried",
        "RunStatusChanged",
        "RunRestarted",
    ]


def test_retry_is_refused_unless_the_policy_is_retry() -> None:
    fleet = _fleet(_retrying(policy="Fail"))
    with pytest.raises(CommandError, match="failurePolicy is not Retry"):
        fleet.retry("t/r", T0 + 5, 0, "p")
