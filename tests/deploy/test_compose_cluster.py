"""compose.cluster.yaml: the 3-server JetStream cluster override, checked offline like compose.yaml.

Compose merges an override into the base file (mappings key by key, ``environment`` entries
one by one); the same merge here gives the file Docker would run, which must match the compose
schema, route every server to every other, and hand every service all three URLs and 3 copies.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("manager", "binder", "forecaster", "notifier")
SERVERS = ("nats", "nats-2", "nats-3")


def merged(base: Any, override: Any) -> Any:
    """Compose's merge for what these files use: mappings recursively, the rest replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merged(base[key], value) if key in base else value
        return out
    return override


def _effective() -> dict[str, Any]:
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())
    override = yaml.safe_load((ROOT / "compose.cluster.yaml").read_text())
    override = {k: v for k, v in override.items() if not k.startswith("x-")}
    doc: dict[str, Any] = merged(base, override)
    return doc


def _flag(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_the_merged_file_matches_the_compose_schema() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(_effective()))
    assert [e.message for e in errors] == []


def test_three_routed_servers_each_with_its_own_store() -> None:
    services = _effective()["services"]
    names = set()
    volumes = set()
    for server in SERVERS:
        command = services[server]["command"]
        assert "-js" in command
        assert _flag(command, "--cluster_name") == "gpu-fleet"
        routes = _flag(command, "--routes").split(",")
        assert routes == [f"nats://{s}:6222" for s in SERVERS]
        names.add(_flag(command, "--server_name"))
        volumes.add(services[server]["volumes"][0].split(":")[0])
        assert "healthcheck" in services[server]
    assert len(names) == 3
    assert len(volumes) == 3


def test_every_service_gets_all_servers_and_three_copies() -> None:
    services = _effective()["services"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        assert env["GPU_FLEET_NATS_URL"].split(",") == [f"nats://{s}:4222" for s in SERVERS]
        assert env["GPU_FLEET_STREAM_REPLICAS"] == "3"
        assert env["GPU_FLEET_LOG_LEVEL"]  # the base file's settings survive the merge
    assert services["manager"]["environment"]["GPU_FLEET_INVENTORY"]
