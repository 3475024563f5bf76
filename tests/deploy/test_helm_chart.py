"""The Helm chart, rendered offline by the real Helm library (helm-python-sdk), asserted as data.

No cluster and no ``helm`` binary: ``Chart.render`` runs Helm's engine (values coalescing,
values.schema.json validation, templates) and we parse the manifests it returns.
"""

from __future__ import annotations

import importlib.util
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from kubernetes_asyncio.client import models as k8s_models

from gpu_fleet.core.manifests import parse_inventory

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gpu-fleet"
SERVICES = ("manager", "binder", "forecaster", "notifier")
CRD_GROUP = "rq.davidlangworthy.io"
RELEASE, NAMESPACE = "prod", "fleet"
EMBEDDED_URL = f"nats://{RELEASE}-gpu-fleet-nats.{NAMESPACE}.svc:4222"

Manifest = dict[str, Any]


def _load_sync_tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "sync_chart_crds", ROOT / "tools" / "sync_chart_crds.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as ch:
        yield ch


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[Manifest]:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs: list[Manifest] = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(chart: helm.Chart, values: dict[str, Any] | None = None) -> str:
    out = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    return out["gpu-fleet/templates/NOTES.txt"]


def of_kind(docs: list[Manifest], kind: str) -> list[Manifest]:
    return [d for d in docs if d["kind"] == kind]


def deployments(docs: list[Manifest]) -> dict[str, Manifest]:
    """Deployments by component label."""
    return {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in of_kind(docs, "Deployment")
    }


def container(deployment: Manifest) -> Manifest:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def env(deployment: Manifest) -> dict[str, Any]:
    """Env by name: the literal value, or the valueFrom mapping."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(deployment)["env"]}


def k8s_violations(value: Any, type_name: str, path: str = "") -> list[str]:
    """Unknown fields and wrong scalar types, checked against the Kubernetes API models.

    No API server here, so this stands in for its schema validation: a misspelt field
    (``readOnlyRootFileSystem``) or an unquoted number where a string belongs (an env value)
    is reported with its path.
    """
    if type_name == "object":
        return []
    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected list"]
        inner = type_name[5:-1]
        return [
            v for i, item in enumerate(value) for v in k8s_violations(item, inner, f"{path}[{i}]")
        ]
    if type_name.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{path}: expected mapping"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [v for k, item in value.items() for v in k8s_violations(item, inner, f"{path}.{k}")]
    scalars: dict[str, tuple[type, ...]] = {
        "str": (str,),
        "datetime": (str,),
        "int": (int,),
        "float": (int, float),
        "bool": (bool,),
    }
    if type_name in scalars:
        ok = isinstance(value, scalars[type_name])
        if type_name in ("int", "float") and isinstance(value, bool):
            ok = False
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    model = getattr(k8s_models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected {type_name} mapping"]
    by_json = {json_key: attr for attr, json_key in model.attribute_map.items()}
    out: list[str] = []
    for key, item in value.items():
        if key not in by_json:
            out.append(f"{path}.{key}: unknown field of {type_name}")
        else:
            out.extend(k8s_violations(item, model.openapi_types[by_json[key]], f"{path}.{key}"))
    return out


def test_k8s_violations_catches_typos_and_unquoted_values() -> None:
    bad = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {"a": 1}},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "env": [{"name": "N", "value": 1}],
                    "securityContext": {"readOnlyRootFileSystem": True},
                }
            ]
        },
    }
    assert sorted(k8s_violations(bad, "V1Pod")) == [
        ".metadata.labels.a: expected str, got 1",
        ".spec.containers[0].env[0].value: expected str, got 1",
        ".spec.containers[0].securityContext.readOnlyRootFileSystem: unknown field of "
        "V1SecurityContext",
    ]


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"nats": {"enabled": False, "urlSecret": {"name": "creds"}}},
        {
            "inventory": yaml.safe_load((ROOT / "examples" / "inventory.yaml").read_text()),
            "manager": {"replicas": 2, "livenessProbe": {"exec": {"command": ["true"]}}},
            "imagePullSecrets": [{"name": "regcred"}],
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "podAnnotations": {"team": "infra"},
            "liveMap": {"enabled": True},
        },
    ],
    ids=["defaults", "external-nats", "everything-set"],
)
def test_every_manifest_matches_the_kubernetes_api(
    chart: helm.Chart, values: dict[str, Any]
) -> None:
    docs = render(chart, values)
    assert docs
    problems = []
    for doc in docs:
        group_version = doc["apiVersion"].rsplit("/", 1)[-1]
        model = f"{group_version.capitalize()}{doc['kind']}"
        problems += [
            f"{doc['kind']}/{doc['metadata']['name']}{p}" for p in k8s_violations(doc, model)
        ]
    assert problems == []


def test_install_dry_run_through_helm(chart: helm.Chart) -> None:
    """The install action (hooks, ordering, release manifest), without a cluster."""
    cfg = helm.Config(kube_apiserver="http://127.0.0.1:1", storage_driver="memory")
    release = cfg.install(chart, RELEASE, {}, namespace=NAMESPACE, dry_run="client")
    kinds = Counter(d["kind"] for d in yaml.safe_load_all(release["manifest"]) if d)
    assert kinds["Deployment"] == 4
    assert kinds["StatefulSet"] == 1
    assert "fleet.notify" in release["notes"]


# -- lint and defaults ---------------------------------------------------------------------------


def test_lint_strict_has_no_errors_or_warnings() -> None:
    report = helm.lint(CHART, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_strict_external_nats_mode() -> None:
    values = {"nats": {"enabled": False, "url": "nats://nats.nats.svc:4222"}}
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []


def test_chart_metadata(chart: helm.Chart) -> None:
    meta = chart.metadata
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == "0.1.0"
    chart.validate_schema(chart.values)


def test_four_deployments_one_image_with_their_console_scripts(chart: helm.Chart) -> None:
    deps = deployments(render(chart))
    assert set(deps) == set(SERVICES)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    images = set()
    for name, dep in deps.items():
        c = container(dep)
        assert dep["metadata"]["name"] == f"{RELEASE}-gpu-fleet-{name}"
        assert dep["metadata"]["namespace"] == NAMESPACE
        assert c["command"] == [f"gpu-fleet-{name}"]
        assert c["command"][0] in scripts, "the command must be a console script of the package"
        e = env(dep)
        assert e["GPU_FLEET_NATS_URL"] == EMBEDDED_URL
        assert e["GPU_FLEET_LOG_LEVEL"] == "info"
        assert all(isinstance(v, str | dict) for v in e.values()), "env values must be strings"
        images.add(c["image"])
        # selector must select the pod template
        selector = dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
        assert dep["spec"]["replicas"] == 1
    assert images == {"gpu-fleet:0.1.0"}  # tag defaults to appVersion


def test_manager_settings_are_wired_to_env(chart: helm.Chart) -> None:
    dep = deployments(
        render(
            chart, {"manager": {"tick": "2s", "activationLead": "20m", "accountingPeriod": "12h"}}
        )
    )["manager"]
    e = env(dep)
    assert e["GPU_FLEET_TICK"] == "2s"
    assert e["GPU_FLEET_ACTIVATION_LEAD"] == "20m"
    assert e["GPU_FLEET_ACCOUNTING_PERIOD"] == "12h"
    assert e["GPU_FLEET_CLOCK"] == "wall"
    assert "GPU_FLEET_INVENTORY" not in e  # no inventory by default
    # the other services get only the common settings
    for name in ("binder", "forecaster", "notifier"):
        assert "GPU_FLEET_TICK" not in env(deployments(render(chart))[name])


def test_api_limits_reach_the_manager_and_bad_ones_are_refused(chart: helm.Chart) -> None:
    """The limits of docs/reliability.md are operator settings: values -> env -> manager flags."""
    defaults = env(deployments(render(chart))["manager"])
    assert defaults["GPU_FLEET_MAX_REQUEST_BYTES"] == "524288"
    assert defaults["GPU_FLEET_PAGE_SIZE"] == "500"
    assert defaults["GPU_FLEET_MAX_OBJECTS_PER_NAMESPACE"] == "10000"
    assert defaults["GPU_FLEET_MAX_PENDING_PER_CLIENT"] == "256"
    limits = {
        "maxRequestBytes": 65536,
        "maxReplyBytes": 262144,
        "pageSize": 50,
        "maxObjectBytes": 32768,
        "maxObjectsPerNamespace": 100,
        "maxPendingPerClient": 16,
    }
    e = env(deployments(render(chart, {"manager": {"apiLimits": limits}}))["manager"])
    assert (
        e["GPU_FLEET_MAX_REQUEST_BYTES"],
        e["GPU_FLEET_MAX_REPLY_BYTES"],
        e["GPU_FLEET_PAGE_SIZE"],
        e["GPU_FLEET_MAX_OBJECT_BYTES"],
        e["GPU_FLEET_MAX_OBJECTS_PER_NAMESPACE"],
        e["GPU_FLEET_MAX_PENDING_PER_CLIENT"],
    ) == ("65536", "262144", "50", "32768", "100", "16")
    with pytest.raises(Exception, match="pageSize"):
        render(chart, {"manager": {"apiLimits": {**limits, "pageSize": 0}}})
    with pytest.raises(Exception, match="maxPendingPerClient"):
        render(chart, {"manager": {"apiLimits": {**limits, "maxPendingPerClient": 0}}})


# -- NATS wiring ---------------------------------------------------------------------------------


def test_embedded_nats_statefulset_with_jetstream_and_pvc(chart: helm.Chart) -> None:
    docs = render(chart)
    (sts,) = of_kind(docs, "StatefulSet")
    assert sts["metadata"]["name"] == f"{RELEASE}-gpu-fleet-nats"
    c = container(sts)
    assert "--jetstream" in c["args"]
    store = c["args"][c["args"].index("--store_dir") + 1]
    assert {"name": "data", "mountPath": store} in c["volumeMounts"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    client = services[f"{RELEASE}-gpu-fleet-nats"]
    assert {p["port"] for p in client["spec"]["ports"]} >= {4222}
    assert (
        client["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    )
    assert sts["spec"]["serviceName"] in services
    # the services' URL names the client Service
    host = re.match(r"nats://([^.:]+)\.", EMBEDDED_URL)
    assert host is not None
    assert host.group(1) == client["metadata"]["name"]


def test_three_nats_servers_routed_with_streams_at_three_replicas(chart: helm.Chart) -> None:
    """nats.replicas=3: a routed JetStream cluster; services get every server and 3 copies."""
    docs = render(chart, {"nats": {"replicas": 3}})
    (sts,) = of_kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 3
    args = container(sts)["args"]
    name = sts["metadata"]["name"]
    headless = f"{name}-headless.{NAMESPACE}.svc"
    routes = args[args.index("--routes") + 1].split(",")
    assert routes == [f"nats://{name}-{i}.{headless}:6222" for i in range(3)]
    assert args[args.index("--cluster") + 1] == "nats://0.0.0.0:6222"
    assert {"name": "cluster", "containerPort": 6222} in container(sts)["ports"]
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    assert sts["spec"]["serviceName"] == f"{name}-headless"
    assert 6222 in {p["port"] for p in services[f"{name}-headless"]["spec"]["ports"]}
    for dep in deployments(docs).values():
        variables = env(dep)
        assert variables["GPU_FLEET_NATS_URL"].split(",") == [
            f"nats://{name}-{i}.{headless}:4222" for i in range(3)
        ]
        assert variables["GPU_FLEET_STREAM_REPLICAS"] == "3"
    # One server by default: one URL, one copy, no routes.
    docs = render(chart)
    (sts,) = of_kind(docs, "StatefulSet")
    assert "--routes" not in container(sts)["args"]
    for dep in deployments(docs).values():
        assert env(dep)["GPU_FLEET_STREAM_REPLICAS"] == "1"
    external = render(
        chart, {"nats": {"enabled": False, "url": "nats://x:4222", "streamReplicas": 3}}
    )
    for dep in deployments(external).values():
        assert env(dep)["GPU_FLEET_STREAM_REPLICAS"] == "3"
    with pytest.raises(Exception, match="replicas"):
        render(chart, {"nats": {"replicas": 2}})


def test_storage_class_override(chart: helm.Chart) -> None:
    docs = render(
        chart, {"nats": {"jetstream": {"storage": {"storageClassName": "fast", "size": "50Gi"}}}}
    )
    (sts,) = of_kind(docs, "StatefulSet")
    spec = sts["spec"]["volumeClaimTemplates"][0]["spec"]
    assert spec["storageClassName"] == "fast"
    assert spec["resources"]["requests"]["storage"] == "50Gi"


def test_external_nats_url(chart: helm.Chart) -> None:
    url = "nats://nats.messaging.svc.cluster.local:4222"
    docs = render(chart, {"nats": {"enabled": False, "url": url}})
    assert of_kind(docs, "StatefulSet") == []
    assert [s for s in of_kind(docs, "Service") if "nats" in s["metadata"]["name"]] == []
    for dep in deployments(docs).values():
        assert env(dep)["GPU_FLEET_NATS_URL"] == url
    assert url in notes(chart, {"nats": {"enabled": False, "url": url}})


def test_external_nats_url_from_secret(chart: helm.Chart) -> None:
    docs = render(
        chart, {"nats": {"enabled": False, "urlSecret": {"name": "nats-creds", "key": "uri"}}}
    )
    for dep in deployments(docs).values():
        assert env(dep)["GPU_FLEET_NATS_URL"] == {
            "secretKeyRef": {"name": "nats-creds", "key": "uri"}
        }


def test_external_nats_requires_a_url(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="nats"):
        render(chart, {"nats": {"enabled": False}})


def test_embedded_nats_and_url_together_is_an_error(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"nats\.enabled=false"):
        render(chart, {"nats": {"url": "nats://elsewhere:4222"}})


# -- shutdown, security, RBAC -------------------------------------------------------------------


def test_termination_grace_covers_the_10s_drain(chart: helm.Chart) -> None:
    for dep in deployments(render(chart)).values():
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 30
    docs = render(chart, {"terminationGracePeriodSeconds": 45})
    for dep in deployments(docs).values():
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 45
    with pytest.raises(helm.HelmValuesError, match="terminationGracePeriodSeconds"):
        render(chart, {"terminationGracePeriodSeconds": 5})


def test_every_workload_runs_non_root_without_privilege_escalation(chart: helm.Chart) -> None:
    docs = render(chart)
    workloads = of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet")
    assert len(workloads) == 5
    for w in workloads:
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]


def test_pod_user_matches_the_image_user(chart: helm.Chart) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"^ARG UID=(\d+)$", dockerfile, re.MULTILINE)
    assert uid is not None
    assert re.search(r"^USER \$\{UID\}", dockerfile, re.MULTILINE)
    for dep in deployments(render(chart)).values():
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))


def _rules(docs: list[Manifest]) -> list[Manifest]:
    (role,) = of_kind(docs, "ClusterRole")
    rules: list[Manifest] = role["rules"]
    return rules


def _allows(rules: list[Manifest], group: str, resource: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules
    )


def test_rbac_is_exactly_what_the_kubernetes_bridge_touches(chart: helm.Chart) -> None:
    rules = _rules(render(chart))
    granted = {
        (group, resource, verb)
        for r in rules
        for group in r["apiGroups"]
        for resource in r["resources"]
        for verb in r["verbs"]
    }
    want = {("", "nodes", v) for v in ("get", "list", "watch")}
    want |= {("", "pods", v) for v in ("get", "list", "watch", "create", "delete")}
    want |= {("", "pods/binding", "create"), ("", "services", "get"), ("", "services", "create")}
    for plural in ("runs", "budgets"):
        want |= {(CRD_GROUP, plural, v) for v in ("get", "list", "watch", "patch")}
        want |= {(CRD_GROUP, f"{plural}/status", v) for v in ("get", "patch")}
    want.add((CRD_GROUP, "runs/finalizers", "update"))
    want |= {(CRD_GROUP, "notificationchannels", v) for v in ("get", "list", "watch")}
    for plural in ("gpuleases", "reservations"):
        want |= {(CRD_GROUP, plural, v) for v in ("get", "list", "watch", "create", "delete")}
        want.add((CRD_GROUP, f"{plural}/status", "patch"))
    want.add(("events.k8s.io", "events", "create"))
    assert granted == want


def test_the_bridge_runs_in_cluster_with_the_label_mapping_from_values(chart: helm.Chart) -> None:
    from gpu_fleet.kube.settings import mapping  # noqa: PLC0415 - the services' own parser

    values = {
        "kubernetes": {
            "clusterName": "west",
            "labelSources": {"fabric.domain": ["topology.k8s.aws/network-node-layer-3"]},
            "flavorAliases": {"Tesla-X": "X"},
        }
    }
    deps = deployments(render(chart, values))
    for component in ("manager", "binder"):
        env = {e["name"]: e.get("value") for e in container(deps[component])["env"]}
        assert env["GPU_FLEET_KUBE_IN_CLUSTER"] == "true"
        m = mapping(env["GPU_FLEET_KUBE_MAPPING"])
        assert m.cluster_name == "west"
        assert m.sources["fabric.domain"] == ("topology.k8s.aws/network-node-layer-3",)
        assert m.flavor_aliases["Tesla-X"] == "X"
    for component in ("forecaster", "notifier"):
        names = {e["name"] for e in container(deps[component])["env"]}
        assert "GPU_FLEET_KUBE_IN_CLUSTER" not in names
    off = render(chart, {"kubernetes": {"enabled": False}})
    assert of_kind(off, "ClusterRole") == []
    env = {e["name"] for e in container(deployments(off)["manager"])["env"]}
    assert "GPU_FLEET_KUBE_IN_CLUSTER" not in env


def test_leader_election_env_and_a_namespaced_role_for_leases(chart: helm.Chart) -> None:
    import argparse  # noqa: PLC0415 - the services' own flag parser

    from gpu_fleet.kube.settings import add_arguments, leader  # noqa: PLC0415

    docs = render(chart)
    (role,) = of_kind(docs, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "create", "patch"],
        }
    ]
    (binding,) = of_kind(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    for component in ("manager", "binder"):
        values = {e["name"]: e.get("value") for e in container(deployments(docs)[component])["env"]}
        p = argparse.ArgumentParser()
        add_arguments(p, env={k: v for k, v in values.items() if isinstance(v, str)})
        got = leader(p.parse_args([]))
        assert got is not None
        assert got.namespace == NAMESPACE
        assert (got.lease_seconds, got.renew_seconds, got.retry_seconds) == (15, 10, 2)
    off = render(chart, {"kubernetes": {"leaderElection": {"enabled": False}}})
    assert of_kind(off, "Role") == []
    names = {e["name"] for e in container(deployments(off)["manager"])["env"]}
    assert "GPU_FLEET_KUBE_LEADER_ELECT" not in names


def test_rbac_binds_the_service_account_the_pods_use(chart: helm.Chart) -> None:
    docs = render(chart)
    (sa,) = of_kind(docs, "ServiceAccount")
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    (role,) = of_kind(docs, "ClusterRole")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}
    ]
    for dep in deployments(docs).values():
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_rbac_and_service_account_can_be_turned_off(chart: helm.Chart) -> None:
    docs = render(
        chart, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}}
    )
    assert of_kind(docs, "ClusterRole") == []
    assert of_kind(docs, "ServiceAccount") == []
    for dep in deployments(docs).values():
        assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# -- overrides -----------------------------------------------------------------------------------


def test_overrides_replicas_image_and_log_level(chart: helm.Chart) -> None:
    docs = render(
        chart,
        {
            "image": {
                "repository": "registry.example.com/gpu-fleet",
                "tag": "v9",
                "pullPolicy": "Always",
            },
            "logLevel": "warning",
            "manager": {"replicas": 2},
            "binder": {"replicas": 3, "logLevel": "debug"},
        },
    )
    deps = deployments(docs)
    assert deps["manager"]["spec"]["replicas"] == 2
    assert deps["binder"]["spec"]["replicas"] == 3
    assert deps["forecaster"]["spec"]["replicas"] == 1
    for dep in deps.values():
        assert container(dep)["image"] == "registry.example.com/gpu-fleet:v9"
        assert container(dep)["imagePullPolicy"] == "Always"
    assert env(deps["binder"])["GPU_FLEET_LOG_LEVEL"] == "debug"
    assert env(deps["notifier"])["GPU_FLEET_LOG_LEVEL"] == "warning"


def test_resources_and_extra_env(chart: helm.Chart) -> None:
    docs = render(
        chart,
        {
            "binder": {
                "resources": {"requests": {"cpu": "2"}, "limits": {"memory": "4Gi"}},
                "extraEnv": [{"name": "OMP_NUM_THREADS", "value": "2"}],
            }
        },
    )
    binder = deployments(docs)["binder"]
    # Helm deep-merges values: the default memory request stays unless overridden too.
    assert container(binder)["resources"] == {
        "requests": {"cpu": "2", "memory": "512Mi"},
        "limits": {"memory": "4Gi"},
    }
    assert env(binder)["OMP_NUM_THREADS"] == "2"


def test_probes_are_on_by_default_and_overridable(chart: helm.Chart) -> None:
    """/healthz and /readyz on the metrics port by default; a service's own probe wins."""
    for dep in deployments(render(chart)).values():
        c = container(dep)
        assert c["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["livenessProbe"]["failureThreshold"] * c["livenessProbe"]["periodSeconds"] >= 60
        assert env(dep)["GPU_FLEET_METRICS_PORT"] == "9100"
        assert env(dep)["GPU_FLEET_READY_MAX_LAG"] == "1000"
    probe = {"exec": {"command": ["true"]}, "periodSeconds": 30}
    deps = deployments(render(chart, {"notifier": {"livenessProbe": probe}}))
    assert container(deps["notifier"])["livenessProbe"] == probe
    assert container(deps["notifier"])["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for dep in deployments(render(chart, {"probes": {"enabled": False}})).values():
        assert "livenessProbe" not in container(dep)
        assert "readinessProbe" not in container(dep)
        assert container(dep)["ports"][0]["name"] == "metrics"


def test_metrics_port_zero_turns_http_probes_and_services_off(chart: helm.Chart) -> None:
    docs = render(chart, {"metrics": {"port": 0, "serviceMonitor": {"enabled": True}}})
    for dep in deployments(docs).values():
        c = container(dep)
        assert "ports" not in c
        assert "livenessProbe" not in c
        assert env(dep)["GPU_FLEET_METRICS_PORT"] == "0"
    assert [s for s in of_kind(docs, "Service") if "metrics" in s["metadata"]["name"]] == []
    assert of_kind(docs, "ServiceMonitor") == []


def _metrics_services(docs: list[Manifest]) -> dict[str, Manifest]:
    return {
        s["metadata"]["labels"]["app.kubernetes.io/component"]: s
        for s in of_kind(docs, "Service")
        if s["metadata"]["name"].endswith("-metrics")
    }


def test_a_metrics_service_per_component_selects_its_pods(chart: helm.Chart) -> None:
    docs = render(chart)
    services = _metrics_services(docs)
    deps = deployments(docs)
    assert set(services) == set(SERVICES)
    for name, svc in services.items():
        assert svc["metadata"]["name"] == f"{RELEASE}-gpu-fleet-{name}-metrics"
        pod_labels = deps[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        for other, dep in deps.items():
            if other != name:
                labels = dep["spec"]["template"]["metadata"]["labels"]
                assert not svc["spec"]["selector"].items() <= labels.items()
        (port,) = svc["spec"]["ports"]
        assert port == {"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}
    assert of_kind(docs, "ServiceMonitor") == [], "off by default: needs the operator's CRD"


def test_service_monitor_scrapes_every_metrics_service(chart: helm.Chart) -> None:
    values = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kps"}}}}
    docs = render(chart, values)
    (sm,) = of_kind(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kps"
    selector = sm["spec"]["selector"]["matchLabels"]
    chosen = [
        s for s in of_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()
    ]
    assert sorted(s["metadata"]["name"] for s in chosen) == sorted(
        s["metadata"]["name"] for s in _metrics_services(docs).values()
    )
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
    }


def _promql_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(gpu_fleet_[a-z0-9_]+)", expr))


def test_grafana_dashboard_configmap_for_the_sidecar(chart: helm.Chart) -> None:
    from gpu_fleet.views.metrics import METRICS  # noqa: PLC0415 - only this test needs it

    docs = render(chart)
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = cm["data"]["gpu-fleet.json"]
    source = (CHART / "dashboards" / "gpu-fleet.json").read_text()
    assert json.loads(text) == json.loads(source)
    dashboard = json.loads(text)
    assert dashboard["uid"] == "gpu-fleet"
    known: set[str] = set()
    for m in METRICS:
        known.add(m.name)
        if m.kind == "histogram":
            known |= {f"{m.name}_bucket", f"{m.name}_count", f"{m.name}_sum"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = set().union(*(_promql_metrics(e) for e in exprs))
    assert used <= known, f"the dashboard queries metrics nobody exports: {used - known}"
    titles = {p["title"] for p in dashboard["panels"]}
    for needed in ("GPUs by funding class", "Envelope use against concurrency",
                   "GPU-hours used and remaining", "Pending reservations",
                   "Reservations kept (started by earliestStart)", "Admissions by outcome",
                   "Submit latency (fleet.api.apply)",
                   "Forecast hit rate at start (P50 ~50 %, P90 ~90 %)",
                   "Forecast error at start (median, by quantile)",
                   "Reservation wait (runs that queued)"):  # fmt: skip
        assert needed in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Forecast accuracy and the queue's waits are on it (issue 14).
    for name in ("gpu_fleet_forecast_starts_total", "gpu_fleet_forecast_error_seconds_bucket",
                 "gpu_fleet_reservation_wait_seconds_bucket"):  # fmt: skip
        assert name in used
    moved = render(
        chart, {"metrics": {"dashboard": {"namespace": "monitoring", "labels": {"dash": "y"}}}}
    )
    (cm,) = [c for c in of_kind(moved, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["dash"] == "y"
    off = render(chart, {"metrics": {"dashboard": {"enabled": False}}})
    assert [c for c in of_kind(off, "ConfigMap") if "dashboard" in c["metadata"]["name"]] == []


def test_live_map_is_off_by_default_and_serves_the_page_when_on(chart: helm.Chart) -> None:
    """``liveMap.enabled``: ``gpu-fleet map`` against the release's NATS, behind a Service."""
    assert "map" not in deployments(render(chart))
    docs = render(chart, {"liveMap": {"enabled": True, "refreshSeconds": 10}})
    dep = deployments(docs)["map"]
    c = container(dep)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert c["command"][0] in scripts
    assert c["command"] == [
        *("gpu-fleet", "map", "--host", "0.0.0.0"),
        *("--port", "9100", "--refresh", "10"),
    ]
    assert env(dep)["GPU_FLEET_NATS_URL"] == EMBEDDED_URL
    # Authorization is on by default: the map logs in as the operator (it shows every team).
    assert env(dep)["GPU_FLEET_NATS_USER"] == "admin"
    (password,) = [e for e in c["env"] if e["name"] == "GPU_FLEET_NATS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"]["key"] == "admin-password"
    assert c["ports"] == [{"name": "http", "containerPort": 9100, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    (svc,) = [s for s in of_kind(docs, "Service") if s["metadata"]["name"].endswith("-map")]
    assert svc["metadata"]["name"] == f"{RELEASE}-gpu-fleet-map"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_inventory_configmap_is_mounted_into_the_manager(chart: helm.Chart) -> None:
    inventory = yaml.safe_load((ROOT / "examples" / "inventory.yaml").read_text())
    docs = render(chart, {"inventory": inventory})
    (cm,) = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-inventory")]
    nodes = parse_inventory(cm["data"]["inventory.yaml"], source="configmap")
    assert [n.name for n in nodes] == [n["name"] for n in inventory["nodes"]]
    manager = deployments(docs)["manager"]
    path = env(manager)["GPU_FLEET_INVENTORY"]
    mount = next(m for m in container(manager)["volumeMounts"] if m["name"] == "inventory")
    assert path == f"{mount['mountPath']}/inventory.yaml"
    volume = next(
        v for v in manager["spec"]["template"]["spec"]["volumes"] if v["name"] == "inventory"
    )
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    assert "checksum/inventory" in manager["spec"]["template"]["metadata"]["annotations"]
    assert "GPU_FLEET_INVENTORY" not in env(deployments(docs)["binder"])
    names = [c["metadata"]["name"] for c in of_kind(render(chart), "ConfigMap")]
    assert [n for n in names if n.endswith("-inventory")] == []


# -- schema ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"manager": {"replicas": "two"}}, "/manager/replicas"),
        ({"binder": {"replicas": -1}}, "/binder/replicas"),
        ({"manager": {"activationLead": "soon"}}, "/manager/activationLead"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"logLevel": "loud"}, "/logLevel"),
        ({"nats": {"enabled": False, "url": "http://nats:4222"}}, "/nats/url"),
        ({"replica": 2}, "replica"),
        ({"metrics": {"port": "9100"}}, "/metrics/port"),
        ({"liveMap": {"port": 0}}, "/liveMap/port"),
        ({"liveMap": {"refreshSeconds": 0}}, "/liveMap/refreshSeconds"),
        ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "serviceMonitor/interval"),
        ({"probes": {"liveness": {"periodSeconds": 0}}}, "/probes/liveness/periodSeconds"),
        (
            {"inventory": {"nodes": [{"name": "a1", "gpus": 8, "labels": {"region": "r"}}]}},
            "labels",
        ),
    ],
)
def test_schema_rejects_bad_values(chart: helm.Chart, values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
        render(chart, values)


def test_notes_explain_notifications_and_kubectl_runs(chart: helm.Chart) -> None:
    text = notes(chart)
    assert "nats --server" in text
    assert "sub 'fleet.notify.<team>.>'" in text
    assert "kubectl runs plan" in text
    assert f"port-forward svc/{RELEASE}-gpu-fleet-nats 4222:4222" in text


def test_notes_say_how_to_log_in_find_the_live_map_and_the_cluster(chart: helm.Chart) -> None:
    text = notes(chart)  # authorization on by default
    assert "export GPU_FLEET_NATS_USER=admin" in text
    secret = f"{RELEASE}-gpu-fleet-nats-auth"
    assert f"get secret {secret} -o jsonpath='{{.data.admin-password}}'" in text
    assert "live fleet map" not in text
    text = notes(chart, {"liveMap": {"enabled": True}, "nats": {"replicas": 3}})
    assert f"port-forward svc/{RELEASE}-gpu-fleet-map 9100:80" in text
    assert "3 routed servers" in text
    assert "GPU_FLEET_NATS_USER" not in notes(chart, {"auth": {"enabled": False}})


# -- CRDs ----------------------------------------------------------------------------------------


def test_chart_ships_the_generated_crds_unchanged(chart: helm.Chart) -> None:
    tool = _load_sync_tool()
    source = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    if not source and not list((CHART / "crds").glob("*.yaml")):
        pytest.fail("crds/ is empty: run python tools/gen_crds.py")
    assert tool.differences() == [], "chart CRDs are stale: run python tools/sync_chart_crds.py"
    shipped = sorted(Path(c["name"]).name for c in chart.crds)
    assert shipped == source
    for crd in chart.crds:
        doc = yaml.safe_load(crd["data"])
        assert doc["kind"] == "CustomResourceDefinition"
        assert doc["spec"]["group"] == CRD_GROUP


def test_sync_tool_copies_and_detects_drift(tmp_path: Path) -> None:
    tool = _load_sync_tool()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "runs.yaml").write_text("kind: CustomResourceDefinition\n")
    assert tool.differences(src, dst) == ["missing in chart: runs.yaml"]
    assert tool.main(["--check", "--source", str(src), "--target", str(dst)]) == 1
    tool.sync(src, dst)
    assert tool.differences(src, dst) == []
    (dst / "runs.yaml").write_text("edited\n")
    (dst / "old.yaml").write_text("kind: Gone\n")
    assert tool.differences(src, dst) == [
        "stale in chart (no source): old.yaml",
        "differs: runs.yaml",
    ]
    assert tool.main(["--source", str(src), "--target", str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["runs.yaml"]
    assert tool.main(["--check", "--source", str(src), "--target", str(dst)]) == 0
