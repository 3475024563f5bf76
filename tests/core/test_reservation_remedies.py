"""A reservation's remedies from the matching equal the full summaries' answer (issue 11).

``reservation._remedies`` reads the matching alone; before, it read a whole funding evaluation.
Over generated states - two flavors, owned and unbudgeted runs, actives and spares, funded and
unfunded leases, minted payers of both kinds - every run asking gets the lines the summaries
give (the reference is ``reference_remedies``; ``tests/scenarios/test_scenario_remedies.py``
checks every scenario against it).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from builders import A100, H100, T0, budget, env, lease, node, payer, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_remedies import reference_remedies

from gpu_fleet.core.engine import reservation
from gpu_fleet.core.funding.metering import summarize
from gpu_fleet.core.ledger.state import FleetState
from gpu_fleet.core.model import FundingClass, LeaseRole

FLAVORS = (H100, A100)


@st.composite
def states(draw: st.DrawFn) -> FleetState:
    state = FleetState()
    for flavor in FLAVORS:
        for i in range(4):
            n = node(f"{flavor.lower()}-{i}", flavor=flavor)
            state.nodes[n.name] = n
    concurrency = {f: draw(st.integers(0, 24)) for f in FLAVORS}
    envelopes = [env(f.lower(), c, flavor=f) for f, c in concurrency.items()]
    state.budgets["a/a"] = budget("a", "org:a", envelopes)
    if draw(st.booleans()):
        state.budgets["b/b"] = budget("b", "org:b", [env("h100", draw(st.integers(0, 8)))])
    next_slot = dict.fromkeys(state.nodes, 0)
    for r in range(draw(st.integers(1, 8))):
        ns = draw(st.sampled_from(["a", "b", "c"]))
        flavor = draw(st.sampled_from(FLAVORS))
        width = draw(st.integers(1, 4))
        roles = draw(st.lists(st.sampled_from([LeaseRole.ACTIVE, LeaseRole.SPARE]), max_size=3))
        the_run = run(ns, f"r{r}", width * max(1, len(roles)), flavor=flavor)
        state.runs[the_run.key] = the_run
        state.admitted[the_run.key] = T0 - 100 + r
        for j, role in enumerate(roles):
            free = [n for n, s in next_slot.items() if s + width <= 8 and flavor.lower() in n]
            if not free:
                break
            where = draw(st.sampled_from(sorted(free)))
            minted = draw(st.sampled_from([None, payer("a", flavor.lower(), owner="org:a")]))
            held = lease(
                f"{the_run.key}#{j}",
                the_run.key,
                width,
                node_name=where,
                first=next_slot[where],
                role=role,
                minted=minted,
            )
            next_slot[where] += width
            state.leases[held.id] = held
    state.rebuild_indexes()
    return state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states(), st.sampled_from(FLAVORS))
def test_remedies_from_the_matching_are_the_summaries_answer(
    state: FleetState, flavor: str
) -> None:
    fill = state.matching(T0)
    ev = summarize(state.meter, state.funding_inputs(), fill, T0)
    asking = [*state.runs.values(), run("a", "fresh", 8, flavor=flavor)]
    for who in asking:
        assert reservation._remedies(state, who, T0) == reference_remedies(state, who, ev)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(states())
def test_has_unfunded_actives_is_the_plain_walk_over_open_leases(state: FleetState) -> None:
    """The resolver's "anything to reclaim?" (``certain_to_wait`` asks it after every change):
    the two fast passes answer what walking every open active lease answers."""
    classes = state.matching(T0).funding_class
    plain = any(
        classes.get(x.id, FundingClass.UNFUNDED) is FundingClass.UNFUNDED
        for x in state.open_leases.values()
        if x.role is LeaseRole.ACTIVE
    )
    assert state.has_unfunded_actives(T0) is plain


def test_an_open_active_lease_the_matching_does_not_cover_counts_as_unfunded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = FleetState()
    n = node("h100-0")
    state.nodes[n.name] = n
    held = run("a", "r", 2)
    state.runs[held.key] = held
    spare = lease("a/r#0", held.key, 1, node_name=n.name, role=LeaseRole.SPARE)
    active = lease("a/r#1", held.key, 1, node_name=n.name, first=1)
    state.leases = {spare.id: spare, active.id: active}
    state.rebuild_indexes()
    covered = SimpleNamespace(funding_class={active.id: FundingClass.OWNED})
    monkeypatch.setattr(state, "matching", lambda at: covered)
    assert state.has_unfunded_actives(T0) is False  # the spare is not in it, and is no active
    state.version += 1  # a neutral change (a status, a reservation): the answer is kept
    covered.funding_class = {spare.id: FundingClass.OWNED}
    assert state.has_unfunded_actives(T0) is False
    state.funding_epoch += 1  # a change to who pays: asked again
    assert state.has_unfunded_actives(T0) is True  # the active is missing: unfunded
