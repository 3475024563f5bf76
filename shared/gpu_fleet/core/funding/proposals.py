"""The envelopes a claim proposes to, in proximity order (SPEC §B.5): own, parents, siblings,
cousins - same location first within each tier - then the sponsors its run opted into.

Shared by the matching (every open lease is a claim) and cover (a prospective claim); cached per
(owner, flavor, sponsors, location) because a fleet's leases take few distinct combinations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.model import EnvelopeKey, Run


class Proposer:
    """Builds each claim's ordered list of envelopes; cached per (run, location)."""

    def __init__(self, index: EnvelopeIndex, t: float) -> None:
        self.index = index
        self.t = t
        self._cache: dict[tuple[object, ...], list[EnvelopeKey]] = {}
        self._owners: dict[str, list[str]] = {}
        self._tiers: dict[tuple[str, str], list[tuple[Tier, list[str]]]] = {}
        self._sel_keys = tuple(sorted({k for e in index.envelopes.values() for k in e.selector}))

    def envelopes_for(
        self, run: Run, owner: str, location: Mapping[str, str] | None
    ) -> list[EnvelopeKey]:
        loc_key = None if location is None else tuple(location.get(k) for k in self._sel_keys)
        funding = run.spec.funding
        sponsors = funding.sponsors if funding is not None and funding.allow_borrow else ()
        cache_key = (owner, run.flavor, sponsors, loc_key)
        hit = self._cache.get(cache_key)
        if hit is not None:
            return hit
        out = [e.key for e in self.ordered(run, owner, location, self.t, admitting=False)]
        self._cache[cache_key] = out
        return out

    def _family_tiers(self, flavor: str, owner: str) -> list[tuple[Tier, list[str]]]:
        """The owners of ``flavor`` envelopes in ``owner``'s family, grouped by tier (closest
        first, each group sorted); the same for every location and sponsor list, so cached."""
        hit = self._tiers.get((flavor, owner))
        if hit is not None:
            return hit
        tiers: dict[Tier, list[str]] = defaultdict(list)
        owners = self._owners.get(flavor)
        if owners is None:
            owners = self._owners[flavor] = self.index.owners_with_flavor(flavor)
        for o in owners:
            tier = self.index.family.tier(o, owner)
            if tier is not Tier.NONE:
                tiers[tier].append(o)
        out = [(tier, sorted(tiers[tier])) for tier in sorted(tiers)]
        self._tiers[(flavor, owner)] = out
        return out

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
        index = self.index
        flavor = run.flavor
        out: list[EnvelopeInfo] = []
        if not owner:
            return out

        def usable(e: EnvelopeInfo) -> bool:
            return e.admits_at(t) if admitting else e.active_at(t)

        for tier, tier_owners in self._family_tiers(flavor, owner):
            envs = [
                e
                for o in tier_owners
                for e in index.of_owner(o, flavor)
                if usable(e) and (tier is Tier.OWNER or e.family_sharing)
            ]
            out.extend(e for e in envs if e.matches_location(location))
            out.extend(e for e in envs if not e.matches_location(location))
        funding = run.spec.funding
        if funding is not None and funding.allow_borrow and funding.sponsors:
            seen: set[str] = set()
            for sponsor in funding.sponsors:
                if sponsor in seen or index.family.tier(sponsor, owner) is not Tier.NONE:
                    continue
                seen.add(sponsor)
                envs = [
                    e for e in index.of_owner(sponsor, flavor) if usable(e) and e.lends_to(owner)
                ]
                out.extend(e for e in envs if e.matches_location(location))
                out.extend(e for e in envs if not e.matches_location(location))
        return out
