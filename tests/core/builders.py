"""Small builders for the funding/ledger/engine tests: manifests as dicts, then msgspec.convert.

Every builder returns the real frozen Struct the core consumes, so a test reads like a manifest.
Instants are integer Unix seconds; ``T0`` is the reference "now" of most tests, and every
envelope window defaults to a year around it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from gpu_fleet.core.funding import (
    EnvelopeIndex,
    Evaluation,
    FillResult,
    FundingInputs,
    HoursView,
    Meter,
    build_index,
    evaluate,
    fill,
)
from gpu_fleet.core.model import (
    Budget,
    EnvelopeKey,
    FundingClass,
    Instant,
    Lease,
    LeaseRole,
    MintReason,
    Node,
    Payer,
    Run,
    slot,
)

H100 = "H100"
A100 = "A100"
HOUR = 3600
MINUTE = 60
T0: Instant = int(dt.datetime(2026, 3, 2, tzinfo=dt.UTC).timestamp())
YEAR_START = "2026-01-01T00:00:00Z"
YEAR_END = "2027-01-01T00:00:00Z"


# Funding classes by their short names, as the tests assert them.
OWNED = FundingClass.OWNED
SHARED = FundingClass.SHARED
BORROWED = FundingClass.BORROWED
UNFUNDED = FundingClass.UNFUNDED


def iso(t: Instant) -> str:
    """An instant as the RFC 3339 text manifests carry."""
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------


def env(
    name: str,
    concurrency: int,
    *,
    flavor: str = H100,
    selector: Mapping[str, str] | None = None,
    start: Instant | str | None = YEAR_START,
    end: Instant | str | None = YEAR_END,
    gpu_hours: float | None = None,
    sharing: str = "",
    lend: bool = False,
    lend_to: Sequence[str] = (),
    lend_max: int | None = None,
    allow_admission: bool | None = None,
    allow_reservations: bool | None = None,
) -> dict[str, Any]:
    """An envelope dict (manifest shape)."""
    out: dict[str, Any] = {
        "name": name,
        "flavor": flavor,
        "selector": dict(selector) if selector is not None else {"region": "r1"},
        "concurrency": concurrency,
    }
    if start is not None:
        out["start"] = iso(start) if isinstance(start, int) else start
    if end is not None:
        out["end"] = iso(end) if isinstance(end, int) else end
    if gpu_hours is not None:
        out["gpuHours"] = gpu_hours
    if sharing:
        out["sharing"] = sharing
    if lend or lend_to or lend_max is not None:
        lending: dict[str, Any] = {"allow": lend, "to": list(lend_to)}
        if lend_max is not None:
            lending["maxConcurrency"] = lend_max
        out["lending"] = lending
    if allow_admission is not None or allow_reservations is not None:
        pre: dict[str, Any] = {}
        if allow_admission is not None:
            pre["allowAdmission"] = allow_admission
        if allow_reservations is not None:
            pre["allowReservations"] = allow_reservations
        out["preActivation"] = pre
    return out


def cap(
    name: str,
    members: Sequence[str],
    *,
    max_concurrency: int | None = None,
    flavor: str = H100,
    gpu_hours: float | None = None,
) -> dict[str, Any]:
    """An aggregate-cap dict (manifest shape)."""
    out: dict[str, Any] = {"name": name, "flavor": flavor, "envelopes": list(members)}
    if max_concurrency is not None:
        out["maxConcurrency"] = max_concurrency
    if gpu_hours is not None:
        out["gpuHours"] = gpu_hours
    return out


def budget(
    namespace: str,
    owner: str,
    envelopes: Sequence[Mapping[str, Any]] = (),
    *,
    name: str | None = None,
    parents: Sequence[str] = (),
    caps: Sequence[Mapping[str, Any]] = (),
) -> Budget:
    """A Budget; the name defaults to the namespace, envelopes default to one ``e`` of 8."""
    spec: dict[str, Any] = {
        "owner": owner,
        "envelopes": [dict(e) for e in envelopes] or [env("e", 8)],
    }
    if parents:
        spec["parents"] = list(parents)
    if caps:
        spec["aggregateCaps"] = [dict(c) for c in caps]
    return msgspec.convert(
        {
            "kind": "Budget",
            "metadata": {"name": name or namespace, "namespace": namespace},
            "spec": spec,
        },
        Budget,
    )


def run(
    namespace: str,
    name: str,
    total: int,
    *,
    flavor: str = H100,
    group_gpus: int | None = None,
    cross_spread: bool | None = None,
    spares: int = 0,
    allow_borrow: bool | None = None,
    sponsors: Sequence[str] = (),
    max_borrow: int | None = None,
    malleable: tuple[int, int, int] | None = None,
    max_duration: str | None = None,
) -> Run:
    """A Run; ``malleable`` is (min, max, step)."""
    spec: dict[str, Any] = {"resources": {"gpuType": flavor, "totalGPUs": total}}
    loc: dict[str, Any] = {}
    if group_gpus is not None:
        loc["groupGPUs"] = group_gpus
    if cross_spread is not None:
        loc["allowCrossGroupSpread"] = cross_spread
    if loc:
        spec["locality"] = loc
    if spares:
        spec["sparesPerGroup"] = spares
    if allow_borrow is not None or sponsors or max_borrow is not None:
        funding: dict[str, Any] = {
            "allowBorrow": bool(allow_borrow) if allow_borrow is not None else True,
            "sponsors": list(sponsors),
        }
        if max_borrow is not None:
            funding["maxBorrowGPUs"] = max_borrow
        spec["funding"] = funding
    if malleable is not None:
        lo, hi, step = malleable
        spec["malleable"] = {"minTotalGPUs": lo, "maxTotalGPUs": hi, "stepGPUs": step}
    if max_duration is not None:
        spec["runtime"] = {"maxDuration": max_duration}
    return msgspec.convert(
        {"kind": "Run", "metadata": {"name": name, "namespace": namespace}, "spec": spec}, Run
    )


def node(
    name: str,
    gpus: int = 8,
    *,
    region: str = "r1",
    cluster: str = "c1",
    fabric: str = "f1",
    flavor: str = H100,
) -> Node:
    """A GPU node with full location labels."""
    labels = {"region": region, "cluster": cluster, "fabric.domain": fabric, "gpu.flavor": flavor}
    return Node(name=name, gpus=gpus, labels=labels)


# ------------------------------------------------------------------------------------------
# Ledger records
# ------------------------------------------------------------------------------------------


def payer(namespace: str, envelope: str = "e", *, owner: str = "", budget_name: str = "") -> Payer:
    """A minted payer naming ``namespace/budget/envelope`` (budget defaults to the namespace)."""
    return Payer(
        namespace=namespace, budget=budget_name or namespace, envelope=envelope, owner=owner
    )


def key(namespace: str, envelope: str = "e", budget_name: str = "") -> EnvelopeKey:
    """The EnvelopeKey of ``namespace/budget/envelope`` (budget defaults to the namespace)."""
    return EnvelopeKey(namespace, budget_name or namespace, envelope)


def lease(
    lease_id: str,
    run_key: str,
    width: int = 1,
    *,
    node_name: str = "n1",
    first: int = 0,
    group: int = 0,
    role: LeaseRole = LeaseRole.ACTIVE,
    minted: Payer | None = None,
    start: Instant = T0,
    end: Instant | None = None,
    reason: MintReason = MintReason.START,
) -> Lease:
    """A lease on ``width`` consecutive slots of ``node_name`` starting at ordinal ``first``."""
    return Lease(
        id=lease_id,
        run=run_key,
        node=node_name,
        slots=tuple(slot(node_name, i) for i in range(first, first + width)),
        role=role,
        group=group,
        reason=reason,
        minted_payer=minted,
        start=start,
        end=end,
    )


# ------------------------------------------------------------------------------------------
# Worlds: a budget set + runs + leases, evaluated the way the engine does
# ------------------------------------------------------------------------------------------


class World:
    """Inputs of the funding fill, assembled from lists (admission time defaults per run)."""

    def __init__(
        self,
        budgets: Iterable[Budget],
        runs: Iterable[Run] = (),
        leases: Iterable[Lease] = (),
        *,
        nodes: Iterable[Node] = (),
        admitted: Mapping[str, Instant] | None = None,
        period_hours: float = 24.0,
    ) -> None:
        self.budgets = list(budgets)
        self.runs = {r.key: r for r in runs}
        self.leases = list(leases)
        node_list = list(nodes) or [node(f"n{i}", 64) for i in range(1, 5)]
        self.node_labels = {n.name: dict(n.labels) for n in node_list}
        self.admitted = dict(admitted or {})
        self.period_hours = period_hours
        self.index: EnvelopeIndex = build_index(self.budgets)

    def fill(self, t: Instant = T0, hours: HoursView | None = None) -> FillResult:
        return fill(self.index, self.leases, self.runs, self.admitted, self.node_labels, t, hours)

    def inputs(self) -> FundingInputs:
        return FundingInputs(
            index=self.index,
            leases=self.leases,
            runs=self.runs,
            admitted=self.admitted,
            node_labels=self.node_labels,
            period_hours=self.period_hours,
        )

    def evaluate(self, t: Instant = T0, meter: Meter | None = None) -> Evaluation:
        return evaluate(meter or Meter(t=float(t)), self.inputs(), t)
