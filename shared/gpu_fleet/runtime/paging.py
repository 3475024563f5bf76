"""List replies a page at a time, the way Kubernetes lists page: ``limit`` and ``continue``.

A page holds at most ``limit`` items *and* at most the reply budget in bytes, whichever comes
first (Kubernetes also lets a server return fewer items than asked), so a list reply cannot
outgrow the connection's ``max_payload`` however many runs, leases or budgets the fleet holds.
While more items follow, ``metadata.continue`` carries a token to pass back, and
``metadata.remainingItemCount`` says how many are left.

The token is opaque to clients: base64url JSON of the list's name and the sort key of the last
item returned.  The next page starts *after* that key in the current state.  Unlike the
Kubernetes API server we keep no snapshot of the first page's state, so a list followed across
pages while the ledger moves sees every item that existed throughout exactly once, and items
added or removed meanwhile at most once (documented in docs/reliability.md).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from gpu_fleet.messages import api

T = TypeVar("T")
Key = tuple[int | str, ...]
PAGE_OVERHEAD = 512
"""Bytes reserved for the reply envelope and the list metadata around the items."""


class ContinueTokenError(ValueError):
    """A ``continue`` token this list did not issue (or that was edited)."""


def encode_token(listing: str, after: Key) -> str:
    raw = json.dumps({"l": listing, "a": list(after)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(listing: str, token: str) -> Key:
    """The key a page must start after; ``ContinueTokenError`` for a token of another list."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError) as exc:
        raise ContinueTokenError("not a continue token from this list") from exc
    if not isinstance(data, dict) or data.get("l") != listing:
        raise ContinueTokenError("not a continue token from this list")
    after = data.get("a")
    if not isinstance(after, list) or not all(
        isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)) for k in after
    ):
        raise ContinueTokenError("not a continue token from this list")
    return tuple(after)


def page(
    listing: str,
    items: Sequence[T],
    key: Callable[[T], Key],
    *,
    limit: int,
    token: str | None,
    budget: int,
    encode: Callable[[Any], bytes],
) -> api.ListPage:
    """One page of ``items`` (sorted by ``key``) after ``token``: <= ``limit`` items and
    <= ``budget`` bytes once encoded.  A page always holds at least one item if any remain, so
    a client following ``continue`` always gets to the end."""
    ordered = sorted(items, key=key)
    start = 0
    if token:
        after = decode_token(listing, token)
        try:
            start = next((i for i, item in enumerate(ordered) if key(item) > after), len(ordered))
        except TypeError as exc:  # a forged key of the wrong shape
            raise ContinueTokenError("not a continue token from this list") from exc
    taken: list[T] = []
    used = PAGE_OVERHEAD
    for item in ordered[start:]:
        size = len(encode(item)) + 1
        if taken and (len(taken) >= limit or used + size > budget):
            break
        taken.append(item)
        used += size
    end = start + len(taken)
    if end >= len(ordered):
        return api.ListPage(items=list(taken))
    return api.ListPage(
        items=list(taken),
        metadata=api.ListMeta(
            continue_=encode_token(listing, key(taken[-1])),
            remaining_item_count=len(ordered) - end,
        ),
    )
