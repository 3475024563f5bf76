"""The envelopes a claim proposes to, in proximity order (SPEC §B.5): own, parents, siblings,
cousins - same location first within each tier - then the sponsors its run opted into.

Shared by the matching (every open lease is a claim) and cover (a prospective claim); cached per
(owner, flavor, sponsors) and location because a fleet's leases take few distinct combinations.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from gpu_fleet.core.funding.envelopes import (
    EnvelopeIndex,
    EnvelopeInfo,
    Place,
    location_at,
    place_of,
)
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.model import EnvelopeKey, Run

_KEEP_OPEN_SETS = 4
"""Sets of open envelopes an index keeps proposal lists for: the instants a fleet evaluates at
usually fall in one or two."""


def _open_at(index: EnvelopeIndex, t: float) -> frozenset[EnvelopeKey]:
    return frozenset([k for k, e in index.envelopes.items() if e.active_at(t)])


_LocationKey = tuple[str | None, ...] | None
"""A location as far as some envelopes' selectors tell locations apart (``None``: unknown)."""


def _selector_keys(envelopes: Sequence[EnvelopeInfo]) -> tuple[str, ...]:
    """The location labels any of ``envelopes`` tests (a ``*`` value tests nothing)."""
    return tuple(sorted({k for e in envelopes for k, v in e.selector.items() if v != "*"}))


def _location_key(location: Mapping[str, str] | None, keys: tuple[str, ...]) -> _LocationKey:
    return None if location is None else tuple([location.get(k) for k in keys])


@dataclass(slots=True)
class _Group:
    """One proximity group (a family tier, or one sponsor): its usable envelopes in order, and
    its same-location-first split per location - as keys and as ``Proposals.rows`` - computed
    once per location the group's selectors tell apart."""

    envelopes: list[EnvelopeInfo]
    keys: tuple[str, ...]
    # The family tier of every envelope's owner to the claims' owner (``Tier.NONE``: a
    # sponsor's): one per group, as each family group is one tier and a sponsor is no family.
    tier: int
    split: dict[_LocationKey, tuple[tuple[EnvelopeKey, ...], tuple[Offer, ...]]] = field(
        default_factory=dict
    )

    def near_then_far(
        self, location: Mapping[str, str] | None, index: EnvelopeIndex
    ) -> tuple[tuple[EnvelopeKey, ...], tuple[Offer, ...]]:
        """The split at ``location``, and its rows.  Why rows per group: a list is its groups'
        splits end to end, and groups are shared by many lists (a family group by every sponsor
        list of its owner, a sponsor's by its every borrower's lists), so each row is made once
        per group, not once per list (a first evaluation at 100k open leases made 200k)."""
        loc_key = _location_key(location, self.keys)
        hit = self.split.get(loc_key)
        if hit is None:
            keys = tuple([e.key for e in _near_then_far([self.envelopes], location)])
            number, acceptor_of, tier = index.numbered[0], index.acceptor_of, self.tier
            rows = tuple([(acceptor_of[key], number[key], tier) for key in keys])
            hit = self.split[loc_key] = (keys, rows)
        return hit


OFFER_END = -1
"""The acceptor of the row after a claim's last offer: the end of its list (it goes unfunded)."""


Offer = tuple[int, int, int]
"""One row of ``Proposals.rows``: acceptor group, envelope number, tier."""

_LAST_ROW: Offer = (OFFER_END, -1, 0)
_SPONSOR_TIER = int(Tier.NONE)


@dataclass(frozen=True, slots=True)
class Proposals:
    """A claim's list: the envelopes in proximity order, and the same as the integer rows the
    matching proposes with (``rows``, and ``offers``: the same as an array).

    A row per envelope - its acceptor group, its number in the index
    (``EnvelopeIndex.numbered``), and the family tier of its owner to the claim's owner
    (``Tier.NONE``: a sponsor's) - then ``(OFFER_END, -1, 0)``.  Integers, so a round of
    proposals is a few array operations over every claim proposing in a large matching (issue
    11: a million proposals at 100k open leases), and a few lookups in a small one.
    Immutable, as the lists live as long as the index and every claim that shares one reads
    it."""

    keys: tuple[EnvelopeKey, ...]
    rows: tuple[Offer, ...]
    offers: np.ndarray = field(compare=False)


@dataclass(slots=True)
class RunLists:
    """One owner's proposal groups for a flavor and sponsor list, and the whole list per
    location as far as the groups' selectors tell locations apart."""

    owner: str
    groups: list[_Group]
    keys: tuple[str, ...]
    by_location: dict[_LocationKey, Proposals] = field(default_factory=dict)
    by_place: dict[Place | None, Proposals] = field(default_factory=dict)

    def at_place(self, place: Place | None, proposer: Proposer) -> Proposals:
        """``at`` the location of ``place`` (``None``: unknown); one lookup when known.

        Why: the matching asks once per run and node, 60k times at 100k open leases, and
        narrowing each location to the labels the groups' selectors test cost more than the
        rest of the lookup (issue 11)."""
        hit = self.by_place.get(place)
        if hit is None:
            location = None if place is None else location_at(place)
            hit = self.by_place[place] = self.at(location, proposer)
        return hit

    def at(self, location: Mapping[str, str] | None, proposer: Proposer) -> Proposals:
        """The list for a claim at ``location``; one object per list."""
        loc_key = _location_key(location, self.keys)
        hit = self.by_location.get(loc_key)
        if hit is None:
            splits = [g.near_then_far(location, proposer.index) for g in self.groups]
            keys = tuple([key for group_keys, _ in splits for key in group_keys])
            rows = (*itertools.chain.from_iterable([r for _, r in splits]), _LAST_ROW)
            offers = np.array(rows, dtype=np.int64)
            offers.flags.writeable = False
            hit = Proposals(keys, rows, offers)
            self.by_location[loc_key] = hit
        return hit


@dataclass(slots=True)
class _Caches:
    """What a proposer has built, kept by the index per set of open envelopes (``at``)."""

    lists: dict[tuple[str, str, tuple[str, ...]], RunLists] = field(default_factory=dict)
    family: dict[tuple[str, str], list[_Group]] = field(default_factory=dict)
    sponsor: dict[tuple[str, str, str], _Group] = field(default_factory=dict)
    owners: dict[str, set[str]] = field(default_factory=dict)
    tiers: dict[tuple[str, str], list[tuple[Tier, list[str]]]] = field(default_factory=dict)


class Proposer:
    """Builds each claim's ordered list of envelopes.

    Cached in layers because a fleet's leases take few distinct combinations, and at 100k open
    leases building the lists was a tenth of a funding evaluation (issue 11): each family tier
    group per (owner, flavor) and each sponsor group per (sponsor, flavor, owner), each split by
    location once per location its selectors tell apart; then each whole list per (owner,
    flavor, sponsors) and location.
    """

    def __init__(self, index: EnvelopeIndex, t: float, caches: _Caches | None = None) -> None:
        self.index = index
        self.t = t
        caches = caches or _Caches()
        self._lists = caches.lists
        self._family = caches.family
        self._sponsor = caches.sponsor
        self._owners = caches.owners
        self._tiers = caches.tiers
        # Per node, a copy of its labels and ``place_of`` them (``None``: an unknown node), read
        # again only when the labels differ.  Why: the matching asks for every lease, 54k
        # distinct nodes at 100k open leases, and reading the labels again at every evaluation
        # was a twentieth of one (issue 11); comparing two small maps costs a tenth of that.
        # A place depends on the labels only, so the index keeps them for every set of open
        # windows, and a fleet's state hands them on to the index it builds after a budget
        # change (``EnvelopeIndex.node_places``).
        self.places = index.node_places

    def place_of_node(self, node: str, labels: Mapping[str, str] | None) -> Place | None:
        """``place_of`` a node's ``labels`` (``None``: an unknown node), kept in ``places``."""
        hit = self.places.get(node)
        if hit is not None and hit[0] == labels:
            return hit[1]
        place = place_of(labels) if labels is not None else None
        self.places[node] = (None if labels is None else dict(labels), place)
        return place

    @classmethod
    def at(cls, index: EnvelopeIndex, t: float) -> Proposer:
        """The proposer for ``index`` at ``t``, with caches shared by every instant at which
        the same envelopes are open.

        Why: the lists depend only on the budgets and which windows are open, and building
        them from cold was a tenth of a funding evaluation at 100k open leases (issue 11),
        paid again at every evaluation although windows open and close rarely.  The index keeps
        the caches, not the proposer: they hold no reference back to the index, so an index
        dropped after a budget change is freed at once, without the cyclic collector.  Sharing
        is safe across threads: every cache entry is a pure function of its key (a node's
        place, of the labels kept beside it, and it is replaced whole), so a race at worst
        computes one twice.
        """
        kept = index.proposer_caches
        open_now = _open_at(index, t)
        caches = kept.get(open_now)
        if not isinstance(caches, _Caches):
            if len(kept) >= _KEEP_OPEN_SETS:
                kept.clear()
            caches = kept[open_now] = _Caches()
        return cls(index, t, caches)

    def envelopes_for(
        self, run: Run, owner: str, location: Mapping[str, str] | None
    ) -> tuple[EnvelopeKey, ...]:
        """``ordered`` for funding at ``t`` (not admitting), as keys; the same tuple for every
        claim that shares it."""
        return self.proposals_for(run, owner, location).keys

    def proposals_for(self, run: Run, owner: str, location: Mapping[str, str] | None) -> Proposals:
        """``envelopes_for``, with the offers the matching reads; one object per list."""
        return self.lists_for(run, owner).at(location, self)

    def lists_for(self, run: Run, owner: str) -> RunLists:
        """The lists of ``run``'s claims wherever they are (``RunLists.at``): looked up once
        per run, not once per lease."""
        funding = run.spec.funding
        sponsors = funding.sponsors if funding is not None and funding.allow_borrow else ()
        flavor = run.flavor
        lists_key = (owner, flavor, sponsors)
        lists = self._lists.get(lists_key)
        if lists is None:
            groups = self._funding_groups(flavor, owner, sponsors)
            labels = tuple(sorted({key for g in groups for key in g.keys}))  # ``_selector_keys``
            lists = self._lists[lists_key] = RunLists(owner, groups, labels)
        return lists

    def _funding_groups(self, flavor: str, owner: str, sponsors: Sequence[str]) -> list[_Group]:
        """``_groups`` for funding at ``t``, assembled from the cached family and sponsor
        groups."""
        if not owner:
            return []
        t = self.t
        family = self._family.get((flavor, owner))
        if family is None:
            family = self._family[(flavor, owner)] = [
                _Group(g, _selector_keys(g), int(tier))
                for tier, g in self._family_groups(flavor, owner, lambda e: e.active_at(t))
            ]
        out = list(family)
        for sponsor in self._lenders(owner, sponsors):
            group = self._sponsor.get((sponsor, flavor, owner))
            if group is None:
                envs = self._sponsor_envelopes(sponsor, flavor, owner, lambda e: e.active_at(t))
                group = self._sponsor[(sponsor, flavor, owner)] = _Group(
                    envs, _selector_keys(envs), _SPONSOR_TIER
                )
            out.append(group)
        return out

    def _family_tiers(self, flavor: str, owner: str) -> list[tuple[Tier, list[str]]]:
        """The owners of ``flavor`` envelopes in ``owner``'s family, grouped by tier (closest
        first, each group sorted); the same for every location and sponsor list, so cached.

        Only the owners the family graph reaches within a cousin's distance are asked for
        their tier (``Family.near``): asking every owner of the flavor made a first evaluation
        at fleet scale ask 200k times (issue 11)."""
        hit = self._tiers.get((flavor, owner))
        if hit is not None:
            return hit
        tiers: dict[Tier, list[str]] = defaultdict(list)
        owners = self._owners.get(flavor)
        if owners is None:
            owners = self._owners[flavor] = set(self.index.owners_with_flavor(flavor))
        family = self.index.family
        for o in family.near(owner):
            if o not in owners:
                continue
            tier = family.tier(o, owner)
            if tier is not Tier.NONE:
                tiers[tier].append(o)
        out = [(tier, sorted(tiers[tier])) for tier in sorted(tiers)]
        self._tiers[(flavor, owner)] = out
        return out

    def _family_groups(
        self, flavor: str, owner: str, usable: Callable[[EnvelopeInfo], bool]
    ) -> list[tuple[Tier, list[EnvelopeInfo]]]:
        """The usable envelopes of ``owner``'s family it may propose to, one group per family
        tier (closest first), with the tier."""
        of_owner = self.index.of_owner
        return [
            (
                tier,
                [
                    e
                    for o in tier_owners
                    for e in of_owner(o, flavor)
                    if usable(e) and (tier is Tier.OWNER or e.family_sharing)
                ],
            )
            for tier, tier_owners in self._family_tiers(flavor, owner)
        ]

    def _groups(
        self,
        flavor: str,
        owner: str,
        sponsors: Sequence[str],
        usable: Callable[[EnvelopeInfo], bool],
    ) -> list[list[EnvelopeInfo]]:
        """The usable envelopes ``owner`` may propose to, in groups of proximity order: each
        family tier (closest first), then each sponsor it opted into, in its order."""
        if not owner:
            return []
        out = [g for _, g in self._family_groups(flavor, owner, usable)]
        out += [
            self._sponsor_envelopes(s, flavor, owner, usable)
            for s in self._lenders(owner, sponsors)
        ]
        return out

    def _lenders(self, owner: str, sponsors: Sequence[str]) -> list[str]:
        """The sponsors a run opted into that can lend to ``owner``: outside its family, each
        once, in the run's order."""
        tier = self.index.family.tier
        return [s for s in dict.fromkeys(sponsors) if tier(s, owner) is Tier.NONE]

    def _sponsor_envelopes(
        self, sponsor: str, flavor: str, owner: str, usable: Callable[[EnvelopeInfo], bool]
    ) -> list[EnvelopeInfo]:
        return [e for e in self.index.of_owner(sponsor, flavor) if usable(e) and e.lends_to(owner)]

    def ordered(
        self,
        run: Run,
        owner: str,
        location: Mapping[str, str] | None,
        t: float,
        *,
        admitting: bool,
    ) -> list[EnvelopeInfo]:
        """Proximity order (SPEC §B.5) over envelopes usable at ``t``.

        ``admitting`` uses the cover window rule (allowAdmission opens pre-window planning);
        otherwise only envelopes whose window is active can fund.
        """

        def usable(e: EnvelopeInfo) -> bool:
            return e.admits_at(t) if admitting else e.active_at(t)

        funding = run.spec.funding
        sponsors = funding.sponsors if funding is not None and funding.allow_borrow else ()
        return _near_then_far(self._groups(run.flavor, owner, sponsors, usable), location)


def _near_then_far(
    groups: Sequence[Sequence[EnvelopeInfo]], location: Mapping[str, str] | None
) -> list[EnvelopeInfo]:
    """Each group's same-location envelopes, then its others, group after group."""
    out: list[EnvelopeInfo] = []
    for group in groups:
        near = [e.matches_location(location) for e in group]
        out.extend(e for e, here in zip(group, near, strict=True) if here)
        out.extend(e for e, here in zip(group, near, strict=True) if not here)
    return out
