"""Kubernetes Nodes as topology rows: GPU count, location labels, health.  Pure functions.

* GPUs: ``status.allocatable["nvidia.com/gpu"]`` (the device plugin lowers it when a GPU turns
  unhealthy) minus the GPUs requested by pods bound there that gpu-fleet does not manage.
* Labels: each fleet key (region, cluster, fabric.domain, gpu.flavor) is taken from the first
  present label of an ordered list, so real fleets' labels (GPU feature discovery, Topograph,
  GKE, EKS) work without relabelling; the flavor goes through an alias map
  (``NVIDIA-H100-80GB-HBM3`` -> ``H100``); the cluster may be a configured name.
* Health: a taint ``node.kubernetes.io/out-of-service`` is *fenced* (failure: spare swap,
  checkpoint grace); ``spec.unschedulable`` is *cordoned* (no new placement, nothing moves);
  Ready=False/Unknown is *suspect* (an unreachable kubelet may still run containers), which
  the fleet treats like a cordon: no new placement, no swap.  A deleted node is fenced by the
  bridge (it is absent here).
* A GPU node missing a key is left out and reported - one bad node never fails the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gpu_fleet.core.model import NodeHealth
from gpu_fleet.kube.objects import (
    GPU_RESOURCE,
    MANAGED_BY,
    MANAGER_NAME,
    NODE_SOURCE,
    NODE_SOURCE_LABEL,
    OUT_OF_SERVICE_TAINT,
    Obj,
    labels_of,
    name_of,
)

DEFAULT_SOURCES: dict[str, tuple[str, ...]] = {
    "region": ("topology.kubernetes.io/region", "region"),
    "cluster": ("cluster",),
    "fabric.domain": (
        "nvidia.com/gpu.clique",
        "network.topology.nvidia.com/accelerator",
        "cloud.google.com/gce-topology-block",
        "topology.k8s.aws/network-node-layer-3",
        "fabric.domain",
    ),
    "gpu.flavor": ("nvidia.com/gpu.product", "gpu.flavor"),
}
DEFAULT_FLAVOR_ALIASES: dict[str, str] = {
    "NVIDIA-H100-80GB-HBM3": "H100",
    "NVIDIA-H100-SXM5-80GB": "H100",
    "NVIDIA-H200": "H200",
    "NVIDIA-A100-SXM4-80GB": "A100",
    "NVIDIA-A100-SXM4-40GB": "A100",
    "NVIDIA-GB200": "GB200",
}


@dataclass(frozen=True)
class LabelMapping:
    """Which Kubernetes labels feed each topology key, in order of preference."""

    sources: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_SOURCES))
    cluster_name: str = ""  # when set, every node's cluster is this name
    flavor_aliases: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_FLAVOR_ALIASES))

    def labels(self, k8s_labels: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
        """(fleet labels, missing keys)."""
        out: dict[str, str] = {}
        missing: list[str] = []
        for key in ("region", "cluster", "fabric.domain", "gpu.flavor"):
            if key == "cluster" and self.cluster_name:
                out[key] = self.cluster_name
                continue
            value = next(
                (k8s_labels[s] for s in self.sources.get(key, ()) if k8s_labels.get(s)), None
            )
            if value is None:
                missing.append(key)
                continue
            if key == "gpu.flavor":
                value = self.flavor_aliases.get(value, value)
            out[key] = value
        return out, missing


@dataclass(frozen=True)
class NodeRow:
    """One GPU node as the fleet should know it."""

    name: str
    gpus: int
    labels: dict[str, str]
    health: NodeHealth
    suspect: bool = False

    def inventory(self, health: NodeHealth) -> dict[str, object]:
        """The ``fleet.api.node`` register payload (health given: re-registering never
        changes health; only ``cordon``/``fence``/``uncordon`` do)."""
        return {
            "name": self.name,
            "gpus": self.gpus,
            "labels": {**self.labels, NODE_SOURCE_LABEL: NODE_SOURCE},
            "health": health.value,
        }


@dataclass(frozen=True)
class Problem:
    node: str
    message: str


def _quantity(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def pod_gpus(pod: Obj) -> int:
    """GPUs a pod asks for: the sum over containers of the request (or the limit)."""
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        res = c.get("resources") or {}
        value = (res.get("requests") or {}).get(GPU_RESOURCE) or (res.get("limits") or {}).get(
            GPU_RESOURCE
        )
        total += _quantity(value) if value is not None else 0
    return total


def unmanaged_gpus(pods: Iterable[Obj]) -> dict[str, int]:
    """GPUs held per node by live pods gpu-fleet does not manage (node -> GPUs)."""
    used: dict[str, int] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed"):
            continue
        if labels_of(pod).get(MANAGED_BY) == MANAGER_NAME:
            continue
        gpus = pod_gpus(pod)
        if gpus:
            used[node] = used.get(node, 0) + gpus
    return used


def node_health(node: Obj) -> tuple[NodeHealth, bool]:
    """(health, suspect): fenced > cordoned > suspect (reported as cordoned) > ready."""
    spec = node.get("spec") or {}
    if any(t.get("key") == OUT_OF_SERVICE_TAINT for t in spec.get("taints") or []):
        return NodeHealth.FENCED, False
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c.get("type") == "Ready"), None)
    suspect = ready is not None and ready.get("status") != "True"
    if spec.get("unschedulable") or suspect:
        return NodeHealth.CORDONED, suspect
    return NodeHealth.READY, False


def map_node(node: Obj, mapping: LabelMapping, unmanaged: int = 0) -> NodeRow | Problem | None:
    """A node's row, a ``Problem`` if it has GPUs but a key is missing, or None if no GPUs."""
    allocatable = (node.get("status") or {}).get("allocatable") or {}
    gpus = _quantity(allocatable.get(GPU_RESOURCE, 0))
    name = name_of(node)
    if gpus <= 0:
        return None
    labels, missing = mapping.labels(labels_of(node))
    if missing:
        return Problem(name, f"GPU node {name} has no label for {', '.join(missing)}; left out")
    health, suspect = node_health(node)
    return NodeRow(name, max(0, gpus - unmanaged), labels, health, suspect)


def snapshot(
    nodes: Iterable[Obj], pods: Iterable[Obj], mapping: LabelMapping
) -> tuple[dict[str, NodeRow], list[Problem]]:
    """Every GPU node's row, by name, and the nodes left out (sorted)."""
    used = unmanaged_gpus(pods)
    rows: dict[str, NodeRow] = {}
    problems: list[Problem] = []
    for node in sorted(nodes, key=name_of):
        got = map_node(node, mapping, used.get(name_of(node), 0))
        if isinstance(got, NodeRow):
            rows[got.name] = got
        elif isinstance(got, Problem):
            problems.append(got)
    return rows, problems
