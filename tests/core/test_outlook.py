"""The funding outlook: when leases funded now will demote, at the current burn (DESIGN 1, 2).

Hand-computed cases on one envelope: a window that ends, GPU-hours that run out under the
hysteresis rule (the lowest-ranked claim demotes first, the top claim spends the envelope to
zero), a lease that ends before its funding does, and a prediction that moves when the burn
changes.
"""

from __future__ import annotations

from gpu_fleet.core.funding.outlook import demotions
from gpu_fleet.core.ledger import (
    BudgetApplied,
    Event,
    FleetState,
    LeaseClosed,
    LeaseMinted,
    NodeRegistered,
    RunSubmitted,
    fold,
)
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Budget, EnvelopeKey, Lease, LeaseRole, Node, Run

T0 = 1_772_409_600  # 2026-03-02T00:00:00Z
H = 3600
NODE = Node(
    name="n1",
    gpus=8,
    labels={"region": "r", "cluster": "c", "fabric.domain": "f", "gpu.flavor": "H100"},
)
ENV = EnvelopeKey("team", "b", "e")


def budget(end: str = "2027-01-01T00:00:00Z", hours: float | None = None) -> Budget:
    extra = f", gpuHours: {hours}" if hours is not None else ""
    (b,) = parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\n"
        "metadata: {name: b, namespace: team}\n"
        "spec: {owner: 'org:team', envelopes: [{name: e, flavor: H100, selector: {region: r},"
        f" concurrency: 8, start: '2026-01-01T00:00:00Z', end: '{end}'{extra}}}]}}\n"
    )
    assert isinstance(b, Budget)
    return b


def run(name: str) -> Run:
    (r,) = parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: team}}\n"
        "spec: {resources: {gpuType: H100, totalGPUs: 2}}\n"
    )
    assert isinstance(r, Run)
    return r


def lease(name: str, first: int, start: int = T0, end: int | None = None) -> Lease:
    return Lease(
        id=f"team/{name}@{start}#000",
        run=f"team/{name}",
        node="n1",
        slots=(f"n1#{first}", f"n1#{first + 1}"),
        role=LeaseRole.ACTIVE,
        group=0,
        start=start,
        end=end,
    )


def state(b: Budget, *leases: Lease) -> FleetState:
    st = FleetState()
    events: list[Event] = [NodeRegistered(at=T0, node=NODE), BudgetApplied(at=T0, budget=b)]
    for x in leases:
        events.append(RunSubmitted(at=x.start, run=run(x.run.split("/")[1])))
        events.append(LeaseMinted(at=x.start, lease=x))
    for e in events:
        fold(st, e)
    return st


def outlook(st: FleetState, now: int, horizon: int) -> list[tuple[str, int, str]]:
    return [
        (d.lease, d.at - T0, d.cause)
        for d in demotions(st.meter, st.funding_inputs(), now, horizon)
    ]


def test_a_window_that_ends_demotes_every_lease_it_pays_at_its_end() -> None:
    st = state(budget(end="2026-03-02T05:00:00Z"), lease("a", 0), lease("b", 2))
    got = demotions(st.meter, st.funding_inputs(), T0, T0 + 30 * 86400)
    assert [(d.lease, d.at - T0, d.cause, d.payer) for d in got] == [
        ("team/a@1772409600#000", 5 * H, "window", ENV),
        ("team/b@1772409600#000", 5 * H, "window", ENV),
    ]
    assert outlook(st, T0, T0 + 4 * H) == []  # beyond the horizon: nothing to say yet


def test_gpu_hours_run_out_lowest_rank_first_and_the_top_claim_spends_to_zero() -> None:
    """100 GPU-hours, two 2-GPU claims (burn 4/h), period 24h.  b (admitted later) keeps its
    funding while the hours cover one period of a's width (48): it demotes when 100 - 4t = 48,
    t = 13h.  a then burns 2/h from 48 to zero: 24h more, demoted at 37h."""
    st = state(budget(hours=100), lease("a", 0), lease("b", 2, start=T0 + 1))
    got = demotions(st.meter, st.funding_inputs(), T0 + 1, T0 + 30 * 86400)
    assert [(d.lease.split("@")[0], round((d.at - T0) / H, 2), d.cause) for d in got] == [
        ("team/b", 13.0, "gpu-hours"),
        ("team/a", 37.0, "gpu-hours"),
    ]
    first = got[0]
    assert (first.burn_gpus, first.exhausted_at) == (4, T0 + 1 + 25 * H)
    assert first.remaining_hours is not None
    assert round(first.remaining_hours, 2) == 100.0  # a ran one second alone before b


def test_a_lease_that_ends_first_is_an_expiry_not_a_demotion() -> None:
    st = state(budget(end="2026-03-02T05:00:00Z"), lease("a", 0, end=T0 + 2 * H))
    assert outlook(st, T0, T0 + 86400) == []


def test_the_prediction_moves_when_the_burn_changes() -> None:
    """When b's lease closes, a burns alone and spends the 100 hours to zero in 50h."""
    b_lease = lease("b", 2, start=T0 + 1)
    st = state(budget(hours=100), lease("a", 0), b_lease)
    fold(st, LeaseClosed(at=T0 + H, lease=b_lease.id, reason="Completed"))
    got = demotions(st.meter, st.funding_inputs(), T0 + H, T0 + 30 * 86400)
    # 100 - 4 GPU-hours used in the first hour = 96 left; 96 / 2 = 48h more.
    assert [(d.lease.split("@")[0], round((d.at - T0) / H, 2)) for d in got] == [("team/a", 49.0)]


def test_the_walk_leaves_the_folded_meter_alone() -> None:
    st = state(budget(hours=100), lease("a", 0))
    before = (st.meter.t, dict(st.meter.envelope_hours))
    demotions(st.meter, st.funding_inputs(), T0 + 10 * H, T0 + 30 * 86400)
    assert (st.meter.t, dict(st.meter.envelope_hours)) == before


def test_without_an_ending_window_or_an_allowance_nobody_can_demote() -> None:
    """Plain concurrency envelopes whose windows outlast the horizon: nothing to walk."""
    st = state(budget(end="2027-01-01T00:00:00Z"), lease("a", 0), lease("b", 2, end=T0 + H))
    assert outlook(st, T0, T0 + 30 * 86400) == []
