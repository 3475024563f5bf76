"""Owner derivation and family tiers (SPEC §B.4.1, §B.4.2)."""

from __future__ import annotations

import itertools

import pytest
from builders import budget
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.core.funding import ConflictKind, Tier, derive_family
from gpu_fleet.core.model import Budget


class TestOwnerDerivation:
    def test_single_owner_binds_namespace(self) -> None:
        """A namespace whose Budgets all name one owner is bound to it."""
        fam = derive_family([budget("ns-a", "org:a"), budget("ns-a", "org:a", name="second")])
        assert fam.owner_of("ns-a") == "org:a"
        assert fam.conflicts == {}

    def test_namespace_without_budget_is_unbound(self) -> None:
        """A namespace no Budget names has owner ''."""
        fam = derive_family([budget("ns-a", "org:a")])
        assert fam.owner_of("elsewhere") == ""

    def test_empty_namespace_reads_as_default(self) -> None:
        """The one namespaced-key rule: an empty namespace is 'default'."""
        fam = derive_family([budget("default", "org:d")])
        assert fam.owner_of("") == "org:d"

    def test_multiple_owners_unbind_namespace_with_conflict_text(self) -> None:
        """Two owners in one namespace: unbound, conflict MultipleOwners naming both owners."""
        fam = derive_family([budget("ns", "org:b", name="b1"), budget("ns", "org:a", name="b2")])
        assert fam.owner_of("ns") == ""
        conflict = fam.conflicts["ns"]
        assert conflict.kind is ConflictKind.MULTIPLE_OWNERS
        assert conflict.owners == ("org:a", "org:b")
        assert conflict.describe() == "namespace ns is bound to more than one owner (org:a, org:b)"

    def test_leaf_owner_spanning_namespaces_unbinds_both(self) -> None:
        """A leaf owner bound in two namespaces leaves both unbound (LeafOwnerSpansNamespaces)."""
        fam = derive_family([budget("ns1", "org:leaf"), budget("ns2", "org:leaf")])
        assert fam.owner_of("ns1") == ""
        assert fam.owner_of("ns2") == ""
        for ns in ("ns1", "ns2"):
            c = fam.conflicts[ns]
            assert c.kind is ConflictKind.LEAF_OWNER_SPANS_NAMESPACES
            assert c.owners == ("org:leaf",)
            assert "leaf owner org:leaf is bound in more than one namespace" in c.describe()

    def test_leaf_collision_leaves_unrelated_namespaces_alone(self) -> None:
        """Only the namespaces a colliding leaf owner touches become unbound."""
        fam = derive_family(
            [budget("ns1", "org:leaf"), budget("ns2", "org:leaf"), budget("ns3", "org:other")]
        )
        assert fam.owner_of("ns3") == "org:other"
        assert "ns3" not in fam.conflicts

    def test_interior_owner_in_two_namespaces_is_fine(self) -> None:
        """An owner named as someone's parent may be bound in several namespaces."""
        fam = derive_family(
            [
                budget("p1", "org:parent"),
                budget("p2", "org:parent"),
                budget("kid", "org:kid", parents=["org:parent"]),
            ]
        )
        assert fam.owner_of("p1") == "org:parent"
        assert fam.owner_of("p2") == "org:parent"
        assert fam.owner_of("kid") == "org:kid"
        assert fam.conflicts == {}

    def test_multiple_owners_conflict_wins_over_leaf_conflict(self) -> None:
        """A namespace both multi-owner and touched by a spanning leaf keeps MultipleOwners."""
        fam = derive_family(
            [
                budget("ns1", "org:a", name="x"),
                budget("ns1", "org:b", name="y"),
                budget("ns2", "org:a"),
            ]
        )
        assert fam.conflicts["ns1"].kind is ConflictKind.MULTIPLE_OWNERS
        assert fam.conflicts["ns2"].kind is ConflictKind.LEAF_OWNER_SPANS_NAMESPACES
        assert fam.owner_of("ns2") == ""

    def test_derivation_is_independent_of_input_order(self) -> None:
        """Owners and conflicts are the same for every permutation of the Budgets."""
        budgets = [
            budget("ns1", "org:leaf"),
            budget("ns2", "org:leaf"),
            budget("ns3", "org:b", name="x"),
            budget("ns3", "org:a", name="y"),
            budget("p1", "org:parent"),
            budget("p2", "org:parent"),
            budget("kid", "org:kid", parents=["org:parent"]),
        ]
        reference = derive_family(budgets)
        for perm in itertools.permutations(budgets):
            fam = derive_family(perm)
            assert dict(fam.owners) == dict(reference.owners)
            assert dict(fam.conflicts) == dict(reference.conflicts)


def _tree() -> list[Budget]:
    """root -> {a, b}; a -> {a1, a2}; b -> {b1}; b1 -> {b1x}."""
    return [
        budget("root", "root"),
        budget("a", "a", parents=["root"]),
        budget("b", "b", parents=["root"]),
        budget("a1", "a1", parents=["a"]),
        budget("a2", "a2", parents=["a"]),
        budget("b1", "b1", parents=["b"]),
        budget("b1x", "b1x", parents=["b1"]),
    ]


class TestTiers:
    @pytest.mark.parametrize(
        ("envelope_owner", "claim_owner", "tier"),
        [
            ("a", "a", Tier.OWNER),
            ("a", "a1", Tier.CHILD),  # a1's parent owns the envelope
            ("root", "a", Tier.CHILD),
            ("a2", "a1", Tier.SIBLING),  # shared parent a
            ("b", "a", Tier.SIBLING),
            ("b1", "a1", Tier.COUSIN),  # b1 is a child of b, a sibling of a1's parent a
            ("a1", "b1", Tier.COUSIN),
            ("root", "a1", Tier.NONE),  # grandparent is not family
            ("a", "root", Tier.NONE),  # a parent claiming on its child's envelope: not family
            ("b1x", "a1", Tier.NONE),  # second cousin once removed: not family
            ("a", "stranger", Tier.NONE),
        ],
    )
    def test_tier_of_claim_against_envelope_owner(
        self, envelope_owner: str, claim_owner: str, tier: Tier
    ) -> None:
        """Own / child / sibling / cousin / none, as SPEC §B.4.2 defines them."""
        fam = derive_family(_tree())
        assert fam.tier(envelope_owner, claim_owner) is tier

    def test_empty_owner_is_never_family(self) -> None:
        """An unbound ('') claim owner or envelope owner has no relationship, not even own."""
        fam = derive_family(_tree())
        assert fam.tier("", "") is Tier.NONE
        assert fam.tier("a", "") is Tier.NONE
        assert fam.tier("", "a") is Tier.NONE

    def test_grandparent_excluded_from_proximity(self) -> None:
        """Proximity lists own, parents, siblings, cousins in tier order, never the grandparent."""
        fam = derive_family(_tree())
        got = fam.proximity("a1", ["root", "a", "a1", "a2", "b", "b1", "b1x", "stranger"])
        assert got == [
            (Tier.OWNER, "a1"),
            (Tier.CHILD, "a"),
            (Tier.SIBLING, "a2"),
            (Tier.COUSIN, "b1"),
        ]

    def test_tier_cache_does_not_leak_between_families(self) -> None:
        """A tier computed once is stable, and a different budget set derives its own tiers."""
        fam = derive_family(_tree())
        assert fam.tier("a", "a1") is Tier.CHILD
        assert fam.tier("a", "a1") is Tier.CHILD
        other = derive_family([budget("a1", "a1")])
        assert other.tier("a", "a1") is Tier.NONE


OWNERS = [f"o{i}" for i in range(7)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OWNERS), st.sampled_from(OWNERS)), max_size=14))
def test_near_holds_every_owner_of_the_family(edges: list[tuple[str, str]]) -> None:
    """``near`` is what the proposal lists ask tiers for instead of every owner: each owner with
    a tier to the claim's owner must be in it (random parent graphs, cycles and self-parents
    included)."""
    parents: dict[str, list[str]] = {o: [] for o in OWNERS}
    for child, parent in edges:
        parents[child].append(parent)
    fam = derive_family([budget(o, o, parents=parents[o]) for o in OWNERS])
    for claim_owner in [*OWNERS, "stranger"]:
        near = fam.near(claim_owner)
        family = {o for o in [*OWNERS, "stranger"] if fam.tier(o, claim_owner) is not Tier.NONE}
        assert family <= near
    assert fam.near("stranger") == {"stranger"}  # outside the graph: only itself
    assert derive_family(_tree()).near("a1") == {"a1", "a", "a2", "b1"}
