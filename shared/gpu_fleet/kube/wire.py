"""The wire client: ``KubeClient`` over kubernetes_asyncio (the only module that imports it).

kubernetes_asyncio brings configuration (kubeconfig, in-cluster service account, a plain URL),
authentication, TLS and the aiohttp session.  Requests go through ``ApiClient.call_api`` with
``_preload_content=False`` and the JSON is read here, because:

* the bridge keeps objects as plain dicts, so model deserialization would be a round trip;
* the Binding reply is a ``Status`` the generated method cannot deserialize (TOOLING §6,
  kubernetes-client/python #825), which ``_preload_content=False`` sidesteps;
* every patch names its content type (``application/merge-patch+json``) explicitly - without
  it a dict body would go out as a JSON patch;
* one watch loop reads the JSON lines itself: it passes bookmarks through, turns a 410 (as an
  HTTP status or an ERROR event) into ``GoneError``, and never retries by itself (the informer
  decides: re-list on 410, back off on anything else).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from gpu_fleet.kube.client import ApiStatusError, GoneError, WatchEvent, status_error
from gpu_fleet.kube.objects import Obj, Resource

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Connection:
    """Where the API server is: a URL (emulator, ``kubectl proxy``), a kubeconfig, or in-cluster.

    Precedence: ``url``, then ``kubeconfig``, then in-cluster when ``in_cluster`` is set.
    """

    url: str | None = None
    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False

    @property
    def configured(self) -> bool:
        return bool(self.url or self.kubeconfig or self.in_cluster)

    def describe(self) -> str:
        if self.url:
            return self.url
        if self.kubeconfig:
            return f"kubeconfig {self.kubeconfig}"
        return "in-cluster"


async def connect(conn: Connection) -> WireClient:
    """A client for ``conn``; kubeconfig and in-cluster loading are kubernetes_asyncio's."""
    cfg = k8s_client.Configuration()
    if conn.url:
        cfg.host = conn.url.rstrip("/")
    elif conn.kubeconfig:
        await k8s_config.load_kube_config(
            config_file=conn.kubeconfig, context=conn.context, client_configuration=cfg
        )
    else:
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    return WireClient(k8s_client.ApiClient(configuration=cfg))


class WireClient:
    """``KubeClient`` over one kubernetes_asyncio ``ApiClient``."""

    def __init__(self, api: Any) -> None:
        self.api = api

    async def close(self) -> None:
        await self.api.close()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: Any = 30,
    ) -> Any:
        resp = await self.api.call_api(
            path,
            method,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=timeout,
        )
        try:
            data = await resp.read()
        finally:
            resp.release()
        decoded: Any = json.loads(data) if data else {}
        if not 200 <= resp.status <= 299:
            raise status_error(resp.status, decoded)
        return decoded

    async def list(self, res: Resource, namespace: str | None = None) -> tuple[list[Obj], str]:
        body = await self._call("GET", res.path(namespace))
        items = [
            {"apiVersion": res.api_version, "kind": res.kind, **item}
            for item in body.get("items") or []
        ]
        return items, str((body.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(
        self, res: Resource, resource_version: str, timeout_seconds: int
    ) -> AsyncIterator[WatchEvent]:
        query = [
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        resp = await self.api.call_api(
            res.path(None),
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=(10, timeout_seconds + 30),
        )
        try:
            if not 200 <= resp.status <= 299:
                data = await resp.read()
                raise status_error(resp.status, json.loads(data) if data else {})
            while True:
                line = await resp.content.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind = str(event.get("type", ""))
                obj = event.get("object") or {}
                if kind == "ERROR":
                    err = status_error(int(obj.get("code") or 500), obj)
                    if isinstance(err, GoneError) or err.code == 410:
                        raise GoneError(410, err.reason, err.message)
                    raise err
                yield WatchEvent(kind, obj)
        finally:
            resp.release()

    async def get(self, res: Resource, namespace: str | None, name: str) -> Obj:
        out: Obj = await self._call("GET", res.path(namespace, name))
        return out

    async def create(self, res: Resource, namespace: str | None, body: Obj) -> Obj:
        out: Obj = await self._call("POST", res.path(namespace), body=body)
        return out

    async def patch(
        self, res: Resource, namespace: str | None, name: str, patch: Obj, subresource: str = ""
    ) -> Obj:
        out: Obj = await self._call(
            "PATCH", res.path(namespace, name, subresource), body=patch, content_type=MERGE_PATCH
        )
        return out

    async def delete(
        self, res: Resource, namespace: str | None, name: str, grace_seconds: int | None = None
    ) -> None:
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        await self._call("DELETE", res.path(namespace, name), body=body)

    async def bind(self, namespace: str, pod: str, pod_uid: str, node: str) -> None:
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod, "namespace": namespace, "uid": pod_uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/binding"
        await self._call("POST", path, body=binding)


__all__ = ["ApiStatusError", "Connection", "WireClient", "connect"]
