"""The small client protocol the bridge needs, and the API errors it distinguishes.

Two implementations: ``wire.WireClient`` (kubernetes_asyncio, for real clusters and the
emulator over HTTP) and ``gpu_fleet.kubesim.memory.MemoryClient`` (the in-memory fake the
reconcile tests use).  Patches are always JSON merge patches (``application/merge-patch+json``):
the bridge sends whole lists (finalizers, conditions), which is what a merge patch replaces, and
puts ``metadata.resourceVersion`` in the patch when it wants an optimistic-concurrency check.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from gpu_fleet.kube.objects import Obj, Resource


class ApiStatusError(Exception):
    """A non-2xx answer: HTTP ``code``, the Status ``reason`` and its message."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class NotFoundError(ApiStatusError):
    pass


class AlreadyExistsError(ApiStatusError):
    pass


class ConflictError(ApiStatusError):
    """409 Conflict: a stale resourceVersion precondition, or a pod already bound elsewhere."""


class GoneError(ApiStatusError):
    """410 Gone: the watch's resourceVersion is too old; the informer must re-list."""


def status_error(code: int, body: Any) -> ApiStatusError:
    """The typed error for a Status body (or anything else the server sent)."""
    reason = ""
    message = ""
    if isinstance(body, dict):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
        code = int(body.get("code") or code)
    if code == 404:
        return NotFoundError(code, reason or "NotFound", message)
    if code == 409:
        cls = AlreadyExistsError if reason == "AlreadyExists" else ConflictError
        return cls(code, reason or "Conflict", message)
    if code == 410:
        return GoneError(code, reason or "Expired", message)
    return ApiStatusError(code, reason or "Error", message)


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: Obj


class KubeClient(Protocol):
    async def list(self, res: Resource, namespace: str | None = None) -> tuple[list[Obj], str]:
        """Every object (all namespaces when ``namespace`` is None) and the list's RV."""
        ...

    def watch(
        self, res: Resource, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[WatchEvent]:
        """Changes after ``resource_version``, with bookmarks; ``GoneError`` if it is too old.
        The stream ends by itself after ``timeout_seconds``."""
        ...

    async def get(self, res: Resource, namespace: str | None, name: str) -> Obj: ...

    async def create(self, res: Resource, namespace: str | None, body: Obj) -> Obj: ...

    async def patch(
        self, res: Resource, namespace: str | None, name: str, patch: Obj, subresource: str = ""
    ) -> Obj:
        """A JSON merge patch, on the object or on a subresource (``status``)."""
        ...

    async def delete(
        self, res: Resource, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> None: ...

    async def bind(self, namespace: str, pod: str, pod_uid: str, node: str) -> None:
        """POST the ``pods/binding`` subresource (the scheduler's act)."""
        ...

    async def close(self) -> None: ...
