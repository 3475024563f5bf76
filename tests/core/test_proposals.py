"""The proposer's cached lists are the proximity order, wherever the claim's node is.

``Proposer.envelopes_for`` caches an owner's proposal groups once and then one list per location
as far as the envelopes' selectors tell locations apart (issue 11).  The reference here is the
order as it was computed before that cache: every family tier, then every sponsor, each split
into same-location envelopes and the others, recomputed for each call.
"""

from __future__ import annotations

import gc
import weakref
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from builders import T0, YEAR_END, YEAR_START, budget, env, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_fleet.core.funding import build_index
from gpu_fleet.core.funding.envelopes import EnvelopeIndex
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.proposals import OFFER_END, Proposals, Proposer
from gpu_fleet.core.model import EnvelopeKey, Run

TEAMS = [  # (namespace, owner, parents): a parent, two children, a grandchild, an outsider
    ("p", "org:p", ()),
    ("c1", "org:c1", ("org:p",)),
    ("c2", "org:c2", ("org:p",)),
    ("g", "org:g", ("org:c1",)),
    ("h", "org:h", ("org:c2",)),  # a cousin of g
    ("s", "org:s", ()),
]
KEYS = ("region", "cluster", "fabric.domain")
VALUES = ("a", "b", "*")

selectors = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=3)
locations = st.one_of(
    st.none(), st.dictionaries(st.sampled_from(KEYS), st.sampled_from(("a", "b")), max_size=3)
)


def reference_envelopes(
    index: EnvelopeIndex, run: Run, owner: str, location: Mapping[str, str] | None, t: float
) -> list[EnvelopeKey]:
    """SPEC §B.5's proximity order, straight from the index."""
    if not owner:
        return []
    flavor = run.flavor
    tiers: dict[Tier, list[str]] = defaultdict(list)
    for o in index.owners_with_flavor(flavor):
        tier = index.family.tier(o, owner)
        if tier is not Tier.NONE:
            tiers[tier].append(o)
    groups = [
        [
            e
            for o in sorted(tiers[tier])
            for e in index.of_owner(o, flavor)
            if e.active_at(t) and (tier is Tier.OWNER or e.family_sharing)
        ]
        for tier in sorted(tiers)
    ]
    funding = run.spec.funding
    if funding is not None and funding.allow_borrow and funding.sponsors:
        seen: set[str] = set()
        for sponsor in funding.sponsors:
            if sponsor in seen or index.family.tier(sponsor, owner) is not Tier.NONE:
                continue
            seen.add(sponsor)
            groups.append(
                [e for e in index.of_owner(sponsor, flavor) if e.active_at(t) and e.lends_to(owner)]
            )
    out = []
    for group in groups:
        out += [e.key for e in group if e.matches_location(location)]
        out += [e.key for e in group if not e.matches_location(location)]
    return out


@st.composite
def budgets(draw: st.DrawFn) -> list[Any]:
    out = []
    for ns, owner, parents in TEAMS:
        envs = [
            env(
                f"e{i}",
                draw(st.integers(1, 8)),
                selector=draw(selectors),
                sharing=draw(st.sampled_from(["", "none"])),
                lend=ns == "s",
                lend_to=draw(st.sampled_from([["*"], ["org:c*"], ["org:x"]])) if ns == "s" else (),
                start=draw(st.sampled_from([YEAR_START, T0 + 3600])),
                end=YEAR_END,
            )
            for i in range(draw(st.integers(0, 3)))
        ]
        if envs:
            out.append(budget(ns, owner, envs, parents=parents))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    budgets(), st.lists(st.tuples(st.sampled_from(TEAMS), st.booleans(), locations), max_size=12)
)
def test_cached_lists_are_the_proximity_order(
    drawn: list[Any], asks: list[tuple[tuple[str, str, tuple[str, ...]], bool, Any]]
) -> None:
    index = build_index(drawn)
    proposer = Proposer(index, T0)  # one proposer for every ask: its caches are exercised
    for (ns, _, _), borrows, location in asks:
        r = run(ns, "r", 8, sponsors=["org:s", "org:c2"] if borrows else ())
        owner = index.family.owner_of(ns)
        got = proposer.envelopes_for(r, owner, location)
        assert list(got) == reference_envelopes(index, r, owner, location, T0)
        ordered = proposer.ordered(r, owner, location, T0, admitting=False)
        assert [e.key for e in ordered] == list(got)
        assert_rows(index, proposer.proposals_for(r, owner, location), owner)


def assert_rows(index: EnvelopeIndex, proposals: Proposals, owner: str) -> None:
    """The rows the matching proposes with, as they are defined per envelope of the list."""
    number = index.numbered[0]
    tier = index.family.tier
    want = [
        (index.acceptor_of[k], number[k], int(tier(index.envelopes[k].owner, owner)))
        for k in proposals.keys
    ]
    assert proposals.rows == (*want, (OFFER_END, -1, 0))
    assert proposals.offers.tolist() == [list(row) for row in proposals.rows]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(budgets(), st.lists(st.tuples(st.sampled_from(TEAMS), st.booleans(), locations), max_size=8))
def test_instants_with_the_same_open_windows_share_the_lists(
    drawn: list[Any], asks: list[tuple[tuple[str, str, tuple[str, ...]], bool, Any]]
) -> None:
    index = build_index(drawn)
    before, later = T0, T0 + 7200  # some windows open at T0 + 3600
    assert Proposer.at(index, before)._lists is Proposer.at(index, before + 60)._lists
    opens = any(e.active_at(later) != e.active_at(before) for e in index.envelopes.values())
    assert (Proposer.at(index, later)._lists is not Proposer.at(index, before)._lists) == opens
    for t in (before, later, before):  # back again: the first one is still right
        for (ns, _, _), borrows, location in asks:
            r = run(ns, "r", 8, sponsors=["org:s"] if borrows else ())
            owner = index.family.owner_of(ns)
            got = Proposer.at(index, t).envelopes_for(r, owner, location)
            assert list(got) == reference_envelopes(index, r, owner, location, t)


def test_an_index_and_its_kept_lists_are_freed_without_the_cyclic_collector() -> None:
    """The services freeze their heap (runtime/heap.py): a cycle through a dropped index would
    stay until the next sweep, so what the index keeps must not refer back to it."""
    owner_budget = budget("p", "org:p", [env("e0", 8, selector={"region": "a"})])
    sponsor = budget("s", "org:s", [env("e0", 8, lend=True, lend_to=["*"])])
    index = build_index([owner_budget, sponsor])
    proposer = Proposer.at(index, T0)
    got = proposer.envelopes_for(run("p", "r", 8, sponsors=["org:s"]), "org:p", {"region": "a"})
    assert [str(k) for k in got] == ["p/p/e0", "s/s/e0"]
    assert index.proposer_caches  # the caches are kept
    gone = weakref.ref(index)
    was_on = gc.isenabled()
    gc.disable()
    try:
        del index, proposer
        assert gone() is None
    finally:
        if was_on:
            gc.enable()
