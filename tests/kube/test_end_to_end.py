"""End to end over real parts: a nats-server with JetStream, the binder and the manager, the
emulator serving HTTP, a simulated kubelet, and the bridge deployed as the chart deploys it -
the manager side (Runs, Budgets, status) and the binder side (nodes, pods) as two actors, each
with its own kubernetes_asyncio client and its own ledger follower.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from _kube import Stack, budget_obj, gpu_node, new_store, run_obj, wait_until

from gpu_fleet.kube.bridge import BridgeConfig, KubeBridge
from gpu_fleet.kube.objects import BUDGETS, NODES, PODS, RUNS
from gpu_fleet.kube.wire import Connection, WireClient, connect
from gpu_fleet.kubesim.kubelet import SimKubelet
from gpu_fleet.kubesim.server import ApiServer
from gpu_fleet.kubesim.store import Store

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


class World:
    def __init__(self, stack: Stack, store: Store, kubelet: SimKubelet, client: WireClient):
        self.stack = stack
        self.store = store
        self.kubelet = kubelet
        self.client = client
        self.bridges: list[KubeBridge] = []


@pytest_asyncio.fixture(name="world")
async def _world(tmp_path: Path) -> AsyncIterator[World]:
    stack = Stack(tmp_path)
    store = new_store()
    server = ApiServer(store, bookmark_every=1.0)
    kubelet = SimKubelet(store)
    client: WireClient | None = None
    world: World | None = None
    try:
        await stack.start()
        await server.start()
        await kubelet.start()
        client = await connect(Connection(url=server.url))
        world = World(stack, store, kubelet, client)
        conn = Connection(url=server.url)
        for objects, pods in ((True, False), (False, True)):
            bridge = KubeBridge(
                BridgeConfig(
                    nats_url=stack.url,
                    connection=conn,
                    objects=objects,
                    pods=pods,
                    resync_seconds=3.0,
                    watch_timeout=5,
                )
            )
            world.bridges.append(bridge)
            await bridge.start()
        yield world
    finally:
        for b in reversed(world.bridges if world else []):
            await b.stop()
        if client is not None:
            await client.close()
        await kubelet.stop()
        await server.stop()
        await stack.stop()


async def _run_status(world: World, name: str) -> dict[str, Any]:
    obj = await world.client.get(RUNS, "vision", name)
    status: dict[str, Any] = obj.get("status") or {}
    return status


async def test_a_gang_run_becomes_bound_pods_in_one_domain_and_completes(world: World) -> None:
    c = world.client
    for name, clique in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
        await c.create(NODES, None, gpu_node(name, clique=clique))
    await c.create(BUDGETS, "vision", budget_obj("vision", "org:ai:vision", concurrency=32))
    await c.create(
        RUNS,
        "vision",
        run_obj(
            "vision",
            "big",
            16,
            gpus_per_pod=4,
            extra_spec={"locality": {"groupGPUs": 8, "allowCrossGroupSpread": False}},
        ),
    )

    async def bound() -> list[dict[str, Any]] | None:
        pods, _ = await c.list(PODS, "vision")
        mine = [
            p for p in pods if p["metadata"]["labels"].get("rq.davidlangworthy.io/run") == "big"
        ]
        return mine if len(mine) == 4 and all(p["spec"].get("nodeName") for p in mine) else None

    pods = await wait_until(bound, "the gang's 4 pods bound", timeout=60)
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert nodes in ({"a1", "a2"}, {"b1", "b2"})  # one fabric domain, as the leases say
    for p in pods:
        assert p["metadata"]["annotations"]["rq.davidlangworthy.io/node"] == p["spec"]["nodeName"]
        limits = p["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "4"

    # A pod is bound only once the whole gang's pods exist: in the API server's own history,
    # every creation of the run's pods precedes the first binding.
    history = [
        (ch.type, ch.obj["metadata"]["name"], bool(ch.obj.get("spec", {}).get("nodeName")))
        for ch in world.store.history
        if ch.rt.plural == "pods" and ch.obj["metadata"]["name"].startswith("big-")
    ]
    first_bind = next(i for i, (_, _, is_bound) in enumerate(history) if is_bound)
    created_before = {n for t, n, _ in history[:first_bind] if t == "ADDED"}
    assert created_before == {f"big-active-{i}" for i in range(4)}

    async def running() -> dict[str, Any] | None:
        st = await _run_status(world, "big")
        return st if st.get("phase") == "Running" else None

    st = await wait_until(running, "status Running", timeout=60)
    assert st["width"]["allocated"] == 16
    assert st["funding"]["ownedGPUs"] == 16
    assert sorted(st["nodes"]) == sorted(nodes)
    budget = await c.get(BUDGETS, "vision", "b")
    assert budget["status"]["headroom"] == [{"name": "e", "flavor": "H100", "concurrency": 16}]

    await wait_until(
        lambda: all(
            p["status"]["phase"] == "Running"
            for p in world.store.list(world.store.find("", "pods"), "vision")[0]
        ),
        "the kubelet started every pod",
    )
    assert len(world.kubelet.finish_run("vision", "big")) == 4

    async def completed() -> dict[str, Any] | None:
        s = await _run_status(world, "big")
        return s if s.get("phase") == "Completed" else None

    await wait_until(completed, "status Completed", timeout=60)
    leases = await world.stack.api("leases", {"namespace": "vision", "name": "big"})
    assert leases
    assert {x["closureReason"] for x in leases} == {"Completed"}

    async def pods_gone() -> bool:
        pods, _ = await c.list(PODS, "vision")
        return not pods

    await wait_until(pods_gone, "pods of the closed leases deleted", timeout=60)
