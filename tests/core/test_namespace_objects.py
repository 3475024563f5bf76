"""``FleetState.objects_in``: counted once, then kept by the fold (the manager's per-namespace
object limit asks it on every apply that creates something, so it must not scan the fleet).

The property: after any sequence of Budget, Run and deletions - asked before, between or
after the events - the kept count equals a fresh count of the tables.
"""

from __future__ import annotations

from builders import budget, run
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.core.ledger import (
    BudgetApplied,
    BudgetDeleted,
    Event,
    FleetState,
    LedgerError,
    RunDeleted,
    RunSubmitted,
    RunUpdated,
    fold,
)

NAMESPACES = ("a", "b")
NAMES = ("x", "y", "z")


def fresh(state: FleetState, namespace: str) -> int:
    tables = (state.runs, state.budgets, state.channels)
    return sum(1 for t in tables for key in t if key.split("/", 1)[0] == namespace)


@st.composite
def events(draw: st.DrawFn) -> list[Event]:
    out: list[Event] = []
    for at in range(draw(st.integers(0, 25))):
        ns, name = draw(st.sampled_from(NAMESPACES)), draw(st.sampled_from(NAMES))
        kind = draw(st.sampled_from(["budget", "budget-", "run", "run~", "run-"]))
        if kind == "budget":
            out.append(BudgetApplied(at=at, budget=budget(ns, f"org:{ns}", name=name)))
        elif kind == "budget-":
            out.append(BudgetDeleted(at=at, namespace=ns, name=name))
        elif kind == "run":
            out.append(RunSubmitted(at=at, run=run(ns, name, 1)))
        elif kind == "run~":
            out.append(RunUpdated(at=at, run=run(ns, name, 1)))
        else:
            out.append(RunDeleted(at=at, run=f"{ns}/{name}"))
    return out


@settings(max_examples=200, deadline=None)
@given(events(), st.integers(0, 25))
def test_the_kept_count_is_a_fresh_count(evs: list[Event], ask_after: int) -> None:
    state = FleetState()
    for i, event in enumerate(evs):
        if i == ask_after:
            assert state.objects_in("a") == fresh(state, "a")  # from here on the fold keeps it
        try:
            fold(state, event)
        except LedgerError:  # an event the ledger refuses changes nothing
            continue
    for namespace in NAMESPACES:
        assert state.objects_in(namespace) == fresh(state, namespace)
    state.rebuild_indexes()
    assert state.objects_in("b") == fresh(state, "b")
