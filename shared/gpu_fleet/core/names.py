"""Kubernetes' naming rules, and how an error message may quote what a user typed.

Names cross every boundary (API requests, manifests, subjects, pod and lease names), so the
rules are checked where input arrives and nowhere else has to wonder.  They are Kubernetes' own
(``k8s.io/apimachinery/pkg/util/validation``), because a Run's name becomes a pod's name and a
namespace must be a real namespace once the Kubernetes bridge carries the object:

* **DNS-1123 label** (namespaces, Run names): 1-63 characters, lowercase letters, digits and
  ``-``, starting and ending with a letter or digit.
* **DNS-1123 subdomain** (Budget and node names): 1-253 characters, labels joined by ``.``.
* **label value** (report labels): 0-63 characters, letters, digits, ``-``, ``_`` and ``.``,
  starting and ending with a letter or digit.

A problem is returned as a message that names the rule and never repeats the value: the caller
puts it next to the field's path.  When a message must show user input (a name that was not
found, say), ``quote`` shows a short prefix and the full length, so no reply can grow with the
input: a 600 KB name once made a reply exceed the server's max_payload and took the manager's
connection down (issue 19).

This module is pure and a leaf: it imports nothing else of the core.
"""

from __future__ import annotations

import re
from typing import Final

DNS_LABEL_MAX: Final = 63
DNS_SUBDOMAIN_MAX: Final = 253
LABEL_VALUE_MAX: Final = 63
OWNER_MAX: Final = 253
"""Owners (``org:ai:rai``) are not Kubernetes names; they are bounded like a subdomain."""
QUOTE_PREFIX: Final = 40
"""Characters of user input an error message may repeat before it says ``...(N characters)``."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_PRINTABLE_NO_SPACE = re.compile(r"[^\s\x00-\x1f\x7f]+")

DNS_LABEL_RULE: Final = (
    "must be a DNS-1123 label (lowercase letters, digits and '-', "
    "starting and ending with a letter or digit)"
)
DNS_SUBDOMAIN_RULE: Final = (
    "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
    "each part starting and ending with a letter or digit)"
)
LABEL_VALUE_RULE: Final = (
    "must be a label value (letters, digits, '-', '_' and '.', "
    "starting and ending with a letter or digit)"
)
OWNER_RULE: Final = "must be printable text without spaces"


def _too_long(value: str, limit: int) -> str | None:
    if len(value) > limit:
        return f"must be no more than {limit} characters (got {len(value)})"
    return None


def dns_label_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 label, or None when it is one."""
    if not value:
        return "must not be empty"
    long = _too_long(value, DNS_LABEL_MAX)
    if long:
        return long
    return None if _DNS_LABEL.fullmatch(value) else DNS_LABEL_RULE


def dns_subdomain_problem(value: str) -> str | None:
    """Why ``value`` is not a DNS-1123 subdomain, or None when it is one."""
    if not value:
        return "must not be empty"
    long = _too_long(value, DNS_SUBDOMAIN_MAX)
    if long:
        return long
    return None if _DNS_SUBDOMAIN.fullmatch(value) else DNS_SUBDOMAIN_RULE


def label_value_problem(value: str) -> str | None:
    """Why ``value`` is not a Kubernetes label value (which may be empty), or None."""
    long = _too_long(value, LABEL_VALUE_MAX)
    if long:
        return long
    return None if _LABEL_VALUE.fullmatch(value) else LABEL_VALUE_RULE


def owner_problem(value: str) -> str | None:
    """Why ``value`` cannot be an owner (``org:ai:rai``): empty, too long, spaces or controls."""
    if not value:
        return "must not be empty"
    long = _too_long(value, OWNER_MAX)
    if long:
        return long
    return None if _PRINTABLE_NO_SPACE.fullmatch(value) else OWNER_RULE


def quote(value: object, limit: int = QUOTE_PREFIX) -> str:
    """``value`` as ``repr`` shows it, cut to ``limit`` characters with its length said.

    ``quote("x" * 600_000)`` is ``'xxxx...'... (600000 characters)``: enough to recognise the
    input, never enough to grow a reply.  ``repr`` keeps control characters visible and on one
    line, so a quoted value cannot break a header or a log line.  A value that is not a string
    (a number, a list from YAML) is cut the same way, on its ``repr``.
    """
    if not isinstance(value, str):
        shown = repr(value)
        if len(shown) <= limit:
            return shown
        return f"{shown[:limit]}... ({len(shown)} characters)"
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def clamp(text: str, limit: int) -> str:
    """``text`` on one line and at most about ``limit`` characters, saying what was cut.

    For messages built by code we do not control (a library's exception text) before they go
    into a reply or a header: newlines would break a header, length would break a reply.
    """
    one_line = " ".join(text.split())
    if len(one_line) <= limit:
        return one_line
    return f"{one_line[:limit]}... ({len(one_line)} characters)"
