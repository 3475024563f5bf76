"""The CRDs in ``crds/`` are generated, current, structural, and accept our real manifests.

There is no API server here, so "accepts" means: the manifests validate against each generated
``openAPIV3Schema`` with ``jsonschema``, read the way a strict API server reads them (``nullable``
honoured, unknown fields rejected as ``kubectl apply --validate=strict`` would).  CEL rules are
not evaluated; the tests only check they are where SPEC §A puts them.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from gpu_fleet.core.model import GROUP

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCENARIOS = ROOT.parent / "shared" / "scenarios"
EXAMPLES = ROOT / "examples" / "manifests"
CHANNEL_EXAMPLES = ROOT / "examples" / "channels"

Schema = dict[str, Any]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_crds", ROOT / "tools" / "gen_crds.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_crds", module)
    spec.loader.exec_module(module)
    return module


gen_crds = _load_generator()

EXPECTED = {
    # kind: (plural, shortNames)
    "Budget": ("budgets", []),
    "Run": ("runs", []),
    "Reservation": ("reservations", []),
    "GPULease": ("gpuleases", ["gl"]),
    "NotificationChannel": ("notificationchannels", ["nc"]),
}


def _crds() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        out[doc["spec"]["names"]["kind"]] = doc
    return out


def _schema(kind: str) -> Schema:
    schema: Schema = _crds()[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _walk(schema: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its path (properties, items and map values)."""
    yield path or ".", schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def _as_strict_json_schema(schema: Schema) -> Schema:
    """Read an OpenAPI v3 CRD schema the way a strict API server does, as plain JSON Schema."""
    out = copy.deepcopy(schema)
    for _, node in _walk(out):
        if node.pop("nullable", False):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
    return out


def _plain(value: Any) -> Any:
    """YAML timestamps as the RFC 3339 strings the API server receives."""
    if isinstance(value, dt.datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _manifests() -> list[Any]:
    params: list[Any] = []
    sources: list[tuple[Path, list[Any]]] = []
    for path in sorted([*EXAMPLES.glob("*.yaml"), *CHANNEL_EXAMPLES.glob("*.yaml")]):
        sources.append((path, [d for d in yaml.safe_load_all(path.read_text()) if d]))
    if SHARED_SCENARIOS.is_dir():
        for path in sorted(SHARED_SCENARIOS.glob("*.yaml")):
            sources.append((path, yaml.safe_load(path.read_text()).get("objects") or []))
    for path, docs in sources:
        for doc in docs:
            if doc.get("kind") in ("Budget", "Run", "NotificationChannel"):
                name = f"{path.stem}:{doc['kind']}/{doc['metadata']['name']}"
                params.append(pytest.param(_plain(doc), id=name))
    return params


def _validate(doc: Schema) -> list[str]:
    validator = jsonschema.Draft7Validator(_as_strict_json_schema(_schema(doc["kind"])))
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_crds_are_up_to_date() -> None:
    """crds/ holds exactly what the generator writes (run `make crds` after a model change)."""
    stale = list(gen_crds.stale_files(ROOT / "crds", gen_crds.generate()))
    assert stale == [], "stale CRDs; run `make crds`"


def test_generation_is_deterministic() -> None:
    assert gen_crds.generate() == gen_crds.generate()


def test_check_mode_reports_a_stale_folder(tmp_path: Path) -> None:
    assert gen_crds.main(["--out", str(tmp_path)]) == 0
    assert gen_crds.main(["--out", str(tmp_path), "--check"]) == 0
    (tmp_path / "runs.yaml").write_text("# edited by hand\n")
    (tmp_path / "extra.yaml").write_text("{}\n")
    assert sorted(gen_crds.stale_files(tmp_path, gen_crds.generate())) == [
        "extra.yaml",
        "runs.yaml",
    ]
    assert gen_crds.main(["--out", str(tmp_path), "--check"]) == 1


def test_group_version_kinds_and_names() -> None:
    crds = _crds()
    assert set(crds) == set(EXPECTED)
    for kind, (plural, short_names) in EXPECTED.items():
        crd = crds[kind]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
        spec = crd["spec"]
        assert spec["group"] == GROUP == "rq.davidlangworthy.io"
        assert spec["scope"] == "Namespaced"
        names = spec["names"]
        assert (names["kind"], names["plural"], names["singular"]) == (
            kind,
            plural,
            kind.lower(),
        )
        assert names.get("shortNames", []) == short_names
        [version] = spec["versions"]
        assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
        assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_schema_is_structural(kind: str) -> None:
    """No references or combinators, a type on every node, no properties beside a map."""
    problems: list[str] = []
    for path, node in _walk(_schema(kind)):
        for bad in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "definitions"):
            if bad in node:
                problems.append(f"{path}: has {bad}")
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            problems.append(f"{path}: no type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties beside additionalProperties")
        if node.get("additionalProperties") is False:
            problems.append(f"{path}: additionalProperties: false")
        if node.get("type") == "object" and not (
            "properties" in node
            or "additionalProperties" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or path == ".metadata"
        ):
            problems.append(f"{path}: object with no fields would be pruned empty")
        if "default" in node and node["default"] is None:
            problems.append(f"{path}: null default")
    assert problems == []


def test_printer_columns() -> None:
    crds = _crds()

    def columns(kind: str) -> dict[str, str]:
        cols = crds[kind]["spec"]["versions"][0]["additionalPrinterColumns"]
        return {c["name"]: c["jsonPath"] for c in cols}

    assert columns("Run")["Phase"] == ".status.phase"
    assert columns("Run")["GPUs"] == ".spec.resources.totalGPUs"
    assert columns("Budget")["Owner"] == ".spec.owner"
    assert columns("GPULease")["Run"] == ".spec.runRef.name"
    assert columns("GPULease")["Role"] == ".spec.slice.role"
    for kind in EXPECTED:
        assert columns(kind)["Age"] == ".metadata.creationTimestamp"


def test_immutable_specs_and_monotone_closure() -> None:
    """SPEC §A.3/§A.4: Reservation and GPULease specs are immutable; a closed lease stays closed."""
    for kind in ("Reservation", "GPULease"):
        rules = [r["rule"] for r in _schema(kind)["properties"]["spec"]["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules
    status_rules = _schema("GPULease")["properties"]["status"]["x-kubernetes-validations"]
    assert any("oldSelf.closed" in r["rule"] for r in status_rules)


def test_run_template_and_status_are_preserved() -> None:
    run = _schema("Run")
    template = run["properties"]["spec"]["properties"]["roles"]["items"]["properties"]["template"]
    assert template == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    for kind in ("Budget", "Run"):
        assert _schema(kind)["properties"]["status"]["x-kubernetes-preserve-unknown-fields"]


def test_datetimes_nullables_and_enums_survive_conversion() -> None:
    envelope = _schema("Budget")["properties"]["spec"]["properties"]["envelopes"]["items"]
    props = envelope["properties"]
    assert props["start"] == {"type": "string", "format": "date-time", "nullable": True}
    assert props["sharing"]["type"] == "string"
    assert props["sharing"]["enum"] == ["", "family", "none"]
    assert envelope["required"] == ["name", "flavor", "selector", "concurrency"]
    assert props["selector"] == {"type": "object", "additionalProperties": {"type": "string"}}


def test_shared_golden_run_manifest_validates() -> None:
    """The objects of the shared golden-simple-fit scenario are accepted by the CRDs."""
    path = SHARED_SCENARIOS / "golden-simple-fit.yaml"
    if not path.is_file():
        pytest.fail(f"{path} is missing; the shared folder sits beside every checkout and CI")
    objects = [_plain(o) for o in yaml.safe_load(path.read_text())["objects"]]
    assert {o["kind"] for o in objects} == {"Budget", "Run"}
    for obj in objects:
        assert _validate(obj) == []


@pytest.mark.parametrize("doc", _manifests())
def test_every_known_manifest_validates(doc: Schema) -> None:
    """Every Budget/Run/NotificationChannel in examples/ and the shared scenarios is accepted
    by the CRDs."""
    assert _validate(doc) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        pytest.param(
            lambda d: d["spec"]["resources"].pop("totalGPUs"),
            "spec.resources: 'totalGPUs' is a required property",
            id="missing-required",
        ),
        pytest.param(
            lambda d: d["spec"]["resources"].update(totalGPUs="four"),
            "spec.resources.totalGPUs: 'four' is not of type 'integer'",
            id="wrong-type",
        ),
        pytest.param(
            lambda d: d["spec"].update(totalGpus=4),
            "spec: Additional properties are not allowed ('totalGpus' was unexpected)",
            id="typo",
        ),
        pytest.param(
            lambda d: d["spec"].update(roles=[{"name": "w", "failurePolicy": "Sometimes"}]),
            "spec.roles.0.failurePolicy: 'Sometimes' is not one of ['Fail', 'Ignore', 'Retry']",
            id="bad-enum",
        ),
    ],
)
def test_bad_run_manifest_is_rejected(mutate: Any, expected: str) -> None:
    doc: Schema = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Run",
        "metadata": {"name": "r", "namespace": "team"},
        "spec": {"resources": {"gpuType": "H100", "totalGPUs": 4}},
    }
    assert _validate(doc) == []
    mutate(doc)
    assert _validate(doc) == [expected]


def test_a_channel_keeps_only_the_secret_reference() -> None:
    """The CRD has no field that could hold a signing secret's value: only where it is."""
    spec = _schema("NotificationChannel")["properties"]["spec"]
    assert set(spec["properties"]["secretRef"]["properties"]) == {"name", "key", "file", "env"}
    assert spec["required"] == ["target"]
    assert spec["properties"]["format"]["enum"] == ["json", "slack"]
    doc: Schema = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "NotificationChannel",
        "metadata": {"name": "c", "namespace": "team"},
        "spec": {"target": {"webhook": "https://x.example/h"}, "secretRef": {"env": "S"}},
    }
    assert _validate(doc) == []
    doc["spec"]["secret"] = "hunter2"
    assert _validate(doc) == [
        "spec: Additional properties are not allowed ('secret' was unexpected)"
    ]
