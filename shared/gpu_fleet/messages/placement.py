"""Binder placement requests: plan a pack request at a ledger sequence (read-your-writes)."""

from __future__ import annotations

import msgspec

from gpu_fleet.core.placement import PackPlan, PackRequest


class PlaceRequest(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the binder answers only once it has folded this ledger sequence
    run: str
    request: PackRequest


class PlaceError(msgspec.Struct, frozen=True, kw_only=True):
    kind: str
    message: str
    shortfall: dict[str, int] = msgspec.field(default_factory=dict)


class PlaceReply(msgspec.Struct, frozen=True, kw_only=True):
    seq: int  # the sequence the answer was computed at
    plan: PackPlan | None = None
    error: PlaceError | None = None
    solver_ms: float = 0.0


ENCODER = msgspec.json.Encoder()
REQUEST_DECODER = msgspec.json.Decoder(PlaceRequest)
REPLY_DECODER = msgspec.json.Decoder(PlaceReply)
