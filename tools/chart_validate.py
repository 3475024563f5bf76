"""Render the Helm chart offline and check every object against Kubernetes' own schemas.

Usage::

    python tools/chart_validate.py                      # every value set, the newest schemas
    python tools/chart_validate.py --kube-version 1.30.0

Helm renders through helm-python-sdk (the real Helm Go SDK, no binary, no cluster; TOOLING §3);
kubernetes-validate holds the OpenAPI schemas of each Kubernetes release and checks in strict
mode, so an unknown field (a typo such as ``portz``), a wrong type or a missing required field
fails here instead of at ``helm install``.  The CRDs the chart ships are checked too (as
``CustomResourceDefinition`` objects).  Each value set below switches a part of the chart on or
off, so every template branch is rendered at least once.

Exit status: 0 when every object is valid, 1 otherwise (each problem printed with its object,
field path and reason).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate as kv
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "gpu-fleet"
RELEASE = "fleet"
NAMESPACE = "gpu-fleet"

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "bridge off": {"kubernetes": {"enabled": False}},
    "no leader election": {"kubernetes": {"leaderElection": {"enabled": False}}},
    "live map, teams, signed ledger, TLS": {
        "liveMap": {"enabled": True},
        "auth": {"teams": ["vision"], "ledgerKeysSecret": "ledger-keys"},
        "tls": {"enabled": True, "secretName": "nats-tls", "verifyClients": True},
    },
    "no rbac, own service account": {
        "rbac": {"create": False},
        "serviceAccount": {"create": False, "name": "ops"},
    },
    "external nats, inventory, service monitor, no probes": {
        "nats": {"enabled": False, "url": "nats://nats.nats.svc:4222"},
        "inventory": {
            "nodes": [
                {
                    "name": "a1",
                    "gpus": 8,
                    "labels": {
                        "region": "r",
                        "cluster": "c",
                        "fabric.domain": "A",
                        "gpu.flavor": "H100",
                    },
                }
            ]
        },
        "metrics": {"serviceMonitor": {"enabled": True}},
        "probes": {"enabled": False},
    },
}

# Kinds outside the Kubernetes API that a value set may render; kubernetes-validate has no
# schema for them, so they are counted as not checked rather than failed.
FOREIGN = {("monitoring.coreos.com/v1", "ServiceMonitor")}

Manifest = dict[str, Any]


def rendered(values: dict[str, Any], chart: Any = None) -> list[Manifest]:
    """Every object the chart renders with ``values`` (templates, then the shipped CRDs)."""
    ch = chart if chart is not None else helm.Chart.load(str(CHART))
    docs: list[Manifest] = []
    for path, text in sorted(ch.render(values, name=RELEASE, namespace=NAMESPACE).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    for crd in ch.crds:
        docs.extend(d for d in yaml.safe_load_all(crd["data"]) if d)
    return docs


def label(obj: Manifest) -> str:
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind', '?')}/{meta.get('name', '?')}"


def problems(objs: list[Manifest], version: str) -> list[str]:
    """One line per invalid object: which object, which field, why."""
    out = []
    for obj in objs:
        if (obj.get("apiVersion"), obj.get("kind")) in FOREIGN:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path) or "<object>"
            out.append(f"{label(obj)}: {path}: {exc.message}")
        except kv.SchemaNotFoundError:
            out.append(f"{label(obj)}: no schema for {obj.get('apiVersion')} {obj.get('kind')}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--kube-version",
        default=kv.latest_version(),
        help="Kubernetes release whose schemas to use (default: the newest known)",
    )
    args = ap.parse_args(argv)
    chart = helm.Chart.load(str(CHART))
    bad = 0
    for name, values in VALUE_SETS.items():
        objs = rendered(values, chart)
        found = problems(objs, args.kube_version)
        for line in found:
            print(f"{name}: {line}", file=sys.stderr)
        bad += len(found)
        kinds = sorted({str(o.get("kind")) for o in objs})
        foreign = sum((o.get("apiVersion"), o.get("kind")) in FOREIGN for o in objs)
        print(
            f"{name}: {len(objs)} objects ({', '.join(kinds)}), {len(found)} invalid,"
            f" {foreign} outside the Kubernetes API not checked"
        )
    print(f"Kubernetes {args.kube_version} schemas, strict: {'FAILED' if bad else 'all valid'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
