"""The bridge's reconcile logic against the in-memory fake of the API (no HTTP), with the real
fleet behind it: a nats-server, the binder and the manager (virtual clock), over NATS only.

Each test waits on conditions with bounded polling, never on time.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from _kube import Stack, budget_obj, gpu_node, new_store, run_obj, wait_until

from gpu_fleet.kube.bridge import BridgeConfig, KubeBridge
from gpu_fleet.kube.objects import FINALIZER
from gpu_fleet.kubesim.kubelet import SimKubelet
from gpu_fleet.kubesim.memory import MemoryClient
from gpu_fleet.kubesim.store import Store

pytestmark = pytest.mark.asyncio


class Cluster:
    """The emulator store, its kubelet, the fleet stack and one bridge (both halves)."""

    def __init__(self, stack: Stack, store: Store, kubelet: SimKubelet, bridge: KubeBridge):
        self.stack = stack
        self.store = store
        self.kubelet = kubelet
        self.bridge = bridge
        self.client = MemoryClient(store)

    def rt(self, plural: str, group: str = "") -> Any:
        return self.store.find(group, plural)

    def create(self, plural: str, ns: str | None, body: dict[str, Any], group: str = "") -> Any:
        return self.store.create(self.rt(plural, group), ns, body)

    def runs(self) -> Any:
        return self.rt("runs", "rq.davidlangworthy.io")

    def run(self, ns: str, name: str) -> dict[str, Any]:
        return self.store.get(self.runs(), ns, name)

    def pods(self, ns: str, run: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.rt("pods"), ns, f"rq.davidlangworthy.io/run={run}")
        return items

    async def api(self, endpoint: str, body: dict[str, Any]) -> Any:
        return await self.stack.api(endpoint, body)


@pytest_asyncio.fixture(name="cluster")
async def _cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    stack = Stack(tmp_path)
    store = new_store()
    kubelet = SimKubelet(store)
    bridge = KubeBridge(
        BridgeConfig(nats_url="", resync_seconds=2.0, forecasts=True),
        client_factory=lambda: MemoryClient(store, bookmark_every=0.5),
    )
    try:
        await stack.start()
        bridge.config.nats_url = stack.url
        await kubelet.start()
        for name, clique in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
            store.create(store.find("", "nodes"), None, gpu_node(name, clique=clique))
        await bridge.start()
        yield Cluster(stack, store, kubelet, bridge)
        assert bridge.pass_failures == 0  # no pass raised (see the log's kube.reconcile_failed)
    finally:
        await bridge.stop()
        await kubelet.stop()
        await stack.stop()


async def _leases(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return list(await cluster.api("leases", {"namespace": ns, "name": name}))


async def test_nodes_feed_the_topology_with_mapped_labels(cluster: Cluster) -> None:
    async def registered() -> Any:
        report = await cluster.api("report", {})
        del report
        state = cluster.bridge.state
        return len(state.nodes) == 4 and state.nodes

    nodes = await wait_until(registered, "four nodes registered")
    assert nodes["a1"].gpus == 8
    assert nodes["a1"].labels["fabric.domain"] == "A"
    assert nodes["a1"].labels["gpu.flavor"] == "H100"  # through the alias map
    assert nodes["b2"].labels["region"] == "r"


async def test_gang_run_becomes_bound_pods_in_one_domain_then_completes(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create(
        "runs", "rai", run_obj("rai", "train", 8, gpus_per_pod=2), "rq.davidlangworthy.io"
    )

    def bound() -> list[dict[str, Any]] | None:
        pods = cluster.pods("rai", "train")
        ok = len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods)
        return pods if ok else None

    pods = await wait_until(bound, "4 pods bound")
    names = sorted(p["metadata"]["name"] for p in pods)
    assert names == [f"train-active-{i}" for i in range(4)]
    nodes = {p["spec"]["nodeName"] for p in pods}
    assert nodes <= {"a1", "a2"} or nodes <= {"b1", "b2"}  # one fabric domain
    leases = await _leases(cluster, "rai", "train")
    assert {x["node"] for x in leases} == nodes
    pod0 = next(p for p in pods if p["metadata"]["name"] == "train-active-0")
    c = pod0["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["MASTER_ADDR"] == "train-active-0.train.rai.svc"
    assert env["WORLD_SIZE"] == "8"
    assert env["NNODES"] == "4"
    assert env["NODE_RANK"] == "0"
    assert pod0["spec"]["schedulerName"] == "gpu-fleet"
    assert pod0["metadata"]["ownerReferences"][0]["kind"] == "Run"
    assert pod0["metadata"]["labels"]["team"] == "rai"
    svc = cluster.store.get(cluster.rt("services"), "rai", "train")
    assert svc["spec"]["clusterIP"] == "None"

    def running_status() -> dict[str, Any] | None:
        st = cluster.run("rai", "train").get("status") or {}
        return st if st.get("phase") == "Running" else None

    st = await wait_until(running_status, "Run status Running")
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {
        "Admitted": "True",
        "Scheduled": "True",
        "Running": "True",
        "Completed": "False",
        "Failed": "False",
        "Blocked": "False",
    }
    assert st["width"]["allocated"] == 8
    assert st["funding"]["ownedGPUs"] == 8
    assert st["observedGeneration"] == 1
    assert FINALIZER in cluster.run("rai", "train")["metadata"]["finalizers"]

    await wait_until(
        lambda: all(p["status"]["phase"] == "Running" for p in cluster.pods("rai", "train")),
        "kubelet started the pods",
    )
    assert cluster.kubelet.finish_run("rai", "train") == [f"train-active-{i}" for i in range(4)]

    def completed() -> dict[str, Any] | None:
        s = cluster.run("rai", "train").get("status") or {}
        return s if s.get("phase") == "Completed" else None

    st = await wait_until(completed, "Run status Completed")
    assert {c["type"] for c in st["conditions"] if c["status"] == "True"} == {
        "Admitted",
        "Completed",
    }
    leases = await _leases(cluster, "rai", "train")
    assert leases
    assert all(x["closureReason"] == "Completed" for x in leases)
    await wait_until(lambda: not cluster.pods("rai", "train"), "pods of closed leases deleted")


async def test_deleting_a_run_closes_its_leases_before_it_goes(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create("runs", "rai", run_obj("rai", "gone", 4), "rq.davidlangworthy.io")
    await wait_until(lambda: len(cluster.pods("rai", "gone")) == 4, "pods created")
    await wait_until(
        lambda: FINALIZER in (cluster.run("rai", "gone")["metadata"].get("finalizers") or []),
        "finalizer added",
    )
    cluster.store.delete(cluster.runs(), "rai", "gone")
    assert cluster.run("rai", "gone")["metadata"]["deletionTimestamp"]  # held by the finalizer

    def gone() -> bool:
        try:
            cluster.run("rai", "gone")
        except Exception:
            return True
        return False

    await wait_until(gone, "Run object removed once its leases closed")
    assert "rai/gone" not in cluster.bridge.state.runs
    await wait_until(lambda: not cluster.pods("rai", "gone"), "pods garbage-collected")


async def test_a_failed_pod_fails_the_gang_under_policy_fail(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create("runs", "rai", run_obj("rai", "flaky", 2), "rq.davidlangworthy.io")
    await wait_until(
        lambda: [p for p in cluster.pods("rai", "flaky") if p["status"]["phase"] == "Running"][1:],
        "two pods running",
    )
    cluster.kubelet.finish("rai", "flaky-active-1", "Failed", exit_code=3)

    def failed() -> dict[str, Any] | None:
        s = cluster.run("rai", "flaky").get("status") or {}
        return s if s.get("phase") == "Failed" else None

    st = await wait_until(failed, "Run Failed")
    assert st["reason"] == "WorkloadFailed"
    leases = await _leases(cluster, "rai", "flaky")
    assert all(x["closureReason"] for x in leases)


async def test_invalid_spec_is_reported_in_status_and_nothing_is_applied(cluster: Cluster) -> None:
    bad = run_obj("rai", "bad", 4)
    bad["spec"]["resources"]["totalGPUs"] = -1
    cluster.create("runs", "rai", bad, "rq.davidlangworthy.io")

    def reported() -> dict[str, Any] | None:
        s = cluster.run("rai", "bad").get("status") or {}
        return s if s.get("reason") == "InvalidSpec" else None

    st = await wait_until(reported, "InvalidSpec status")
    assert "totalGPUs" in st["message"]
    admitted = next(c for c in st["conditions"] if c["type"] == "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "InvalidSpec")
    assert "rai/bad" not in cluster.bridge.state.runs


async def test_node_health_cordon_suspect_fence_and_left_out_nodes(cluster: Cluster) -> None:
    state = lambda: cluster.bridge.state  # noqa: E731 - re-read: the follower replaces nothing, but reads stay fresh
    await wait_until(lambda: len(state().nodes) == 4, "nodes registered")
    nodes = cluster.rt("nodes")

    def health(name: str) -> str:
        return state().nodes[name].health.value

    cluster.store.patch(nodes, None, "a1", {"spec": {"unschedulable": True}})
    await wait_until(lambda: health("a1") == "Cordoned", "cordon")
    cluster.store.patch(nodes, None, "a1", {"spec": {"unschedulable": None}})
    await wait_until(lambda: health("a1") == "Ready", "uncordon")

    ready_unknown = {"status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}}
    cluster.store.patch(nodes, None, "a2", ready_unknown, "status")  # the kubelet went quiet
    await wait_until(lambda: health("a2") == "Cordoned", "suspect: no new placement")

    taint = {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}
    cluster.store.patch(nodes, None, "b1", {"spec": {"taints": [taint]}})
    await wait_until(lambda: health("b1") == "Fenced", "out-of-service taint fences")

    cluster.store.delete(nodes, None, "b2")
    await wait_until(lambda: health("b2") == "Fenced", "a deleted node is fenced")

    # A GPU node without a fabric label is left out and reported; the rest goes on.
    bare = gpu_node("c1")
    del bare["metadata"]["labels"]["nvidia.com/gpu.clique"]
    cluster.store.create(nodes, None, bare)
    cluster.store.create(nodes, None, gpu_node("c2", clique="C"))
    await wait_until(lambda: "c2" in state().nodes, "c2 registered")
    assert "c1" not in state().nodes
    assert "fabric.domain" in cluster.bridge.problems["c1"]
    reports = await wait_until(
        lambda: [e for e in _event_objs(cluster, "default") if e["reason"] == "LeftOut"],
        "a LeftOut Event on the node",
    )
    assert [e["regarding"]["name"] for e in reports] == ["c1"]
    assert reports[0]["regarding"]["kind"] == "Node"
    assert "fabric.domain" in reports[0]["note"]

    # GPUs used by pods gpu-fleet does not manage are not offered.
    cluster.store.create(
        cluster.rt("pods"),
        "other",
        {
            "metadata": {"name": "squatter"},
            "spec": {
                "nodeName": "c2",
                "containers": [
                    {"name": "x", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "3"}}}
                ],
            },
        },
    )
    await wait_until(lambda: state().nodes["c2"].gpus == 5, "c2 offers 8 - 3 GPUs")


async def test_a_fenced_node_ends_the_gang_and_its_pods_go(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create(
        "runs", "rai", run_obj("rai", "solo", 8, gpus_per_pod=8), "rq.davidlangworthy.io"
    )
    pods = await wait_until(
        lambda: [p for p in cluster.pods("rai", "solo") if p["spec"].get("nodeName")], "bound"
    )
    node = pods[0]["spec"]["nodeName"]
    taint = {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}
    cluster.store.patch(cluster.rt("nodes"), None, node, {"spec": {"taints": [taint]}})

    def failed() -> dict[str, Any] | None:
        s = cluster.run("rai", "solo").get("status") or {}
        return s if s.get("phase") == "Failed" else None

    st = await wait_until(failed, "the run fails without a spare")
    assert st["reason"] == "NodeFailureNoSpare"
    await wait_until(lambda: not cluster.pods("rai", "solo"), "its pods deleted")


async def test_spec_changes_apply_once_per_generation(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create("runs", "rai", run_obj("rai", "gen", 2), "rq.davidlangworthy.io")

    def observed(gen: int) -> bool:
        s = cluster.run("rai", "gen").get("status") or {}
        return s.get("observedGeneration") == gen and s.get("phase") == "Running"

    await wait_until(lambda: observed(1), "generation 1 observed")
    applies = cluster.bridge.commands
    seq = cluster.bridge.follower.seq if cluster.bridge.follower else 0
    # Label changes are not spec changes: no new generation, nothing re-applied.
    cluster.store.patch(cluster.runs(), "rai", "gen", {"metadata": {"labels": {"x": "y"}}})
    await cluster.bridge.reconcile_once()
    assert cluster.bridge.commands == applies
    assert cluster.bridge.follower is not None
    assert cluster.bridge.follower.seq == seq
    # A spec change is one RunUpdated, keyed by the new generation.
    cluster.store.patch(cluster.runs(), "rai", "gen", {"spec": {"runtime": {"maxDuration": "9h"}}})
    await wait_until(lambda: observed(2), "generation 2 observed")
    run = cluster.bridge.state.runs["rai/gen"]
    assert run.metadata.annotations["rq.davidlangworthy.io/generation"] == "2"
    assert run.spec.runtime is not None
    assert run.spec.runtime.max_duration == "9h"


async def test_a_restarted_bridge_converges_with_no_duplicate_and_no_leak(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create(
        "runs", "rai", run_obj("rai", "keep", 4, gpus_per_pod=2), "rq.davidlangworthy.io"
    )

    def both_bound() -> list[dict[str, Any]] | None:
        bound = [p for p in cluster.pods("rai", "keep") if p["spec"].get("nodeName")]
        return bound if len(bound) == 2 else None

    pods = await wait_until(both_bound, "both pods bound")
    placed = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    before = await wait_until(
        lambda: (e := _events(cluster, "rai")) and {"Admitted", "Bound"} <= set(e.values()) and e,
        "Admitted and Bound events",
    )
    await cluster.bridge.stop()
    # While no bridge runs: a pod is lost, and a pod of a lease that is not open shows up (left
    # by a crash of an earlier incarnation).
    cluster.store.delete(cluster.rt("pods"), "rai", "keep-active-1")
    leak = run_pods_leak(cluster, "keep-active-9")
    cluster.store.create(cluster.rt("pods"), "rai", leak)
    # Two bridges at once (a restart overlapping a slow shutdown) must not fight either.
    bridges = [
        KubeBridge(
            BridgeConfig(nats_url=cluster.stack.url, resync_seconds=2.0),
            client_factory=lambda: MemoryClient(cluster.store, bookmark_every=0.5),
        )
        for _ in range(2)
    ]
    try:
        for b in bridges:
            await b.start()

        def converged() -> dict[str, str] | None:
            now = {
                p["metadata"]["name"]: p["spec"].get("nodeName")
                for p in cluster.pods("rai", "keep")
            }
            return now if now == placed else None

        await wait_until(
            converged, "the lost pod re-created and bound where its lease is, the leak gone"
        )
        names = [p["metadata"]["name"] for p in cluster.pods("rai", "keep")]
        assert sorted(names) == ["keep-active-0", "keep-active-1"]
        assert cluster.run("rai", "keep")["status"]["phase"] == "Running"
        # Both replayed the whole ledger and re-bound a pod: no Event was created twice.
        await wait_until(
            lambda: all(b.passes and not b.events.pending for b in bridges), "events replayed"
        )
        assert _events(cluster, "rai") == before
        assert sum(b.events_created for b in bridges) == 0
    finally:
        for b in bridges:
            await b.stop()


def _event_objs(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    items, _ = cluster.store.list(cluster.rt("events", "events.k8s.io"), ns)
    return items


def _events(cluster: Cluster, ns: str) -> dict[str, str]:
    """Event name -> reason, of the events.k8s.io Events in ``ns``."""
    items, _ = cluster.store.list(cluster.rt("events", "events.k8s.io"), ns)
    return {e["metadata"]["name"]: e["reason"] for e in items}


async def test_events_on_the_run_admitted_bound_and_expired(cluster: Cluster) -> None:
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    spec = {"runtime": {"maxDuration": "1h"}}
    cluster.create(
        "runs", "rai", run_obj("rai", "short", 4, extra_spec=spec), "rq.davidlangworthy.io"
    )

    def reasons() -> set[str]:
        return {r for n, r in _events(cluster, "rai").items() if n.startswith("short.")}

    await wait_until(lambda: {"Admitted", "Bound"} <= reasons(), "Admitted and Bound")
    items, _ = cluster.store.list(cluster.rt("events", "events.k8s.io"), "rai")
    admitted = next(e for e in items if e["reason"] == "Admitted")
    # Named by the ledger address of the admitting status event (``<seq>-<index>`` in hex).
    assert re.fullmatch(r"short\.[0-9a-f]+(-[0-9a-f]+)?\.admitted", admitted["metadata"]["name"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", admitted["eventTime"])
    assert admitted["regarding"]["uid"] == cluster.run("rai", "short")["metadata"]["uid"]
    assert admitted["note"].startswith("admitted: 4 GPUs on ")
    leases = await _leases(cluster, "rai", "short")
    end = max(int(dt.datetime.fromisoformat(x["end"]).timestamp()) for x in leases)
    await cluster.api("clock", {"advance_to": end})
    await wait_until(lambda: "Expired" in reasons(), "Expired event")
    expired = next(e for e in _events(cluster, "rai").items() if e[1] == "Expired")
    assert expired[0].startswith("short.")


def run_pods_leak(cluster: Cluster, name: str) -> dict[str, Any]:
    """A managed pod naming a lease that was never open."""
    owner = cluster.run("rai", "keep")
    return {
        "metadata": {
            "name": name,
            "labels": {
                "rq.davidlangworthy.io/run": "keep",
                "rq.davidlangworthy.io/role": "Active",
                "app.kubernetes.io/managed-by": "gpu-fleet",
            },
            "annotations": {"rq.davidlangworthy.io/lease": "rai/keep@0#999"},
            "ownerReferences": [
                {
                    "apiVersion": "rq.davidlangworthy.io/v1",
                    "kind": "Run",
                    "name": "keep",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
        "spec": {"nodeName": "a1", "containers": [{"name": "workload", "image": "x"}]},
    }


async def test_a_notification_channel_applied_with_kubectl_reaches_the_ledger(
    cluster: Cluster,
) -> None:
    """``kubectl apply`` of a NotificationChannel: applied once per generation, refused when
    invalid (nothing applied), removed from the ledger when the object is deleted."""
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    group = "rq.davidlangworthy.io"
    channels = cluster.rt("notificationchannels", group)
    body = {
        "apiVersion": f"{group}/v1",
        "kind": "NotificationChannel",
        "metadata": {"name": "deadlines", "namespace": "rai"},
        "spec": {"target": {"nats": True}, "leadTimes": ["1h", "10m"]},
    }
    cluster.create("notificationchannels", "rai", body, group)
    await wait_until(lambda: "rai/deadlines" in cluster.bridge.state.channels, "the channel")
    channel = cluster.bridge.state.channels["rai/deadlines"]
    assert channel.spec.lead_times == ("1h", "10m")
    assert channel.metadata.annotations["rq.davidlangworthy.io/generation"] == "1"
    applies = cluster.bridge.commands
    await cluster.bridge.reconcile_once()
    assert cluster.bridge.commands == applies  # the same generation is not applied twice

    bad = {**body, "metadata": {"name": "bad", "namespace": "rai"}, "spec": {"target": {}}}
    cluster.create("notificationchannels", "rai", bad, group)
    await wait_until(lambda: cluster.bridge.rejected, "the invalid channel refused")
    assert "rai/bad" not in cluster.bridge.state.channels

    cluster.store.delete(channels, "rai", "deadlines")
    await wait_until(lambda: "rai/deadlines" not in cluster.bridge.state.channels, "deleted")


def _mirrors(cluster: Cluster, plural: str, ns: str) -> list[dict[str, Any]]:
    items, _ = cluster.store.list(cluster.rt(plural, "rq.davidlangworthy.io"), ns)
    return items


async def test_gpuleases_and_reservations_mirror_the_ledger(cluster: Cluster) -> None:
    """One GPULease per open lease and one Reservation per pending reservation, status through
    the status subresource; a closed lease's and a released reservation's object go."""
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    cluster.create(
        "runs", "rai", run_obj("rai", "big", 16, gpus_per_pod=4), "rq.davidlangworthy.io"
    )

    def lease_mirrors() -> list[dict[str, Any]] | None:
        items = _mirrors(cluster, "gpuleases", "rai")
        done = len(items) == 2 and all((o.get("status") or {}).get("fundingClass") for o in items)
        return items if done else None

    items = await wait_until(lease_mirrors, "two GPULease mirrors with status")
    leases = await _leases(cluster, "rai", "big")
    assert sorted(o["metadata"]["annotations"]["rq.davidlangworthy.io/lease"] for o in items) == (
        sorted(x["id"] for x in leases)
    )
    run_uid = cluster.run("rai", "big")["metadata"]["uid"]
    for o in items:
        assert o["spec"]["runRef"] == {"name": "big", "namespace": "rai"}
        assert o["spec"]["slice"]["role"] == "Active"
        assert len(o["spec"]["slice"]["nodes"]) == 8
        assert o["spec"]["paidByEnvelope"] == "e"
        assert o["spec"]["owner"] == "org:ai:rai"
        st = o["status"]
        assert (st["gpus"], st["fundingClass"], st["closed"]) == (8, "owned", False)
        assert {c["type"]: c["status"] for c in st["conditions"]} == {
            "Active": "True",
            "Closed": "False",
        }
        assert o["metadata"]["ownerReferences"][0]["uid"] == run_uid
        assert o["metadata"]["name"].startswith("big-")

    # A second run over the budget waits with a reservation: its mirror appears.
    cluster.create("runs", "rai", run_obj("rai", "extra", 8), "rq.davidlangworthy.io")

    def reservation() -> dict[str, Any] | None:
        items = _mirrors(cluster, "reservations", "rai")
        return items[0] if len(items) == 1 and items[0].get("status") else None

    res = await wait_until(reservation, "Reservation mirror")
    st = cluster.run("rai", "extra").get("status") or {}
    await wait_until(
        lambda: (cluster.run("rai", "extra").get("status") or {}).get("pendingReservation"),
        "run status names its reservation",
    )
    st = cluster.run("rai", "extra")["status"]
    assert res["metadata"]["name"] == st["pendingReservation"]
    assert res["spec"]["runRef"]["name"] == "extra"
    assert res["spec"]["earliestStart"] == st["earliestStart"]
    assert res["status"]["state"] == "Pending"
    assert res["status"]["forecast"]["scope"] == "budget"

    # Completing the first run closes its leases: their mirrors go, the reservation activates
    # (released) and its mirror goes; the second run's leases get mirrors.
    await cluster.api("complete", {"namespace": "rai", "name": "big"})

    def settled() -> bool:
        names = {o["spec"]["runRef"]["name"] for o in _mirrors(cluster, "gpuleases", "rai")}
        return names == {"extra"} and not _mirrors(cluster, "reservations", "rai")

    await wait_until(settled, "mirrors follow the ledger")


async def test_failure_policy_retry_restarts_the_gang_after_backoff_then_fails(
    cluster: Cluster,
) -> None:
    """A failed pod under Retry: the retry is a ledger event (counted once however often it is
    reported), the gang's pods go for the backoff and come back on the same leases as the
    next attempt; once the retries are used up the run fails."""
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create("budgets", "rai", budget_obj("rai", "org:ai:rai"), "rq.davidlangworthy.io")
    obj = run_obj("rai", "again", 2, failure_policy="Retry")
    obj["spec"]["roles"][0].update({"retries": 1, "backoff": "1m"})
    cluster.create("runs", "rai", obj, "rq.davidlangworthy.io")

    def running(attempt: str) -> dict[str, dict[str, Any]] | None:
        pods = {p["metadata"]["name"]: p for p in cluster.pods("rai", "again")}
        ok = len(pods) == 2 and all(
            p["status"]["phase"] == "Running"
            and p["metadata"]["annotations"]["rq.davidlangworthy.io/attempt"] == attempt
            for p in pods.values()
        )
        return pods if ok else None

    first = await wait_until(lambda: running("0"), "attempt 0 running")
    leases = await _leases(cluster, "rai", "again")
    cluster.kubelet.finish("rai", "again-active-1", "Failed", exit_code=3)

    def backing_off() -> dict[str, Any] | None:
        st = cluster.run("rai", "again").get("status") or {}
        return st if st.get("failedAttempts") == 1 and st.get("retryAfter") else None

    st = await wait_until(backing_off, "status shows the retry and its backoff")
    assert st["phase"] == "Running"
    await wait_until(lambda: not cluster.pods("rai", "again"), "pods gone during the backoff")
    assert "Retrying" in _events(cluster, "rai").values()
    # The same failure reported again (a second bridge, a replayed pass) counts once.
    again = await cluster.api("retry", {"namespace": "rai", "name": "again", "attempt": 0})
    assert again["failedAttempts"] == 1
    assert await _leases(cluster, "rai", "again") == leases  # GPUs kept while waiting

    retry_after = int(dt.datetime.fromisoformat(st["retryAfter"]).timestamp())
    await cluster.api("clock", {"advance_to": retry_after})
    second = await wait_until(lambda: running("1"), "attempt 1 running on the same leases")
    for name, pod in second.items():
        assert pod["metadata"]["uid"] != first[name]["metadata"]["uid"]
        assert pod["spec"]["nodeName"] == first[name]["spec"]["nodeName"]

    # Pods (the binder half) and status (the manager half) are written independently: wait for
    # the status of the restart rather than racing it.
    def restarted() -> dict[str, Any] | None:
        s = cluster.run("rai", "again").get("status") or {}
        return s if "retryAfter" not in s else None

    st = await wait_until(restarted, "status shows the restart (no pending retry)")
    assert st["failedAttempts"] == 1

    cluster.kubelet.finish("rai", "again-active-0", "Failed", exit_code=1)

    def failed() -> dict[str, Any] | None:
        s = cluster.run("rai", "again").get("status") or {}
        return s if s.get("phase") == "Failed" else None

    st = await wait_until(failed, "retries used up: the run fails")
    assert st["reason"] == "WorkloadFailed"
    assert "after 1 retries" in st["message"]
    closed = await _leases(cluster, "rai", "again")
    assert all(x["closureReason"] == "WorkloadFailed" for x in closed)
    await wait_until(lambda: not cluster.pods("rai", "again"), "pods of the failed run gone")


async def test_fencing_a_node_swaps_in_the_spare_with_the_replaced_members_identity(
    cluster: Cluster,
) -> None:
    """A tainted node is fenced; its lease moves onto the spare's slots, and the swap pod
    (``<run>-g<group>-swap-<unixnano>``, pinned to the spare's node) takes over the replaced
    member's hostname and rank, so the gang's rendezvous names stay valid."""
    await wait_until(lambda: len(cluster.bridge.state.nodes) == 4, "nodes registered")
    cluster.create(
        "budgets", "rai", budget_obj("rai", "org:ai:rai", concurrency=32), "rq.davidlangworthy.io"
    )
    obj = run_obj("rai", "swap", 16, gpus_per_pod=8, extra_spec={"sparesPerGroup": 8})
    cluster.create("runs", "rai", obj, "rq.davidlangworthy.io")

    def placed() -> dict[str, dict[str, Any]] | None:
        pods = {p["metadata"]["name"]: p for p in cluster.pods("rai", "swap")}
        ok = len(pods) == 3 and all(p["spec"].get("nodeName") for p in pods.values())
        return pods if ok else None

    pods = await wait_until(placed, "two active pods and a spare placeholder bound")
    assert sorted(pods) == ["swap-active-0", "swap-active-1", "swap-spare-0"]
    victim = pods["swap-active-0"]
    spare_node = pods["swap-spare-0"]["spec"]["nodeName"]
    env0 = {e["name"]: e["value"] for e in victim["spec"]["containers"][0]["env"]}
    nodes = cluster.rt("nodes")
    node = cluster.store.get(nodes, None, victim["spec"]["nodeName"])
    taint = {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}
    cluster.store.patch(nodes, None, node["metadata"]["name"], {"spec": {"taints": [taint]}})

    def swapped() -> dict[str, Any] | None:
        now = {p["metadata"]["name"]: p for p in cluster.pods("rai", "swap")}
        swaps = [p for n, p in now.items() if "-g0-swap-" in n]
        ok = (
            len(now) == 2
            and "swap-active-1" in now
            and len(swaps) == 1
            and swaps[0]["spec"].get("nodeName")
        )
        return swaps[0] if ok else None

    pod = await wait_until(swapped, "the swap pod bound on the spare's node; the rest gone")
    assert pod["spec"]["nodeName"] == spare_node
    assert pod["spec"]["hostname"] == "swap-active-0"  # the replaced member's DNS name
    ann = pod["metadata"]["annotations"]
    assert ann["rq.davidlangworthy.io/replaces"] == "swap-active-0"
    assert ann["rq.davidlangworthy.io/swap-node"] == spare_node
    assert ann["rq.davidlangworthy.io/lease-reason"] == "Swap"
    terms = pod["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [spare_node]
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env == env0  # same rank, same MASTER_ADDR, same world
    assert env["NODE_RANK"] == "0"
    await wait_until(lambda: "Swapped" in _events(cluster, "rai").values(), "Swapped event")

    def on_spare() -> dict[str, Any] | None:  # the status write is separate from the Event's
        s = cluster.run("rai", "swap").get("status") or {}
        return s if spare_node in s.get("nodes", ()) else None

    st = await wait_until(on_spare, "status lists the spare's node")
    assert st["phase"] == "Running"
