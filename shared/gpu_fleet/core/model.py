"""The resource model: what users write (Budget, Run) and what the fleet records (Lease, Node).

Spec Structs mirror the CRDs of group ``rq.davidlangworthy.io/v1`` field for field (SPEC §A) with
our additions (DESIGN decisions 1-3): ``gpuHours`` on envelopes and aggregate caps, and
``spec.runtime.maxDuration`` / ``preemptionGrace`` on runs.  They are frozen: a changed spec is a
new object, so the ledger can hold them by value and a replay sees exactly what was applied.

Wire names are camelCase with the GPU acronym kept upper case (``totalGPUs``), which is why most
fields carry an explicit ``name=`` instead of relying on ``rename="camel"``.

Instants inside the core are integer Unix seconds (``Instant``); specs keep ``datetime`` because
that is what manifests carry.  ``to_instant`` is the one conversion.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Literal

import msgspec

API_VERSION = "rq.davidlangworthy.io/v1"
GROUP = "rq.davidlangworthy.io"

Instant = int
"""Unix seconds, UTC.  The whole core runs on an injected clock expressed in these."""

LOCATION_KEYS = ("region", "cluster", "fabric.domain")
FLAVOR_LABEL = "gpu.flavor"


def to_instant(value: dt.datetime) -> Instant:
    """Convert an aware datetime to Unix seconds (naive datetimes are read as UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp())


def run_key(namespace: str, name: str) -> str:
    """The one namespaced-key rule (SPEC §F.1.8): ``ns/name``, empty namespace is ``default``."""
    return f"{namespace or 'default'}/{name}"


class _Spec(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every manifest struct.

    Unknown fields in a *manifest* are typos and fail loudly - ``manifests.validate_manifest``
    walks the raw document and reports each one with its path before anything is built.  The
    structs themselves accept unknown fields so that an older service can still decode a ledger
    event carrying a Budget or Run written by a newer one (schema evolution, rolling upgrades).
    """


# --------------------------------------------------------------------------------------------
# Budget
# --------------------------------------------------------------------------------------------


class PreActivation(_Spec, frozen=True):
    allow_reservations: bool = msgspec.field(default=True, name="allowReservations")
    allow_admission: bool = msgspec.field(default=False, name="allowAdmission")


class Lending(_Spec, frozen=True):
    allow: bool = False
    to: tuple[str, ...] = ()
    max_concurrency: int | None = msgspec.field(default=None, name="maxConcurrency")


class Envelope(_Spec, frozen=True):
    name: str
    flavor: str
    selector: dict[str, str]
    concurrency: int
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    gpu_hours: float | None = msgspec.field(default=None, name="gpuHours")
    sharing: Literal["", "family", "none"] = ""
    pre_activation: PreActivation | None = msgspec.field(default=None, name="preActivation")
    lending: Lending | None = None


class AggregateCap(_Spec, frozen=True):
    name: str
    flavor: str
    envelopes: tuple[str, ...]
    max_concurrency: int | None = msgspec.field(default=None, name="maxConcurrency")
    gpu_hours: float | None = msgspec.field(default=None, name="gpuHours")


class AutoRenew(_Spec, frozen=True):
    period: str
    notify_before: str = msgspec.field(default="0s", name="notifyBefore")


class BudgetSpec(_Spec, frozen=True):
    owner: str
    envelopes: tuple[Envelope, ...]
    aggregate_caps: tuple[AggregateCap, ...] = msgspec.field(default=(), name="aggregateCaps")
    parents: tuple[str, ...] = ()
    auto_renew: AutoRenew | None = msgspec.field(default=None, name="autoRenew")


class ObjectMeta(_Spec, frozen=True):
    name: str
    namespace: str = "default"
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)


class Budget(_Spec, frozen=True, tag_field="kind", tag="Budget"):
    metadata: ObjectMeta
    spec: BudgetSpec
    api_version: str = msgspec.field(default=API_VERSION, name="apiVersion")

    @property
    def key(self) -> str:
        return run_key(self.metadata.namespace, self.metadata.name)


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


class Resources(_Spec, frozen=True):
    gpu_type: str = msgspec.field(name="gpuType")
    total_gpus: int = msgspec.field(name="totalGPUs")


class Locality(_Spec, frozen=True):
    group_gpus: int | None = msgspec.field(default=None, name="groupGPUs")
    allow_cross_group_spread: bool = msgspec.field(default=True, name="allowCrossGroupSpread")


class Malleable(_Spec, frozen=True):
    min_total_gpus: int = msgspec.field(name="minTotalGPUs")
    max_total_gpus: int = msgspec.field(name="maxTotalGPUs")
    step_gpus: int = msgspec.field(name="stepGPUs")
    desired_total_gpus: int | None = msgspec.field(default=None, name="desiredTotalGPUs")


class Funding(_Spec, frozen=True):
    allow_borrow: bool = msgspec.field(default=False, name="allowBorrow")
    max_borrow_gpus: int | None = msgspec.field(default=None, name="maxBorrowGPUs")
    sponsors: tuple[str, ...] = ()


class Follow(_Spec, frozen=True):
    after: tuple[str, ...]
    on_upstream_failure: Literal["", "wait", "fail"] = msgspec.field(
        default="", name="onUpstreamFailure"
    )
    upstream_failure_grace: str = msgspec.field(default="30m", name="upstreamFailureGrace")


class Runtime(_Spec, frozen=True):
    checkpoint: str = "0s"
    max_duration: str | None = msgspec.field(default=None, name="maxDuration")
    preemption_grace: str | None = msgspec.field(default=None, name="preemptionGrace")


class Role(_Spec, frozen=True):
    name: str
    template: dict[str, object] = msgspec.field(default_factory=dict)
    width: int = 1
    gpus_per_pod: int = msgspec.field(default=1, name="gpusPerPod")
    group_gpus: int | None = msgspec.field(default=None, name="groupGPUs")
    spares: int = 0
    failure_policy: Literal["Fail", "Retry", "Ignore"] = msgspec.field(
        default="Fail", name="failurePolicy"
    )
    retries: int | None = None
    backoff: str | None = None


class RunSpec(_Spec, frozen=True):
    resources: Resources
    locality: Locality | None = None
    malleable: Malleable | None = None
    spares_per_group: int = msgspec.field(default=0, name="sparesPerGroup")
    funding: Funding | None = None
    follow: Follow | None = None
    runtime: Runtime | None = None
    roles: tuple[Role, ...] = ()


class Run(_Spec, frozen=True, tag_field="kind", tag="Run"):
    metadata: ObjectMeta
    spec: RunSpec
    api_version: str = msgspec.field(default=API_VERSION, name="apiVersion")

    @property
    def key(self) -> str:
        return run_key(self.metadata.namespace, self.metadata.name)

    @property
    def flavor(self) -> str:
        return self.spec.resources.gpu_type

    @property
    def desired_width(self) -> int:
        """Width the run asks for now: malleable desired, else totalGPUs."""
        m = self.spec.malleable
        if m is not None:
            return m.desired_total_gpus if m.desired_total_gpus is not None else m.max_total_gpus
        return self.spec.resources.total_gpus

    @property
    def min_width(self) -> int:
        """Minimum runnable width (SPEC §B.2): malleable min, else start together or not at all."""
        m = self.spec.malleable
        return m.min_total_gpus if m is not None else self.spec.resources.total_gpus

    @property
    def group_gpus(self) -> int | None:
        loc = self.spec.locality
        return loc.group_gpus if loc is not None else None


# --------------------------------------------------------------------------------------------
# NotificationChannel (where a team's notices go; DESIGN decisions 2 and 3)
# --------------------------------------------------------------------------------------------

Severity = Literal["info", "warning", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "critical")
"""Severities in rising order; a channel's filter names the lowest one it wants."""

NOTIFICATION_EVENTS: dict[str, Severity] = {
    "run-admitted": "info",  # the run started: its gang is bound
    "run-reserved": "info",  # the run got a reservation (a promised start)
    "run-forecast": "info",  # a waiting run's forecast changed
    "reservation-activated": "info",  # the reservation started its run
    "run-completed": "info",
    "run-failed": "critical",
    "run-unfunded": "warning",  # held: no funding principal
    "run-swapped": "warning",  # a failed node's group moved onto spares
    "lease-started": "info",
    "lease-closed": "info",
    "lease-expiring": "warning",  # a lease's scheduled end is within a lead time
    "lease-expired": "warning",  # a lease closed at its scheduled end
    "preempted": "critical",  # notice (with deadline, seed, conflict set) and closure
    "funding-expiring": "warning",  # leases will demote at a predicted instant
    "funding-demoted": "warning",  # a lease lost its funding (demote, not kill)
    "funding-restored": "info",  # an unfunded lease is funded again
    "budget-renewal-due": "warning",  # autoRenew: an envelope window ends within notifyBefore
    "delivery-dead-lettered": "warning",  # a webhook gave up after its attempts
    "channel-test": "info",  # kubectl runs notify test
}
"""Every notification event with its severity: the one list manifests validate filters with."""


class ChannelTarget(_Spec, frozen=True):
    """Where a channel delivers: an HTTP(S) webhook, or NATS only (exactly one of them)."""

    webhook: str | None = None
    nats: bool | None = None


class ChannelFilter(_Spec, frozen=True):
    """Which notifications a channel wants; an empty list means "all"."""

    events: tuple[str, ...] = ()
    runs: tuple[str, ...] = ()  # run names in the channel's namespace, or namespace/name
    severity: Severity = "info"  # the lowest severity delivered


class SecretRef(_Spec, frozen=True):
    """Where the signing secret is kept.  Only this reference reaches the ledger, never the value.

    Exactly one of ``name`` (a Kubernetes Secret in the channel's namespace, read at ``key``),
    ``file`` (local mode: a file holding the secret) and ``env`` (local mode: an environment
    variable of the notifier).
    """

    name: str | None = None
    key: str = "secret"
    file: str | None = None
    env: str | None = None


class ChannelSpec(_Spec, frozen=True):
    target: ChannelTarget
    format: Literal["json", "slack"] = "json"
    filter: ChannelFilter | None = None
    lead_times: tuple[str, ...] = msgspec.field(default=(), name="leadTimes")
    secret_ref: SecretRef | None = msgspec.field(default=None, name="secretRef")
    scope: Literal["namespace", "team"] = "namespace"


class NotificationChannel(_Spec, frozen=True, tag_field="kind", tag="NotificationChannel"):
    """A team's subscription: which notices, in which format, to which receiver, signed how.

    ``scope: namespace`` (the default) receives the notices about the channel's own namespace;
    ``scope: team`` those of every namespace with the same derived owner.
    """

    metadata: ObjectMeta
    spec: ChannelSpec
    api_version: str = msgspec.field(default=API_VERSION, name="apiVersion")

    @property
    def key(self) -> str:
        return run_key(self.metadata.namespace, self.metadata.name)


Manifest = Budget | Run | NotificationChannel
"""Everything a user may apply (a tagged union on ``kind``)."""


# --------------------------------------------------------------------------------------------
# Fleet and ledger records
# --------------------------------------------------------------------------------------------


class NodeHealth(enum.StrEnum):
    READY = "Ready"
    CORDONED = "Cordoned"  # no new work; existing work untouched (cordon is not failure)
    FENCED = "Fenced"  # failed: deleted or tainted out-of-service


class Node(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU node as the topology index sees it (inventory file row or Kubernetes Node)."""

    name: str
    gpus: int
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    health: NodeHealth = NodeHealth.READY

    @property
    def flavor(self) -> str:
        return self.labels.get(FLAVOR_LABEL, "")


class EnvelopeKey(msgspec.Struct, frozen=True, order=True, cache_hash=True, gc=False):
    """Identity of an envelope: the Budget's namespace and name, then the envelope name.

    A matching looks its counters, limits and rejections up by key a few million times at
    100k open leases (issue 11), so the hash is computed once per key (``cache_hash``).  It
    holds three strings and can be in no reference cycle, so the cyclic collector does not
    track it (``gc=False``): a dict of keys, or of lease ids to keys (a matching's payers), is
    then untracked too, and not walked after every evaluation.
    """

    namespace: str
    budget: str
    envelope: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.budget}/{self.envelope}"


class Payer(msgspec.Struct, frozen=True, kw_only=True):
    """An envelope that pays, with its Budget's owner (as reported; never used to authorise)."""

    namespace: str
    budget: str
    envelope: str
    owner: str

    @property
    def key(self) -> EnvelopeKey:
        return EnvelopeKey(self.namespace, self.budget, self.envelope)


class LeaseRole(enum.StrEnum):
    ACTIVE = "Active"
    SPARE = "Spare"


class MintReason(enum.StrEnum):
    START = "Start"
    GROW = "Grow"
    SWAP = "Swap"
    PROMISE = "Promise"


class FundingClass(enum.StrEnum):
    OWNED = "owned"
    SHARED = "shared"
    BORROWED = "borrowed"
    UNFUNDED = "unfunded"


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """One run's hold on physical slots of one node, for one group, one role, one mint payer.

    Immutable: closing a lease produces a new value with ``closed_at``/``closure_reason`` set,
    and the ledger refuses a second closure (closure is final).
    """

    id: str
    run: str
    node: str
    slots: tuple[str, ...]
    role: LeaseRole
    group: int
    reason: MintReason = MintReason.START
    cohort: int = 0
    minted_payer: Payer | None = None
    start: Instant
    end: Instant | None = None  # scheduled end (maxDuration); None = open-ended
    closed_at: Instant | None = None
    closure_reason: str | None = None

    @property
    def width(self) -> int:
        return len(self.slots)

    @property
    def is_open(self) -> bool:
        return self.closure_reason is None

    def effective_end(self) -> Instant | None:
        """When the lease stops counting: the earlier of its scheduled end and its closure."""
        end, closed = self.end, self.closed_at  # no list: the meter asks for every open lease
        if end is None or (closed is not None and closed < end):
            return closed
        return end

    def live_at(self, t: float) -> bool:  # an Instant, or a meter time between two
        if t < self.start:
            return False
        end = self.effective_end()
        return end is None or t < end


def slot(node: str, ordinal: int) -> str:
    """A physical slot name (DESIGN decision 6): one GPU of one node, unique fleet-wide."""
    return f"{node}#{ordinal}"
