"""Helpers for the Kubernetes bridge tests: the emulator's store with our CRDs, node and Run
objects as a cluster carries them, and the fleet stack (real nats-server, binder, manager on a
virtual clock) from ``tests/services/_stack.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from _stack import T0, Stack, wait_until

from gpu_fleet.kubesim.store import Store

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"

__all__ = ["T0", "Stack", "wait_until"]


def crd_docs() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]


def new_store() -> Store:
    """An emulator store that knows our CRDs (registered through the API, as kubectl would)."""
    store = Store()
    crd = store.find("apiextensions.k8s.io", "customresourcedefinitions")
    for doc in crd_docs():
        store.create(crd, None, doc)
    return store


def gpu_node(
    name: str,
    gpus: int = 8,
    *,
    clique: str = "A",
    product: str = "NVIDIA-H100-80GB-HBM3",
    region: str = "r",
    cluster: str = "c",
    ready: str = "True",
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """A Node as GPU feature discovery and the device plugin label and size it."""
    spec: dict[str, Any] = {}
    if unschedulable:
        spec["unschedulable"] = True
    if taints:
        spec["taints"] = taints
    return {
        "metadata": {
            "name": name,
            "labels": {
                "topology.kubernetes.io/region": region,
                "cluster": cluster,
                "nvidia.com/gpu.clique": clique,
                "nvidia.com/gpu.product": product,
            },
        },
        "spec": spec,
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64"},
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def budget_obj(namespace: str, owner: str, concurrency: int = 16) -> dict[str, Any]:
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Budget",
        "metadata": {"name": "b", "namespace": namespace},
        "spec": {
            "owner": owner,
            "envelopes": [
                {
                    "name": "e",
                    "flavor": "H100",
                    "selector": {"region": "r"},
                    "concurrency": concurrency,
                    "start": "2026-01-01T00:00:00Z",
                    "end": "2027-01-01T00:00:00Z",
                }
            ],
        },
    }


def run_obj(
    namespace: str,
    name: str,
    gpus: int,
    *,
    width: int | None = None,
    gpus_per_pod: int = 1,
    failure_policy: str = "Fail",
    extra_spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gang Run with one role of ``width`` pods (``gpus / gpus_per_pod`` by default)."""
    width = width or gpus // gpus_per_pod
    return {
        "apiVersion": "rq.davidlangworthy.io/v1",
        "kind": "Run",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "resources": {"gpuType": "H100", "totalGPUs": gpus},
            "locality": {"allowCrossGroupSpread": False},
            "roles": [
                {
                    "name": "trainer",
                    "width": width,
                    "gpusPerPod": gpus_per_pod,
                    "failurePolicy": failure_policy,
                    "template": {
                        "metadata": {"labels": {"team": "rai"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "workload",
                                    "image": "trainer:1",
                                    "args": ["--epochs", "3"],
                                }
                            ]
                        },
                    },
                }
            ],
            **(extra_spec or {}),
        },
    }
