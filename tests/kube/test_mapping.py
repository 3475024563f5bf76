"""Pure parts of the bridge: node rows from Node objects, pod intents from leases, conditions."""

from __future__ import annotations

import json

import msgspec
import pytest
from _kube import gpu_node, run_obj

from gpu_fleet.core.engine import Fleet
from gpu_fleet.core.ledger import FleetState, RunStatus
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Budget, Lease, LeaseRole, MintReason, Node, NodeHealth, Run
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.kube import settings
from gpu_fleet.kube.nodes import LabelMapping, NodeRow, Problem, map_node, snapshot
from gpu_fleet.kube.pods import PodSettings, run_pods
from gpu_fleet.kube.status import conditions, run_status, true_conditions


def test_labels_are_mapped_by_the_first_present_source_and_flavor_aliases() -> None:
    node = gpu_node("n", clique="nvl-7")
    node["metadata"]["labels"]["fabric.domain"] = "ignored: clique comes first"
    row = map_node(node, LabelMapping())
    assert isinstance(row, NodeRow)
    assert row.labels == {
        "region": "r",
        "cluster": "c",
        "fabric.domain": "nvl-7",
        "gpu.flavor": "H100",
    }
    assert row.gpus == 8
    assert row.health is NodeHealth.READY


def test_configured_cluster_name_and_sources_from_json() -> None:
    m = settings.mapping(
        '{"clusterName": "west-1", "flavorAliases": {"Tesla-X": "X"},'
        ' "sources": {"fabric.domain": ["topology.k8s.aws/network-node-layer-3"]}}'
    )
    node = gpu_node("n", product="Tesla-X")
    del node["metadata"]["labels"]["cluster"]
    node["metadata"]["labels"]["topology.k8s.aws/network-node-layer-3"] = "nn-9"
    row = map_node(node, m)
    assert isinstance(row, NodeRow)
    assert row.labels == {
        "region": "r",
        "cluster": "west-1",
        "fabric.domain": "nn-9",
        "gpu.flavor": "X",
    }
    with pytest.raises(ValueError, match="unknown field"):
        settings.mapping('{"cluster": "x"}')
    with pytest.raises(ValueError, match="not a topology key"):
        settings.mapping('{"sources": {"zone": ["a"]}}')


def test_nodes_without_gpus_are_ignored_and_gpu_nodes_missing_a_key_are_reported() -> None:
    cpu = gpu_node("cpu", gpus=0)
    bare = gpu_node("bare")
    del bare["metadata"]["labels"]["nvidia.com/gpu.product"]
    rows, problems = snapshot([cpu, bare, gpu_node("ok")], [], LabelMapping())
    assert sorted(rows) == ["ok"]
    assert problems == [Problem("bare", "GPU node bare has no label for gpu.flavor; left out")]
    assert map_node(cpu, LabelMapping()) is None


@pytest.mark.parametrize(
    ("patch", "health"),
    [
        ({"spec": {"unschedulable": True}}, NodeHealth.CORDONED),
        ({"spec": {"taints": [{"key": "node.kubernetes.io/out-of-service"}]}}, NodeHealth.FENCED),
        ({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}, NodeHealth.CORDONED),
    ],
)
def test_health(patch: dict[str, dict[str, object]], health: NodeHealth) -> None:
    node = gpu_node("n")
    for k, v in patch.items():
        node[k] = {**node[k], **v}
    row = map_node(node, LabelMapping())
    assert isinstance(row, NodeRow)
    assert row.health is health


def _run(gpus: int, gpp: int) -> Run:
    (run,) = parse_manifests(json.dumps(run_obj("rai", "t", gpus, gpus_per_pod=gpp)), "t")
    assert isinstance(run, Run)
    return run


def _lease(
    i: int, node: str, width: int, role: LeaseRole = LeaseRole.ACTIVE, cohort: int = 0
) -> Lease:
    return Lease(
        id=f"rai/t@0#{i:03d}",
        run="rai/t",
        node=node,
        slots=tuple(f"{node}#{s}" for s in range(width)),
        role=role,
        group=0,
        reason=MintReason.START,
        cohort=cohort,
        start=0,
    )


def test_pods_are_named_in_mint_order_and_names_never_move() -> None:
    run = _run(8, 2)
    obj = {"metadata": {"name": "t", "uid": "0123456789abcdef"}}
    leases = [
        _lease(0, "a1", 4),
        _lease(1, "a2", 4),
        _lease(2, "a2", 2, LeaseRole.SPARE),
        _lease(3, "b1", 2, cohort=1),
    ]
    opened = {x.id: x for x in leases}
    pods = run_pods(
        run, run_obj=obj, leases=leases, open_ids=opened, noticed=(), settings=PodSettings()
    )
    assert [(p.name, p.node, p.gpus) for p in pods] == [
        ("t-active-0", "a1", 2),
        ("t-active-1", "a1", 2),
        ("t-active-2", "a2", 2),
        ("t-active-3", "a2", 2),
        ("t-spare-0", "a2", 2),
        ("t-c1-active-0", "b1", 2),
    ]
    # Lease 0 closes: its pods go, the others keep their names; rank 0 moves to the next pod.
    del opened[leases[0].id]
    pods = run_pods(
        run, run_obj=obj, leases=leases, open_ids=opened, noticed=(), settings=PodSettings()
    )
    assert [p.name for p in pods] == ["t-active-2", "t-active-3", "t-spare-0", "t-c1-active-0"]
    env = {e["name"]: e["value"] for e in pods[0].body["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == "t-active-2.t.rai.svc"
    assert env["NODE_RANK"] == "0"
    spare = pods[2].body
    assert spare["spec"]["containers"][0]["image"] == PodSettings().placeholder_image
    assert "env" not in spare["spec"]["containers"][0]
    # A lease under a preemption notice gets no pod.
    pods = run_pods(
        run,
        run_obj=obj,
        leases=leases,
        open_ids=opened,
        noticed=[leases[1].id],
        settings=PodSettings(),
    )
    assert [p.name for p in pods] == ["t-spare-0", "t-c1-active-0"]


def test_conditions_keep_transition_times_unless_status_changes() -> None:
    first = conditions("Pending", "Reserved", "waiting", generation=1, previous=None, now="T1")
    again = conditions("Pending", "Scheduling", "go", generation=1, previous=first, now="T2")
    by = {c["type"]: c for c in again}
    assert by["Admitted"]["lastTransitionTime"] == "T1"  # True both times
    assert by["Admitted"]["reason"] == "Scheduling"
    running = conditions("Running", "GangBound", "", generation=1, previous=again, now="T3")
    by = {c["type"]: c for c in running}
    assert by["Running"]["lastTransitionTime"] == "T3"
    assert by["Admitted"]["lastTransitionTime"] == "T1"
    assert by["Failed"] == {
        "type": "Failed",
        "status": "False",
        "reason": "NotApplicable",
        "message": "",
        "observedGeneration": 1,
        "lastTransitionTime": "T1",
    }
    assert true_conditions("Pending", "Unfunded") == ()
    unfunded = {
        c["type"]: c
        for c in conditions("Pending", "Unfunded", "no", generation=2, previous=None, now="T")
    }
    assert (unfunded["Admitted"]["status"], unfunded["Admitted"]["reason"]) == ("False", "Unfunded")
    assert true_conditions("Pending", "CheckpointGrace") == ("Admitted", "Blocked")
    assert true_conditions("Waiting", "FollowWait") == ("Blocked",)


def test_status_shows_the_checkpoint_deadline_during_a_grace() -> None:
    t0 = 1_767_225_600
    fleet = Fleet()
    labels = {"region": "r", "cluster": "c", "fabric.domain": "A", "gpu.flavor": "H100"}
    for name in ("a1", "a2"):
        fleet.register_node(Node(name=name, gpus=2, labels=labels), t0)
    budget = {
        "kind": "Budget",
        "metadata": {"name": "b", "namespace": "a"},
        "spec": {
            "owner": "org:a",
            "envelopes": [
                {
                    "name": "e",
                    "flavor": "H100",
                    "selector": {"region": "r"},
                    "concurrency": 8,
                    "start": "2026-01-01T00:00:00Z",
                    "end": "2027-01-01T00:00:00Z",
                }
            ],
        },
    }
    fleet.apply(msgspec.convert(budget, Budget), t0)
    run = {
        "kind": "Run",
        "metadata": {"name": "train", "namespace": "a"},
        "spec": {
            "resources": {"gpuType": "H100", "totalGPUs": 4},
            "runtime": {"checkpoint": "10m"},
        },
    }
    fleet.apply(msgspec.convert(run, Run), t0)
    st = run_status(fleet.state, "a/train", generation=1, previous=None, now="T")
    assert "checkpointDeadline" not in st
    fleet.set_node_health("a1", NodeHealth.FENCED, t0 + 300)
    assert fleet.state.status["a/train"].reason == "CheckpointGrace"
    st = run_status(fleet.state, "a/train", generation=1, previous=None, now="T")
    assert st["checkpointDeadline"] == format_instant(t0 + 300 + 600)


def test_status_shows_the_follow_deadline_while_waiting_on_a_failed_upstream() -> None:
    state = FleetState()
    run = {
        "kind": "Run",
        "metadata": {"name": "eval", "namespace": "a"},
        "spec": {"resources": {"gpuType": "H100", "totalGPUs": 4}, "follow": {"after": ["train"]}},
    }
    state.runs["a/eval"] = msgspec.convert(run, Run)
    state.status["a/eval"] = RunStatus("Waiting", "FollowWait", "waiting for a/train")
    st = run_status(state, "a/eval", generation=1, previous=None, now="T")
    assert "followDeadline" not in st
    state.status["a/eval"] = RunStatus(
        "Waiting", "FollowWait", "a/train failed", {"followDeadline": 1_767_227_400}
    )
    st = run_status(state, "a/eval", generation=1, previous=None, now="T")
    assert st["followDeadline"] == "2026-01-01T00:30:00Z"
