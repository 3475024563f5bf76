"""The emulator's HTTP face: the Kubernetes REST shapes over aiohttp, backed by ``store``.

Enough of the API for kubernetes_asyncio and for ``kubectl --server URL`` (with
``--validate=false``, since there is no OpenAPI document): discovery (``/version``, ``/api``,
``/apis``, ``/api/v1``, ``/apis/<g>/<v>``), collections and items for every registered type
(cluster and namespaced), ``status`` and ``pods/binding`` subresources, JSON merge, strategic
merge (as merge) and JSON patches, PUT, DELETE with finalizers, lists with ``kind``, and watches
(``watch=true`` in any spelling, ``resourceVersion``, ``allowWatchBookmarks``,
``timeoutSeconds``, 410 as an ERROR event) streamed as JSON lines, and Table output of custom
resources from their printer columns (``table``).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from gpu_fleet.kubesim import table
from gpu_fleet.kubesim.store import ResourceType, Store, StoreError

Obj = dict[str, Any]
VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-gpu-fleet-kubesim",
    "platform": "linux/amd64",
}


def _error(exc: StoreError) -> web.Response:
    return web.json_response(exc.status(), status=exc.code)


class ApiServer:
    """An aiohttp application over a ``Store``; ``start()`` listens on 127.0.0.1:<port>."""

    def __init__(self, store: Store, *, bookmark_every: float = 5.0) -> None:
        self.store = store
        self.bookmark_every = bookmark_every
        self.app = web.Application()
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._runner = web.AppRunner(
            self.app, handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        self.store.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- discovery --------------------------------------------------------------------------
    def _resources(self, group: str, version: str) -> list[Obj]:
        out: list[Obj] = []
        for rt in sorted(self.store.types.values(), key=lambda r: r.plural):
            if rt.gv != (group, version):
                continue
            out.append(
                {
                    "name": rt.plural,
                    "singularName": rt.singular or rt.kind.lower(),
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": list(rt.verbs),
                    "shortNames": list(rt.short_names),
                }
            )
            if rt.status_subresource:
                out.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": ["get", "patch", "update"],
                    }
                )
            if rt.kind == "Pod":
                out.append(
                    {
                        "name": "pods/binding",
                        "singularName": "",
                        "namespaced": True,
                        "kind": "Binding",
                        "verbs": ["create"],
                    }
                )
        return out

    def _groups(self) -> Obj:
        gvs = sorted({rt.gv for rt in self.store.types.values() if rt.group})
        groups: dict[str, list[str]] = {}
        for g, v in gvs:
            groups.setdefault(g, []).append(v)
        return {
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [
                {
                    "name": g,
                    "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                    "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]},
                }
                for g, vs in sorted(groups.items())
            ],
        }

    # -- dispatch ---------------------------------------------------------------------------
    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        parts = [p for p in request.path.split("/") if p]
        try:
            if parts == ["version"]:
                return web.json_response(VERSION)
            if parts == ["api"]:
                return web.json_response(
                    {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
                )
            if parts == ["apis"]:
                return web.json_response(self._groups())
            if parts and parts[0] == "api" and len(parts) >= 2:
                group, version, rest = "", parts[1], parts[2:]
            elif parts and parts[0] == "apis" and len(parts) >= 3:
                group, version, rest = parts[1], parts[2], parts[3:]
            else:
                raise StoreError(404, "NotFound", f"the server could not find {request.path}")
            if not rest:
                gv = f"{group}/{version}" if group else version
                return web.json_response(
                    {
                        "kind": "APIResourceList",
                        "apiVersion": "v1",
                        "groupVersion": gv,
                        "resources": self._resources(group, version),
                    }
                )
            return await self._resource(request, group, rest)
        except StoreError as exc:
            return _error(exc)

    def _parse(
        self, group: str, rest: list[str]
    ) -> tuple[ResourceType, str | None, str | None, str]:
        """(type, namespace, name, subresource) from the path after the group version."""
        namespace = None
        if (
            len(rest) >= 3
            and rest[0] == "namespaces"
            and (group, rest[2]) in self.store.types
            and self.store.types[(group, rest[2])].namespaced
        ):
            namespace, rest = rest[1], rest[2:]
        rt = self.store.find(group, rest[0])
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else ""
        return rt, namespace, name, sub

    async def _body(self, request: web.Request) -> Any:
        text = await request.text()
        if not text:
            return {}
        try:
            return json.loads(text)
        except ValueError as exc:
            raise StoreError(400, "BadRequest", f"body is not JSON: {exc}") from exc

    async def _resource(
        self, request: web.Request, group: str, rest: list[str]
    ) -> web.StreamResponse:
        rt, namespace, name, sub = self._parse(group, rest)
        store = self.store
        method = request.method
        q = request.query
        if name is None:
            if method == "GET":
                if q.get("watch", "").lower() in ("true", "1"):
                    return await self._watch(request, rt, namespace)
                items, rv = store.list(
                    rt, namespace, q.get("labelSelector"), q.get("fieldSelector")
                )
                columns = self._columns(request, rt)
                if columns is not None:
                    full = q.get("includeObject") == "Object"
                    return web.json_response(table.table(items, columns, rv, store.clock(), full))
                return web.json_response(
                    {
                        "kind": f"{rt.kind}List",
                        "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": rv},
                        "items": items,
                    }
                )
            if method == "POST":
                created = store.create(rt, namespace, await self._body(request))
                return web.json_response(created, status=201)
            raise StoreError(405, "MethodNotAllowed", f"{method} on a collection")
        if sub == "binding" and rt.kind == "Pod" and method == "POST":
            body = await self._body(request)
            target = (body.get("target") or {}).get("name")
            if not target:
                raise StoreError(422, "Invalid", "target.name: Required value")
            uid = ((body.get("metadata") or {}).get("uid")) or ""
            store.bind(namespace or "default", name, str(target), str(uid))
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201},
                status=201,
            )
        if sub not in ("", "status"):
            raise StoreError(404, "NotFound", f"no subresource {sub!r}")
        if method == "GET":
            obj = store.get(rt, namespace, name)
            columns = self._columns(request, rt) if not sub else None
            if columns is not None:
                full = q.get("includeObject") == "Object"
                rv = str(obj["metadata"].get("resourceVersion", ""))
                return web.json_response(table.table([obj], columns, rv, store.clock(), full))
            return web.json_response(obj)
        if method == "PATCH":
            ctype = request.headers.get("Content-Type", "")
            body = await self._body(request)
            if "json-patch" in ctype:
                out = store.patch(rt, namespace, name, body, sub, json_ops=True)
            elif "merge-patch" in ctype:  # JSON merge, and strategic merge treated as merge
                out = store.patch(rt, namespace, name, body, sub)
            else:
                raise StoreError(415, "UnsupportedMediaType", f"patch type {ctype!r}")
            return web.json_response(out)
        if method == "PUT":
            return web.json_response(
                store.replace(rt, namespace, name, await self._body(request), sub)
            )
        if method == "DELETE":
            body = await self._body(request)
            uid = ((body.get("preconditions") or {}).get("uid")) if isinstance(body, dict) else ""
            return web.json_response(store.delete(rt, namespace, name, str(uid or "")))
        raise StoreError(405, "MethodNotAllowed", f"{method} on an item")

    def _columns(self, request: web.Request, rt: ResourceType) -> list[Obj] | None:
        """The printer columns when the client asked for a Table and the kind has any (custom
        resources with ``additionalPrinterColumns``); None: answer with plain JSON."""
        if not rt.group or not table.wants_table(request.headers.get("Accept", "")):
            return None
        crds = self.store.find("apiextensions.k8s.io", "customresourcedefinitions")
        try:
            crd = self.store.get(crds, None, f"{rt.plural}.{rt.group}")
        except StoreError:
            return None
        return table.columns_of(crd) or None

    async def _watch(
        self, request: web.Request, rt: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        q = request.query
        timeout = float(q["timeoutSeconds"]) if q.get("timeoutSeconds") else None
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        events = self.store.watch(
            rt,
            namespace,
            q.get("resourceVersion"),
            timeout=timeout,
            bookmark_every=self.bookmark_every if bookmarks else None,
            label_selector=q.get("labelSelector"),
        )
        try:
            async for event in events:
                await resp.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        return resp
