"""Who owns a namespace, and how close two owners are (SPEC §B.4.1, §B.4.2).

A Budget binds its namespace to an owner; a Run has no owner field, it inherits the owner of its
namespace.  Mis-bindings are not guessed around: a namespace with Budgets of two owners, or a
leaf owner bound in two namespaces, is *unbound* (owner ``""``) and its runs fund nothing.  The
conflicts are kept so ``explain`` can say exactly why.

Tiers rank how close a claim's owner is to an envelope's owner: own (1), child (2), sibling (3),
cousin (4), otherwise no relationship (sponsor territory).  Grandparents are not family.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpu_fleet.core.model import Budget


class Tier(enum.IntEnum):
    OWNER = 1
    CHILD = 2
    SIBLING = 3
    COUSIN = 4
    NONE = 9  # no family relationship: only a sponsor loan can fund it


class ConflictKind(enum.StrEnum):
    MULTIPLE_OWNERS = "MultipleOwners"
    LEAF_OWNER_SPANS_NAMESPACES = "LeafOwnerSpansNamespaces"


@dataclass(frozen=True)
class BindingConflict:
    namespace: str
    kind: ConflictKind
    owners: tuple[str, ...]

    def describe(self) -> str:
        if self.kind is ConflictKind.MULTIPLE_OWNERS:
            return (
                f"namespace {self.namespace} is bound to more than one owner "
                f"({', '.join(self.owners)})"
            )
        return (
            f"namespace {self.namespace} has no owner: leaf owner {self.owners[0]} "
            "is bound in more than one namespace"
        )


@dataclass(frozen=True)
class Family:
    """The derived owner map and the family graph, computed once per budget set."""

    owners: Mapping[str, str]  # namespace -> owner ("" when unbound)
    conflicts: Mapping[str, BindingConflict]
    parents_of: Mapping[str, frozenset[str]]
    children_of: Mapping[str, frozenset[str]]
    _tier_cache: dict[tuple[str, str], Tier] = field(default_factory=dict, compare=False)

    def owner_of(self, namespace: str) -> str:
        return self.owners.get(namespace or "default", "")

    def tier(self, envelope_owner: str, claim_owner: str) -> Tier:
        """Proximity of ``claim_owner`` to an envelope owned by ``envelope_owner``."""
        if not claim_owner or not envelope_owner:
            return Tier.NONE
        key = (envelope_owner, claim_owner)
        cached = self._tier_cache.get(key)
        if cached is not None:
            return cached
        result = self._tier(envelope_owner, claim_owner)
        self._tier_cache[key] = result
        return result

    def near(self, claim_owner: str) -> set[str]:
        """Every owner ``tier`` may place in ``claim_owner``'s family (a superset: the owner,
        its parents, their children, and their parents' grandchildren), so a caller asks for
        the tiers of these, not of every owner there is."""
        parents_of, children_of = self.parents_of, self.children_of
        none: frozenset[str] = frozenset()
        parents = parents_of.get(claim_owner, none)
        out = {claim_owner, *parents}
        for p in parents:
            out.update(children_of.get(p, none))
            for gp in parents_of.get(p, none):
                for uncle in children_of.get(gp, none):
                    out.update(children_of.get(uncle, none))
        return out

    def _tier(self, e: str, r: str) -> Tier:
        if e == r:
            return Tier.OWNER
        r_parents = self.parents_of.get(r, frozenset())
        if e in r_parents:
            return Tier.CHILD
        if r_parents & self.parents_of.get(e, frozenset()):
            return Tier.SIBLING
        # cousin: e is a child of a sibling of one of r's parents
        for p in r_parents:
            for gp in self.parents_of.get(p, frozenset()):
                for uncle in self.children_of.get(gp, frozenset()):
                    if uncle != p and e in self.children_of.get(uncle, frozenset()):
                        return Tier.COUSIN
        return Tier.NONE

    def proximity(self, claim_owner: str, candidates: Iterable[str]) -> list[tuple[Tier, str]]:
        """Family owners of ``candidates`` in cover order: tier, then owner name."""
        ranked = [(self.tier(o, claim_owner), o) for o in set(candidates)]
        return sorted(t for t in ranked if t[0] is not Tier.NONE)


def derive_family(budgets: Iterable[Budget]) -> Family:
    """Derive namespace owners and the family DAG; independent of input order."""
    owners_by_ns: dict[str, set[str]] = defaultdict(set)
    ns_by_owner: dict[str, set[str]] = defaultdict(set)
    parents: dict[str, set[str]] = defaultdict(set)
    children: dict[str, set[str]] = defaultdict(set)
    interior: set[str] = set()
    for b in budgets:
        ns = b.metadata.namespace or "default"
        owners_by_ns[ns].add(b.spec.owner)
        ns_by_owner[b.spec.owner].add(ns)
        for p in b.spec.parents:
            parents[b.spec.owner].add(p)
            children[p].add(b.spec.owner)
            interior.add(p)

    owners: dict[str, str] = {}
    conflicts: dict[str, BindingConflict] = {}
    for ns in sorted(owners_by_ns):
        names = sorted(owners_by_ns[ns])
        if len(names) > 1:
            owners[ns] = ""
            conflicts[ns] = BindingConflict(ns, ConflictKind.MULTIPLE_OWNERS, tuple(names))
        else:
            owners[ns] = names[0]
    for owner in sorted(ns_by_owner):
        spans = ns_by_owner[owner]
        if owner in interior or len(spans) < 2:
            continue
        for ns in sorted(spans):
            owners[ns] = ""
            if ns not in conflicts:
                conflicts[ns] = BindingConflict(
                    ns, ConflictKind.LEAF_OWNER_SPANS_NAMESPACES, (owner,)
                )
    return Family(
        owners=owners,
        conflicts=conflicts,
        parents_of={k: frozenset(v) for k, v in parents.items()},
        children_of={k: frozenset(v) for k, v in children.items()},
    )
