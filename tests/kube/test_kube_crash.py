"""Crash safety of the bridge with real processes: SIGKILL the binder (pods half) mid-create,
mid-bind and mid-delete, and the manager (objects half) mid-mirror, then start a fresh process.

The kill is triggered by the emulated API server itself, synchronously inside the write it is
serving (a store listener), so "mid-create" means exactly: the server made pod 2 of 4 and the
binder died before hearing back.  After the restart the stack must converge with no duplicate
pod (the API server's own history shows each pod created once and bound once), no pod on a
node that no open lease of its run holds, no leaked pod, one mirror per open lease and no Event
created twice.  Waits are bounded polls of conditions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from _kube import budget_obj, gpu_node, new_store, run_obj

from gpu_fleet.cli.stack import ProcessStack, call, wait_for_services
from gpu_fleet.kubesim.kubelet import SimKubelet
from gpu_fleet.kubesim.server import ApiServer
from gpu_fleet.kubesim.store import ResourceType, Store

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]
G = "rq.davidlangworthy.io"
NS = "vision"


async def until(probe: Callable[[], Any], what: str, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


class World:
    def __init__(self, store: Store, stack: ProcessStack, nc: Any, kubelet: SimKubelet) -> None:
        self.kubelet = kubelet
        self.store = store
        self.stack = stack
        self.nc = nc
        self.history: list[tuple[str, str, dict[str, Any]]] = []  # (type, plural, object)
        self.trigger: Callable[[str, ResourceType, dict[str, Any]], None] | None = None
        store.listeners.append(self._listen)

    def _listen(self, type_: str, rt: ResourceType, obj: dict[str, Any]) -> None:
        self.history.append((type_, rt.plural, obj))
        if self.trigger is not None:
            self.trigger(type_, rt, obj)

    def kill_when(
        self, cond: Callable[[str, ResourceType, dict[str, Any]], bool], svc: str
    ) -> None:
        """SIGKILL ``svc`` inside the first write that satisfies ``cond`` (once)."""

        def trigger(type_: str, rt: ResourceType, obj: dict[str, Any]) -> None:
            if cond(type_, rt, obj):
                self.trigger = None
                self.stack.kill(svc)

        self.trigger = trigger

    def pods(self, run: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.store.find("", "pods"), NS, f"{G}/run={run}")
        return items

    def objects(self, group: str, plural: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.store.find(group, plural), NS)
        return items

    def create(self, plural: str, body: dict[str, Any]) -> None:
        self.store.create(self.store.find(G, plural), NS, body)

    async def leases(self, run: str) -> list[dict[str, Any]]:
        return list(await call(self.nc, "leases", {"namespace": NS, "name": run}))

    async def converged(self, run: str, pods: int) -> list[dict[str, Any]]:
        """Every pod of ``run`` exists and is bound on its open lease's node."""
        deadline = time.monotonic() + 180
        while True:
            open_nodes = {
                x["id"]: x["node"] for x in await self.leases(run) if not x["closureReason"]
            }
            now = self.pods(run)
            ok = len(now) == pods and all(
                p["spec"].get("nodeName")
                and open_nodes.get(p["metadata"]["annotations"][f"{G}/lease"])
                == p["spec"]["nodeName"]
                for p in now
            )
            if ok:
                return now
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run}: pods did not converge: {[p['metadata'] for p in now]}")
            await asyncio.sleep(0.2)

    def created(self, plural: str) -> list[str]:
        return [o["metadata"]["name"] for t, p, o in self.history if t == "ADDED" and p == plural]

    def binds(self, run: str) -> list[str]:
        """Pod names in the order they were bound (nodeName set), from the server's history."""
        seen: dict[str, str] = {}
        out = []
        for t, p, o in self.history:
            if p != "pods" or (o["metadata"].get("labels") or {}).get(f"{G}/run") != run:
                continue
            node = (o.get("spec") or {}).get("nodeName") or ""
            uid = o["metadata"]["uid"]
            if t == "MODIFIED" and node and not seen.get(uid):
                out.append(o["metadata"]["name"])
            seen[uid] = node
        return out


@pytest_asyncio.fixture(name="world")
async def _world(tmp_path: Path) -> AsyncIterator[World]:
    store = new_store()
    server = ApiServer(store, bookmark_every=1.0)
    kubelet = SimKubelet(store)
    stack = ProcessStack(
        tmp_path / "data",
        log_level="warning",
        services=("binder", "manager"),
        kube_args=["--kube-url", "URL"],
    )
    nc = None
    try:
        await server.start()
        stack.kube_args = ["--kube-url", server.url]
        await kubelet.start()
        for name, clique in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
            store.create(store.find("", "nodes"), None, gpu_node(name, clique=clique))
        stack.start()
        nc = await nats.connect(stack.admin_url)  # authorization is on, as in production
        await wait_for_services(nc, ("binder", "manager"), timeout=120)
        world = World(store, stack, nc, kubelet)
        world.create("budgets", budget_obj(NS, "org:v:vision", concurrency=32))
        yield world
    finally:
        if nc is not None:
            await nc.close()
        stack.stop()
        await kubelet.stop()
        await server.stop()


def _pod_of(run: str) -> Callable[[ResourceType, dict[str, Any]], bool]:
    def match(rt: ResourceType, obj: dict[str, Any]) -> bool:
        return rt.plural == "pods" and (obj["metadata"].get("labels") or {}).get(f"{G}/run") == run

    return match


async def test_binder_sigkill_mid_create_mid_bind_and_mid_delete_converges(world: World) -> None:
    # Mid-create: the server makes pod 2 of 4, then the binder dies before hearing back.
    is_gang = _pod_of("gang")
    made: list[str] = []

    def second_create(type_: str, rt: ResourceType, obj: dict[str, Any]) -> bool:
        if type_ == "ADDED" and is_gang(rt, obj):
            made.append(obj["metadata"]["name"])
        return len(made) == 2

    world.kill_when(second_create, "binder")
    world.create("runs", run_obj(NS, "gang", 16, gpus_per_pod=4))
    await until(lambda: "binder" not in world.stack.procs, "the binder killed mid-create")
    assert len(world.pods("gang")) == 2
    assert world.binds("gang") == []  # never bound before the whole gang exists
    world.stack.spawn("binder")
    pods = await world.converged("gang", 4)
    names = sorted(p["metadata"]["name"] for p in pods)
    assert names == [f"gang-active-{i}" for i in range(4)]
    assert sorted(n for n in world.created("pods") if n.startswith("gang-")) == names
    assert sorted(world.binds("gang")) == names  # each bound exactly once

    # Mid-bind: the binder dies right after the server bound the first pod of a second gang.
    is_two = _pod_of("two")

    def first_bind(type_: str, rt: ResourceType, obj: dict[str, Any]) -> bool:
        return type_ == "MODIFIED" and is_two(rt, obj) and bool(obj["spec"].get("nodeName"))

    world.kill_when(first_bind, "binder")
    world.create("runs", run_obj(NS, "two", 16, gpus_per_pod=4))
    await until(lambda: "binder" not in world.stack.procs, "the binder killed mid-bind")
    assert len(world.binds("two")) == 1
    world.stack.spawn("binder")
    pods = await world.converged("two", 4)
    names = sorted(p["metadata"]["name"] for p in pods)
    assert sorted(n for n in world.created("pods") if n.startswith("two-")) == names
    assert sorted(world.binds("two")) == names
    # No leaked pod: every managed pod belongs to one of the two runs and an open lease.
    assert len(world.pods("gang")) + len(world.pods("two")) == len(
        world.store.list(world.store.find("", "pods"), NS)[0]
    )

    # Mid-delete: the second gang finishes; the binder dies right after the server deleted the
    # first of its pods (their leases closed Completed); the fresh binder deletes the rest.
    await until(
        lambda: all(p["status"]["phase"] == "Running" for p in world.pods("two")), "running"
    )

    def first_delete(type_: str, rt: ResourceType, obj: dict[str, Any]) -> bool:
        return type_ == "DELETED" and is_two(rt, obj)

    world.kill_when(first_delete, "binder")
    assert len(world.kubelet.finish_run(NS, "two")) == 4
    await until(lambda: "binder" not in world.stack.procs, "the binder killed mid-delete")
    assert 0 < len(world.pods("two")) < 4
    world.stack.spawn("binder")
    await until(lambda: not world.pods("two"), "the rest of the finished gang's pods deleted")
    closed = await world.leases("two")
    assert closed
    assert all(x["closureReason"] == "Completed" for x in closed)
    assert len(world.pods("gang")) == 4  # the other gang untouched


async def test_manager_sigkill_mid_mirror_converges_with_no_duplicate(world: World) -> None:
    """The objects half dies right after the first GPULease mirror was made; the fresh manager
    (and its bridge half) replays the ledger: one mirror per open lease, no Event twice."""

    def first_mirror(type_: str, rt: ResourceType, obj: dict[str, Any]) -> bool:
        return type_ == "ADDED" and rt.plural == "gpuleases"

    world.kill_when(first_mirror, "manager")
    world.create("runs", run_obj(NS, "gang", 16, gpus_per_pod=4))
    await until(lambda: "manager" not in world.stack.procs, "the manager killed mid-mirror")
    world.stack.spawn("manager")
    await wait_for_services(world.nc, ("manager",), timeout=120)
    pods = await world.converged("gang", 4)
    leases = [x for x in await world.leases("gang") if not x["closureReason"]]

    def mirrored() -> list[dict[str, Any]]:
        items = [o for o in world.objects(G, "gpuleases") if (o.get("status") or {}).get("gpus")]
        return items if len(items) == len(leases) else []

    items = await until(mirrored, "one mirror per open lease")
    got = sorted(o["metadata"]["annotations"][f"{G}/lease"] for o in items)
    assert got == sorted(x["id"] for x in leases)
    assert sorted(world.created("gpuleases")) == sorted(o["metadata"]["name"] for o in items)
    await until(
        lambda: "Admitted" in {e["reason"] for e in world.objects("events.k8s.io", "events")},
        "the Admitted event",
    )
    events = world.created("events")
    assert len(events) == len(set(events))
    assert sum(n.endswith(".admitted") for n in events) == 1
    assert len(pods) == 4
