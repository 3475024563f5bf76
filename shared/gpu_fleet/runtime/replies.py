"""Replies that can never take a service's connection down: bounded size, one-line headers.

The NATS server closes a connection that publishes a message (headers plus payload) over its
``max_payload`` (1 MiB by default), and nats-py then stays CLOSED for good.  A reply that quotes
its request can therefore be a kill switch: a ``fleet.api.get`` with a 600 KB name once came
back as a not-found error quoting the name twice (header and body), and the manager's
connection was gone (issue 19).  So every reply of every service endpoint goes through here:

* **Requests over a size are refused before decoding** (a 413 that says how large the
  request was and what the limit is; the fleet API does it in ``gpu_fleet_manager.boundary``).
* **Error text is bounded and on one line.**  ``Nats-Service-Error`` is a header: a CR or LF in
  it would corrupt the protocol stream, so it is reduced to printable ASCII on one line and
  clamped; the JSON body's message and field errors are clamped and counted
  (``error_out``).
* **The encoded reply is checked against the budget** (``reply_budget``: the connection's
  ``max_payload`` or the configured bound, whichever is smaller, minus room for headers) and
  replaced by a short error when it would not fit (``respond``).  List endpoints page instead
  (``gpu_fleet.runtime.paging``), so only a single huge object can hit this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import structlog
from nats.micro.request import Request

from gpu_fleet.core.names import clamp
from gpu_fleet.messages import api

log = structlog.get_logger("gpu_fleet.replies")

HEADER_MAX: Final = 200
"""Characters of the ``Nats-Service-Error`` header."""
MESSAGE_MAX: Final = 500
"""Characters of an error reply's message, and of each field error's message."""
PATH_MAX: Final = 200
"""Characters of a field error's path."""
FIELD_ERRORS_MAX: Final = 100
"""Field errors in one reply; the rest are counted in a last entry."""
HEADER_ROOM: Final = 4096
"""Bytes of ``max_payload`` kept for headers and protocol framing (ours use under 300)."""


@dataclass(frozen=True)
class ApiLimits:
    """What a service accepts and sends; see docs/reliability.md for every default."""

    max_request_bytes: int = 512 * 1024
    """Requests larger than this are refused (413) before they are decoded."""
    max_reply_bytes: int = 1024 * 1024
    """Upper bound of a reply; the connection's ``max_payload`` lowers it further."""
    page_size: int = 500
    """Items in a list page when the request gives no ``limit``."""
    max_object_bytes: int = 256 * 1024
    """Largest Budget, Run or node once encoded: its ledger event must fit one NATS message."""
    max_objects_per_namespace: int = 10_000
    """Runs, Budgets and NotificationChannels one namespace may hold (a create over it is 400)."""
    max_pending_per_client: int = 256
    """Requests one client connection may have waiting in the manager (more are refused, 429)."""


def reply_budget(max_payload: int, limits: ApiLimits) -> int:
    """Bytes a reply body may use on a connection whose server allows ``max_payload``."""
    return max(1024, min(max_payload, limits.max_reply_bytes) - HEADER_ROOM)


def header_text(text: str) -> str:
    """``text`` as a header value: printable ASCII on one line, at most ``HEADER_MAX`` chars."""
    ascii_text = text.encode("ascii", "backslashreplace").decode("ascii")
    printable = "".join(c if c.isprintable() else " " for c in ascii_text)
    return clamp(printable, HEADER_MAX)


def error_out(
    code: api.ErrorCode, message: str, errors: list[api.FieldErrorOut] | None = None
) -> api.ErrorOut:
    """An error body whose size does not depend on the input: clamped text, counted errors."""
    items = [
        api.FieldErrorOut(clamp(e.path, PATH_MAX), clamp(e.message, MESSAGE_MAX))
        for e in (errors or [])[:FIELD_ERRORS_MAX]
    ]
    extra = len(errors or []) - FIELD_ERRORS_MAX
    if extra > 0:
        items.append(api.FieldErrorOut("<more>", f"and {extra} more error(s)"))
    return api.ErrorOut(code=code, message=clamp(message, MESSAGE_MAX), errors=items)


async def respond_error(req: Request, status: str, error: api.ErrorOut) -> None:
    """Answer with a service error: short header, bounded ``Reply`` body."""
    body = api.ENCODER.encode(api.Reply(ok=False, error=error))
    await req.respond_error(status, header_text(error.message), data=body)


async def respond_text_error(req: Request, status: str, message: str) -> None:
    """A service error with no body (binder and forecaster replies), header bounded."""
    await req.respond_error(status, header_text(message))


async def respond(req: Request, body: bytes, budget: int) -> bool:
    """Send ``body``, or a short 500 if it exceeds ``budget``; True when ``body`` went out."""
    if len(body) <= budget:
        await req.respond(body)
        return True
    log.warning("reply.too_large", bytes=len(body), budget=budget)
    await respond_error(
        req,
        "500",
        error_out(
            "internal",
            f"reply of {len(body)} bytes exceeds the reply limit of {budget} bytes; "
            "ask for less (a list takes limit and continue)",
        ),
    )
    return False
