"""The wire client (kubernetes_asyncio) against the emulator over real HTTP, and the informer's
craft: list then watch from the list's version, bookmarks, re-list on 410.  Also kubectl.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from _kube import CRDS, budget_obj, gpu_node, new_store, run_obj, wait_until

from gpu_fleet.kube.client import (
    AlreadyExistsError,
    ConflictError,
    GoneError,
    NotFoundError,
    WatchEvent,
)
from gpu_fleet.kube.informer import Informer
from gpu_fleet.kube.objects import NODES, PODS, RUNS, SERVICES
from gpu_fleet.kube.wire import Connection, WireClient, connect
from gpu_fleet.kubesim.server import ApiServer
from gpu_fleet.kubesim.store import Store

pytestmark = pytest.mark.asyncio


class Api:
    def __init__(self, store: Store, server: ApiServer, client: WireClient) -> None:
        self.store = store
        self.server = server
        self.client = client


@pytest_asyncio.fixture(name="api")
async def _api() -> AsyncIterator[Api]:
    store = new_store()
    server = ApiServer(store, bookmark_every=0.2)
    await server.start()
    client = await connect(Connection(url=server.url))
    try:
        yield Api(store, server, client)
    finally:
        await client.close()
        await server.stop()


def _pod(name: str, owner: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if owner is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {"metadata": meta, "spec": {"containers": [{"name": "workload", "image": "x"}]}}


async def test_objects_get_identity_versions_and_generation(api: Api) -> None:
    c = api.client
    run = await c.create(RUNS, "rai", run_obj("rai", "r", 2) | {"status": {"phase": "Forged"}})
    m = run["metadata"]
    assert m["uid"]
    assert m["creationTimestamp"].endswith("Z")
    assert m["generation"] == 1
    assert "status" not in run  # status is a subresource: create ignores it
    with pytest.raises(AlreadyExistsError):
        await c.create(RUNS, "rai", run_obj("rai", "r", 2))
    rv1 = int(m["resourceVersion"])

    st = await c.patch(
        RUNS, "rai", "r", {"status": {"phase": "Pending"}, "spec": {"x": 1}}, "status"
    )
    assert st["status"] == {"phase": "Pending"}
    assert "x" not in st["spec"]  # a status write never touches spec
    assert st["metadata"]["generation"] == 1
    assert int(st["metadata"]["resourceVersion"]) > rv1

    spec = await c.patch(
        RUNS, "rai", "r", {"spec": {"sparesPerGroup": 1}, "status": {"phase": "X"}}
    )
    assert spec["metadata"]["generation"] == 2  # spec changed
    assert spec["status"] == {"phase": "Pending"}  # an object write never touches status

    same = await c.patch(RUNS, "rai", "r", {"metadata": {"labels": {"a": "b"}}})
    assert same["metadata"]["generation"] == 2  # metadata is not spec

    stale = {"metadata": {"resourceVersion": m["resourceVersion"]}, "status": {"phase": "Y"}}
    with pytest.raises(ConflictError):
        await c.patch(RUNS, "rai", "r", stale, "status")
    with pytest.raises(NotFoundError):
        await c.get(RUNS, "rai", "nope")


async def test_binding_sets_node_once(api: Api) -> None:
    c = api.client
    pod = await c.create(PODS, "rai", _pod("p"))
    assert pod["status"]["phase"] == "Pending"
    await c.bind("rai", "p", pod["metadata"]["uid"], "n1")
    assert (await c.get(PODS, "rai", "p"))["spec"]["nodeName"] == "n1"
    with pytest.raises(ConflictError):
        await c.bind("rai", "p", pod["metadata"]["uid"], "n2")


async def test_finalizers_hold_deletion_and_owners_collect_dependents(api: Api) -> None:
    c = api.client
    run = await c.create(RUNS, "rai", run_obj("rai", "r", 2))
    await c.patch(RUNS, "rai", "r", {"metadata": {"finalizers": ["x/y"]}})
    await c.create(PODS, "rai", _pod("p", run))
    await c.delete(RUNS, "rai", "r")
    held = await c.get(RUNS, "rai", "r")
    assert held["metadata"]["deletionTimestamp"]
    assert await c.get(PODS, "rai", "p")  # owner still there
    await c.patch(RUNS, "rai", "r", {"metadata": {"finalizers": None}})
    with pytest.raises(NotFoundError):
        await c.get(RUNS, "rai", "r")
    with pytest.raises(NotFoundError):
        await c.get(PODS, "rai", "p")  # garbage-collected with its owner


async def _collect(events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    async for ev in events:
        out.append(ev)
        if len(out) >= n:
            break
    return out


async def test_watch_resumes_from_a_version_with_bookmarks_and_410(api: Api) -> None:
    c = api.client
    await c.create(NODES, None, gpu_node("n1"))
    _, rv = await c.list(NODES)
    await c.create(NODES, None, gpu_node("n2"))
    await c.patch(NODES, None, "n1", {"spec": {"unschedulable": True}})
    events = await _collect(c.watch(NODES, rv, 30), 3)
    assert [(e.type, e.object["metadata"].get("name")) for e in events[:2]] == [
        ("ADDED", "n2"),
        ("MODIFIED", "n1"),
    ]  # only what happened after rv: n1's creation is not replayed
    assert events[2].type == "BOOKMARK"
    assert (
        events[2].object["metadata"]["resourceVersion"]
        == events[1].object["metadata"]["resourceVersion"]
    )
    api.store.compact()
    with pytest.raises(GoneError):
        await _collect(c.watch(NODES, rv, 30), 1)


async def test_informer_relists_on_410_and_keeps_its_cache(api: Api) -> None:
    c = api.client
    await c.create(NODES, None, gpu_node("n1"))
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    inf = Informer(c, NODES, changed, watch_timeout=30, backoff_initial=0.05)
    task = asyncio.create_task(inf.run())
    try:
        await asyncio.wait_for(inf.synced.wait(), 10)
        assert sorted(k[1] for k in inf.cache) == ["n1"]
        await c.create(NODES, None, gpu_node("n2"))
        await wait_until(lambda: ("", "n2") in inf.cache, "watch saw n2")
        # The server forgets its history and drops every watch: the resume is too old.
        await c.create(NODES, None, gpu_node("n3"))
        await wait_until(lambda: ("", "n3") in inf.cache, "watch saw n3")
        api.store.rv += 5  # writes the informer never saw as events ...
        api.store.objects[("", "nodes")].pop(("", "n1"))  # ... one of them a deletion
        api.store.compact()
        api.store.close_watches()
        await wait_until(lambda: inf.relists_on_gone >= 1, "re-list after 410")
        await wait_until(lambda: ("", "n1") not in inf.cache, "cache replaced by the re-list")
        assert sorted(k[1] for k in inf.cache) == ["n2", "n3"]
        assert inf.lists == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_create_service_and_delete(api: Api) -> None:
    c = api.client
    svc = {"metadata": {"name": "s"}, "spec": {"clusterIP": "None"}}
    await c.create(SERVICES, "rai", svc)
    await c.delete(SERVICES, "rai", "s", grace_seconds=0)
    with pytest.raises(NotFoundError):
        await c.delete(SERVICES, "rai", "s")


async def _kubectl(url: str, *args: str, stdin: str = "") -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "kubectl",
        "--server",
        url,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode())
    return proc.returncode or 0, out.decode()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_kubectl_applies_crds_and_objects_and_reads_them(api: Api) -> None:
    fresh = ApiServer(Store())
    await fresh.start()
    try:
        rc, out = await _kubectl(fresh.url, "apply", "--validate=false", "-f", str(CRDS))
        assert rc == 0, out
        run = json.dumps(run_obj("rai", "r", 2))
        rc, out = await _kubectl(fresh.url, "apply", "--validate=false", "-f", "-", stdin=run)
        assert rc == 0, out
        assert "run.rq.davidlangworthy.io/r created" in out
        rc, out = await _kubectl(fresh.url, "get", "runs", "-A", "-o", "json")
        assert rc == 0, out
        assert [i["metadata"]["name"] for i in json.loads(out)["items"]] == ["r"]
        rc, out = await _kubectl(fresh.url, "delete", "run", "r", "-n", "rai")
        assert rc == 0, out
    finally:
        await fresh.stop()


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not on PATH")
async def test_kubectl_get_shows_the_printer_columns(api: Api) -> None:
    """The emulator answers kubectl's Table request from the CRD's printer columns."""
    fresh = ApiServer(new_store())
    await fresh.start()
    try:
        runs = fresh.store.find("rq.davidlangworthy.io", "runs")
        fresh.store.create(runs, "rai", run_obj("rai", "train", 8))
        status = {
            "phase": "Running",
            "reason": "GangBound",
            "width": {"allocated": 8},
            "funding": {"ownedGPUs": 6, "borrowedGPUs": 2},
            "pendingReservation": "train-res-1",
        }
        fresh.store.patch(runs, "rai", "train", {"status": status}, "status")
        budgets = fresh.store.find("rq.davidlangworthy.io", "budgets")
        fresh.store.create(budgets, "rai", budget_obj("rai", "org:ai:rai"))
        healthy = {
            "conditions": [{"type": "Healthy", "status": "True"}],
            "totals": {"ownedGPUs": 6},
        }
        fresh.store.patch(budgets, "rai", "b", {"status": healthy}, "status")
        rc, out = await _kubectl(fresh.url, "get", "runs,budgets,reservations,gpuleases", "-A")
        assert rc == 0, out
        lines = [line.split() for line in out.splitlines() if line.strip()]
        header = lines[0]
        assert header[:7] == ["NAMESPACE", "NAME", "PHASE", "REASON", "GPUS", "WIDTH", "OWNED"]
        row = dict(zip(header, lines[1], strict=False))
        assert (row["PHASE"], row["WIDTH"], row["OWNED"]) == ("Running", "8", "6")
        budget_header = lines[2]
        assert budget_header[2:4] == ["OWNER", "HEALTHY"]
        assert lines[3][2:5] == ["org:ai:rai", "True", "6"]
        rc, out = await _kubectl(fresh.url, "get", "run", "train", "-n", "rai", "-o", "wide")
        assert rc == 0, out
        assert "FLAVOR" in out.splitlines()[0]
        assert "train-res-1" in out
    finally:
        await fresh.stop()
