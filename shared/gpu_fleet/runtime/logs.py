"""structlog configured once per process: JSON lines on stdout, context from contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import msgspec
import structlog
from structlog.typing import EventDict, WrappedLogger

_json = msgspec.json.Encoder(enc_hook=str)


def _render(_: WrappedLogger, __: str, event_dict: EventDict) -> str:
    # structlog's JSONRenderer passes ``default=`` which msgspec rejects; encode directly.
    return _json.encode(event_dict).decode()


def configure(service: str, level: str = "info", stream: Any = None) -> None:
    """Production chain: contextvars first, then level, timestamp, and one JSON object a line."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)
