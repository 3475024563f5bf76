"""Fuzzing the manifest boundary (issue 19): any bytes a user can put in a file.

Every input goes through what ``kubectl runs submit``, ``gpu-fleet validate`` and the manager
run: ``load_source`` (bytes -> documents) and ``parse_documents`` (documents -> Budgets and
Runs).  Inputs are valid manifests mutated (fields dropped, retyped, renamed, aliased, nested,
bombed), arbitrary YAML-ish text and raw bytes.  For each one:

* the only exception is ``ManifestError`` (no traceback, no ``RecursionError``);
* every error has a path and a one-line message of bounded length (field-precise);
* a hang guard (``timeout`` marker) fails the run if an input is not answered.

The ledger side of the same property (a refused apply changes nothing) is fuzzed through the
API in ``tests/services/test_fuzz_api.py``; here ``parse_documents`` is pure, so a refused input
has produced nothing by construction.  Seeded (``@seed(19)``); counts in ``EXAMPLES``
(400, or ``GPU_FLEET_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gpu_fleet.core.manifests import ManifestError, load_source, parse_documents
from gpu_fleet.core.model import Budget, Run

EXAMPLES = int(os.environ.get("GPU_FLEET_FUZZ_EXAMPLES", "400"))
"""Inputs per run (the ``ci`` profile's 50 is overridden: this is the boundary)."""

RUN: dict[str, Any] = {
    "apiVersion": "rq.davidlangworthy.io/v1",
    "kind": "Run",
    "metadata": {"name": "train", "namespace": "team"},
    "spec": {
        "resources": {"gpuType": "H100", "totalGPUs": 4},
        "locality": {"allowCrossGroupSpread": False},
        "malleable": {"minTotalGPUs": 2, "maxTotalGPUs": 8, "stepGPUs": 2},
        "runtime": {"maxDuration": "2h"},
        "funding": {"allowBorrow": True, "sponsors": ["org:ai"]},
        "roles": [
            {
                "name": "worker",
                "width": 4,
                "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}},
            }
        ],
    },
}
BUDGET: dict[str, Any] = {
    "apiVersion": "rq.davidlangworthy.io/v1",
    "kind": "Budget",
    "metadata": {"name": "team", "namespace": "team"},
    "spec": {
        "owner": "org:team",
        "parents": ["org:ai"],
        "envelopes": [
            {
                "name": "west",
                "flavor": "H100",
                "selector": {"region": "r1"},
                "concurrency": 8,
                "start": "2026-01-01T00:00:00Z",
                "end": "2027-01-01T00:00:00Z",
            }
        ],
    },
}

junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "x" * 300, "Bad_Name", "-1", "no", "1e5", "2026-13-45T99:00:00Z"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def set_at(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from([RUN, BUDGET])))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(paths(doc)))
        action = draw(st.sampled_from(["replace", "drop", "add", "nest"]))
        target = doc
        for step in where:
            target = target[step]
        if action == "replace":
            doc = set_at(doc, where, draw(junk))
        elif action == "drop" and where:
            parent = doc
            for step in where[:-1]:
                parent = parent[step]
            del parent[where[-1]]
        elif action == "add" and isinstance(target, dict):
            target[draw(st.text(max_size=12))] = draw(junk)
        elif action == "nest":
            doc = set_at(doc, where, [[[[[[[[target]]]]]]]])
    return doc


def as_yaml(documents: list[Any]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False)


@st.composite
def inputs(draw: st.DrawFn) -> bytes:
    shape = draw(st.sampled_from(["manifests", "manifests", "manifests", "text", "bytes", "bomb"]))
    if shape == "bytes":
        return draw(st.binary(max_size=200))
    if shape == "text":
        alphabet = st.sampled_from(list("ab: -[]{}&*!|>#'\"\n\t,?%@`0123456789.\\\x00"))
        return draw(st.text(alphabet, max_size=200)).encode()
    if shape == "bomb":
        levels, fan = draw(st.integers(2, 12)), draw(st.integers(2, 10))
        lines = ["l0: &l0 [" + ", ".join(["x"] * fan) + "]"]
        lines += [
            f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * fan) + "]" for i in range(1, levels)
        ]
        return ("\n".join(lines) + "\n").encode()
    documents = draw(st.lists(mutated() | st.none(), min_size=1, max_size=3))
    text = as_yaml(documents)
    separator = draw(st.sampled_from(["", "---\n", "--- \n# c\n"]))
    return (separator + text).encode()


@seed(19)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(inputs())
@pytest.mark.timeout(300)
def test_any_file_gives_manifests_or_field_precise_errors(data: bytes) -> None:
    try:
        manifests = parse_documents(load_source(data, "input.yaml"), source="input.yaml")
    except ManifestError as exc:
        refused = exc
    else:
        assert manifests
        assert all(isinstance(m, Budget | Run) for m in manifests)
        return
    assert refused.errors
    for error in refused.errors:  # each names where the problem is and says it on one line
        assert error.path
        assert "\n" not in error.message
        assert len(error.message) < 2000, error.message[:200]
