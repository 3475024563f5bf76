"""The Kubernetes bridge: Run and Budget objects in, status mirrors and bound pods out.

The only package that imports ``kubernetes_asyncio`` (an import-linter contract), and only in
``wire``.  Everything else here speaks to a small ``KubeClient`` protocol over plain dicts, so
the reconcile logic runs unchanged against the wire client, the in-memory fake and the emulator
(``gpu_fleet.kubesim``, which production code never imports).  The bridge talks to the fleet only
over NATS: it follows the ledger (the one truth) and sends fleet API commands.

This package must never hold state of its own that the ledger does not have: Kubernetes objects
are inputs and mirrors, never a second source of truth.
"""

from gpu_fleet.kube.bridge import BridgeConfig, KubeBridge
from gpu_fleet.kube.client import KubeClient
from gpu_fleet.kube.informer import Informer
from gpu_fleet.kube.leader import LeaderSettings
from gpu_fleet.kube.nodes import LabelMapping
from gpu_fleet.kube.settings import add_arguments, connection, leader, mapping
from gpu_fleet.kube.wire import Connection

__all__ = [
    "BridgeConfig",
    "Connection",
    "Informer",
    "KubeBridge",
    "KubeClient",
    "LabelMapping",
    "LeaderSettings",
    "add_arguments",
    "connection",
    "leader",
    "mapping",
]
