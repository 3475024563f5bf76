"""The funding summary read from a matching's columns is the summary of its per-lease maps.

A large matching hands ``summarize`` its claims as integer columns (``ClaimColumns``, issue 11)
so the totals are array sums instead of a walk over every open lease by id; these tests make
every matching large (``proposing_in``).  Over generated worlds -
family sharing, sponsors, loans, caps, hours, spares - both ways must give the same envelope,
cap and run totals, with runs and lenders in the same order.  And the place of a node, kept
between evaluations, follows the node when it is registered again with other labels.
"""

from __future__ import annotations

import copy
import dataclasses
import gc

import pytest
from builders import T0, World, budget, cap, env, key, lease, node, payer, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fill_equivalence import proposing_in
from test_incremental import NODES, budgets_of, drawn_runs, hours_views

from gpu_fleet.core.funding import (
    Evaluation,
    FillResult,
    Meter,
    Proposer,
    evaluate,
    summarize,
)
from gpu_fleet.core.ledger import (
    BudgetApplied,
    Event,
    LeaseMinted,
    NodeRegistered,
    RunSubmitted,
    fold,
    fold_all,
)
from gpu_fleet.core.model import EnvelopeKey, LeaseRole

COLUMNS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def totals(ev: Evaluation) -> tuple[object, ...]:
    """Everything the summary says, in order (dict order included)."""
    return (
        [dataclasses.asdict(u) for u in ev.envelopes.values()],
        [dataclasses.asdict(c) for c in ev.caps.values()],
        [(k, dataclasses.asdict(r), list(r.lenders)) for k, r in ev.runs.items()],
    )


def without_columns(f: FillResult) -> FillResult:
    return dataclasses.replace(f, columns=None)


@COLUMNS
@given(st.data())
def test_the_columns_sum_what_the_walk_over_the_leases_sums(data: st.DataObject) -> None:
    budgets = data.draw(budgets_of())
    drawn = drawn_runs(data, "r", 14)
    world = World(budgets, drawn.runs.values(), drawn.leases, nodes=NODES, admitted=drawn.admitted)
    hours = data.draw(hours_views(budgets))
    with proposing_in(arrays=True):
        f = world.fill(T0, hours)
    assert f.columns is not None
    meter = Meter(t=float(T0))
    inputs = world.inputs()
    assert totals(summarize(meter, inputs, f, T0)) == totals(
        summarize(meter, inputs, without_columns(f), T0)
    )


def test_a_lease_of_an_unknown_run_is_summed_by_the_walk() -> None:
    """A live lease whose run the fleet does not know is no claim: the columns would miss it,
    so the matching keeps none and the summary walks the leases (it counts as unfunded)."""
    world = World(
        [budget("a", "org:a", [env("e", 8)])],
        [run("a", "job", 2)],
        [lease("a/job#0", "a/job", 2), lease("a/ghost#0", "a/ghost", 3, first=2)],
    )
    with proposing_in(arrays=True):
        assert world.fill().columns is None
        ev = world.evaluate()
    assert ev.runs["a/ghost"].unfunded == 3
    assert ev.runs["a/job"].owned == 2
    assert [u.owned for u in ev.envelopes.values()] == [2]


def test_the_columns_count_spares_lenders_and_minted_payers_like_the_walk() -> None:
    """A child run spilling onto its parent's envelope (a lender), a funded spare, and a lease
    minted on the parent's envelope that no longer fits: each total the columns make matches
    the walk's, and each of those totals is there to compare."""
    world = World(
        [
            budget("p", "org:p", [env("e", 6)]),
            budget("a", "org:a", [env("e", 2)], parents=["org:p"]),
        ],
        [run("a", "big", 8), run("p", "own", 2)],
        [
            lease("a/big#0", "a/big", 2),
            lease("a/big#1", "a/big", 2, first=2, group=1),
            lease("a/big#2", "a/big", 2, first=4, group=2, role=LeaseRole.SPARE),
            lease("a/big#3", "a/big", 2, first=6, group=3, minted=payer("p", owner="org:p")),
            lease("p/own#0", "p/own", 2, node_name="n2"),
        ],
    )
    with proposing_in(arrays=True):
        f = world.fill()
    assert f.columns is not None
    meter = Meter(t=float(T0))
    got = summarize(meter, world.inputs(), f, T0)
    assert totals(got) == totals(summarize(meter, world.inputs(), without_columns(f), T0))
    big = got.runs["a/big"]
    assert (big.owned, big.shared, big.spares, big.unfunded) == (2, 2, 2, 2)
    assert big.lenders == {"org:p": 2}
    parent = got.envelopes[key("p")]
    assert (parent.owned, parent.shared, parent.spare, parent.unfunded) == (2, 4, 2, 2)


@pytest.mark.parametrize("arrays", [True, False])
def test_a_matchings_payers_are_not_tracked_by_the_cyclic_collector(arrays: bool) -> None:
    """Envelope keys hold strings only and are not tracked (``EnvelopeKey``), so the map of
    lease id to payer, 100k entries at fleet scale, is no container for the collector to walk
    after every evaluation.  A key still hashes, compares and survives a copy as a value."""
    world = World(
        [budget("a", "org:a", [env("e", 2)])],
        [run("a", "job", 4)],
        [lease("a/job#0", "a/job", 2), lease("a/job#1", "a/job", 2, first=2, group=1)],
    )
    with proposing_in(arrays=arrays):
        f = world.fill()
    assert f.payer == {"a/job#0": key("a"), "a/job#1": None}
    assert not gc.is_tracked(key("a"))
    assert not gc.is_tracked(f.payer)
    assert hash(key("a")) == hash(copy.deepcopy(key("a")))
    assert {key("a"): 1}[copy.deepcopy(key("a"))] == 1


def two_regions() -> World:
    """One run's lease on node n1 in r1, and an envelope in r1 and one in r2."""
    envelopes = [
        env("west", 2, selector={"region": "r1"}),
        env("east", 2, selector={"region": "r2"}),
    ]
    return World(
        [budget("a", "org:a", envelopes)],
        [run("a", "job", 2)],
        [lease("a/job#0", "a/job", 2)],
        nodes=[node("n1", 8, region="r1")],
    )


def test_a_node_registered_again_with_other_labels_is_placed_again() -> None:
    """The proposer keeps each node's place while the node keeps its labels; another map (the
    node registered again) is read again, so claims follow the node."""
    world = two_regions()
    proposer = Proposer.at(world.index, T0)
    west = world.node_labels["n1"]
    assert proposer.place_of_node("n1", west) is proposer.place_of_node("n1", west)
    assert world.fill().payer["a/job#0"] == key("a", "west")

    world.node_labels = {"n1": dict(node("n1", 8, region="r2").labels)}
    assert world.fill().payer["a/job#0"] == key("a", "east")


def test_a_small_matching_keeps_no_columns_and_proposes_in_python() -> None:
    """Below ``ARRAYS_FROM`` claims a matching proposes in Python and keeps no columns, so its
    summary is the walk's."""
    world = World(
        [budget("a", "org:a", [env("e", 8)])], [run("a", "job", 2)], [lease("a/job#0", "a/job", 2)]
    )
    f = world.fill()
    assert f.columns is None
    assert world.evaluate().runs["a/job"].owned == 2


def test_a_node_whose_labels_are_edited_in_place_is_placed_again() -> None:
    """The proposer compares a node's labels by value, so a caller that edits the map itself
    (no fleet does; the matching is still a pure function of it) gets the new place."""
    world = two_regions()
    assert world.fill().payer["a/job#0"] == key("a", "west")
    world.node_labels["n1"]["region"] = "r2"
    assert world.fill().payer["a/job#0"] == key("a", "east")


def test_a_budget_change_hands_the_nodes_places_to_the_new_index() -> None:
    """A fleet's state builds a new index when a Budget changes, and hands it the places it
    knows (a place depends on the node's labels only): the new index funds as a state folded
    from scratch does, and a node registered again with other labels is placed again."""
    world = two_regions()
    events: list[Event] = [
        NodeRegistered(at=T0, node=node("n1", 8, region="r1")),
        *(BudgetApplied(at=T0, budget=b) for b in world.budgets),
        *(RunSubmitted(at=T0, run=r) for r in world.runs.values()),
        LeaseMinted(at=T0, lease=world.leases[0]),
    ]
    state = fold_all(events)

    def payer_of_the_lease() -> EnvelopeKey | None:
        got = evaluate(state.meter, state.funding_inputs(), T0).fill.payer
        fresh = fold_all(events)
        assert got == evaluate(fresh.meter, fresh.funding_inputs(), T0).fill.payer
        return got["a/job#0"]

    assert payer_of_the_lease() == key("a", "west")
    index, places = state.index, state.index.node_places
    assert places

    def apply(event: Event) -> None:
        events.append(event)
        fold(state, event)

    west = env("west", 1, selector={"region": "r1"})  # too small for the lease now
    apply(
        BudgetApplied(
            at=T0, budget=budget("a", "org:a", [west, env("east", 2, selector={"region": "r2"})])
        )
    )
    assert payer_of_the_lease() == key("a", "east")
    assert state.index is not index
    assert state.index.node_places is places

    apply(BudgetApplied(at=T0, budget=world.budgets[0]))  # west fits again ...
    apply(NodeRegistered(at=T0, node=node("n1", 8, region="r2")))  # ... but n1 moved east
    assert payer_of_the_lease() == key("a", "east")


@pytest.mark.parametrize("arrays", [False, True])
def test_caps_are_read_in_their_order_whatever_limits_them(arrays: bool) -> None:
    """The trace counts an envelope's caps in the order the checks read them - every cap,
    the one without a concurrency limit too - as the matching always did."""
    world = World(
        [
            budget(
                "a",
                "org:a",
                [env("e", 8)],
                caps=[cap("c0", ["e"]), cap("c1", ["e"], max_concurrency=5)],
            )
        ],
        [run("a", "j", 1)],
        [lease("a/j#0", "a/j", 1)],
    )
    with proposing_in(arrays):
        trace = world.fill().trace
    assert trace is not None
    assert list(trace.cap.items()) == [("a/a/c0", 1), ("a/a/c1", 1)]


def test_a_repeated_lease_id_counts_once_in_a_large_matching() -> None:
    """The ledger refuses a second lease with the same id, but the matching is a pure function
    of what it is given: as a small matching does, the funded one counts, once, and the
    summary walks the maps (no columns)."""
    world = World(
        [budget("a", "org:a", [env("e", 2)])],
        [run("a", "j", 4)],
        [lease("a/j#0", "a/j", 2), lease("a/j#0", "a/j", 2, first=2)],
    )
    small = world.fill()
    with proposing_in(arrays=True):
        large = world.fill()
        ev = world.evaluate()
    assert large.columns is None
    assert list(large.payer.items()) == list(small.payer.items()) == [("a/j#0", key("a"))]
    assert (ev.runs["a/j"].owned, ev.runs["a/j"].unfunded) == (2, 0)
