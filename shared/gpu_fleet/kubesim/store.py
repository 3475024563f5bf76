"""An in-memory Kubernetes object store with the API server's semantics that the bridge relies on.

Why our own and not kmock alone (TOOLING §2): kmock is a JSON store over HTTP with none of the
semantics the bridge is built around - no resourceVersion, uid, generation or
creationTimestamp, watches that ignore ``resourceVersion`` and never send 410 or bookmarks, a
status "subresource" that merges anything, no binding, no optimistic concurrency and no garbage
collection.  A semantics layer in front of it would have replaced every handler, so this store
is that layer on its own, and ``server`` speaks the real REST shapes over aiohttp (already a
dependency of kubernetes_asyncio).

What it does, as the API server does:

* one monotone ``resourceVersion`` counter for every write; lists carry the current one;
* ``uid``, ``creationTimestamp``, ``generation`` (1 at create, +1 when ``spec`` changes);
* status subresource: a write to ``/status`` changes only ``status``, a write to the object
  never changes ``status`` (for kinds that have the subresource);
* ``metadata.resourceVersion`` in a patch is a precondition: a stale one gives 409 Conflict;
* finalizers: DELETE only sets ``deletionTimestamp``; the object goes when the list empties;
* owner-reference garbage collection (background): an object whose owners are all gone is
  deleted, recursively;
* ``pods/binding`` sets ``spec.nodeName`` once (binding a bound pod is 409);
* watches from a resourceVersion replay the retained history after it, then stream live
  events; one older than the retained history gets a 410 ERROR event; bookmarks carry the
  current resourceVersion; ``timeoutSeconds`` ends the stream;
* CustomResourceDefinitions created through the API register their kinds.

Gaps (deliberate; see docs/kubernetes.md): no admission, defaulting or schema validation
(beyond the status/spec split), no server-side apply, strategic merge patch is treated as a
JSON merge patch, pods are deleted at once (no graceful termination phase), namespaces need not
exist, no authentication, no field managers.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import copy
import datetime as dt
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status_subresource: bool = True
    short_names: tuple[str, ...] = ()
    singular: str = ""
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gv(self) -> tuple[str, str]:
        return self.group, self.version


BUILTINS = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=("ns",)),
    ResourceType("", "v1", "nodes", "Node", namespaced=False, short_names=("no",)),
    ResourceType("", "v1", "pods", "Pod", namespaced=True, short_names=("po",)),
    ResourceType("", "v1", "services", "Service", namespaced=True, short_names=("svc",)),
    ResourceType("", "v1", "events", "Event", namespaced=True, status_subresource=False),
    ResourceType(
        "events.k8s.io", "v1", "events", "Event", namespaced=True, status_subresource=False
    ),
    ResourceType(
        "coordination.k8s.io", "v1", "leases", "Lease", namespaced=True, status_subresource=False
    ),
    ResourceType(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        namespaced=False,
        short_names=("crd", "crds"),
    ),
)


class StoreError(Exception):
    """An API error as a Kubernetes ``Status``."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def status(self) -> Obj:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def _now_iso(now: dt.datetime) -> str:
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge recursively, ``null`` deletes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(target: Obj, ops: list[Obj]) -> Obj:
    """A small RFC 6902 subset (add, replace, remove, test), enough for kubectl."""
    doc = copy.deepcopy(target)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in str(op["path"]).split("/")[1:]]
        parent: Any = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1] if parts else ""
        kind = op.get("op")
        if kind == "test":
            current = parent[int(last)] if isinstance(parent, list) else parent.get(last)
            if current != op.get("value"):
                raise StoreError(422, "Invalid", f"test failed at {op['path']}")
        elif kind in ("add", "replace"):
            if isinstance(parent, list):
                if last == "-":
                    parent.append(op["value"])
                elif kind == "add":
                    parent.insert(int(last), op["value"])
                else:
                    parent[int(last)] = op["value"]
            else:
                parent[last] = op["value"]
        elif kind == "remove":
            if isinstance(parent, list):
                del parent[int(last)]
            else:
                parent.pop(last, None)
        else:
            raise StoreError(422, "Invalid", f"unsupported JSON patch op {kind!r}")
    return doc


def _path(obj: Obj, dotted: str) -> Any:
    cur: Any = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def selector_matches(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a``, ``!a``."""
    if not selector:
        return True
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def field_matches(obj: Obj, selector: str | None) -> bool:
    """Field selectors as dotted-path equality (``spec.nodeName=n1``, ``metadata.name!=x``)."""
    if not selector:
        return True
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        neg = "!=" in term
        k, v = term.split("!=" if neg else "=", 1)
        got = _path(obj, k.strip().lstrip("=")) or ""
        if (str(got) == v.strip().lstrip("=")) == neg:
            return False
    return True


@dataclass
class _Change:
    rv: int
    rt: ResourceType
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj


@dataclass
class _Watcher:
    rt: ResourceType
    namespace: str | None
    queue: asyncio.Queue[_Change | None] = field(default_factory=asyncio.Queue)


Listener = Callable[[str, ResourceType, Obj], None]


class Store:
    """Objects by resource type and (namespace, name); every write goes through here."""

    def __init__(
        self,
        clock: Callable[[], dt.datetime] | None = None,
        history_limit: int = 10_000,
    ) -> None:
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.types: dict[tuple[str, str], ResourceType] = {}
        self.objects: dict[tuple[str, str], dict[tuple[str, str], Obj]] = {}
        self.rv = 0
        self.history: list[_Change] = []
        self.history_limit = history_limit
        self.compacted_rv = 0  # watches from below this are answered with 410
        self._watchers: list[_Watcher] = []
        self.listeners: list[Listener] = []
        self._uids = itertools.count(1)
        for rt in BUILTINS:
            self.register(rt)

    # -- types ------------------------------------------------------------------------------
    def register(self, rt: ResourceType) -> None:
        self.types[(rt.group, rt.plural)] = rt
        self.objects.setdefault((rt.group, rt.plural), {})

    def find(self, group: str, plural: str) -> ResourceType:
        rt = self.types.get((group, plural))
        if rt is None:
            raise StoreError(404, "NotFound", f"the server could not find resource {plural!r}")
        return rt

    def _register_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        versions = spec.get("versions") or [{"name": "v1"}]
        served = next((v for v in versions if v.get("storage")), versions[0])
        self.register(
            ResourceType(
                group=str(spec.get("group", "")),
                version=str(served.get("name", "v1")),
                plural=str(names.get("plural", "")),
                kind=str(names.get("kind", "")),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                status_subresource="status" in (served.get("subresources") or {}),
                short_names=tuple(names.get("shortNames") or ()),
                singular=str(names.get("singular", "")),
            )
        )

    # -- reads ------------------------------------------------------------------------------
    def _bucket(self, rt: ResourceType) -> dict[tuple[str, str], Obj]:
        return self.objects[(rt.group, rt.plural)]

    def _key(self, rt: ResourceType, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "default") if rt.namespaced else "", name)

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._bucket(rt).get(self._key(rt, namespace, name))
        if obj is None:
            raise StoreError(404, "NotFound", f'{rt.plural} "{name}" not found')
        return copy.deepcopy(obj)

    def list(
        self,
        rt: ResourceType,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[Obj], str]:
        items = [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(self._bucket(rt).items())
            if (namespace is None or not rt.namespaced or ns == namespace)
            and selector_matches((obj.get("metadata") or {}).get("labels") or {}, label_selector)
            and field_matches(obj, field_selector)
        ]
        return items, str(self.rv)

    # -- writes -----------------------------------------------------------------------------
    def _emit(self, rt: ResourceType, type_: str, obj: Obj) -> None:
        change = _Change(self.rv, rt, type_, copy.deepcopy(obj))
        self.history.append(change)
        if len(self.history) > self.history_limit:
            dropped = self.history[: len(self.history) - self.history_limit]
            self.history = self.history[len(dropped) :]
            self.compacted_rv = dropped[-1].rv
        ns = (obj.get("metadata") or {}).get("namespace")
        for w in self._watchers:
            if w.rt == rt and (w.namespace is None or w.namespace == ns):
                w.queue.put_nowait(change)
        for listener in list(self.listeners):
            listener(type_, rt, change.obj)

    def _bump(self, obj: Obj) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def create(self, rt: ResourceType, namespace: str | None, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        m = obj.setdefault("metadata", {})
        name = m.get("name")
        if not name and m.get("generateName"):
            name = f"{m['generateName']}{uuid.uuid4().hex[:5]}"
        if not name:
            raise StoreError(422, "Invalid", "metadata.name: Required value")
        key = self._key(rt, namespace or m.get("namespace"), name)
        if key in self._bucket(rt):
            raise StoreError(409, "AlreadyExists", f'{rt.plural} "{name}" already exists')
        m["name"] = name
        if rt.namespaced:
            m["namespace"] = key[0]
        else:
            m.pop("namespace", None)
        m["uid"] = str(uuid.UUID(int=next(self._uids) + (self.rv << 64)))
        m["creationTimestamp"] = _now_iso(self.clock())
        m["generation"] = 1
        m.pop("deletionTimestamp", None)
        obj["apiVersion"] = rt.api_version
        obj["kind"] = rt.kind
        if rt.status_subresource and rt.kind not in ("Node", "Namespace"):
            obj.pop("status", None)  # as the API server does; a kubelet registers its Node whole
        if rt.kind == "Pod":
            obj.setdefault("spec", {})
            obj["status"] = {"phase": "Pending"}
        self._bump(obj)
        self._bucket(rt)[key] = obj
        if rt.kind == "CustomResourceDefinition":
            self._register_crd(obj)
        self._emit(rt, "ADDED", obj)
        return copy.deepcopy(obj)

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        patch: Obj | builtins.list[Obj],
        subresource: str = "",
        *,
        json_ops: bool = False,
    ) -> Obj:
        key = self._key(rt, namespace, name)
        current = self._bucket(rt).get(key)
        if current is None:
            raise StoreError(404, "NotFound", f'{rt.plural} "{name}" not found')
        if json_ops:
            assert isinstance(patch, list)
            wanted = json_patch(current, patch)
        else:
            assert isinstance(patch, dict)
            precondition = (patch.get("metadata") or {}).get("resourceVersion")
            if precondition and str(precondition) != current["metadata"]["resourceVersion"]:
                raise StoreError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {rt.plural} "{name}": the object has '
                    "been modified; please apply your changes to the latest version and try again",
                )
            wanted = merge_patch(current, patch)
        return self._write(rt, key, current, wanted, subresource)

    def replace(
        self, rt: ResourceType, namespace: str | None, name: str, body: Obj, subresource: str = ""
    ) -> Obj:
        key = self._key(rt, namespace, name)
        current = self._bucket(rt).get(key)
        if current is None:
            raise StoreError(404, "NotFound", f'{rt.plural} "{name}" not found')
        precondition = (body.get("metadata") or {}).get("resourceVersion")
        if precondition and str(precondition) != current["metadata"]["resourceVersion"]:
            raise StoreError(409, "Conflict", f'{rt.plural} "{name}": the object has been modified')
        return self._write(rt, key, current, copy.deepcopy(body), subresource)

    def _write(
        self,
        rt: ResourceType,
        key: tuple[str, str],
        current: Obj,
        wanted: Obj,
        subresource: str,
    ) -> Obj:
        new = copy.deepcopy(current)
        if subresource == "status":
            if "status" in wanted:
                new["status"] = wanted["status"]
            else:
                new.pop("status", None)
        else:
            for k, v in wanted.items():
                if k in ("metadata", "status", "apiVersion", "kind"):
                    continue
                new[k] = v
            for k in [k for k in new if k not in wanted and k not in ("metadata", "status")]:
                del new[k]
            if not rt.status_subresource and "status" in wanted:
                new["status"] = wanted["status"]
            immutable = ("name", "namespace", "uid", "creationTimestamp", "generation")
            wm = wanted.get("metadata") or {}
            for k in ("labels", "annotations", "finalizers", "ownerReferences"):
                if wm.get(k) is None:
                    new["metadata"].pop(k, None)
                else:
                    new["metadata"][k] = wm[k]
            for k, v in wm.items():
                if k not in immutable and k not in ("resourceVersion", "deletionTimestamp"):
                    new["metadata"][k] = v
            if new.get("spec") != current.get("spec"):
                new["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
        if new == current:
            return copy.deepcopy(current)  # a no-op write keeps the resourceVersion
        self._bump(new)
        self._bucket(rt)[key] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(rt, key)
            return copy.deepcopy(new)
        self._emit(rt, "MODIFIED", new)
        return copy.deepcopy(new)

    def delete(
        self, rt: ResourceType, namespace: str | None, name: str, precondition_uid: str = ""
    ) -> Obj:
        key = self._key(rt, namespace, name)
        current = self._bucket(rt).get(key)
        if current is None:
            raise StoreError(404, "NotFound", f'{rt.plural} "{name}" not found')
        if precondition_uid and precondition_uid != current["metadata"]["uid"]:
            raise StoreError(409, "Conflict", f'{rt.plural} "{name}": uid precondition failed')
        if current["metadata"].get("finalizers"):
            if not current["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(current)
                new["metadata"]["deletionTimestamp"] = _now_iso(self.clock())
                self._bump(new)
                self._bucket(rt)[key] = new
                self._emit(rt, "MODIFIED", new)
                return copy.deepcopy(new)
            return copy.deepcopy(current)
        self.rv += 1
        current["metadata"]["resourceVersion"] = str(self.rv)
        self._remove(rt, key)
        return copy.deepcopy(current)

    def _remove(self, rt: ResourceType, key: tuple[str, str]) -> None:
        obj = self._bucket(rt).pop(key)
        self._emit(rt, "DELETED", obj)
        self._collect_garbage(str(obj["metadata"]["uid"]))

    def _collect_garbage(self, owner_uid: str) -> None:
        """Background propagation: dependents whose every owner is gone are deleted."""
        live = {o["metadata"]["uid"] for bucket in self.objects.values() for o in bucket.values()}
        for (group, plural), bucket in sorted(self.objects.items()):
            rt = self.types[(group, plural)]
            for key in sorted(bucket):
                obj = bucket.get(key)
                if obj is None:
                    continue
                owners = [r.get("uid") for r in obj["metadata"].get("ownerReferences") or []]
                if owner_uid in owners and not any(u in live for u in owners):
                    with contextlib.suppress(StoreError):
                        self.delete(rt, key[0] or None, key[1])

    def bind(self, namespace: str, pod: str, node: str, pod_uid: str = "") -> Obj:
        rt = self.find("", "pods")
        key = self._key(rt, namespace, pod)
        current = self._bucket(rt).get(key)
        if current is None:
            raise StoreError(404, "NotFound", f'pods "{pod}" not found')
        if pod_uid and pod_uid != current["metadata"]["uid"]:
            raise StoreError(409, "Conflict", f'pods "{pod}": uid precondition failed')
        bound = (current.get("spec") or {}).get("nodeName")
        if bound:
            raise StoreError(409, "Conflict", f'pod {pod} is already assigned to node "{bound}"')
        if (current.get("spec") or {}).get("schedulingGates"):
            raise StoreError(409, "Conflict", f"pod {pod} has scheduling gates")
        new = copy.deepcopy(current)
        new["spec"]["nodeName"] = node
        self._bump(new)
        self._bucket(rt)[key] = new
        self._emit(rt, "MODIFIED", new)
        return copy.deepcopy(new)

    # -- watches ----------------------------------------------------------------------------
    def compact(self) -> None:
        """Forget the history so far: a watch from an older resourceVersion gets 410."""
        self.compacted_rv = self.rv
        self.history = []

    async def watch(
        self,
        rt: ResourceType,
        namespace: str | None,
        resource_version: str | None,
        *,
        timeout: float | None = None,
        bookmark_every: float | None = None,
        label_selector: str | None = None,
    ) -> AsyncIterator[Obj]:
        """Watch events as the API server sends them (``{"type", "object"}``)."""
        w = _Watcher(rt, namespace)
        replay: builtins.list[_Change] = []
        if not resource_version or resource_version == "0":
            items, _ = self.list(rt, namespace, label_selector)
            replay = [_Change(self.rv, rt, "ADDED", o) for o in items]
        else:
            since = int(resource_version)
            if since < self.compacted_rv:
                yield {
                    "type": "ERROR",
                    "object": StoreError(
                        410, "Expired", f"too old resource version: {since} ({self.compacted_rv})"
                    ).status(),
                }
                return
            replay = [
                c
                for c in self.history
                if c.rv > since and c.rt == rt and (namespace is None or _ns(c.obj) == namespace)
            ]
        self._watchers.append(w)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            for c in replay:
                if selector_matches(_labels(c.obj), label_selector):
                    yield {"type": c.type, "object": copy.deepcopy(c.obj)}
            while True:
                wait = None if deadline is None else deadline - loop.time()
                if bookmark_every is not None:
                    wait = bookmark_every if wait is None else min(wait, bookmark_every)
                if wait is not None and wait <= 0:
                    return
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                    # cancellation that races the queue, and the watch would never end.
                    async with asyncio.timeout(wait):
                        change = await w.queue.get()
                except TimeoutError:
                    if deadline is not None and loop.time() >= deadline:
                        return
                    yield {
                        "type": "BOOKMARK",
                        "object": {
                            "kind": rt.kind,
                            "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(self.rv)},
                        },
                    }
                    continue
                if change is None:
                    return
                if selector_matches(_labels(change.obj), label_selector):
                    yield {"type": change.type, "object": copy.deepcopy(change.obj)}
        finally:
            self._watchers.remove(w)

    def close_watches(self) -> None:
        """End every open watch (a server restart, as far as clients can tell)."""
        for w in self._watchers:
            w.queue.put_nowait(None)


def _ns(obj: Obj) -> str | None:
    ns = (obj.get("metadata") or {}).get("namespace")
    return str(ns) if ns is not None else None


def _labels(obj: Obj) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels")
    return labels if isinstance(labels, dict) else {}
