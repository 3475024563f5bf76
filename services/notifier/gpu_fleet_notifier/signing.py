"""The webhook signature: HMAC-SHA256 over the timestamp and the body (pure, no I/O).

Every webhook request carries::

    GPU-Fleet-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is the attempt's, so each retry is signed afresh; a receiver recomputes the HMAC
over the exact bytes it received, compares in constant time, and refuses a timestamp further
than its tolerance (default ``TOLERANCE`` seconds) from its own clock - a captured request
cannot be replayed later.  De-duplication is by ``GPU-Fleet-Id`` (the notification id, the same
on every retry and every channel).  ``verify`` is the reference receiver; docs/notifications.md
shows the same dozen lines for a receiver that does not import gpu-fleet.

Several ``v1=`` values may appear (one per secret while a secret is rotated): a receiver accepts
the request when any of them matches.
"""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "GPU-Fleet-Signature"
ID_HEADER = "GPU-Fleet-Id"  # the notification id: the idempotency key
EVENT_HEADER = "GPU-Fleet-Event"
DELIVERY_HEADER = "GPU-Fleet-Delivery"  # "<notification id>@<namespace>/<channel>"
ATTEMPT_HEADER = "GPU-Fleet-Attempt"
TOLERANCE = 300  # seconds


class SignatureError(ValueError):
    """A request that does not verify; the message says which check failed."""


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The header value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: bytes, header: str, body: bytes, now: float, tolerance: int = TOLERANCE) -> int:
    """Check a request as a receiver would; return its timestamp, or raise ``SignatureError``."""
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("malformed signature header: want t=<seconds>,v1=<hex>")
    if abs(now - timestamp) > tolerance:
        raise SignatureError(f"timestamp {timestamp} is outside the {tolerance}s tolerance")
    expected = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise SignatureError("signature does not match the body")
    return timestamp
