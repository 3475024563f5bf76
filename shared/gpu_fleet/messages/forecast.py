"""Forecast requests and replies (``fleet.forecast.run``), served by the forecaster.

``kubectl runs plan`` and run status call this, so the reply is a stable contract.  Evolution
rules (as for every family here): new fields get defaults and are appended at the end; a field's
type never changes; decoders do not forbid unknown fields, so an older client reads a newer reply.
Instants are Unix seconds (UTC); ``None`` means "not known", never "now".
"""

from __future__ import annotations

import msgspec


class ForecastRequest(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str = "default"
    name: str
    seq: int = 0  # answer only once this ledger sequence is folded (read-your-writes)


class Remedy(msgspec.Struct, frozen=True, kw_only=True):
    """One change the owner could make, and the start it would give (from the same timeline)."""

    action: str  # shrink | drop-spares | borrow | flavor
    detail: str
    start: int | None = None


class Forecast(msgspec.Struct, frozen=True, kw_only=True):
    """When the run starts: earliest start, P50/P90, how sure we are and why; remedies ranked."""

    run: str
    earliest_start: int | None = None
    p50: int | None = None
    p90: int | None = None
    confidence: str = "conservative"  # exact | bounded | conservative | window-aligned
    deficit_gpus: int = 0
    basis: str = ""
    remedies: list[Remedy] = msgspec.field(default_factory=list)
    seq: int = 0  # the ledger sequence the answer was computed at
    at: int = 0  # the instant the forecast was computed for


ENCODER = msgspec.json.Encoder()
REQUEST_DECODER = msgspec.json.Decoder(ForecastRequest)
REPLY_DECODER = msgspec.json.Decoder(Forecast)
