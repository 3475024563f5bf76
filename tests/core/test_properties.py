"""Properties of the funding matching and the Fleet over generated worlds (DESIGN 1, 9)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from builders import HOUR, MINUTE, T0, World, budget, cap, env, lease, node, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.funding import Tier, build_index
from gpu_fleet.core.ledger import LeaseClosed, check_invariants
from gpu_fleet.core.model import Budget, EnvelopeKey, FundingClass, Lease, Payer, Run

# derandomization comes from the suite's Hypothesis profile (tests/conftest.py: "ci")
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NODES = [node("n1", 64, region="r1"), node("n2", 64, region="r2", fabric="f2")]
# (namespace, owner, parents); org:s is a non-family sponsor
TEAMS = [
    ("p", "org:p", ()),
    ("c1", "org:c1", ("org:p",)),
    ("c2", "org:c2", ("org:p",)),
    ("s", "org:s", ()),
]
ACLS = [[], ["*"], ["org:c1"], ["org:c*"], ["org:x"]]


@dataclass
class Generated:
    budgets: list[Budget]
    runs: list[Run]
    leases: list[Lease]
    admitted: dict[str, int]
    envelopes: list[tuple[str, str]] = field(default_factory=list)  # (namespace, envelope)


@st.composite
def worlds(draw: st.DrawFn, *, loans: bool = True, caps: bool = True) -> Generated:
    budgets: list[Budget] = []
    env_keys: list[tuple[str, str]] = []
    for ns, owner, parents in TEAMS:
        if ns == "s" and not loans:
            continue
        envs: list[dict[str, Any]] = []
        for i in range(draw(st.integers(1, 2))):
            kw: dict[str, Any] = {
                "selector": {"region": draw(st.sampled_from(["r1", "r2", "*"]))},
                "sharing": draw(st.sampled_from(["", "", "none"])),
            }
            if ns == "s":
                kw["lend"] = draw(st.integers(0, 3)) > 0
                kw["lend_to"] = draw(st.sampled_from(ACLS))
                kw["lend_max"] = draw(st.one_of(st.none(), st.integers(1, 6)))
            if ns in ("c1", "c2"):
                kw["flavor"] = draw(st.sampled_from(["H100", "A100"]))  # A100: must spill
            envs.append(env(f"e{i}", draw(st.integers(1, 6)), **kw))
            env_keys.append((ns, f"e{i}"))
        cap_list = []
        if caps and len(envs) == 2 and draw(st.booleans()):
            cap_list = [cap("both", ["e0", "e1"], max_concurrency=draw(st.integers(1, 12)))]
        budgets.append(budget(ns, owner, envs, parents=parents, caps=cap_list))

    runs: list[Run] = []
    leases: list[Lease] = []
    admitted: dict[str, int] = {}
    next_slot = {"n1": 0, "n2": 0}
    for ns, _, _ in TEAMS[:3]:
        for j in range(draw(st.integers(0, 3))):
            borrow = loans and ns != "p" and draw(st.integers(0, 3)) > 0
            r = run(
                ns,
                f"r{j}",
                8,
                sponsors=["org:s"] if borrow else (),
                max_borrow=draw(st.one_of(st.none(), st.integers(1, 6))) if borrow else None,
            )
            runs.append(r)
            admitted[r.key] = T0 + draw(st.integers(0, 5)) * MINUTE
            for k in range(draw(st.integers(1, 2))):
                n = draw(st.sampled_from(["n1", "n2"]))
                width = draw(st.integers(1, 4))
                minted = draw(st.one_of(st.none(), st.sampled_from(env_keys)))
                payer = None
                if minted is not None and (loans or minted[0] != "s"):
                    payer = Payer(
                        namespace=minted[0], budget=minted[0], envelope=minted[1], owner=""
                    )
                leases.append(
                    lease(
                        f"{r.key}#{k}",
                        r.key,
                        width,
                        node_name=n,
                        first=next_slot[n],
                        group=draw(st.integers(0, 2)),
                        minted=payer,
                    )
                )
                next_slot[n] += width
    return Generated(budgets, runs, leases, admitted, env_keys)


def world_of(
    g: Generated, *, budgets: list[Budget] | None = None, leases: list[Lease] | None = None
) -> World:
    return World(
        budgets if budgets is not None else g.budgets,
        g.runs,
        leases if leases is not None else g.leases,
        nodes=NODES,
        admitted=g.admitted,
    )


@PROPS
@given(worlds(), st.randoms(use_true_random=False))
def test_input_order_never_changes_class_or_payer(g: Generated, rnd: random.Random) -> None:
    """Shuffling the lease and budget input order never changes any lease's class or payer."""
    base = world_of(g).fill()
    leases, budgets = list(g.leases), list(g.budgets)
    rnd.shuffle(leases)
    rnd.shuffle(budgets)
    shuffled = world_of(g, budgets=budgets, leases=leases).fill()
    assert shuffled.funding_class == base.funding_class
    assert shuffled.payer == base.payer


@PROPS
@given(worlds())
def test_funded_width_within_every_cap(g: Generated) -> None:
    """Funded width never exceeds envelope concurrency, aggregate caps, lending caps, maxBorrow."""
    w = world_of(g)
    f = w.fill()
    by_id = {x.id: x for x in g.leases}
    runs = {r.key: r for r in g.runs}
    funded: dict[EnvelopeKey, int] = defaultdict(int)
    lent: dict[EnvelopeKey, int] = defaultdict(int)
    borrowed_by_run: dict[str, int] = defaultdict(int)
    for lid, env_key in f.payer.items():
        if env_key is None:
            assert f.funding_class[lid] is FundingClass.UNFUNDED
            continue
        width = by_id[lid].width
        funded[env_key] += width
        info = w.index.envelopes[env_key]
        assert info.active_at(T0)
        assert info.flavor == runs[by_id[lid].run].flavor
        claim_owner = w.index.family.owner_of(runs[by_id[lid].run].metadata.namespace)
        tier = w.index.family.tier(info.owner, claim_owner)
        expected = {
            Tier.OWNER: FundingClass.OWNED,
            Tier.NONE: FundingClass.BORROWED,
        }.get(tier, FundingClass.SHARED)
        assert f.funding_class[lid] is expected
        if tier is not Tier.OWNER:
            assert info.family_sharing or tier is Tier.NONE
        if expected is FundingClass.BORROWED:
            assert info.lends_to(claim_owner)
            lent[env_key] += width
            borrowed_by_run[by_id[lid].run] += width
    for env_key, width in funded.items():
        assert width <= w.index.envelopes[env_key].concurrency
    for env_key, width in lent.items():
        lend_max = w.index.envelopes[env_key].lending_max
        assert lend_max is None or width <= lend_max
    for c in w.index.caps.values():
        total = sum(funded.get(m, 0) for m in c.members)
        assert c.max_concurrency is None or total <= c.max_concurrency
    for run_key, width in borrowed_by_run.items():
        funding = runs[run_key].spec.funding
        assert funding is not None
        assert funding.max_borrow_gpus is None or width <= funding.max_borrow_gpus


@PROPS
@given(worlds(loans=False, caps=False), st.integers(0, 1), st.integers(1, 10), st.data())
def test_owner_always_recalls(g: Generated, which: int, width: int, data: st.DataObject) -> None:
    """Without loans, a new owner claim that fits its first envelope's concurrency is funded."""
    index = build_index(g.budgets)
    own_envs = index.of_owner("org:p", "H100")
    target = own_envs[min(which, len(own_envs) - 1)]
    width = min(width, target.concurrency)
    region = data.draw(st.sampled_from(["r1", "r2"]))
    owner_run = run("p", "recall", width)
    node_name = "n1" if region == "r1" else "n2"
    used = sum(x.width for x in g.leases if x.node == node_name)
    newcomer = lease("recall#0", owner_run.key, width, node_name=node_name, first=used)
    # the owner's other runs would be senior owner claims; keep only family claims
    family_only = [x for x in g.leases if not x.run.startswith("p/")]
    g2 = Generated(
        g.budgets,
        [*(r for r in g.runs if r.metadata.namespace != "p"), owner_run],
        [*family_only, newcomer],
        {**g.admitted, owner_run.key: T0 + HOUR},
    )
    f = world_of(g2).fill()
    assert f.funding_class["recall#0"] is FundingClass.OWNED
    assert f.payer["recall#0"] is not None
    assert index.envelopes[f.payer["recall#0"]].owner == "org:p"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(2, 16),
    st.lists(st.integers(1, 6), min_size=1, max_size=5),
    st.integers(0, 15),
    st.booleans(),
)
def test_budget_cut_demotes_never_closes(
    conc: int, widths: list[int], cut: int, with_child: bool
) -> None:
    """Cutting an envelope via Fleet.apply never closes a lease; the ledger stays healthy."""
    fleet = Fleet()
    for n in NODES:
        fleet.register_node(n, T0)
    fleet.apply(budget("p", "org:p", [env("e", conc, selector={"region": "*"})]), T0)
    if with_child:
        fleet.apply(budget("c1", "org:c1", [env("e", 1, flavor="A100")], parents=["org:p"]), T0)
    for i, w in enumerate(widths):
        ns = "c1" if with_child and i % 2 else "p"
        fleet.apply(run(ns, f"r{i}", w), T0 + i)
    open_before = set(fleet.state.open_leases)
    smaller = max(1, min(cut, conc - 1))
    events = fleet.apply(
        budget("p", "org:p", [env("e", smaller, selector={"region": "*"})]), T0 + HOUR
    )
    events += fleet.advance_to(T0 + 3 * HOUR)
    assert not [e for e in events if isinstance(e, LeaseClosed)]
    assert open_before <= set(fleet.state.open_leases)
    assert check_invariants(fleet.state) == []
