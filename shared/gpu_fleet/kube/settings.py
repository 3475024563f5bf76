"""Command-line flags (each with an environment variable) that switch the bridge on.

The manager and the binder both accept them; the bridge runs only when an API server is named:
``--kube-url`` (an emulator, ``kubectl proxy``), ``--kubeconfig`` or ``--in-cluster`` (the
chart's default).  The label mapping comes as JSON (the chart renders it from its values):
``{"clusterName": "c1", "sources": {"fabric.domain": ["nvidia.com/gpu.clique"]},
"flavorAliases": {"NVIDIA-H100-80GB-HBM3": "H100"}}``; keys left out keep their defaults.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

from gpu_fleet.kube.leader import LeaderSettings
from gpu_fleet.kube.nodes import DEFAULT_FLAVOR_ALIASES, DEFAULT_SOURCES, LabelMapping
from gpu_fleet.kube.wire import Connection


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    g = parser.add_argument_group("Kubernetes bridge (off unless an API server is named)")
    g.add_argument("--kube-url", default=env.get("GPU_FLEET_KUBE_URL"), help="API server URL")
    g.add_argument("--kubeconfig", default=env.get("GPU_FLEET_KUBECONFIG"))
    g.add_argument("--kube-context", default=env.get("GPU_FLEET_KUBE_CONTEXT"))
    g.add_argument(
        "--in-cluster",
        action="store_true",
        default=env.get("GPU_FLEET_KUBE_IN_CLUSTER", "").lower() in ("1", "true", "yes"),
        help="use the pod's service account",
    )
    g.add_argument(
        "--kube-leader-elect",
        action="store_true",
        default=env.get("GPU_FLEET_KUBE_LEADER_ELECT", "").lower() in ("1", "true", "yes"),
        help="elect one active bridge half per coordination.k8s.io Lease (several replicas)",
    )
    g.add_argument(
        "--kube-leader-namespace",
        default=env.get("GPU_FLEET_KUBE_LEADER_NAMESPACE", "default"),
        help="namespace of the election Lease",
    )
    g.add_argument(
        "--kube-leader-name",
        default=env.get("GPU_FLEET_KUBE_LEADER_NAME", "gpu-fleet"),
        help="election Lease name prefix (the half is appended: -objects, -pods)",
    )
    g.add_argument(
        "--kube-leader-identity",
        default=env.get("GPU_FLEET_KUBE_LEADER_IDENTITY", ""),
        help="this candidate's identity (default: hostname-pid)",
    )
    for flag, var, default, what in (
        ("lease", "LEASE", "15", "a holder not renewing for this long is presumed dead"),
        ("renew", "RENEW", "10", "the holder gives up (exits) if it cannot renew within this"),
        ("retry", "RETRY", "2", "how often candidates try and the holder renews"),
    ):
        g.add_argument(
            f"--kube-leader-{flag}-seconds",
            default=env.get(f"GPU_FLEET_KUBE_LEADER_{var}_SECONDS", default),
            help=f"seconds: {what}",
        )
    g.add_argument(
        "--kube-mapping",
        default=env.get("GPU_FLEET_KUBE_MAPPING", ""),
        help="node label mapping as JSON (clusterName, sources, flavorAliases)",
    )


def connection(args: argparse.Namespace) -> Connection:
    return Connection(
        url=args.kube_url or None,
        kubeconfig=args.kubeconfig or None,
        context=args.kube_context or None,
        in_cluster=bool(args.in_cluster),
    )


def leader(args: argparse.Namespace) -> LeaderSettings | None:
    """Leader election settings, or None when it is off; ``ValueError`` names a bad field."""
    if not args.kube_leader_elect:
        return None
    seconds = {}
    for flag in ("lease", "renew", "retry"):
        raw = getattr(args, f"kube_leader_{flag}_seconds")
        try:
            seconds[flag] = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"--kube-leader-{flag}-seconds: not a number: {raw!r}") from None
    out = LeaderSettings(
        namespace=args.kube_leader_namespace,
        name=args.kube_leader_name,
        identity=args.kube_leader_identity,
        lease_seconds=seconds["lease"],
        renew_seconds=seconds["renew"],
        retry_seconds=seconds["retry"],
    )
    problems = out.problems()
    if problems:
        raise ValueError("kube leader election: " + "; ".join(problems))
    return out


def mapping(text: str) -> LabelMapping:
    """The label mapping from JSON; ``ValueError`` names what is wrong."""
    if not text.strip():
        return LabelMapping()
    raw: Any = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("kube mapping: expected a JSON object")
    unknown = sorted(set(raw) - {"clusterName", "sources", "flavorAliases"})
    if unknown:
        raise ValueError(f"kube mapping: unknown field(s) {', '.join(unknown)}")
    sources = dict(DEFAULT_SOURCES)
    for key, labels in (raw.get("sources") or {}).items():
        if key not in DEFAULT_SOURCES:
            raise ValueError(f"kube mapping: sources.{key}: not a topology key")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError(f"kube mapping: sources.{key}: expected a list of label names")
        sources[key] = tuple(labels)
    aliases = {**DEFAULT_FLAVOR_ALIASES, **(raw.get("flavorAliases") or {})}
    return LabelMapping(
        sources=sources, cluster_name=str(raw.get("clusterName") or ""), flavor_aliases=aliases
    )
