"""The chart's security: NATS users from a Secret, the same permissions as the code, TLS.

The embedded NATS's config is rendered by the real Helm engine and then *run* by the real
nats-server (``-t``: parse and check), with the passwords in its environment as the pod has
them, so a template slip that nats-server would refuse fails here, not in a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import trustme
import yaml

from gpu_fleet.runtime.natsd import find_binary
from gpu_fleet.runtime.permissions import ROLES, role_permissions

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "gpu-fleet"
SECURED = {
    "auth": {"teams": ["org_vision"], "ledgerKeysSecret": "fleet-ledger-keys"},
    "tls": {"enabled": True, "secretName": "fleet-nats-tls", "verifyClients": True},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as ch:
        yield ch


def render(chart: helm.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(values, name="rel", namespace="ns")
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def env_of(docs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    deployment = find(docs, "Deployment", f"rel-gpu-fleet-{component}")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_the_charts_permissions_are_the_codes() -> None:
    """files/permissions.json is what runtime.permissions says (regenerate it if not)."""
    data = json.loads((CHART / "files" / "permissions.json").read_text())
    assert data == {role: role_permissions(role) for role in ROLES}


def test_auth_is_on_by_default_with_a_user_per_service(chart: helm.Chart) -> None:
    docs = render(chart, {})
    secret = find(docs, "Secret", "rel-gpu-fleet-nats-auth")
    assert sorted(secret["data"]) == [f"{r}-password" for r in sorted(ROLES)]
    assert len({*secret["data"].values()}) == len(ROLES)  # random, one each
    for component in ("manager", "binder", "forecaster", "notifier"):
        env = env_of(docs, component)
        assert env["GPU_FLEET_NATS_USER"] == component
        assert env["GPU_FLEET_NATS_PASSWORD"] == {
            "secretKeyRef": {"name": "rel-gpu-fleet-nats-auth", "key": f"{component}-password"}
        }
        assert "GPU_FLEET_LEDGER_KEY" not in env  # no key Secret given: unsigned
    nats = find(docs, "StatefulSet", "rel-gpu-fleet-nats")
    (container,) = nats["spec"]["template"]["spec"]["containers"]
    assert container["args"][-2:] == ["--config", "/etc/nats/nats.conf"]
    assert "MANAGER_PASSWORD" in {e["name"] for e in container["env"]}


def test_only_the_manager_mounts_the_ledgers_private_key(chart: helm.Chart) -> None:
    docs = render(chart, SECURED)
    for component in ("manager", "binder", "forecaster", "notifier"):
        deployment = find(docs, "Deployment", f"rel-gpu-fleet-{component}")
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        keys = [item["key"] for item in volumes["ledger-keys"]["secret"]["items"]]
        env = env_of(docs, component)
        if component == "manager":
            assert keys == ["ledger.key", "ledger.pub"]
            assert env["GPU_FLEET_LEDGER_KEY"] == "/etc/gpu-fleet/ledger/ledger.key"
        else:
            assert keys == ["ledger.pub"]
            assert env["GPU_FLEET_LEDGER_PUBLIC_KEY"] == "/etc/gpu-fleet/ledger/ledger.pub"
        assert env["GPU_FLEET_NATS_TLS_CA"] == "/etc/gpu-fleet/tls/ca.crt"
        assert env["GPU_FLEET_NATS_TLS_CERT"] == "/etc/gpu-fleet/tls/tls.crt"


def test_auth_off_renders_no_users(chart: helm.Chart) -> None:
    docs = render(chart, {"auth": {"enabled": False}})
    assert not [d for d in docs if d["kind"] == "Secret"]
    assert "GPU_FLEET_NATS_USER" not in env_of(docs, "manager")


def test_nats_server_accepts_the_rendered_config(chart: helm.Chart, tmp_path: Path) -> None:
    docs = render(chart, SECURED)
    conf = find(docs, "ConfigMap", "rel-gpu-fleet-nats-config")["data"]["nats.conf"]
    assert '"team-org_vision"' in conf
    assert "fleet.api.team.org_vision.>" in conf
    # The pod's files, made here: the TLS Secret's three files at the mount path's stand-in.
    ca = trustme.CA()
    cert = ca.issue_cert("rel-gpu-fleet-nats.ns.svc")
    tls = tmp_path / "tls"
    tls.mkdir()
    ca.cert_pem.write_to_path(str(tls / "ca.crt"))
    cert.cert_chain_pems[0].write_to_path(str(tls / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tls / "tls.key"))
    path = tmp_path / "nats.conf"
    path.write_text(conf.replace("/etc/nats-tls/", f"{tls}/"))
    env = dict(os.environ)
    env.update({f"{role.upper()}_PASSWORD": f"pw-{role}" for role in ROLES})
    env["TEAM_ORG_VISION_PASSWORD"] = "pw-team"
    done = subprocess.run(
        [find_binary(), "-c", str(path), "-t"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
