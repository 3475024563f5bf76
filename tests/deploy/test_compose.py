"""compose.yaml, the Dockerfile and the sample inventory, checked offline (no Docker engine).

* the compose-spec JSON schema vendored by check-jsonschema validates the file's shape;
* a few lines of Python check what the schema cannot: depends_on targets, build context, the
  mounted inventory file (parsed by the real ``parse_inventory``), wiring of every service;
* when Debian's docker-compose v1 happens to be installed, ``docker-compose config -q`` too.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gpu_fleet.cli.main import main
from gpu_fleet.core.manifests import parse_inventory
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.natsd import find_binary
from gpu_fleet.runtime.stack_security import StackSecurity

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
APP_SERVICES = ("manager", "binder", "forecaster", "notifier")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves the `<<:` merge keys
    return doc


def _compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return schema


def _host_path(raw: str) -> Path:
    path = Path(raw)
    return path if path.is_absolute() else ROOT / path


def test_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(_compose_schema())
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """Guard against a vacuous schema: the same checks must reject obvious mistakes."""
    bad = json.loads(json.dumps(compose))
    bad["services"]["binder"]["depends_on"]["nats"]["condition"] = "service_healty"
    bad["services"]["notifier"]["portz"] = ["4222"]
    validator = jsonschema.Draft202012Validator(_compose_schema())
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "service_healty" in messages
    assert "portz" in messages


def test_no_top_level_name_for_docker_compose_v1(compose: dict[str, Any]) -> None:
    assert "name" not in compose


def test_services_and_dependencies_are_defined(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"security", "nats", *APP_SERVICES, "map"}
    for name, svc in services.items():
        for target in svc.get("depends_on", {}):
            assert target in services, f"{name} depends on undefined service {target}"
    for name in (*APP_SERVICES, "map"):
        assert services[name]["depends_on"] == {"nats": {"condition": "service_healthy"}}
    assert "healthcheck" in services["nats"], "service_healthy needs a healthcheck"
    # The security profile is written before NATS reads it (docs/security.md).
    assert services["nats"]["depends_on"] == {
        "security": {"condition": "service_completed_successfully"}
    }


def test_nats_runs_jetstream_on_a_named_volume(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert nats["image"].startswith("nats:2.")
    command = nats["command"]
    assert "-js" in command
    store = command[command.index("-sd") + 1]
    volume, _, mount = nats["volumes"][0].partition(":")
    assert mount == store
    assert volume in compose["volumes"], "the JetStream volume must be a named volume"


def test_one_image_four_services_wired_to_nats(compose: dict[str, Any]) -> None:
    services = compose["services"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    builds, images = set(), set()
    for name in APP_SERVICES:
        svc = services[name]
        builds.add(json.dumps(svc["build"], sort_keys=True))
        images.add(svc["image"])
        assert svc["command"] == [f"gpu-fleet-{name}"]
        assert svc["command"][0] in scripts
        assert svc["environment"]["GPU_FLEET_NATS_URL"] == "nats://nats:4222"
        assert svc["environment"]["GPU_FLEET_LOG_LEVEL"] == "${LOG_LEVEL:-info}"
        grace = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert grace is not None
        assert int(grace.group(1)) > 10, "services drain within 10 s of SIGTERM"
    assert len(builds) == 1
    assert len(images) == 1


def test_metrics_and_the_live_map_are_published_on_the_ports_gpu_fleet_up_uses(
    compose: dict[str, Any],
) -> None:
    """9100 the map, 9101..9104 the services' /metrics (as ``gpu-fleet up``), loopback only."""
    services = compose["services"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for i, name in enumerate(APP_SERVICES, start=1):
        svc = services[name]
        assert svc["environment"]["GPU_FLEET_METRICS_PORT"] == "9100"
        assert svc["ports"] == [f"127.0.0.1:{9100 + i}:9100"]
    live = services["map"]
    assert live["command"][:2] == ["gpu-fleet", "map"]
    assert live["command"][0] in scripts
    assert live["command"][live["command"].index("--port") + 1] == "9100"
    assert live["ports"] == ["127.0.0.1:9100:9100"]
    assert live["image"] == services["manager"]["image"]


def test_build_context_has_the_dockerfile(compose: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        build = compose["services"][name]["build"]
        context = _host_path(build["context"])
        assert context.is_dir()
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()


def test_manager_gets_the_seeded_inventory(compose: dict[str, Any]) -> None:
    manager = compose["services"]["manager"]
    host, container, *_ = manager["volumes"][0].split(":")
    assert manager["environment"]["GPU_FLEET_INVENTORY"] == container
    path = _host_path(host)
    nodes = parse_inventory(path.read_text(), source=str(path))
    # 2 fast-fabric domains x 2 nodes x 8 H100
    assert len(nodes) == 4
    assert all(n.gpus == 8 and n.labels["gpu.flavor"] == "H100" for n in nodes)
    assert Counter(n.labels["fabric.domain"] for n in nodes) == {"A": 2, "B": 2}
    for n in nodes:
        assert {"region", "cluster", "fabric.domain", "gpu.flavor"} <= n.labels.keys()


def test_dockerfile_installs_the_project_without_dev_extras_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    assert all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    assert "[dev]" not in text
    assert re.search(r"pip wheel --no-deps --wheel-dir /wheels \.", text)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users
    assert users[-1] not in {"root", "0", "0:0"}
    # everything the Dockerfile copies from the context survives .dockerignore
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for src in ("pyproject.toml", "shared/", "services/"):
        assert f"!{src}" in ignore


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose v1 not installed"
)
def test_docker_compose_v1_config_accepts_the_file() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
    proc = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_each_service_logs_in_as_its_own_user_from_the_profile(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """The files compose points at are the ones ``gpu-fleet profile`` writes, and nats-server
    accepts the config it writes (``-t``)."""
    services = compose["services"]
    assert services["security"]["command"] == ["gpu-fleet", "profile", "/security"]
    folder = tmp_path / "security"
    assert main(["profile", str(folder)]) == 0
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["GPU_FLEET_NATS_USER"] == name
        password_file = env["GPU_FLEET_NATS_PASSWORD_FILE"]
        assert password_file == f"/security/{name}.password"
        assert (folder / Path(password_file).name).is_file()
        assert "security:/security:ro" in services[name]["volumes"]
        key = env.get("GPU_FLEET_LEDGER_KEY") if name == "manager" else None
        assert env["GPU_FLEET_LEDGER_PUBLIC_KEY"] == "/security/ledger.pub"
        if name == "manager":
            assert key == "/security/ledger.key"
        else:
            assert "GPU_FLEET_LEDGER_KEY" not in env
    command = services["nats"]["command"]
    conf = command[command.index("-c") + 1]
    assert conf == "/security/nats-security.conf"
    local = folder / Path(conf).name
    done = subprocess.run(
        [find_binary(), "-c", str(local), "-t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env = {"GPU_FLEET_NATS_PASSWORD_FILE": str(folder / "binder.password")}
    assert (
        ClientAuth.from_env(env).password
        == StackSecurity.load_or_create(folder).passwords["binder"]
    )


def test_the_live_map_logs_in_as_the_operator(compose: dict[str, Any]) -> None:
    """Authorization is on: the map reads every team's runs, so it is the admin user."""
    env = compose["services"]["map"]["environment"]
    assert env["GPU_FLEET_NATS_USER"] == "admin"
    assert env["GPU_FLEET_NATS_PASSWORD_FILE"] == "/security/admin.password"
