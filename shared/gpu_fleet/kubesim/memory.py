"""The in-memory fake of the API: ``KubeClient`` straight onto a ``Store`` (no HTTP).

Reconcile tests run the bridge against it, so they exercise the same semantics as the
emulator (resourceVersions, 409s, finalizers, GC) without sockets; the wire client is tested
separately against the emulator over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from gpu_fleet.kube.client import GoneError, WatchEvent, status_error
from gpu_fleet.kube.objects import Obj, Resource
from gpu_fleet.kubesim.store import ResourceType, Store, StoreError


class MemoryClient:
    def __init__(self, store: Store, *, bookmark_every: float | None = 1.0) -> None:
        self.store = store
        self.bookmark_every = bookmark_every
        self.calls: list[tuple[str, str, str]] = []  # (verb, plural, name): what the bridge did

    def _rt(self, res: Resource) -> ResourceType:
        try:
            return self.store.find(res.group, res.plural)
        except StoreError as exc:
            raise status_error(exc.code, exc.status()) from exc

    async def close(self) -> None:
        return None

    async def list(self, res: Resource, namespace: str | None = None) -> tuple[list[Obj], str]:
        return self.store.list(self._rt(res), namespace)

    async def watch(
        self, res: Resource, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[WatchEvent]:
        events = self.store.watch(
            self._rt(res),
            None,
            resource_version,
            timeout=timeout_seconds,
            bookmark_every=self.bookmark_every,
        )
        try:
            async for ev in events:
                if ev["type"] == "ERROR":
                    raise GoneError(410, "Expired", str(ev["object"].get("message")))
                yield WatchEvent(ev["type"], ev["object"])
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    async def _do(self, verb: str, res: Resource, name: str, fn: object) -> Obj:
        self.calls.append((verb, res.plural, name))
        try:
            out = fn()  # type: ignore[operator]
        except StoreError as exc:
            raise status_error(exc.code, exc.status()) from exc
        return out  # type: ignore[no-any-return]

    async def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        return await self._do(
            "get", res, name, lambda: self.store.get(self._rt(res), namespace, name)
        )

    async def create(self, res: Resource, namespace: str | None, body: Obj) -> Obj:
        name = str((body.get("metadata") or {}).get("name", ""))
        return await self._do(
            "create", res, name, lambda: self.store.create(self._rt(res), namespace, body)
        )

    async def patch(
        self, res: Resource, namespace: str | None, name: str, patch: Obj, subresource: str = ""
    ) -> Obj:
        return await self._do(
            f"patch{'/' + subresource if subresource else ''}",
            res,
            name,
            lambda: self.store.patch(self._rt(res), namespace, name, patch, subresource),
        )

    async def delete(
        self, res: Resource, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> None:
        await self._do(
            "delete", res, name, lambda: self.store.delete(self._rt(res), namespace, name)
        )

    async def bind(self, namespace: str, pod: str, pod_uid: str, node: str) -> None:
        await self._do(
            "bind",
            Resource("", "v1", "pods", "Pod", namespaced=True),
            pod,
            lambda: self.store.bind(namespace, pod, node, pod_uid),
        )
