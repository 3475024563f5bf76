"""A compiled, query-friendly view of every envelope and aggregate cap.

Budgets are user objects with datetimes and nested lists; the funding fill runs many times per
decision, so it works on this flat index instead: integer windows, resolved cap membership,
lending ACLs, and the *acceptor* groups (envelopes tied together by an aggregate cap must be
filled jointly, because one cap bounds them all).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpu_fleet.core.funding.family import Family, derive_family
from gpu_fleet.core.model import (
    LOCATION_KEYS,
    Budget,
    EnvelopeKey,
    Instant,
    Lease,
    Payer,
    to_instant,
)


@dataclass(frozen=True)
class EnvelopeInfo:
    key: EnvelopeKey
    owner: str
    flavor: str
    selector: Mapping[str, str]
    concurrency: int
    start: Instant | None
    end: Instant | None
    gpu_hours: float | None
    family_sharing: bool  # sharing != "none"
    pre_admission: bool  # preActivation.allowAdmission
    pre_reservations: bool  # preActivation.allowReservations (default: allowed)
    lending_allow: bool
    lending_to: tuple[str, ...]
    lending_max: int | None
    caps: tuple[str, ...]  # ids of aggregate caps this envelope belongs to

    @property
    def payer(self) -> Payer:
        return Payer(
            namespace=self.key.namespace,
            budget=self.key.budget,
            envelope=self.key.envelope,
            owner=self.owner,
        )

    def active_at(self, t: float) -> bool:
        """Window ``[start, end)``; a missing bound means never active (INV-WINDOW-REQUIRED)."""
        if self.start is None or self.end is None:
            return False
        return self.start <= t < self.end

    def admits_at(self, t: float) -> bool:
        """Cover may plan against it now: active, or before start with allowAdmission."""
        if self.start is None or self.end is None or t >= self.end:
            return False
        return t >= self.start or self.pre_admission

    def lends_to(self, borrower: str) -> bool:
        """Lending ACL: empty list or ``*`` = anyone; ``prefix*`` = prefix; else exact."""
        if not self.lending_allow or not borrower:
            return False
        if not self.lending_to:
            return True
        for entry in self.lending_to:
            if entry in ("*", borrower):
                return True
            if entry.endswith("*") and borrower.startswith(entry[:-1]):
                return True
        return False

    def matches_location(self, location: Mapping[str, str] | None) -> bool:
        """Same-location test of cover (SPEC §B.5): every selector key agrees or is ``*``."""
        if location is None:
            return False
        for k, v in self.selector.items():
            if v == "*":
                continue
            if location.get(k) != v:
                return False
        return True


@dataclass(frozen=True)
class CapInfo:
    id: str  # "ns/budget/cap"
    name: str
    flavor: str
    members: tuple[EnvelopeKey, ...]
    max_concurrency: int | None
    gpu_hours: float | None


@dataclass(frozen=True)
class EnvelopeIndex:
    """Every envelope and cap of a budget set, plus the family derived from the same set."""

    envelopes: Mapping[EnvelopeKey, EnvelopeInfo]
    caps: Mapping[str, CapInfo]
    family: Family
    by_owner_flavor: Mapping[tuple[str, str], tuple[EnvelopeInfo, ...]]
    acceptor_of: Mapping[EnvelopeKey, int]  # envelope -> acceptor group id
    acceptors: Sequence[tuple[EnvelopeKey, ...]]
    # The proposal lists built so far, per set of open envelopes (``proposals.Proposer.at``):
    # they depend only on the budgets and which windows are open, so they live as long as the
    # index (not an init field: ``dataclasses.replace`` starts a new index without them).
    proposer_caches: dict[frozenset[EnvelopeKey], object] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    # The instants at which the leases of the last tuple asked about start or end, and the
    # windows bound (``metering._points``): one slot, kept with the index it is of.
    points_of: list[tuple[Sequence[Lease], list[float]]] = field(
        default_factory=list, init=False, compare=False, repr=False
    )
    # Per node, a copy of its labels and their ``place_of`` (``proposals.Proposer.places``): a
    # pure function of the labels, so an index may be handed the dict of the one it replaces
    # (``build_index(..., node_places=)``), and a first evaluation after a budget change does
    # not read 54k nodes' labels again (issue 11).
    node_places: dict[str, tuple[dict[str, str] | None, Place | None]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @functools.cached_property
    def numbered(self) -> tuple[dict[EnvelopeKey, int], tuple[EnvelopeInfo, ...]]:
        """Each envelope's number (acceptor after acceptor), and the envelopes by number: the
        matching proposes in integer arrays (``matching._Proposing``), built once per index."""
        infos = tuple(self.envelopes[k] for members in self.acceptors for k in members)
        return {e.key: i for i, e in enumerate(infos)}, infos

    def owners_with_flavor(self, flavor: str) -> list[str]:
        return sorted({o for (o, f) in self.by_owner_flavor if f == flavor})

    def of_owner(self, owner: str, flavor: str) -> tuple[EnvelopeInfo, ...]:
        return self.by_owner_flavor.get((owner, flavor), ())


def location_of(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in LOCATION_KEYS if k in labels}


Place = tuple[str | None, ...]
"""A node's location labels as one hashable value: each of ``LOCATION_KEYS``, or ``None``."""


def place_of(labels: Mapping[str, str]) -> Place:
    return tuple(map(labels.get, LOCATION_KEYS))


def location_at(place: Place) -> dict[str, str]:
    """``location_of`` the labels ``place`` was taken from."""
    return {k: v for k, v in zip(LOCATION_KEYS, place, strict=True) if v is not None}


def build_index(
    budgets: Iterable[Budget],
    *,
    node_places: dict[str, tuple[dict[str, str] | None, Place | None]] | None = None,
) -> EnvelopeIndex:
    """Compile budgets; envelopes of an owner are ordered by (namespace, budget, envelope).
    ``node_places``: the nodes' places known so far, kept by the new index (``node_places``)."""
    budget_list = sorted(budgets, key=lambda b: (b.metadata.namespace, b.metadata.name))
    family = derive_family(budget_list)
    envelopes: dict[EnvelopeKey, EnvelopeInfo] = {}
    caps: dict[str, CapInfo] = {}
    caps_of: dict[EnvelopeKey, list[str]] = defaultdict(list)
    for b in budget_list:
        ns = b.metadata.namespace or "default"
        flavors = {e.name: e.flavor for e in b.spec.envelopes}
        for cap in b.spec.aggregate_caps:
            cap_id = f"{ns}/{b.metadata.name}/{cap.name}"
            members = tuple(
                EnvelopeKey(ns, b.metadata.name, m)
                for m in cap.envelopes
                if flavors.get(m) == cap.flavor
            )
            caps[cap_id] = CapInfo(
                cap_id, cap.name, cap.flavor, members, cap.max_concurrency, cap.gpu_hours
            )
            for m in members:
                caps_of[m].append(cap_id)
    for b in budget_list:
        ns = b.metadata.namespace or "default"
        for e in b.spec.envelopes:
            key = EnvelopeKey(ns, b.metadata.name, e.name)
            pre = e.pre_activation
            lend = e.lending
            envelopes[key] = EnvelopeInfo(
                key=key,
                owner=b.spec.owner,
                flavor=e.flavor,
                selector=dict(e.selector),
                concurrency=e.concurrency,
                start=to_instant(e.start) if e.start is not None else None,
                end=to_instant(e.end) if e.end is not None else None,
                gpu_hours=e.gpu_hours,
                family_sharing=e.sharing != "none",
                pre_admission=bool(pre and pre.allow_admission),
                pre_reservations=pre is None or pre.allow_reservations,
                lending_allow=bool(lend and lend.allow),
                lending_to=tuple(lend.to) if lend else (),
                lending_max=lend.max_concurrency if lend and lend.allow else None,
                caps=tuple(sorted(caps_of.get(key, ()))),
            )
    by_owner_flavor: dict[tuple[str, str], list[EnvelopeInfo]] = defaultdict(list)
    for key in sorted(envelopes):
        info = envelopes[key]
        by_owner_flavor[(info.owner, info.flavor)].append(info)

    # Acceptor groups: connected components of envelopes linked by aggregate caps.
    parent: dict[EnvelopeKey, EnvelopeKey] = {k: k for k in envelopes}

    def find(k: EnvelopeKey) -> EnvelopeKey:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for cap_info in caps.values():
        for a, b_ in zip(cap_info.members, cap_info.members[1:], strict=False):
            ra, rb = find(a), find(b_)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[EnvelopeKey, list[EnvelopeKey]] = defaultdict(list)
    for k in sorted(envelopes):
        groups[find(k)].append(k)
    acceptors = [tuple(v) for _, v in sorted(groups.items())]
    acceptor_of = {k: i for i, members in enumerate(acceptors) for k in members}
    return EnvelopeIndex(
        envelopes=envelopes,
        caps=caps,
        family=family,
        by_owner_flavor={k: tuple(v) for k, v in by_owner_flavor.items()},
        acceptor_of=acceptor_of,
        acceptors=acceptors,
        node_places={} if node_places is None else node_places,
    )
