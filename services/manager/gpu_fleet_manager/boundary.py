"""The fleet API's edge: what a request must be before the manager acts on it.

Every request passes three gates, in order, each answering with a 4xx that names the field:

1. **size** - over ``ApiLimits.max_request_bytes`` it is refused (413) before it is decoded, so
   a huge body costs a length check, not a parse;
2. **shape** - msgspec decodes it into the endpoint's request Struct; its error becomes a field
   error (``name: expected str, got int``) instead of a sentence with a JSONPath in it;
3. **rules** - names follow Kubernetes' rules and counts are positive
   (``gpu_fleet.messages.validation``).

``ApiError`` is how a handler refuses; ``Manager._wrap`` turns it into a bounded reply
(``gpu_fleet.runtime.replies``).
"""

from __future__ import annotations

import re
from typing import TypeVar

import msgspec

from gpu_fleet.core.engine import CommandError
from gpu_fleet.core.engine.fleet import CommandErrorCode
from gpu_fleet.core.names import quote
from gpu_fleet.messages import api
from gpu_fleet.messages.validation import Requests, request_problems
from gpu_fleet.runtime.replies import ApiLimits

R = TypeVar("R", bound=Requests)

REQUEST = "<request>"
"""The path of an error about the whole request body."""


class FieldRefusedError(CommandError):
    """A command refused because of one request field (``by``, ``sponsor``, ...): the error
    reply names that field instead of the object the request is about."""

    def __init__(self, path: str, message: str, code: CommandErrorCode | None = None) -> None:
        super().__init__(message, code)
        self.path = path


class ApiError(Exception):
    """A refused request: a code, a one-line message, the field errors, an HTTP-like status."""

    def __init__(
        self,
        code: api.ErrorCode,
        message: str,
        errors: list[api.FieldErrorOut] | None = None,
        status: str | None = None,
    ):
        super().__init__(message)
        self.code: api.ErrorCode = code
        self.message = message
        self.errors = errors or []
        self.status = status or api.STATUS_CODES.get(code, "500")


_AT = re.compile(r"(?s)(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]*)`")
_EXPECTED = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`")
_ENUM = re.compile(r"(?s)Invalid enum value (?P<value>.*)")


def _path(jsonpath: str, field: str = "") -> str:
    path = jsonpath.lstrip(".")
    if field:
        path = f"{path}.{field}" if path else field
    return path or REQUEST


def shape_error(exc: msgspec.ValidationError) -> api.FieldErrorOut:
    """msgspec's one sentence as a field error; a rejected value is quoted by prefix only."""
    m = _AT.fullmatch(str(exc))
    text, jsonpath = (m.group("text"), m.group("path") or "") if m else (str(exc), "")
    if missing := _MISSING.fullmatch(text):
        return api.FieldErrorOut(_path(jsonpath, missing.group("field")), "required")
    if expected := _EXPECTED.fullmatch(text):
        return api.FieldErrorOut(
            _path(jsonpath), f"expected {expected.group('want')}, got {expected.group('got')}"
        )
    if enum := _ENUM.fullmatch(text):
        return api.FieldErrorOut(_path(jsonpath), f"invalid value {quote(enum.group('value'))}")
    return api.FieldErrorOut(_path(jsonpath), text)


def decode_request(data: bytes, typ: type[R], limits: ApiLimits) -> R:
    """Size, shape and rules, in that order; an empty body reads as ``{}``."""
    if len(data) > limits.max_request_bytes:
        raise ApiError(
            "bad_request",
            f"request is {len(data)} bytes; the limit is {limits.max_request_bytes}",
            [
                api.FieldErrorOut(
                    REQUEST,
                    f"must be no more than {limits.max_request_bytes} bytes (got {len(data)})",
                )
            ],
            status="413",
        )
    try:
        req = msgspec.json.decode(data or b"{}", type=typ)
    except msgspec.ValidationError as exc:
        error = shape_error(exc)
        message = f"invalid request: {error.path}: {error.message}"
        raise ApiError("bad_request", message, [error]) from exc
    except msgspec.DecodeError as exc:
        raise ApiError(
            "bad_request", "request is not JSON", [api.FieldErrorOut(REQUEST, f"not JSON: {exc}")]
        ) from exc
    problems = request_problems(req)
    if problems:
        first = problems[0]
        raise ApiError("validation", f"invalid request: {first.path}: {first.message}", problems)
    return req


def object_too_large(
    size: int, limits: ApiLimits, what: str, path: str
) -> api.FieldErrorOut | None:
    """A field error for an object whose ledger event would be over ``max_object_bytes``."""
    if size <= limits.max_object_bytes:
        return None
    return api.FieldErrorOut(
        path, f"{what} is {size} bytes once encoded; the limit is {limits.max_object_bytes}"
    )
