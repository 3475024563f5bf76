"""The fleet API (request/reply on ``fleet.api.<endpoint>``), served by the manager.

Requests are small Structs; every reply is a ``Reply``: ``ok`` plus a JSON-able ``result``, or an
``error`` that names the code, a one-line message and, for validation, every field error.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class _Req(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RunRef(_Req, frozen=True, kw_only=True):
    namespace: str = "default"
    name: str


class RetryRequest(_Req, frozen=True, kw_only=True):
    """A workload pod of ``attempt`` (0: the first run, N: retry N) failed under
    ``failurePolicy: Retry``; a report for an attempt already handled changes nothing."""

    namespace: str = "default"
    name: str
    attempt: int = 0
    pod: str = ""


class ApplyRequest(_Req, frozen=True, kw_only=True):
    documents: str  # YAML or JSON text, several documents allowed
    source: str = "<request>"


class DeleteRequest(_Req, frozen=True, kw_only=True):
    kind: Literal["Run", "Budget", "NotificationChannel"]
    namespace: str = "default"
    name: str


class ShrinkRequest(_Req, frozen=True, kw_only=True):
    namespace: str = "default"
    name: str
    by: int | None = None
    desired: int | None = None


class SponsorsRequest(_Req, frozen=True, kw_only=True):
    namespace: str = "default"
    name: str
    op: Literal["list", "add", "remove"] = "list"
    sponsor: str | None = None
    max_borrow: int | None = None


class NodeRequest(_Req, frozen=True, kw_only=True):
    op: Literal["register", "cordon", "fence", "uncordon"]
    name: str = ""
    node: dict[str, Any] | None = None  # inventory row for register


class EtaRequest(_Req, kw_only=True, frozen=True):
    namespace: str = "default"
    name: str
    eta: int | str  # Unix seconds or RFC 3339


class ListRequest(_Req, frozen=True, kw_only=True):
    """A list of runs or budgets, a page at a time (``limit``/``continue``, as Kubernetes lists).

    The reply is a ``ListPage``-shaped result.  Without ``limit`` the manager still pages, at its
    configured page size and reply size bound, so no list reply can outgrow the connection.
    """

    namespace: str | None = None
    limit: int | None = None
    continue_: str | None = msgspec.field(default=None, name="continue")


class LeasesRequest(_Req, frozen=True, kw_only=True):
    namespace: str | None = None
    name: str | None = None
    limit: int | None = None
    continue_: str | None = msgspec.field(default=None, name="continue")


class ClockRequest(_Req, frozen=True, kw_only=True):
    advance_to: int | None = None


class ReportRequest(_Req, frozen=True, kw_only=True):
    label: str = "final"


class FleetMapRequest(_Req, frozen=True, kw_only=True):
    """``fleet.api.fleetmap``: the picture of the fleet (``views.fleet_map``); no fields yet."""


class FieldErrorOut(msgspec.Struct, frozen=True):
    path: str
    message: str


ErrorCode = Literal[
    "validation",
    "not_found",
    "conflict",
    "rejected",
    "unavailable",
    "bad_request",
    "forbidden",
    "internal",
]


class ErrorOut(msgspec.Struct, frozen=True, kw_only=True):
    code: ErrorCode
    message: str
    errors: list[FieldErrorOut] = msgspec.field(default_factory=list)


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    result: Any = None
    error: ErrorOut | None = None


class ListMeta(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Kubernetes' list metadata: ``continue`` is set while more items follow."""

    continue_: str = msgspec.field(default="", name="continue")
    remaining_item_count: int | None = msgspec.field(default=None, name="remainingItemCount")


class ListPage(msgspec.Struct, frozen=True, kw_only=True):
    """The result of a list endpoint: one page of items and where the next page starts."""

    items: list[Any]
    metadata: ListMeta = msgspec.field(default_factory=ListMeta)


ENCODER = msgspec.json.Encoder()
REPLY_DECODER = msgspec.json.Decoder(Reply)

STATUS_CODES = {
    "validation": "400",
    "bad_request": "400",
    "forbidden": "403",  # a team acting outside its namespaces (docs/security.md)
    "not_found": "404",
    "conflict": "409",
    "rejected": "409",  # the object's state refuses the command (a Failed run cannot complete)
    "unavailable": "503",
    "internal": "500",
}
