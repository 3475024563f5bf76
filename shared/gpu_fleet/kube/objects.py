"""Resource descriptors, the names the bridge writes, and small accessors for object dicts.

Objects stay plain JSON dicts (as the API server sends them): the bridge reads a handful of
fields and writes merge patches, so a typed model would only add a conversion on every event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_fleet.core.model import GROUP

Obj = dict[str, Any]

SCHEDULER_NAME = "gpu-fleet"
FINALIZER = f"{GROUP}/leases"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER_NAME = "gpu-fleet"
GPU_RESOURCE = "nvidia.com/gpu"
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"

# Labels and annotations of the pods the bridge emits (SPEC §A.7) and of applied manifests.
L_RUN = f"{GROUP}/run"
L_ROLE = f"{GROUP}/role"
L_GROUP = f"{GROUP}/group-index"
A_GPUS = f"{GROUP}/gpus"
A_EXPECTED_WIDTH = f"{GROUP}/expected-width"
A_LEASE_REASON = f"{GROUP}/lease-reason"
A_COHORT = f"{GROUP}/cohort"
A_FLAVOR = f"{GROUP}/flavor"
A_RUN_NONCE = f"{GROUP}/run-nonce"
A_LEASE = f"{GROUP}/lease"
A_SLOTS = f"{GROUP}/slots"
A_NODE = f"{GROUP}/node"
A_UID = f"{GROUP}/uid"
A_GENERATION = f"{GROUP}/generation"
A_RESERVATION = f"{GROUP}/reservation"
A_SWAP_NODE = f"{GROUP}/swap-node"  # a swap pod's required node
A_REPLACES = f"{GROUP}/replaces"  # a swap pod: the member whose hostname and rank it takes
A_ATTEMPT = f"{GROUP}/attempt"  # failurePolicy Retry: which attempt a pod belongs to
NODE_SOURCE_LABEL = "node.source"
NODE_SOURCE = "kubernetes"


@dataclass(frozen=True)
class Resource:
    """One API resource: where it lives and what it is called."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        """The REST path: ``/api/v1/...`` for the core group, ``/apis/<g>/<v>/...`` else."""
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
            if sub:
                base += f"/{sub}"
        return base


NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
PODS = Resource("", "v1", "pods", "Pod", namespaced=True)
SERVICES = Resource("", "v1", "services", "Service", namespaced=True)
RUNS = Resource(GROUP, "v1", "runs", "Run", namespaced=True)
BUDGETS = Resource(GROUP, "v1", "budgets", "Budget", namespaced=True)
CHANNELS = Resource(GROUP, "v1", "notificationchannels", "NotificationChannel", namespaced=True)
GPULEASES = Resource(GROUP, "v1", "gpuleases", "GPULease", namespaced=True)
RESERVATIONS = Resource(GROUP, "v1", "reservations", "Reservation", namespaced=True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
EVENTS = Resource("events.k8s.io", "v1", "events", "Event", namespaced=True)


def meta(obj: Obj) -> dict[str, Any]:
    m = obj.get("metadata")
    return m if isinstance(m, dict) else {}


def name_of(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def namespace_of(obj: Obj) -> str:
    return str(meta(obj).get("namespace") or "")


def key_of(obj: Obj) -> tuple[str, str]:
    return namespace_of(obj), name_of(obj)


def uid_of(obj: Obj) -> str:
    return str(meta(obj).get("uid") or "")


def rv_of(obj: Obj) -> str:
    return str(meta(obj).get("resourceVersion") or "")


def labels_of(obj: Obj) -> dict[str, str]:
    labels = meta(obj).get("labels")
    return labels if isinstance(labels, dict) else {}


def annotations_of(obj: Obj) -> dict[str, str]:
    annotations = meta(obj).get("annotations")
    return annotations if isinstance(annotations, dict) else {}


def is_deleting(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))
