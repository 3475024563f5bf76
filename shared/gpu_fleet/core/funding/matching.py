"""Who pays for every open lease at an instant: the stable matching of DESIGN decision 9.

Every live lease is a *claim*.  It proposes to the envelopes it may use in proximity order (own,
parents, siblings, cousins - same location first within each tier - then the sponsors its run
opted into).  Each envelope keeps the highest-ranked claims that fit its concurrency, its lending
cap, its aggregate caps and its GPU-hours, and turns the rest away to propose further (deferred
acceptance).  Envelopes tied by an aggregate cap decide jointly, because the cap binds them all.

Ranking on an envelope, most senior first:

0. loans the envelope granted (the lease was minted on it as a borrow): a loan is a contract and
   is never recalled;
1-4. owner, child, sibling, cousin claims (family sharing is recallable, so the owner wins);
5. sponsor claims the envelope never granted: they only ever take free headroom.

Inside a rank: admission time, run key, group index (numeric), then the lease's first slot.
So the lowest groups of a malleable run fund first, and a senior claim too big to fit never
blocks a smaller junior one (skip semantics).  A claim is funded whole or not at all.

GPU-hours (DESIGN decision 1) use hysteresis over the accounting period P: a *new* claim needs
the remaining hours to cover one period of its width plus the funded widths above it; a claim
*already funded* keeps its payer while the remaining hours still exceed one period of the widths
above it.  The top claim therefore spends the envelope to zero and lower claims demote first.

The result is a pure function of its inputs; nothing here is stored on a lease.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np

from gpu_fleet.core.funding.accepted_rows import AcceptedRows, HeldRanks, Tails
from gpu_fleet.core.funding.envelopes import EnvelopeIndex, EnvelopeInfo, Place
from gpu_fleet.core.funding.family import Tier
from gpu_fleet.core.funding.fill_result import (
    Accepted,
    ClaimColumns,
    FillResult,
    FillTrace,
    HoursChecks,
    Rejection,
    RejectionLog,
)
from gpu_fleet.core.funding.native import NATIVE
from gpu_fleet.core.funding.proposals import OFFER_END, Proposals, Proposer, RunLists
from gpu_fleet.core.gcpause import paused_gc
from gpu_fleet.core.model import EnvelopeKey, FundingClass, Instant, Lease, LeaseRole, Run

_K = TypeVar("_K")

HOURS_EPSILON = 1e-6
"""GPU-hours below which two amounts are equal (keeps float crossings from flapping)."""

LOAN = 0
SPONSOR = 5


@dataclass(frozen=True)
class HoursView:
    """The GPU-hour state the fill needs: what is left, and who was funded just before."""

    period_hours: float = 24.0
    remaining_envelope: Mapping[EnvelopeKey, float] = field(default_factory=dict)
    remaining_cap: Mapping[str, float] = field(default_factory=dict)
    previously_funded: frozenset[tuple[str, EnvelopeKey]] = frozenset()


def hours_checks_of(hours: HoursView) -> HoursChecks | None:
    """A record for the GPU-hour checks of a matching under ``hours`` (``HoursChecks``), or
    ``None`` if it sets no hours left (no envelope or cap sets GPU-hours)."""
    if not hours.remaining_envelope and not hours.remaining_cap:
        return None
    return HoursChecks(
        hours.period_hours,
        hours.remaining_envelope,
        hours.remaining_cap,
        hours.previously_funded,
    )


_FIRST_SLOTS: dict[tuple[str, ...], tuple[str, int]] = {}
_FIRST_SLOTS_KEPT = 1 << 18
"""Slot tuples whose first slot ``_first_slot`` keeps: a 100k-lease fleet's, and more."""


def _first_slot(slots: tuple[str, ...]) -> tuple[str, int]:
    """The lease's first physical slot, as (node, ordinal); parsed once per slot tuple (the
    dict holds a 100k-lease fleet's: every evaluation meets the same leases again).

    A plain dict, not ``functools.lru_cache``: the cache wraps a tuple argument in a key of its
    own and reorders its list at every hit, about 1.5x a dict's lookup (48 against 27-36 ms
    for 100k leases, issue 11).  It is emptied when full, so it holds at most the slots of the
    leases seen since."""
    hit = _FIRST_SLOTS.get(slots)
    if hit is None:
        if len(_FIRST_SLOTS) >= _FIRST_SLOTS_KEPT:
            _FIRST_SLOTS.clear()
        hit = _FIRST_SLOTS[slots] = _parse_first_slot(slots)
    return hit


def _parse_first_slot(slots: tuple[str, ...]) -> tuple[str, int]:
    if len(slots) == 1:
        return _slot_key(slots[0])
    if not slots:  # the ledger refuses such a lease; the matching funds it as width 0
        return ("", -1)
    node, sep, _ = slots[0].rpartition("#")
    if sep:  # one node and plain ordinals, the usual, checked and read in C (``map``)
        prefix = node + sep
        if all(map(str.startswith, slots, itertools.repeat(prefix))):
            cut = len(prefix)
            ordinals = [s[cut:] for s in slots]
            if all(map(str.isdecimal, ordinals)):
                return node, min(map(int, ordinals))
    return min(map(_slot_key, slots), default=("", -1))


def _slot_key(s: str) -> tuple[str, int]:
    node, _, ordinal = s.rpartition("#")
    return (node, int(ordinal) if ordinal.isdecimal() else -1)


@dataclass(slots=True)
class _Claim:
    """One lease's claim as an extension (``incremental.extend_fill``) ranks it; the matching
    itself keeps its claims as columns (``_ClaimTable``)."""

    lease: Lease
    run_key: str
    proposals: Sequence[EnvelopeKey]
    borrow_cap: int | None
    width: int
    # (admission, run, group, first slot, lease id): the rank on every envelope after its class
    tail: tuple[object, ...]

    def rank_at(self, env: EnvelopeInfo, tier: Tier) -> tuple[object, ...]:
        """The claim's rank on ``env``, whose owner is ``tier`` to the claim's owner."""
        return (_rank_class(int(tier), self.lease, env), *self.tail)


def _rank_class(tier: int, lease: Lease, env: EnvelopeInfo) -> int:
    """A rank's first element: the family tier, or for no family a loan the envelope granted
    (minted on it) or a sponsor claim that only takes free headroom."""
    if tier != _NO_TIER:
        return tier
    minted = lease.minted_payer
    return LOAN if minted is not None and minted.key == env.key else SPONSOR


_NO_TIER = int(Tier.NONE)


_ID = operator.attrgetter("id")

CLASS_OF_RANK = {
    LOAN: FundingClass.BORROWED,
    SPONSOR: FundingClass.BORROWED,
    int(Tier.OWNER): FundingClass.OWNED,
    int(Tier.CHILD): FundingClass.SHARED,
    int(Tier.SIBLING): FundingClass.SHARED,
    int(Tier.COUSIN): FundingClass.SHARED,
}


_CLASS_OR_UNFUNDED = [*(CLASS_OF_RANK[c] for c in range(len(CLASS_OF_RANK))), FundingClass.UNFUNDED]
"""Each rank class's funding class, then (at -1) an unfunded claim's."""


def _objects(items: Sequence[object]) -> np.ndarray:
    """``items`` as a one-dimensional object array, looked up by array indexing in C
    (``np.fromiter``: ``np.array`` would read a tuple among them as a row)."""
    return np.fromiter(items, dtype=object, count=len(items))


_CLASS_ARRAY = _objects(_CLASS_OR_UNFUNDED)


_Tail = tuple[Instant, str, int, tuple[str, int], str]
"""A claim's rank on every envelope after its class: admission, run, group, first slot, lease id
(``Tails`` works it out again for the few claims asked about)."""

_Columns = tuple[
    list[str],
    list[Lease],
    list[int],
    list["int | None"],
    list[Proposals],
    list[int],
    list[int],
    list[int],
]
"""The claims as ``_walk`` lists them, a column each: run, lease, width, borrow limit, proposal
list, place in lease-id order, run's number (``ClaimColumns``) and role's code
(``ROLE_CODES``)."""


@dataclass(slots=True)
class _ClaimTable:
    """The claims of one matching as columns, indexed by *position*: the claim's place among
    all ``n`` claims sorted by tail (admission, run, group, first slot, lease id).

    Why columns and positions: a claim's rank on an envelope is ``(class, *tail)`` and tails
    are unique, so ``class * n + position`` orders exactly as that tuple does, and the rank
    alone then names the claim too (``position = rank % n``).  About a million proposals at
    100k open leases (issue 11) so build, sort, compare and bisect one small integer each -
    C-level, without key functions - instead of a tuple with an object per claim.  Only what
    leaves the matching (accepted rows, the trace) is turned back into tuples (``tails``).
    """

    n: int
    run_keys: Sequence[str]
    leases: Sequence[Lease]
    widths: Sequence[int]
    borrow_caps: Sequence[int | None]
    proposals: Sequence[Proposals]
    id_order: Sequence[int]
    run_numbers: Sequence[int]
    roles: Sequence[int]
    # Per claim: the envelope of its latest proposal (where it is held, while it is held), set
    # by the Python round as it proposes, or after the array round when an acceptor decides
    # over it.  Only claims an acceptor decided over are ever read.
    env_of: list[EnvelopeInfo]
    tails: Tails
    # Is every claim's lease id its own?  Otherwise the matching keeps the per-group turn-away
    # check (``_AtOnceGroups`` logs by group, which would interleave two claims of one id
    # otherwise than the scans do).
    unique_ids: bool = True

    @classmethod
    def of(
        cls,
        columns: tuple[Sequence[Any], ...],
        run_since: list[Instant | None],
        run_key_of: list[str],
    ) -> _ClaimTable:
        """The table of the claims in ``columns`` (``_Columns``, in rank order already); per run
        number, its admission (``None``: not admitted) and key."""
        run_keys, leases, widths, caps, proposals, id_order, runs, roles = columns
        n = len(leases)
        return cls(
            n,
            run_keys,
            leases,
            widths,
            caps,
            proposals,
            id_order,
            runs,
            roles,
            cast("list[EnvelopeInfo]", [None] * n),
            Tails(leases, runs, run_since, run_key_of, _first_slot),
        )

    def rank_tuple(self, rank: int) -> tuple[object, ...]:
        """An integer rank as the tuple it stands for: ``(class, *tail)``."""
        rank_class, p = divmod(rank, self.n)
        return (rank_class, *self.tails.of([p])[0])


@paused_gc()  # a million acyclic temporaries at 100k leases (core.gcpause)
def fill(  # noqa: PLR0917 - the matching's inputs are its whole signature, in one fixed order
    index: EnvelopeIndex,
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
    hours: HoursView | None = None,
) -> FillResult:
    """Run the matching over the leases live at ``t`` and classify each one."""
    hours = hours or HoursView()
    proposer = Proposer.at(index, t)
    table, live_ids, run_names = _claims(proposer, leases, runs, admitted, node_labels, t)
    trace = FillTrace()
    log = RejectionLog(table.n, table.leases, live_ids)
    if NATIVE is not None and table.n >= NATIVE_MATCH_FROM and _native_reads(index, table, hours):
        proposing: _Proposing = _ArrayProposing(index, table)
        held = _match_native(index, table, hours, trace, log, proposing=proposing)
    else:
        proposing = (_ArrayProposing if table.n >= ARRAYS_FROM else _Proposing)(index, table)
        held = _match(index, table, hours, trace, log, proposing=proposing)
    n = table.n
    # Each acceptor group's rows are made when first read (``AcceptedRows``).
    tails = table.tails
    if isinstance(proposing.envelope_of, np.ndarray):  # large: kept as arrays, not per claim
        tails.run_numbers = np.array(table.run_numbers, dtype=np.int64)
    accepted = AcceptedRows(source=HeldRanks(index, held, n, tails, proposing.envelope_of))
    numbered, envelope_of = proposing.numbered, proposing.envelope_of
    columns: ClaimColumns | None = None
    maps = None
    if isinstance(envelope_of, np.ndarray) and n == len(live_ids):
        # A large matching in which every live lease is a claim: the per-lease maps come
        # straight from the arrays, in lease-id order, and the summary reads the columns.
        decided = _Decided.of(table, held, envelope_of)
        maps = decided.maps(live_ids, numbered)
        if maps is not None:
            assert isinstance(proposing, _ArrayProposing)  # the array of envelopes says so
            columns = decided.columns(table, proposing.width_array, run_names, numbered)
    payer, cls = maps or _maps(live_ids, table, held, envelope_of, numbered)
    out = FillResult(payer, cls, {}, accepted, trace)
    out._rejection_log = log
    out.columns = columns
    out._proposer = proposer
    return out


def _claims(  # noqa: PLR0917 - fill's inputs
    proposer: Proposer,
    leases: Sequence[Lease],
    runs: Mapping[str, Run],
    admitted: Mapping[str, Instant],
    node_labels: Mapping[str, Mapping[str, str]],
    t: float,
) -> tuple[_ClaimTable, list[str], list[str]]:
    """One claim per lease live at ``t`` with the envelopes it proposes to, the live lease ids
    in id order (every one starts unfunded, with no rejection), and the runs by number.

    The claims are handed to the sort stretch by stretch of one run, the stretches by their
    run's admission and key: nearly in order already, the sort merges a few long runs of it
    instead of 20k short ones (at 100k open leases it took half the time, issue 11).  The
    sort alone decides the order, so how near the hand-over comes does not matter otherwise.
    """
    owner_of = proposer.index.family.owner_of

    def context(run: Run) -> _RunContext:
        """What a run's claims share: its key, admission, borrow limit and proposal lists."""
        key = run.key
        funding = run.spec.funding
        lists = proposer.lists_for(run, owner_of(run.metadata.namespace))
        cap = funding.max_borrow_gpus if funding is not None else None
        return key, admitted.get(key), cap, lists, lists.by_place

    walk = _walk if NATIVE is None else _walk_native
    tails, columns, spans, run_since, run_key_of, live_ids, run_names, unique = walk(
        sorted(leases, key=_ID), t, runs, context, node_labels, proposer
    )
    n = len(tails)
    gather = _gather if NATIVE is None else NATIVE.gather
    if unique and spans:
        ends = [start for _, _, start in spans[1:]]
        ends.append(n)
        order = sorted(range(len(spans)), key=spans.__getitem__)
        ranked = gather(list(range(n)), [spans[i][2] for i in order], [ends[i] for i in order])
    else:  # in walk order: claims of one id may tie on the whole tail, and then the stable
        # sort keeps the walk's order, as it always has
        ranked = list(range(n))
    ranked.sort(key=tails.__getitem__)
    take = _take if NATIVE is None else NATIVE.take
    table = _ClaimTable.of(take(columns, ranked), run_since, run_key_of)
    table.unique_ids = unique
    return table, live_ids, run_names


def _gather(items: list[Any], starts: list[int], ends: list[int]) -> list[Any]:
    """The stretches ``items[starts[i]:ends[i]]`` one after another (``_native.gather``)."""
    return list(itertools.chain.from_iterable(map(items.__getitem__, map(slice, starts, ends))))


def _take(columns: Sequence[Sequence[Any]], order: list[int]) -> tuple[Sequence[Any], ...]:
    """Each column's items in ``order`` (``_native.take``)."""
    return tuple([column[i] for i in order] for column in columns)


_RunContext = tuple[str, "Instant | None", "int | None", RunLists, "dict[Place | None, Proposals]"]
"""What ``_walk`` looks up once per run: its key, admission (``None``: not admitted), borrow
limit (``None``: none), proposal lists, and those lists by place."""

_Walk = tuple[
    list[_Tail],
    _Columns,
    list[tuple[Instant, str, int]],
    list["Instant | None"],
    list[str],
    list[str],
    list[str],
    bool,
]
"""What ``_walk`` returns: the claims in walk order, their tails (``_Tail``) and their columns
(``_Columns``); per stretch of one run's claims its admission (or first lease's start), run key
and where it starts; per run number its admission and key; the live lease ids; the runs by
number; and whether every id was its own."""


def _walk(  # noqa: PLR0917 - the walk's inputs, in ``_native.claim_walk``'s order
    leases: list[Lease],
    t: float,
    runs: Mapping[str, Run],
    context: Callable[[Run], _RunContext],
    node_labels: Mapping[str, Mapping[str, str]],
    proposer: Proposer,
) -> _Walk:
    """The claims of the ``leases`` (sorted by id) live at ``t``: their tails and columns.

    The walk is by lease id, so a run's leases come one after another (ids are ``run#n``):
    what depends on the run only is looked up (``context``) when the run changes, not per
    lease (issue 11: 100k open leases, ~20k runs).

    This is the reference: ``_native.claim_walk`` takes the same steps in C, and its result
    is equal to this one's (``tests/core/test_native.py``).
    """
    tails: list[_Tail] = []
    run_keys: list[str] = []
    kept: list[Lease] = []
    widths: list[int] = []
    borrow_caps: list[int | None] = []
    lists: list[Proposals] = []
    id_order: list[int] = []
    run_numbers_of: list[int] = []
    roles: list[int] = []
    # Per stretch of one run's claims in the walk: (its admission, run key, where it starts)
    spans: list[tuple[Instant, str, int]] = []
    run_since: list[Instant | None] = []
    run_key_of: list[str] = []
    claims = 0
    last_id: str | None = None
    unique = True  # every lease id once (the ledger refuses a repeat; the matching takes it)
    live_ids: list[str] = []
    run_numbers: dict[str, int] = {}
    run_number = 0
    active, spare = LeaseRole.ACTIVE, LeaseRole.SPARE
    run_lists: RunLists | None = None
    run_name: str | None = None
    run_key = ""
    since: Instant | None = None
    borrow_cap: int | None = None
    by_place: dict[Place | None, Proposals] = {}
    places, place_of_node = proposer.places, proposer.place_of_node
    first_slots = _FIRST_SLOTS
    for lease in leases:
        if t < lease.start:  # ``Lease.live_at``, inlined: once per open lease
            continue
        end, closed = lease.end, lease.closed_at
        if end is None or (closed is not None and closed < end):
            end = closed
        if end is not None and t >= end:
            continue
        lease_id = lease.id
        if lease_id == last_id:
            unique = False
        last_id = lease_id
        live_ids.append(lease_id)
        if lease.run != run_name:
            run_name = lease.run
            got = run_numbers.get(run_name)
            run_number = run_numbers[run_name] = len(run_numbers) if got is None else got
            run = runs.get(run_name)
            run_lists = None
            if run is not None:
                run_key, since, borrow_cap, run_lists, by_place = context(run)
            if got is None:
                run_since.append(since if run is not None else None)
                run_key_of.append(run_key if run is not None else "")
            if run is not None:
                spans.append((lease.start if since is None else since, run_key, len(tails)))
        if run_lists is None:  # no such run
            continue
        node = lease.node
        labels = node_labels.get(node)
        known = places.get(node)  # ``Proposer.place_of_node``, inlined: once per lease
        place = (
            known[1]
            # the same labels are most often the very same dict: ``is`` before ``==``
            if known is not None and (known[0] is labels or known[0] == labels)
            else place_of_node(node, labels)
        )
        proposals = by_place.get(place)  # ``RunLists.at_place``, inlined: once per lease
        if proposals is None:
            proposals = run_lists.at_place(place, proposer)
        slots = lease.slots
        tails.append(
            (  # ``Tails.of`` works out the same
                lease.start if since is None else since,
                run_key,
                lease.group,
                # ``_first_slot``, inlined: the dict lookup is all a known lease pays
                first if (first := first_slots.get(slots)) is not None else _first_slot(slots),
                lease_id,
            )
        )
        run_keys.append(run_key)
        kept.append(lease)
        widths.append(len(slots))
        borrow_caps.append(borrow_cap)
        lists.append(proposals)
        id_order.append(claims)
        run_numbers_of.append(run_number)
        roles.append(0 if lease.role is active else 1 if lease.role is spare else 2)  # ROLE_CODES
        claims += 1
    columns = (run_keys, kept, widths, borrow_caps, lists, id_order, run_numbers_of, roles)
    return tails, columns, spans, run_since, run_key_of, live_ids, list(run_numbers), unique


def _walk_native(  # noqa: PLR0917 - ``_walk``'s
    leases: list[Lease],
    t: float,
    runs: Mapping[str, Run],
    context: Callable[[Run], _RunContext],
    node_labels: Mapping[str, Mapping[str, str]],
    proposer: Proposer,
) -> _Walk:
    """``_walk`` in C (``_native.claim_walk``), given what the Python walk reads from its
    module and the proposer."""
    assert NATIVE is not None
    return cast(
        "_Walk",
        NATIVE.claim_walk(
            leases,
            t,
            runs,
            context,
            node_labels,
            proposer.places,
            proposer.place_of_node,
            proposer,
            _FIRST_SLOTS,
            _first_slot,
            LeaseRole.ACTIVE,
            LeaseRole.SPARE,
        ),
    )


def _maps(
    live_ids: list[str],
    table: _ClaimTable,
    held: Mapping[int, list[int]],
    envelope_of: Sequence[int] | np.ndarray,
    numbered: Sequence[EnvelopeInfo],
) -> tuple[dict[str, EnvelopeKey | None], dict[str, FundingClass]]:
    """Who pays for each live lease and its class, in lease-id order (every lease unfunded,
    then the funded ones set)."""
    payer: dict[str, EnvelopeKey | None] = dict.fromkeys(live_ids)
    cls = dict.fromkeys(live_ids, FundingClass.UNFUNDED)
    n, leases = table.n, table.leases
    for entries in held.values():
        for rank_class, position in map(divmod, entries, itertools.repeat(n)):
            lease_id = leases[position].id
            payer[lease_id] = numbered[envelope_of[position]].key
            cls[lease_id] = CLASS_OF_RANK[rank_class]
    return payer, cls


class _Decided(NamedTuple):
    """What the matching decided per claim (by position), as arrays."""

    rank_class: np.ndarray  # per claim, the rank class it is funded at, -1: unfunded
    payer: np.ndarray  # per claim, the number of the envelope that pays, -1: unfunded
    id_order: np.ndarray  # per claim, its place in lease-id order

    @classmethod
    def of(
        cls, table: _ClaimTable, held: Mapping[int, list[int]], envelope_of: np.ndarray
    ) -> _Decided:
        n = table.n
        ranks = np.fromiter(itertools.chain.from_iterable(held.values()), dtype=np.int64)
        positions = ranks % n if n else ranks
        rank_class = np.full(n, -1, dtype=np.int64)
        rank_class[positions] = ranks // n if n else ranks
        payer = np.full(n, -1, dtype=np.int64)
        payer[positions] = envelope_of[positions]
        return cls(rank_class, payer, np.array(table.id_order, dtype=np.int64))

    def maps(
        self, live_ids: list[str], numbered: Sequence[EnvelopeInfo]
    ) -> tuple[dict[str, EnvelopeKey | None], dict[str, FundingClass]] | None:
        """``_maps`` when the claims are every live lease (``live_ids[i]`` is the claim whose
        ``id_order`` is ``i``): built in one pass each, reading -1 as the end of a list.
        ``None`` if a lease id repeats (the ledger refuses that; ``_maps`` decides which one
        counts, as it always did)."""
        by_id = np.empty_like(self.id_order)
        by_id[self.id_order] = np.arange(len(self.id_order))
        # Looked up by array indexing, as objects (a lookup per lease in Python took a fifth
        # longer, issue 11); -1, unfunded, reads the None at the end.
        keys = _objects([*(e.key for e in numbered), None])
        payer = dict(zip(live_ids, keys[self.payer[by_id]].tolist(), strict=True))
        if len(payer) != len(live_ids):
            return None
        classes = _CLASS_ARRAY[self.rank_class[by_id]].tolist()
        return payer, dict(zip(live_ids, classes, strict=True))

    def columns(
        self,
        table: _ClaimTable,
        widths: np.ndarray,
        run_names: list[str],
        numbered: Sequence[EnvelopeInfo],
    ) -> ClaimColumns:
        """The claims as ``ClaimColumns`` (``widths``: the claims' widths as an array)."""
        return ClaimColumns(
            table.leases,
            widths,
            np.asarray(table.tails.run_numbers, dtype=np.int64),
            run_names,
            np.array(table.roles, dtype=np.int8),
            self.id_order,
            self.rank_class,
            self.payer,
            numbered,
        )


def _new_claim(
    lease: Lease,
    run: Run,
    run_key: str,
    admitted: Instant,
    proposals: Sequence[EnvelopeKey],
) -> _Claim:
    """The claim of one lease (``_claims`` lists the same, with what it looked up per run)."""
    funding = run.spec.funding
    slots = lease.slots
    return _Claim(
        lease,
        run_key,
        proposals,
        funding.max_borrow_gpus if funding is not None else None,
        len(slots),
        (admitted, run_key, lease.group, _first_slot(slots), lease.id),
    )


@dataclass(slots=True)
class _Counters:
    used: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    lent: dict[EnvelopeKey, int] = field(default_factory=lambda: defaultdict(int))
    cap_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))


ARRAYS_FROM = 5_000
"""Claims from which a matching proposes in arrays (``_ArrayProposing``) and sums its summary
from columns (``ClaimColumns``): below, each numpy call's fixed cost outweighs the loop it
replaces (an evaluation at 100 open leases took 1.5x as long in arrays, at 100k 0.8x).
Tests set it to 0 to run the array path on small worlds."""


class _Round(NamedTuple):
    """One round of proposals: the acceptors that received any, in id order, and per acceptor
    (the same index) its newcomers' ranks in rank order."""

    acceptors: list[int]
    newcomers: list[list[int]]
    # The same as what a batch turned away at once waits as (an array slice, or the list).
    batches: Sequence[Sequence[int]]
    # Per newcomer, acceptor after acceptor (acceptor ``j``'s from ``bounds[j]`` to
    # ``bounds[j + 1]``), its claim and envelope number (``EnvelopeIndex.numbered``); ``None``
    # when the round set the claims' envelopes itself (``_ClaimTable.env_of``).
    bounds: list[int] | None
    positions: list[int] | None
    envelopes: list[int] | None
    narrowest: list[int] | None  # per acceptor, the smallest width proposing to it, if known


class _Proposing:
    """Every claim's place in its proposal list, and one round of proposals at a time: each
    claim of the batches given (the ranks they were turned away at) proposes to its next
    envelope; a claim at the end of its list drops out, unfunded.

    This one walks the claims in Python, for small matchings; ``_ArrayProposing`` does the
    same in arrays.
    """

    def __init__(self, index: EnvelopeIndex, table: _ClaimTable) -> None:
        self._n = table.n
        self._leases = table.leases
        self._number, self.numbered = index.numbered
        self._rows = [proposals.rows for proposals in table.proposals]
        self._env_of = table.env_of
        self._next = [0] * table.n
        self._minted: dict[int, int] = {}
        # Per claim, the number of the envelope it proposed to last: where it is held, if held.
        self.envelope_of: list[int] | np.ndarray = [-1] * table.n

    def round(self, batches: list[Sequence[int]]) -> _Round:
        n, rows_of, following, envelope_of = self._n, self._rows, self._next, self.envelope_of
        env_of, numbered = self._env_of, self.numbered
        assert isinstance(envelope_of, list)
        incoming: defaultdict[int, list[int]] = defaultdict(list)
        for was in itertools.chain.from_iterable(batches):
            position = was % n
            i = following[position]
            acceptor, number, rank_class = rows_of[position][i]
            if acceptor == OFFER_END:
                continue
            following[position] = i + 1
            if rank_class == _NO_TIER:
                rank_class = LOAN if self._minted_on(position) == number else SPONSOR
            envelope_of[position] = number
            env_of[position] = numbered[number]
            incoming[acceptor].append(rank_class * n + position)
        acceptors = sorted(incoming)
        newcomers = [incoming[acceptor] for acceptor in acceptors]
        for inc in newcomers:
            inc.sort()
        return _Round(acceptors, newcomers, newcomers, None, None, None, None)

    def _minted_on(self, position: int) -> int:
        """The number of the envelope the claim's lease was minted on as a loan (-1: none, or
        not in the index)."""
        got = self._minted.get(position)
        if got is None:
            payer = self._leases[position].minted_payer
            got = self._minted[position] = -1 if payer is None else self._number.get(payer.key, -1)
        return got


def _stretches(keys: np.ndarray, changes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each stretch of equal keys starts and ends in sorted ``keys``, given where they
    change (``keys[1:] != keys[:-1]``, or several keys' changes together)."""
    cuts = np.flatnonzero(changes) + 1
    if not len(keys):
        return cuts, cuts
    return np.concatenate(([0], cuts)), np.append(cuts, len(keys))


class _ArrayRound(NamedTuple):
    """One round of proposals in arrays (``_ArrayProposing``): per proposal, sorted by
    (acceptor, rank), its rank, claim and envelope number; per acceptor group that received
    any, in id order, the group, where its proposals start and end, and the smallest width
    proposing to it."""

    groups: np.ndarray
    rank: np.ndarray
    position: np.ndarray
    envelope: np.ndarray
    firsts: np.ndarray
    ends: np.ndarray
    counts: np.ndarray  # ends - firsts
    narrowest: np.ndarray

    def lists(self, keep: np.ndarray | None) -> _Round:
        """The round as ``_Round`` lists, for the groups ``keep`` marks (``None``: all)."""
        rank, position, envelope, firsts, narrowest = (
            self.rank,
            self.position,
            self.envelope,
            self.firsts,
            self.narrowest,
        )
        groups = self.groups
        if keep is not None:
            counts = self.counts
            taken = np.repeat(keep, counts)
            rank, position, envelope = rank[taken], position[taken], envelope[taken]
            groups, narrowest = groups[keep], narrowest[keep]
            firsts = np.concatenate(([0], np.cumsum(counts[keep])[:-1])) if len(groups) else groups
        bounds = [*firsts.tolist(), len(rank)]
        spans = list(itertools.pairwise(bounds))
        ranks = rank.tolist()
        return _Round(
            groups.tolist(),
            [ranks[first:end] for first, end in spans],
            cast("list[Sequence[int]]", [rank[first:end] for first, end in spans]),
            bounds,
            position.tolist(),
            envelope.tolist(),
            narrowest.tolist(),
        )


class _ArrayProposing(_Proposing):
    """``_Proposing`` in integer arrays, for large matchings.

    Why: at 100k open leases about a million proposals are made, most to envelopes that turn
    them away, and looking each one up in Python was a sixth of a funding evaluation (issue
    11).  A round is a few array operations over every claim proposing: the next row of its
    list (``Proposals.offers``, all lists laid end to end once per matching), its rank there,
    and one sort by (acceptor, rank), which also hands each acceptor its newcomers in rank
    order.
    """

    def __init__(self, index: EnvelopeIndex, table: _ClaimTable) -> None:
        self._n = table.n
        self._leases = table.leases
        self._number, self.numbered = index.numbered
        starts: list[int] = []
        start_of: dict[int, int] = {}  # by the identity of a list every claim of it shares
        parts: list[np.ndarray] = []
        size = 0
        for proposals in table.proposals:
            start = start_of.get(id(proposals))
            if start is None:
                start = start_of[id(proposals)] = size
                parts.append(proposals.offers)
                size += len(proposals.offers)
            starts.append(start)
        rows = np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)
        self._acceptor = np.ascontiguousarray(rows[:, 0])
        self._envelope = np.ascontiguousarray(rows[:, 1])
        self._tier = np.ascontiguousarray(rows[:, 2])
        self._start = np.array(starts, dtype=np.int64)
        self._next_row = np.zeros(self._n, dtype=np.int64)  # per claim, the row it proposes next
        self.width_array = np.array(table.widths, dtype=np.int64)
        self._minted_array = np.full(self._n, _UNKNOWN, dtype=np.int64)
        self._minted = {}
        self.envelope_of = np.full(self._n, -1, dtype=np.int64)

    def round(self, batches: list[Sequence[int]]) -> _Round:
        return self.round_arrays(batches).lists(None)

    def round_arrays(self, batches: list[Sequence[int]]) -> _ArrayRound:
        """One round of proposals as arrays, sorted by (acceptor, rank)."""
        n = self._n
        proposing = np.concatenate(batches) if len(batches) > 1 else np.asarray(batches[0])
        position = proposing.astype(np.int64, copy=False) % n
        following = self._next_row[position]
        row = self._start[position] + following
        acceptor = self._acceptor[row]
        live = acceptor != OFFER_END
        if not live.all():
            position, following, row, acceptor = (
                position[live],
                following[live],
                row[live],
                acceptor[live],
            )
        self._next_row[position] = following + 1
        envelope = self._envelope[row]
        envelope_of = self.envelope_of
        assert isinstance(envelope_of, np.ndarray)
        envelope_of[position] = envelope
        rank_class = self._tier[row]
        no_tier = rank_class == _NO_TIER
        if no_tier.any():
            granted = self._minted_in(position[no_tier]) == envelope[no_tier]
            rank_class[no_tier] = np.where(granted, LOAN, SPONSOR)
        rank = rank_class * n + position
        order = np.argsort(acceptor * ((SPONSOR + 1) * n) + rank)  # keys are unique
        acceptor, rank, envelope = acceptor[order], rank[order], envelope[order]
        position = position[order]
        firsts, ends = _stretches(acceptor, acceptor[1:] != acceptor[:-1])
        narrowest = (
            np.minimum.reduceat(self.width_array[position], firsts) if len(firsts) else firsts
        )
        return _ArrayRound(
            acceptor[firsts], rank, position, envelope, firsts, ends, ends - firsts, narrowest
        )

    def _minted_in(self, positions: np.ndarray) -> np.ndarray:
        """``_minted_on`` each of ``positions``, looked up the first time a claim proposes to a
        non-family envelope."""
        minted: np.ndarray = self._minted_array[positions]
        unknown = minted == _UNKNOWN
        if unknown.any():
            for position in np.unique(positions[unknown]).tolist():
                self._minted_array[position] = self._minted_on(position)
            minted = self._minted_array[positions]
        return minted


_UNKNOWN = -2


def _match(
    index: EnvelopeIndex,
    table: _ClaimTable,
    hours: HoursView,
    trace: FillTrace,
    log: RejectionLog,
    *,
    proposing: _Proposing,
) -> dict[int, list[int]]:
    """Deferred acceptance in rounds: every unmatched claim proposes to its next envelope, and
    each acceptor group, in id order, decides over what it holds plus its newcomers.

    An acceptor does not re-decide what it holds ranked above its most senior newcomer: a
    greedy scan in rank order meets exactly those claims first, with exactly the counters their
    own widths make (claims it turned away before are gone and added nothing), so it accepts
    them all again.  A loan under a run's borrow limit is re-decided from the most senior such
    claim held, because its check reads the run's loans held at other acceptors.  That is
    conservative: every loan accepted anywhere was checked against the run's whole borrowed
    width, so such a held loan passes again (a review found no case, and a mutant without the
    exception passed), but the exactness argument is simpler with it.
    ``tests/core/test_fill_equivalence.py`` checks the result against re-deciding everything
    (the matching as it was).

    Returns what each acceptor holds at the end, as integer ranks in rank order
    (``_ClaimTable``); the trace's junior ranks are tuples already.  Rejections go to ``log``
    as they happen (``RejectionLog``).  Claims waiting to propose are kept as the rank they
    were turned away at (``rank % n`` is the claim), so a batch turned away moves as is.
    """
    n = table.n
    sponsor_from = SPONSOR * n
    env_of = table.env_of
    held: dict[int, list[int]] = {}
    counters: dict[int, _Counters] = {}
    junior: dict[int, int] = {}
    # Rank of the most senior held loan that is under a borrow limit, per acceptor.
    capped_from: dict[int, int] = {}
    # Borrowed width each run holds right now, kept current as acceptors decide one after
    # another, so a run's maxBorrowGPUs is enforced at acceptance: an envelope never takes a
    # loan it would have to give back (and so never turns anyone away for it).
    borrowed_by_run: dict[str, int] = defaultdict(int)
    decide = _Decider(index, table, hours, borrowed_by_run, log)
    members_of = [[index.envelopes[k] for k in members] for members in index.acceptors]
    # The envelopes of each acceptor group whose newcomers may be turned away at once
    # (``_turned_away_at_once``): one envelope without caps, or envelopes all under caps.
    # None for the others, and for all if some lease holds no slot (the ledger refuses those).
    at_once = [
        envs if (len(envs) == 1 and not envs[0].caps) or all(e.caps for e in envs) else None
        for envs in members_of
    ]
    if n and min(table.widths) < 1:
        at_once = [None] * len(at_once)
    # Acceptors of one envelope without caps: once it is exactly full, the rest of a scan is
    # turned away for its concurrency, all alike (``_Decider.one``).
    solo = [m is not None and len(m) == 1 and not m[0].caps for m in at_once]
    numbered = index.numbered[1]
    borrow_caps = table.borrow_caps
    any_borrow_cap = any(cap is not None for cap in borrow_caps)
    # Claims turned away, to propose in the next round: batches turned away at once as slices
    # of a round, the others one by one (rank class 0 at first: the rank is the position).
    batches: list[Sequence[int]] = [range(n)] if n else []
    pending: list[int] = []
    # In arrays, the groups that turn all their newcomers away at once (``_turned_away_at_once``)
    # are found for the whole round before the scans (``_AtOnceGroups``).
    closing = (
        _AtOnceGroups(index, members_of, at_once, solo, proposing.width_array, n)
        if isinstance(proposing, _ArrayProposing) and table.unique_ids
        else None
    )
    if closing is not None and not closing.any:
        closing = None
    while batches:
        if closing is not None:
            assert isinstance(proposing, _ArrayProposing)
            arrays = proposing.round_arrays(batches)
            batches = []
            closed = closing.closed(arrays)
            if closed is None:
                rnd = arrays.lists(None)
            else:
                away = closing.turn_away(arrays, closed, junior, decide, trace)
                batches.append(cast("Sequence[int]", away))
                rnd = arrays.lists(~(closed[0] | closed[1]))
        else:
            rnd = proposing.round(batches)
            batches = []
        proposed_to = proposing.envelope_of
        bounds, positions, numbers = rnd.bounds, rnd.positions, rnd.envelopes
        for j, acceptor in enumerate(rnd.acceptors):
            inc = rnd.newcomers[j]  # in rank order
            entries = held.get(acceptor, [])
            st = counters.get(acceptor)
            if st is None:
                st = counters[acceptor] = _Counters()
            keep = len(entries)
            # (a group ``closing`` did not turn away would not be turned away here either)
            grouped = at_once[acceptor] if entries and closing is None else None
            if grouped is not None:
                # The envelope each newcomer proposed to (one without caps reads none).
                if bounds is not None and numbers is not None:
                    proposed = numbers[bounds[j] : bounds[j + 1]]
                elif solo[acceptor]:
                    proposed = []
                else:
                    proposed = [proposed_to[rank % n] for rank in inc]
                narrowest = None if rnd.narrowest is None else rnd.narrowest[j]
            if grouped is not None and _turned_away_at_once(
                inc, narrowest, proposed, entries, st, grouped, decide
            ):
                batches.append(rnd.batches[j])
                junior[acceptor] = max(junior[acceptor], inc[-1])
                decide.turned_away(acceptor, trace)
                continue
            # The scan reads each claim's envelope (and ``fill`` the held ones'), which a round
            # in Python sets as it proposes.
            members = members_of[acceptor]
            if bounds is not None and positions is not None and numbers is not None:
                first, end = bounds[j], bounds[j + 1]
                if len(members) == 1:
                    env = members[0]
                    for position in positions[first:end]:
                        env_of[position] = env
                else:
                    for position, number in zip(
                        positions[first:end], numbers[first:end], strict=True
                    ):
                        env_of[position] = numbered[number]
            if entries and inc[0] < entries[-1]:
                bound = inc[0]
                capped = capped_from.get(acceptor)
                if capped is not None and capped < bound:
                    bound = capped
                keep = bisect.bisect_left(entries, bound)
                _release(entries[keep:], st, borrowed_by_run, table)
                candidates = entries[keep:] + inc
                candidates.sort()  # two sorted runs: a merge
            else:
                candidates = inc
            last = junior.get(acceptor)
            if last is None or candidates[-1] > last:
                junior[acceptor] = candidates[-1]
            if len(members) == 1:
                accepted = decide.one(
                    acceptor, members[0], candidates, st, pending, trace, solo=solo[acceptor]
                )
            else:
                accepted = decide(acceptor, candidates, st, pending, trace)
            if any_borrow_cap and (keep < len(entries) or acceptor not in capped_from):
                first_capped = next(
                    (
                        rank
                        for rank in accepted
                        if (rank < n or rank >= sponsor_from) and borrow_caps[rank % n] is not None
                    ),
                    None,
                )
                if first_capped is None:
                    capped_from.pop(acceptor, None)
                else:
                    capped_from[acceptor] = first_capped
            held[acceptor] = now = entries[:keep] + accepted
            if closing is not None and at_once[acceptor] is not None:
                closing.note(acceptor, st, now[-1] if now else -1)
        if pending:
            batches.append(pending)
            pending = []
    trace.junior = {acceptor: table.rank_tuple(rank) for acceptor, rank in junior.items()}
    trace.hours = decide.hours_checks
    return held


NATIVE_MATCH_FROM = 5_000
"""Claims from which a matching runs in C (``_match_native``) where the module is built: as
for ``ARRAYS_FROM``, below it the arrays' set-up (per envelope, per claim) outweighs the loops
it replaces.  Tests set it to 0 to run the C matching on small worlds."""


def _native_reads(index: EnvelopeIndex, table: _ClaimTable, hours: HoursView) -> bool:
    """Can ``_match_native`` read every limit as it is?  Not a negative one, nor NaN GPU-hours
    left: it passes "no limit" as -1 and NaN (validated manifests allow neither; a library
    caller might), so ``_match`` decides such a matching."""
    envs, caps = index.envelopes.values(), index.caps.values()
    limits = [
        *(e.lending_max for e in envs),
        *(c.max_concurrency for c in caps),
        *set(table.borrow_caps),  # one limit per run: a few distinct values
    ]
    left = [
        *hours.remaining_envelope.values(),
        *hours.remaining_cap.values(),
        *(e.gpu_hours for e in envs),
        *(c.gpu_hours for c in caps),
    ]
    return all(x is None or x >= 0 for x in limits) and not any(
        x is not None and math.isnan(x) for x in left
    )


def _match_native(
    index: EnvelopeIndex,
    table: _ClaimTable,
    hours: HoursView,
    trace: FillTrace,
    log: RejectionLog,
    *,
    proposing: _Proposing,
) -> dict[int, list[int]]:
    """``_match`` in C (``_native.match_core``): the same held claims, trace and rejections,
    for a matching whose limits it reads as they are (``_native_reads``).

    The claims and envelopes go in as integer arrays; what the result needs as Python objects
    comes from callbacks into ``_Decider`` - the rejections (``full_rejection``, and the rare
    lending and borrow-limit ones) and every check of an envelope or cap that sets GPU-hours
    (``_Decider._limited``, which notes the GPU-hour checks as the Python scan does) - so the
    reasons and the checks are the very values ``_match`` makes.
    """
    assert NATIVE is not None
    assert isinstance(proposing, _ArrayProposing)
    n = table.n
    number, numbered = index.numbered
    decide = _Decider(index, table, hours, defaultdict(int), log)
    cap_ids = list(index.caps)
    cap_number = {cap_id: i for i, cap_id in enumerate(cap_ids)}
    cap_most = np.array(
        [-1 if (c := index.caps[i].max_concurrency) is None else c for i in cap_ids],
        dtype=np.int64,
    )
    cap_hours = np.full(len(cap_ids), np.nan)
    concurrency: list[int] = []
    lending: list[int] = []
    kinds: list[int] = []
    cap_starts = [0]
    caps_of: list[int] = []
    env_hours: list[float] = []
    cap_full: list[tuple[Rejection, ...]] = []
    cap_spent: list[tuple[Rejection, ...]] = []
    env_spent: list[Rejection | None] = []
    for env in numbered:
        concurrency.append(env.concurrency)
        lending.append(-1 if env.lending_max is None else env.lending_max)
        caps_of.extend(cap_number[cap_id] for cap_id in env.caps)
        cap_starts.append(len(caps_of))
        limits, own_hours = decide._limits_for(env)
        cap_full.append(tuple(full for _, _, _, full, _ in limits))
        cap_spent.append(tuple(spent for _, _, _, _, spent in limits))
        for cap_id, _, left, _, _ in limits:
            if left is not None:
                cap_hours[cap_number[cap_id]] = left
        env_hours.append(np.nan if own_hours is None else own_hours[0])
        env_spent.append(None if own_hours is None else own_hours[1])
        if not env.caps and env.gpu_hours is None:
            kinds.append(_PLAIN)
        elif own_hours is None and all(left is None for _, _, left, _, _ in limits):
            kinds.append(_CAPS_ONLY)  # ``_Decider._caps_only``
        else:
            kinds.append(_LIMITED)
    group_starts = [0]
    for members in index.acceptors:
        group_starts.append(group_starts[-1] + len(members))
    caps = table.borrow_caps
    any_borrow_cap = any(cap is not None for cap in caps)
    run_ids = np.zeros(n, dtype=np.int64)
    borrow_caps = np.full(n, -1, dtype=np.int64)
    if any_borrow_cap:  # only a run with a borrow limit reads what it borrowed: 1, 2, ...
        ids: dict[str, int] = {}  # (the others all add to 0, which nobody reads)
        for position, (cap, key) in enumerate(zip(caps, table.run_keys, strict=True)):
            if cap is not None:
                borrow_caps[position] = cap
                run_ids[position] = ids.setdefault(key, len(ids) + 1)
    leases = table.leases

    def full(env: int, used: int) -> Rejection:
        return decide.full_rejection(numbered[env], used)

    def lent(env: int, lent_now: int) -> Rejection:
        info = numbered[env]
        return Rejection(info.key, _LENT, (info.lending_max, lent_now))

    def borrow_limit(env: int, cap: int) -> Rejection:
        return decide._same(numbered[env].key, _BORROW_LIMIT, cap)

    previously_funded = hours.previously_funded

    def funded_before(position: int, env: int) -> bool:
        return (leases[position].id, numbered[env].key) in previously_funded

    i64 = np.int64
    envelope_of = proposing.envelope_of
    assert isinstance(envelope_of, np.ndarray)
    held, junior, turned, ranks, ends, reasons, peaks, checked = NATIVE.match_core(
        n,
        proposing.width_array,
        borrow_caps,
        run_ids,
        _minted_numbers(proposing, table, number),
        proposing._start,
        proposing._acceptor,
        proposing._envelope,
        proposing._tier,
        np.array(concurrency, dtype=i64),
        np.array(lending, dtype=i64),
        np.array(kinds, dtype=i64),
        np.array(cap_starts, dtype=i64),
        np.array(caps_of, dtype=i64),
        cap_most,
        np.array(group_starts, dtype=i64),
        np.arange(group_starts[-1], dtype=i64),  # envelopes are numbered group after group
        envelope_of,
        np.array(env_hours, dtype=np.float64),
        cap_hours,
        full,
        lent,
        borrow_limit,
        tuple(cap_full),
        tuple(cap_spent),
        tuple(env_spent),
        funded_before if previously_funded else None,
        any_borrow_cap,
        _NO_TIER,
        float(hours.period_hours),
        HOURS_EPSILON,
    )
    turned_away = np.frombuffer(ranks, dtype=i64)
    log.ranks.extend(turned_away[start:end] for start, end in itertools.pairwise([0, *ends]))
    log.reasons.extend(reasons)
    if turned:
        trace.rejected_any = True
        trace.rejected_at = frozenset(turned)
    used, lent_peak, cap_peak = (np.frombuffer(b, dtype=i64).tolist() for b in peaks)
    trace.used = {numbered[e].key: v for e, v in enumerate(used) if v > 0}
    trace.lent = {numbered[e].key: v for e, v in enumerate(lent_peak) if v > 0}
    trace.cap = {cap_ids[c]: v for c, v in enumerate(cap_peak) if v > 0}
    trace.junior = {acceptor: table.rank_tuple(rank) for acceptor, rank in junior.items()}
    trace.hours = checks = decide.hours_checks
    if checks is not None:
        _note_checks(checks, checked, [e.key for e in numbered], cap_ids, leases)
    return cast("dict[int, list[int]]", held)


def _note_checks(
    checks: HoursChecks,
    checked: tuple[bytes, bytes, bytes, bytes, bytes, int, bytes | None, bytes | None],
    env_keys: list[EnvelopeKey],
    cap_ids: list[str],
    leases: Sequence[Lease],
) -> None:
    """What the C matching's GPU-hour checks leave in ``checks``, as ``_passed`` and
    ``_Decider._limited`` note them one check at a time: every bound a maximum (``passed``,
    ``top``), the narrowest width a minimum, the pairs and envelopes sets - so noting each
    slot's extreme once is the same."""
    strict_b, weak_b, top_b, checked_b, has_weak_b, narrowest, already_b, exhausted_b = checked
    strict = np.frombuffer(strict_b, dtype=np.float64).tolist()
    weak = np.frombuffer(weak_b, dtype=np.float64).tolist()
    top = np.frombuffer(top_b, dtype=np.int64).tolist()
    has_weak = np.frombuffer(has_weak_b, dtype=np.bool_)
    keys: list[EnvelopeKey | str] = [*env_keys, *cap_ids]
    for slot in np.flatnonzero(np.frombuffer(checked_b, dtype=np.bool_)).tolist():
        key = keys[slot]
        checks.passed(key, strict[slot], weak[slot] if has_weak[slot] else None)
        if top[slot] > checks.top.get(key, -1):
            checks.top[key] = top[slot]
    if narrowest >= 0:
        checks.narrowest = min(checks.narrowest, narrowest)
    pairs = np.frombuffer(already_b or b"", dtype=np.int64).tolist()  # None: no pair
    if pairs:
        noted = checks.already
        assert isinstance(noted, set), "a shared record is copied before it is added to"
        noted.update(
            (leases[position].id, env_keys[env])
            for position, env in zip(pairs[::2], pairs[1::2], strict=True)
        )
    checks.exhausted.update(
        env_keys[e] for e in np.frombuffer(exhausted_b or b"", dtype=np.int64).tolist()
    )


_PLAIN, _CAPS_ONLY, _LIMITED = 0, 1, 2
"""An envelope's checks past its concurrency, for ``_native.match_core``: none, aggregate caps'
concurrency only, or ``_Decider._limited`` (some GPU-hours)."""


def _minted_numbers(
    proposing: _ArrayProposing, table: _ClaimTable, number: Mapping[EnvelopeKey, int]
) -> np.ndarray:
    """Per claim, the number of the envelope its lease was minted on as a loan (-1: none, not
    in the index, or never asked: its list has no sponsor's envelope), as ``_minted_on``."""
    tier, acceptor = proposing._tier, proposing._acceptor
    minted = np.full(table.n, -1, dtype=np.int64)
    if not len(tier):
        return minted
    sponsors = np.concatenate(([0], np.cumsum(tier == _NO_TIER)))
    list_ends = np.flatnonzero(acceptor == OFFER_END)
    starts = proposing._start
    ends = list_ends[np.searchsorted(list_ends, starts)]
    leases = table.leases
    for position in np.flatnonzero(sponsors[ends + 1] > sponsors[starts]).tolist():
        payer = leases[position].minted_payer
        if payer is not None:
            minted[position] = number.get(payer.key, -1)
    return minted


class _AtOnceGroups:
    """The acceptor groups whose newcomers may be turned away at once (``_turned_away_at_once``:
    one envelope without caps, or envelopes all under caps), in arrays, kept current as the
    scans change them (``note``): per group the rank of the most junior claim it holds (-1:
    none); for a group of one envelope its concurrency and what it funds; for a group under
    caps whether every envelope's first cap is exactly full, and per envelope its room.

    Why: at 100k open leases most proposals (about 620,000 of a million) go to such a group
    that turns them all away, and doing it one group at a time in Python - the loop, the
    check, each round's proposals as lists, a reason per newcomer under caps - was about a
    tenth of an evaluation (issue 11).  The check reads only the group's own counters and
    holdings, which no other group's scan changes, so it is made for every group of a round
    at its start, in a few array operations, and the proposals turned away move on as one
    array.  What they are turned away for, and the trace, are as the check would leave them.
    """

    def __init__(  # noqa: PLR0917 - the matching's groups, and its claims' widths
        self,
        index: EnvelopeIndex,
        members_of: list[list[EnvelopeInfo]],
        at_once: list[list[EnvelopeInfo] | None],
        solo: list[bool],
        widths: np.ndarray,
        n: int,
    ) -> None:
        self._members_of = members_of
        self._caps = index.caps
        self._number, self._numbered = index.numbered
        self._n = n
        self._widths = widths
        self._solo = np.array(solo, dtype=bool)
        self._capped = np.array(
            [m is not None and not s for m, s in zip(at_once, solo, strict=True)], dtype=bool
        )
        self._concurrency = np.array(
            [m[0].concurrency if s else 0 for m, s in zip(members_of, solo, strict=True)],
            dtype=np.int64,
        )
        self._used = np.zeros(len(solo), dtype=np.int64)
        self._last = np.full(len(solo), -1, dtype=np.int64)
        self._caps_full = np.zeros(len(solo), dtype=bool)
        # per envelope number: its concurrency less what it funds (set for envelopes under caps)
        self._room = np.array([e.concurrency for e in self._numbered], dtype=np.int64)

    @property
    def any(self) -> bool:
        return bool(self._solo.any() or self._capped.any())

    def note(self, acceptor: int, st: _Counters, last: int) -> None:
        """What a group funds and holds after its scan."""
        self._last[acceptor] = last
        members = self._members_of[acceptor]
        if self._solo[acceptor]:
            self._used[acceptor] = st.used[members[0].key]
        elif self._capped[acceptor]:
            used, cap_used, caps = st.used, st.cap_used, self._caps
            for env in members:
                self._room[self._number[env.key]] = env.concurrency - used[env.key]
            self._caps_full[acceptor] = all(
                (first := caps[env.caps[0]]).max_concurrency is not None
                and cap_used[first.id] == first.max_concurrency
                for env in members
            )

    def closed(self, arrays: _ArrayRound) -> tuple[np.ndarray, np.ndarray] | None:
        """Per group of the round, is every newcomer turned away at once - as a group of one
        envelope, and as a group under caps; ``None`` when no group is.

        Both need the group to hold claims that all rank above every newcomer.  Then one
        envelope: less room than any newcomer needs (every claim holds a slot: ``_match``
        checks before making these groups).  Under caps: no newcomer borrows, and every
        envelope's first cap is exactly full."""
        groups, n = arrays.groups, self._n
        last = self._last[groups]
        heads = arrays.rank[arrays.firsts]
        below = (last >= 0) & (heads >= last)
        solo = (
            below
            & self._solo[groups]
            & (arrays.narrowest > self._concurrency[groups] - self._used[groups])
        )
        capped = (
            below
            & self._capped[groups]
            & self._caps_full[groups]
            & (heads >= n)
            & (arrays.rank[arrays.ends - 1] < SPONSOR * n)
        )
        return (solo, capped) if solo.any() or capped.any() else None

    def turn_away(
        self,
        arrays: _ArrayRound,
        closed: tuple[np.ndarray, np.ndarray],
        junior: dict[int, int],
        decide: _Decider,
        trace: FillTrace,
    ) -> np.ndarray:
        """Log the newcomers of the closed groups as turned away, note each group's junior
        rank and that it turned claims away; their ranks, to propose again.

        A group of one envelope turns all away for its concurrency: one log entry.  Under
        caps each newcomer fails at its envelope's concurrency if it needs more than the
        room there, else at the envelope's first cap: one entry per group, envelope and
        reason (each claim is in one, so its own rejections stay in the order it met them)."""
        solo, capped = closed
        log, rank, counts = decide.log, arrays.rank, arrays.counts
        which = np.flatnonzero(solo | capped)
        groups = arrays.groups[which]
        for acceptor, last in zip(
            groups.tolist(), rank[arrays.ends[which] - 1].tolist(), strict=True
        ):
            junior[acceptor] = max(junior[acceptor], last)
            decide.turned_away(acceptor, trace)
        if solo.any():
            which = np.flatnonzero(solo)
            for acceptor, first, end in zip(
                arrays.groups[which].tolist(),
                arrays.firsts[which].tolist(),
                arrays.ends[which].tolist(),
                strict=True,
            ):
                log.ranks.append(rank[first:end])
                log.reasons.append(
                    decide.full_rejection(self._members_of[acceptor][0], int(self._used[acceptor]))
                )
        if capped.any():
            self._turn_capped_away(arrays, np.repeat(capped, counts), decide)
        away: np.ndarray = rank[np.repeat(solo | capped, counts)]
        return away

    def _turn_capped_away(self, arrays: _ArrayRound, taken: np.ndarray, decide: _Decider) -> None:
        """Log the proposals ``taken`` marks (to groups under caps, closed) by group, envelope
        and reason."""
        rank, envelope = arrays.rank[taken], arrays.envelope[taken]
        group = np.repeat(arrays.groups, arrays.counts)[taken]
        fits = self._widths[arrays.position[taken]] <= self._room[envelope]
        code = envelope * 2 + fits
        order = np.lexsort((rank, code, group))
        rank, code, group = rank[order], code[order], group[order]
        starts, ends = _stretches(rank, (code[1:] != code[:-1]) | (group[1:] != group[:-1]))
        log, numbered = decide.log, self._numbered
        for first, end, c in zip(
            starts.tolist(), ends.tolist(), code[starts].tolist(), strict=True
        ):
            env = numbered[c >> 1]
            log.ranks.append(rank[first:end])
            log.reasons.append(
                decide.first_cap_full(env)
                if c & 1
                else decide.full_rejection(env, env.concurrency - int(self._room[c >> 1]))
            )


def _turned_away_at_once(  # noqa: PLR0917 - one acceptor's round
    inc: list[int],
    narrowest: int | None,
    envelopes: list[int],
    entries: list[int],
    st: _Counters,
    members: list[EnvelopeInfo],
    decide: _Decider,
) -> bool:
    """Turn every newcomer of ``inc`` (in rank order, ``narrowest`` the smallest width if
    known, each proposing to the envelope numbered as in ``envelopes``; an envelope of one
    without caps reads none) away without the greedy scan when that scan provably would,
    logging why; ``False`` (nothing done) otherwise.

    Both cases need every newcomer to rank below everything the acceptor holds: the scan would
    keep all it holds, with the counters they make, and then meet the newcomers with counters
    that never change (every lease holds a slot, ``_match`` checks).  Then:

    * one envelope without caps, with less room than any newcomer needs: each fails its first
      check, concurrency, with the same numbers - one rejection for all, no scan.  Most
      proposals at fleet scale end this way (issue 11);
    * envelopes whose first aggregate cap is exactly full, and no newcomer borrows (a borrower
      would meet the lending checks in between): each fails at its envelope's concurrency or
      else at that cap.
    """
    most_senior, last = inc[0], inc[-1]
    if most_senior < entries[-1]:
        return False
    table = decide.table
    n, widths, log = table.n, table.widths, decide.log
    used = st.used
    if len(members) == 1 and not members[0].caps:
        env = members[0]
        here = used[env.key]
        room = env.concurrency - here
        if room > 0 and (
            any(widths[rank % n] <= room for rank in inc)
            if narrowest is None
            else narrowest <= room
        ):
            return False
        log.ranks.append(inc)
        log.reasons.append(decide.full_rejection(env, here))
        return True
    if most_senior < n or last >= SPONSOR * n:
        return False
    cap_used = st.cap_used
    caps = decide.index.caps
    for env in members:
        first = caps[env.caps[0]]
        if first.max_concurrency is None or cap_used[first.id] != first.max_concurrency:
            return False
    # Per envelope number, with counters that do not move: the room left, the two rejections.
    number = decide.index.numbered[0]
    verdicts = {
        number[env.key]: (
            env.concurrency - used[env.key],
            decide.full_rejection(env, used[env.key]),
            decide.first_cap_full(env),
        )
        for env in members
    }
    log.ranks += inc
    reasons = log.reasons
    for rank, envelope in zip(inc, envelopes, strict=True):
        room, full, cap_full = verdicts[envelope]
        reasons.append(full if widths[rank % n] > room else cap_full)
    return True


def _release(
    entries: Sequence[int],
    st: _Counters,
    borrowed_by_run: dict[str, int],
    table: _ClaimTable,
) -> None:
    """Take held claims back out of their acceptor's counters (they are decided again)."""
    used, lent, cap_used = st.used, st.lent, st.cap_used
    n, widths, env_of, run_keys = table.n, table.widths, table.env_of, table.run_keys
    sponsor_from = SPONSOR * n
    for rank in entries:
        position = rank % n
        w = widths[position]
        env = env_of[position]
        key = env.key
        used[key] -= w
        if rank < n or rank >= sponsor_from:
            lent[key] -= w
            borrowed_by_run[run_keys[position]] -= w
        for cap_id in env.caps:
            cap_used[cap_id] -= w


_FULL = "concurrency {} full ({} funded ahead)"
_LENT = "lending cap {} reached ({} lent)"
_BORROW_LIMIT = "run borrow limit {} reached"
_CAP_FULL = "aggregate cap {} {} full"
_CAP_HOURS = "aggregate cap {} GPU-hours exhausted"
_HOURS = "GPU-hours exhausted ({:.2f} left)"


_Limits = tuple[
    list[tuple[str, int | None, float | None, Rejection, Rejection]],
    tuple[float, Rejection] | None,
]
"""An envelope's limits past its own concurrency, looked up once per matching: per aggregate cap
(id, concurrency, GPU-hours left, and its two rejections), then the envelope's own GPU-hours
left and their rejection."""


class _Decider:
    """One acceptor group's greedy fill in rank order, with skip semantics, on top of the
    counters it holds.

    Turned-away claims get their ``Rejection`` and go back to ``pending``.  Equal rejections
    are one shared object (a rejection is an immutable value): at 100k open leases about
    900,000 proposals are turned away, most by an envelope that is exactly full, and one
    object each made up a fifth of the evaluation's allocations.
    """

    def __init__(
        self,
        index: EnvelopeIndex,
        table: _ClaimTable,
        hours: HoursView,
        borrowed_by_run: dict[str, int],
        log: RejectionLog,
    ) -> None:
        self.index = index
        self.table = table
        self.log = log
        self._hours = hours
        # The GPU-hour checks, noted where any envelope or cap sets GPU-hours (``HoursChecks``).
        self.hours_checks = hours_checks_of(hours)
        self._borrowed_by_run = borrowed_by_run
        self._full: dict[EnvelopeKey, Rejection] = {}
        self._fixed: dict[tuple[EnvelopeKey, str, object], Rejection] = {}
        self._limits: dict[EnvelopeKey, _Limits] = {}
        # Per envelope met so far, ``_caps_only``.
        self._plain: dict[EnvelopeKey, list[tuple[str, int | None, Rejection]] | None] = {}

    def _caps_only(self, env: EnvelopeInfo) -> list[tuple[str, int | None, Rejection]] | None:
        """The caps of an envelope whose only limits past its own concurrency are caps'
        concurrency (id, concurrency or None, rejection), in ``_limited``'s order, for the scans
        to check inline (most envelopes under caps at fleet scale); ``None`` for the others.
        Worked out the first time a scan meets the envelope (``_plain``), not for the whole
        index: a small matching meets few of its envelopes."""
        caps, env_hours = self._limits_for(env)
        plain = None
        if env_hours is None and all(hours is None for _, _, hours, _, _ in caps):
            plain = [(cap_id, most, full_cap) for cap_id, most, _, full_cap, _ in caps]
        self._plain[env.key] = plain
        return plain

    def full_rejection(self, env: EnvelopeInfo, used: int) -> Rejection:
        """The rejection for ``env`` full with ``used`` funded ahead (kept for the next)."""
        hit = self._full.get(env.key)
        if hit is None or hit.args[1] != used:
            hit = self._full[env.key] = Rejection(env.key, _FULL, (env.concurrency, used))
        return hit

    def first_cap_full(self, env: EnvelopeInfo) -> Rejection:
        """The rejection for ``env``'s first aggregate cap being full."""
        return self._limits_for(env)[0][0][3]

    @staticmethod
    def turned_away(acceptor: int, trace: FillTrace) -> None:
        if not trace.rejected_any or acceptor not in trace.rejected_at:
            trace.rejected_any = True
            trace.rejected_at = trace.rejected_at | {acceptor}

    def _same(self, key: EnvelopeKey, template: str, *args: object) -> Rejection:
        """The one rejection for (envelope, reason, what it names)."""
        k = (key, template, args)
        hit = self._fixed.get(k)
        if hit is None:
            hit = self._fixed[k] = Rejection(key, template, args)
        return hit

    def _limited(
        self, lease_id: str, env: EnvelopeInfo, u: int, w: int, cap_used: dict[str, int]
    ) -> Rejection | None:
        """The aggregate caps' and GPU-hours' checks for lease ``lease_id`` on ``env`` (``u``
        funded there), in their order; ``None`` if it passes."""
        caps, env_hours = self._limits_for(env)
        already: bool | None = None
        period = self._hours.period_hours
        checks = self.hours_checks
        for cap_id, most, hours, full, spent in caps:
            above = cap_used[cap_id]
            if most is not None and above + w > most:
                return full
            if hours is not None:
                if already is None:
                    already = (lease_id, env.key) in self._hours.previously_funded
                if not _hours_ok(hours, period, above, w, already):
                    return spent
                if checks is not None:
                    _passed(checks, cap_id, (lease_id, env.key), period, above, w, already)
        if env_hours is not None:
            remaining, spent = env_hours
            if already is None:
                already = (lease_id, env.key) in self._hours.previously_funded
            if not _hours_ok(remaining, period, u, w, already):
                if checks is not None:
                    checks.exhausted.add(env.key)
                return spent
            if checks is not None:
                _passed(checks, env.key, (lease_id, env.key), period, u, w, already)
        return None

    def _limits_for(self, env: EnvelopeInfo) -> _Limits:
        limits = self._limits.get(env.key)
        if limits is None:
            limits = self._limits[env.key] = self._limits_of(env)
        return limits

    def _limits_of(self, env: EnvelopeInfo) -> _Limits:
        hours = self._hours
        key = env.key
        caps = []
        for cap_id in env.caps:
            cap = self.index.caps[cap_id]
            remaining = (
                None if cap.gpu_hours is None else hours.remaining_cap.get(cap_id, cap.gpu_hours)
            )
            caps.append(
                (
                    cap_id,
                    cap.max_concurrency,
                    remaining,
                    Rejection(key, _CAP_FULL, (cap.name, cap.max_concurrency)),
                    Rejection(key, _CAP_HOURS, (cap.name,)),
                )
            )
        env_hours = None
        if env.gpu_hours is not None:
            remaining_here = hours.remaining_envelope.get(key, env.gpu_hours)
            env_hours = (remaining_here, Rejection(key, _HOURS, (remaining_here,)))
        return caps, env_hours

    def __call__(
        self,
        acceptor: int,
        ranked: list[int],
        st: _Counters,
        pending: list[int],
        trace: FillTrace,
    ) -> list[int]:
        """The claims of ``ranked`` (in rank order) the acceptor takes, in rank order, for an
        acceptor of several envelopes tied by aggregate caps (``one`` decides the others)."""
        table = self.table
        n, widths, env_of, log = table.n, table.widths, table.env_of, self.log
        record, record_reason = log.ranks.append, log.reasons.append
        run_keys, borrow_caps, leases = table.run_keys, table.borrow_caps, table.leases
        sponsor_from = SPONSOR * n
        borrowed_by_run = self._borrowed_by_run
        full, plain = self._full, self._plain
        used, lent, cap_used = st.used, st.lent, st.cap_used
        accepted: list[int] = []
        turned_away = False
        for rank in ranked:
            position = rank % n
            w = widths[position]
            env = env_of[position]
            key = env.key
            u = used[key]
            if u + w > env.concurrency:
                rejection = full.get(key)
                if rejection is None or rejection.args[1] != u:
                    rejection = self.full_rejection(env, u)
                record(rank)
                record_reason(rejection)
                pending.append(rank)
                turned_away = True
                continue
            rejection = None
            is_borrow = rank < n or rank >= sponsor_from
            if is_borrow and env.lending_max is not None and lent[key] + w > env.lending_max:
                rejection = Rejection(key, _LENT, (env.lending_max, lent[key]))
            elif (
                is_borrow
                and (borrow_cap := borrow_caps[position]) is not None
                and borrowed_by_run[run_keys[position]] + w > borrow_cap
            ):
                rejection = self._same(key, _BORROW_LIMIT, borrow_cap)
            elif env.caps or env.gpu_hours is not None:
                caps_only = plain[key] if key in plain else self._caps_only(env)
                if caps_only is None:
                    rejection = self._limited(leases[position].id, env, u, w, cap_used)
                else:  # ``_limited`` when only the caps' concurrency counts, inlined
                    for cap_id, most, full_cap in caps_only:
                        above = cap_used[cap_id]  # read without a limit too, as ``_limited``
                        if most is not None and above + w > most:
                            rejection = full_cap
                            break
            if rejection is not None:
                record(rank)
                record_reason(rejection)
                pending.append(rank)
                turned_away = True
                continue
            used[key] = u + w
            if is_borrow:
                lent[key] += w
                borrowed_by_run[run_keys[position]] += w
            for cap_id in env.caps:
                cap_used[cap_id] += w
            accepted.append(rank)
        self._close_scan(acceptor, trace, st, turned_away=turned_away)
        return accepted

    def _close_scan(
        self, acceptor: int, trace: FillTrace, st: _Counters, *, turned_away: bool
    ) -> None:
        """What a scan leaves in the trace: that the acceptor turned claims away, and the
        counters' peaks."""
        if turned_away:
            self.turned_away(acceptor, trace)
        _raise_peaks(trace.used, st.used)
        _raise_peaks(trace.lent, st.lent)
        _raise_peaks(trace.cap, st.cap_used)

    def one(  # noqa: PLR0917 - ``__call__``'s, and the envelope
        self,
        acceptor: int,
        env: EnvelopeInfo,
        ranked: list[int],
        st: _Counters,
        pending: list[int],
        trace: FillTrace,
        *,
        solo: bool,
    ) -> list[int]:
        """``__call__`` for an acceptor of one envelope, ``env``: the same checks in the same
        order, with the envelope's counters as locals (no lookup per claim; most acceptors are
        one envelope, and their scans are a quarter of an evaluation at 100k open leases).  The
        two scans are kept apart, not shared through a helper, because a call per claim is
        what this saves; the equivalence tests reach both.

        ``solo``: without caps, and every claim holding a slot (``_match``), once the envelope
        is exactly full every claim after is turned away for concurrency with the same
        numbers, in one log entry (about a third of the candidates at fleet scale)."""
        table = self.table
        n, widths, log = table.n, table.widths, self.log
        record, record_reason = log.ranks.append, log.reasons.append
        run_keys, borrow_caps, leases = table.run_keys, table.borrow_caps, table.leases
        sponsor_from = SPONSOR * n
        borrowed_by_run = self._borrowed_by_run
        key, concurrency, lending_max = env.key, env.concurrency, env.lending_max
        limited = bool(env.caps) or env.gpu_hours is not None
        plain = self._caps_only(env) if limited else None
        used, lent, cap_used = st.used, st.lent, st.cap_used
        u, lent_here = used[key], lent[key]
        full: Rejection | None = None
        accepted: list[int] = []
        turned_away = False
        for i, rank in enumerate(ranked):
            position = rank % n
            w = widths[position]
            if u + w > concurrency:
                if full is None or full.args[1] != u:
                    full = self.full_rejection(env, u)
                record(rank)
                record_reason(full)
                pending.append(rank)
                turned_away = True
                continue
            rejection = None
            is_borrow = rank < n or rank >= sponsor_from
            if is_borrow and lending_max is not None and lent_here + w > lending_max:
                rejection = Rejection(key, _LENT, (lending_max, lent_here))
            elif (
                is_borrow
                and (borrow_cap := borrow_caps[position]) is not None
                and borrowed_by_run[run_keys[position]] + w > borrow_cap
            ):
                rejection = self._same(key, _BORROW_LIMIT, borrow_cap)
            elif plain is not None:
                for cap_id, most, full_cap in plain:
                    above = cap_used[cap_id]  # read even without a limit, as ``_limited`` does
                    if most is not None and above + w > most:
                        rejection = full_cap
                        break
            elif limited:
                rejection = self._limited(leases[position].id, env, u, w, cap_used)
            if rejection is not None:
                record(rank)
                record_reason(rejection)
                pending.append(rank)
                turned_away = True
                continue
            u += w
            if is_borrow:
                lent_here += w
                borrowed_by_run[run_keys[position]] += w
            for cap_id in env.caps:
                cap_used[cap_id] += w
            accepted.append(rank)
            if solo and u == concurrency:
                rest = ranked[i + 1 :]
                if rest:
                    record(rest)
                    record_reason(self.full_rejection(env, u))
                    pending += rest
                    turned_away = True
                break
        used[key], lent[key] = u, lent_here
        self._close_scan(acceptor, trace, st, turned_away=turned_away)
        return accepted


def _raise_peaks(peaks: dict[_K, int], counters: Mapping[_K, int]) -> None:
    for k, v in counters.items():
        if v > peaks.get(k, 0):
            peaks[k] = v


def _hours_ok(remaining: float, period: float, above: int, width: int, already: bool) -> bool:
    """DESIGN decision 1's hysteresis rule."""
    if already:
        return remaining > period * above + HOURS_EPSILON
    return remaining + HOURS_EPSILON >= period * (above + width) and remaining > HOURS_EPSILON


def _passed(  # noqa: PLR0917 - ``_hours_ok``'s, and where it was checked
    checks: HoursChecks,
    key: EnvelopeKey | str,
    pair: tuple[str, EnvelopeKey],
    period: float,
    above: int,
    width: int,
    already: bool,
) -> None:
    """Note a check ``_hours_ok`` passed, as the bounds on the hours left it compared with -
    the very expressions it computed, so a later comparison against them is the same check -
    and as the width it counted (``HoursChecks.top``)."""
    if already:
        checks.passed(key, period * above + HOURS_EPSILON, None)
        noted = checks.already
        assert isinstance(noted, set), "a shared record is copied before it is added to"
        noted.add(pair)
    else:
        checks.passed(key, HOURS_EPSILON, period * (above + width))
        checks.narrowest = min(checks.narrowest, width)
        above += width
    top = checks.top
    if above > top.get(key, -1):
        top[key] = above


def senior_width(rows: Sequence[Accepted], rank: tuple[object, ...]) -> int:
    """Funded width on an envelope ranked at or above ``rank`` (equal keys count as senior)."""
    keys = [r.rank for r in rows]
    pos = bisect.bisect_right(keys, rank)
    return sum(r.width for r in rows[:pos])
