"""The event-driven reconcile (issue 11, ``engine.waiting``): at each change only the waiting
runs that change could start are offered one, the decisions are exactly those of offering
every waiting run in turn, and the offers per change do not grow with the queue.

Each fleet here runs twice: with the shortcuts and ``check_shortcuts`` (every run the loop
passes over is shown certain to wait at its turn, then offered anyway and shown to emit
nothing) and without them (every run offered in turn, the reference).  The histories must be
equal event for event.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from builders import A100, T0, budget, env, lease, node, run
from test_incremental import check_reservation_views

from gpu_fleet.core.engine import Fleet, waiting
from gpu_fleet.core.engine import fleet as fleet_module
from gpu_fleet.core.ledger import Event, LeaseMinted, NodeRegistered, fold
from gpu_fleet.core.model import Budget, Node

NODES = [node("n1", 8), node("n2", 8, fabric="f2"), node("n3", 8, fabric="f3")]
TEAM = budget("t", "org:t", [env("e", 256)])


def pair(nodes: list[Node], budgets: list[Budget]) -> list[Fleet]:
    """The engine with its shortcuts (checked) and the reference, on the same fleet."""
    fleets = [Fleet(), Fleet()]
    fleets[0].check_shortcuts = True
    fleets[1].state.incremental = False
    for f in fleets:
        for n in nodes:
            f.register_node(n, T0)
        for b in budgets:
            f.apply(b, T0)
    return fleets


def both(fleets: list[Fleet], step: Callable[[Fleet], object]) -> None:
    for f in fleets:
        step(f)
    assert fleets[0].state.history == fleets[1].state.history
    check_reservation_views(fleets[0].state)


def full_fleet_with_queue(waiting_runs: int) -> list[Fleet]:
    """24 GPUs all held by three 8-GPU runs, and ``waiting_runs`` 8-GPU runs reserved."""
    fleets = pair(NODES, [TEAM])
    for i in range(3):
        both(fleets, lambda f, i=i: f.apply(run("t", f"busy{i}", 8), T0))
    for i in range(waiting_runs):
        both(fleets, lambda f, i=i: f.apply(run("t", f"w{i:03d}", 8), T0 + 1 + i))
    assert all(f.state.pending_reservation(f"t/w{i:03d}") for f in fleets for i in (0, 1))
    return fleets


def record_offers(monkeypatch: pytest.MonkeyPatch, fleet: Fleet) -> list[str]:
    """The runs ``fleet``'s reconciles offer a start from now on (shortcut or not), in order."""
    offered: list[str] = []
    real = waiting._attempt

    def noting(f: Fleet, key: str, now: int) -> list[Event]:
        if f is fleet:
            offered.append(key)
        return real(f, key, now)

    monkeypatch.setattr(waiting, "_attempt", noting)
    return offered


def stall_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reservations reaching their bound stay pending: their activation does not act."""
    monkeypatch.setattr(
        fleet_module,
        "activate_reservation",
        lambda *args, **kwargs: SimpleNamespace(events=[], retry=False),
    )


def offers_during(monkeypatch: pytest.MonkeyPatch, fleet: Fleet, step: Callable[[], object]) -> int:
    """How many waiting runs ``step``'s reconcile offers a start (shortcut or not)."""
    with monkeypatch.context() as patch:
        offered = record_offers(patch, fleet)
        step()
    return len(offered)


@pytest.mark.parametrize("depth", [10, 40])
def test_a_new_run_is_the_only_run_offered_in_a_full_fleet(
    monkeypatch: pytest.MonkeyPatch, depth: int
) -> None:
    """Whatever the depth of the queue, a submission into a full fleet offers one run (the
    new one); the reference offers every waiting run."""
    fleets = full_fleet_with_queue(depth)
    fast, ref = fleets
    fast.check_shortcuts = False  # the check offers every run on purpose
    at = T0 + 1000
    assert offers_during(monkeypatch, fast, lambda: fast.apply(run("t", "late", 8), at)) == 1
    assert offers_during(monkeypatch, ref, lambda: ref.apply(run("t", "late", 8), at)) == depth + 1
    assert fast.state.history == ref.state.history


def test_room_that_frees_goes_to_the_queue_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Completions free 8 GPUs at a time: the first promised run that fits starts, and only
    the runs that fit are offered a start."""
    fleets = full_fleet_with_queue(30)
    for i in range(3):
        both(fleets, lambda f, i=i: f.complete(f"t/busy{i}", T0 + 100 + i))
        assert fleets[0].state.status[f"t/w{i:03d}"].phase == "Running"
        assert fleets[0].state.status[f"t/w{i + 1:03d}"].phase == "Pending"
    fast = fleets[0]
    fast.check_shortcuts = False
    offered = offers_during(monkeypatch, fast, lambda: fast.complete("t/w000", T0 + 200))
    assert fast.state.status["t/w003"].phase == "Running"
    assert offered == 1  # the first run in line the freed GPUs fit, not the queue


def test_a_decision_that_leaves_work_unfunded_reopens_the_queue_behind_it() -> None:
    """An owner's run started from the queue recalls the width its child borrowed: the child
    now runs Unfunded, so reclaiming could make room, and every run behind is offered again
    (here a 16-GPU run that needed more than was free when the offers began)."""
    fleets = pair(
        NODES,
        [
            budget("p", "org:p", [env("e", 8)]),
            budget("c", "org:c", [env("e", 1, flavor=A100)], parents=["org:p"]),
            budget("q", "org:q", [env("e", 64)]),
        ],
    )
    both(fleets, lambda f: f.apply(run("c", "kid", 8), T0))
    both(fleets, lambda f: f.apply(run("q", "busy", 8), T0))
    both(fleets, lambda f: f.apply(run("q", "filler", 8), T0))
    both(fleets, lambda f: f.apply(run("p", "own", 8), T0 + 1))
    both(fleets, lambda f: f.apply(run("q", "big", 16), T0 + 2))
    state = fleets[0].state
    assert state.pending_reservation("p/own")
    assert state.pending_reservation("q/big")
    assert not state.has_unfunded_actives(T0 + 2)
    both(fleets, lambda f: f.complete("q/filler", T0 + 3))
    assert state.status["p/own"].phase == "Running"
    assert state.has_unfunded_actives(T0 + 3)  # c/kid, recalled by p/own


@pytest.mark.parametrize("change", ["delete", "second owner"])
def test_a_budget_change_refiles_every_waiting_run(change: str) -> None:
    """Parked runs whose namespace loses its funding principal - its Budget deleted, or a
    second Budget naming another owner - are offered a start at once (and held Unfunded), not
    left parked.  (The running work is another team's, still funded: nothing Unfunded sends
    the loop to the reference.)"""
    fleets = pair(NODES, [TEAM, budget("u", "org:u", [env("e", 64)])])
    for i in range(3):
        both(fleets, lambda f, i=i: f.apply(run("t", f"busy{i}", 8), T0))
    for i in range(3):
        both(fleets, lambda f, i=i: f.apply(run("u", f"w{i}", 8), T0 + 1 + i))
    state = fleets[0].state
    assert set(state.waiting_line().parked) == {"u/w0", "u/w1", "u/w2"}
    if change == "delete":
        both(fleets, lambda f: f.delete("Budget", "u", "u", T0 + 500))
    else:
        other = budget("u", "org:other", [env("e", 64)], name="other")
        both(fleets, lambda f: f.apply(other, T0 + 500))
    assert not state.has_unfunded_actives(T0 + 500)
    st = state.status["u/w2"]
    assert (st.phase, st.reason) == ("Pending", "Unfunded")
    assert not state.waiting_line().parked


def test_a_run_that_holds_a_lease_is_never_parked() -> None:
    """A waiting run holding an open lease could be topped up: the line files it as not
    parked the moment the lease is folded, so it is offered a start."""
    (fast, _) = full_fleet_with_queue(2)
    state = fast.state
    assert "t/w001" in state.waiting_line().parked
    fold(state, NodeRegistered(at=T0 + 600, node=node("n4", 8, fabric="f4")))
    minted = lease("t/w001-x", "t/w001", 1, node_name="n4", start=T0 + 600)
    fold(state, LeaseMinted(at=T0 + 600, lease=minted))
    line = state.waiting_line()
    assert "t/w001" not in line.parked
    assert "t/w001" in line.unparked


def test_a_due_reservation_is_offered_even_when_nothing_is_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reservation still pending at its bound (its activation did not act) is offered a
    start in the loop like any due run, though its flavor has nothing free."""
    fleets = full_fleet_with_queue(3)
    stall_activations(monkeypatch)
    res = fleets[0].state.pending_reservation("t/w000")
    assert res is not None
    offered = record_offers(monkeypatch, fleets[0])
    both(fleets, lambda f: f.advance_to(res.earliest_start))
    assert fleets[0].state.pending_reservations  # still waiting: nothing freed
    assert "t/w000" in offered


def test_a_run_whose_due_reservation_is_made_again_is_offered_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A due run offered a start that fails on topology (enough GPUs free, in two domains) is
    reserved again under a new name, later in line: it is still parked and its need still
    fits by count, but it was offered at its place already and is not offered again."""
    nodes = [node("n1", 4), node("n2", 4, fabric="f2"), node("n3", 8, fabric="f3")]
    fleets = pair(nodes, [TEAM])
    both(fleets, lambda f: f.apply(run("t", "big", 8, group_gpus=8), T0))
    both(fleets, lambda f: f.apply(run("t", "a", 4), T0))
    both(fleets, lambda f: f.apply(run("t", "b", 4), T0))
    both(fleets, lambda f: f.apply(run("t", "w", 8, group_gpus=8), T0 + 1))
    res = fleets[0].state.pending_reservation("t/w")
    assert res is not None
    both(fleets, lambda f: f.complete("t/a", T0 + 2))
    both(fleets, lambda f: f.complete("t/b", T0 + 3))
    assert fleets[0].state.status["t/w"].phase == "Pending"  # 8 free, but 4 + 4
    stall_activations(monkeypatch)
    offered = record_offers(monkeypatch, fleets[0])
    both(fleets, lambda f: f.advance_to(res.earliest_start))
    again = fleets[0].state.pending_reservation("t/w")
    assert again is not None
    assert again.name != res.name  # made again, later in line
    assert offered == ["t/w"]
