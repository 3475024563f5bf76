"""Manifest parsing, defaulting and validation (SPEC §A.1/§A.2 and DESIGN decisions 1-3).

Every rule is pinned by the exact list of messages it produces for one broken field of an
otherwise valid manifest, so a rule that stops firing, fires twice or drifts in wording fails.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_fleet.core.manifests import (
    FieldError,
    ManifestError,
    load_documents,
    parse_inventory,
    parse_manifests,
    validate_manifest,
    validate_node,
)
from gpu_fleet.core.manifests.rules import DNS_LABEL_RULE, DNS_SUBDOMAIN_RULE, RESERVED_ENV
from gpu_fleet.core.model import API_VERSION, Budget, Node, NodeHealth, Run

UTC = dt.UTC
DELETE = object()
DURATION_RULE = "is not a duration such as 30s, 15m or 1h30m"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def budget_doc() -> dict[str, Any]:
    window = {"start": "2026-01-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    return {
        "apiVersion": API_VERSION,
        "kind": "Budget",
        "metadata": {"name": "rai", "namespace": "rai"},
        "spec": {
            "owner": "org:ai:rai",
            "parents": ["org:ai"],
            "envelopes": [
                {
                    "name": "west",
                    "flavor": "H100",
                    "selector": {"region": "us-west"},
                    "concurrency": 64,
                    **window,
                },
                {
                    "name": "east",
                    "flavor": "H100",
                    "selector": {"region": "us-east", "fabric.domain": "*"},
                    "concurrency": 32,
                    "gpuHours": 1000,
                    **window,
                },
                {
                    "name": "spare",
                    "flavor": "A100",
                    "selector": {"region": "*"},
                    "concurrency": 8,
                    **window,
                },
            ],
            "aggregateCaps": [
                {
                    "name": "h100-total",
                    "flavor": "H100",
                    "envelopes": ["west", "east"],
                    "maxConcurrency": 80,
                }
            ],
        },
    }


def run_doc() -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "metadata": {"name": "ra1", "namespace": "rai"},
        "spec": {"resources": {"gpuType": "H100", "totalGPUs": 8}},
    }


def full_run_doc() -> dict[str, Any]:
    """A run with every optional block set (and valid)."""
    doc = run_doc()
    doc["metadata"]["labels"] = {"team": "rai"}
    doc["spec"].update(
        {
            "locality": {"groupGPUs": 4, "allowCrossGroupSpread": False},
            "malleable": {"minTotalGPUs": 4, "maxTotalGPUs": 16, "stepGPUs": 4},
            "sparesPerGroup": 1,
            "funding": {"allowBorrow": True, "maxBorrowGPUs": 4, "sponsors": ["org:x"]},
            "follow": {"after": ["prep"], "onUpstreamFailure": "fail"},
            "runtime": {"checkpoint": "10m", "maxDuration": "4h", "preemptionGrace": "5m"},
            "roles": [
                {
                    "name": "worker",
                    "width": 2,
                    "gpusPerPod": 4,
                    "groupGPUs": 4,
                    "failurePolicy": "Retry",
                    "retries": 3,
                    "backoff": "30s",
                    "template": {
                        "metadata": {"labels": {"app": "train"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "workload",
                                    "image": "train:1",
                                    "env": [{"name": "LR", "value": "0.1"}],
                                }
                            ]
                        },
                    },
                }
            ],
        }
    )
    return doc


def malleable_run_doc() -> dict[str, Any]:
    doc = run_doc()
    doc["spec"]["malleable"] = {"minTotalGPUs": 4, "maxTotalGPUs": 16, "stepGPUs": 4}
    return doc


def role_run_doc() -> dict[str, Any]:
    doc = run_doc()
    doc["spec"]["roles"] = [{"name": "worker", "width": 2, "gpusPerPod": 4}]
    return doc


def _steps(path: str) -> list[str | int]:
    return [
        int(p[1:-1]) if p.startswith("[") else p for p in re.findall(r"\[\d+\]|[^.\[\]]+", path)
    ]


def patched(doc: dict[str, Any], changes: dict[str, object]) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``path: value`` changes applied (``DELETE`` removes)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, last = _steps(path)
        target: Any = doc
        for step in parents:
            target = target[step]
        if value is DELETE:
            del target[last]
        elif isinstance(target, list) and last == len(target):
            target.append(value)
        else:
            target[last] = value
    return doc


def errors(raw: object, path: str = "") -> list[str]:
    """The error lines of an invalid manifest (and a check that str(error) is those lines)."""
    with pytest.raises(ManifestError) as info:
        validate_manifest(raw, path)
    lines = [str(e) for e in info.value.errors]
    assert str(info.value) == "\n".join(lines)
    return lines


def parse_errors(text: str, source: str = "f.yaml") -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifests(text, source)
    assert info.value.source == source
    return str(info.value).splitlines()


def inventory_errors(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_inventory(text, "fleet.yaml")
    return str(info.value).splitlines()


# --------------------------------------------------------------------------------------------
# Error types
# --------------------------------------------------------------------------------------------


class TestErrorTypes:
    def test_field_error_renders_path_and_message(self) -> None:
        assert str(FieldError("spec.owner", "required")) == "spec.owner: required"

    def test_manifest_error_joins_lines_and_keeps_source(self) -> None:
        err = ManifestError([FieldError("a", "x"), FieldError("b", "y")], source="f.yaml")
        assert str(err) == "a: x\nb: y"
        assert err.errors == [FieldError("a", "x"), FieldError("b", "y")]
        assert err.source == "f.yaml"
        assert isinstance(err, ValueError)

    def test_validate_manifest_error_has_no_source(self) -> None:
        with pytest.raises(ManifestError) as info:
            validate_manifest({})
        assert info.value.source is None


# --------------------------------------------------------------------------------------------
# Valid manifests and defaults
# --------------------------------------------------------------------------------------------


class TestValidAndDefaults:
    def test_budget_is_typed(self) -> None:
        budget = validate_manifest(budget_doc())
        assert isinstance(budget, Budget)
        assert budget.key == "rai/rai"
        west, east, _ = budget.spec.envelopes
        assert west.start == dt.datetime(2026, 1, 1, tzinfo=UTC)
        assert west.end == dt.datetime(2027, 1, 1, tzinfo=UTC)
        assert west.gpu_hours is None
        assert east.gpu_hours == 1000.0
        assert east.selector == {"region": "us-east", "fabric.domain": "*"}
        assert budget.spec.aggregate_caps[0].envelopes == ("west", "east")
        assert budget.spec.parents == ("org:ai",)

    def test_full_run_is_typed(self) -> None:
        run = validate_manifest(full_run_doc())
        assert isinstance(run, Run)
        assert run.spec.locality is not None
        assert run.spec.locality.allow_cross_group_spread is False
        assert run.spec.funding is not None
        assert run.spec.funding.sponsors == ("org:x",)
        assert run.spec.runtime is not None
        assert run.spec.runtime.max_duration == "4h"
        role = run.spec.roles[0]
        assert (role.width, role.gpus_per_pod, role.retries) == (2, 4, 3)
        assert role.failure_policy == "Retry"

    def test_namespace_defaults_to_default(self) -> None:
        run = validate_manifest(patched(run_doc(), {"metadata.namespace": DELETE}))
        assert run.metadata.namespace == "default"
        assert run.key == "default/ra1"

    def test_empty_namespace_means_default(self) -> None:
        run = validate_manifest(patched(run_doc(), {"metadata.namespace": ""}))
        assert run.metadata.namespace == "default"

    def test_desired_defaults_to_max(self) -> None:
        run = validate_manifest(malleable_run_doc())
        assert isinstance(run, Run)
        assert run.spec.malleable is not None
        assert run.spec.malleable.desired_total_gpus == 16
        assert run.desired_width == 16

    def test_explicit_desired_is_kept(self) -> None:
        run = validate_manifest(
            patched(malleable_run_doc(), {"spec.malleable.desiredTotalGPUs": 8})
        )
        assert isinstance(run, Run)
        assert run.spec.malleable is not None
        assert run.spec.malleable.desired_total_gpus == 8

    def test_follow_defaults(self) -> None:
        run = validate_manifest(patched(run_doc(), {"spec.follow": {"after": ["prep"]}}))
        assert isinstance(run, Run)
        assert run.spec.follow is not None
        assert run.spec.follow.on_upstream_failure == "wait"
        assert run.spec.follow.upstream_failure_grace == "30m"

    def test_empty_on_upstream_failure_means_wait(self) -> None:
        doc = patched(run_doc(), {"spec.follow": {"after": ["prep"], "onUpstreamFailure": ""}})
        run = validate_manifest(doc)
        assert isinstance(run, Run)
        assert run.spec.follow is not None
        assert run.spec.follow.on_upstream_failure == "wait"

    def test_explicit_fail_is_kept(self) -> None:
        doc = patched(run_doc(), {"spec.follow": {"after": ["prep"], "onUpstreamFailure": "fail"}})
        run = validate_manifest(doc)
        assert isinstance(run, Run)
        assert run.spec.follow is not None
        assert run.spec.follow.on_upstream_failure == "fail"

    def test_cross_group_spread_defaults_true(self) -> None:
        run = validate_manifest(patched(run_doc(), {"spec.locality": {"groupGPUs": 8}}))
        assert isinstance(run, Run)
        assert run.spec.locality is not None
        assert run.spec.locality.allow_cross_group_spread is True

    def test_role_defaults(self) -> None:
        doc = patched(run_doc(), {"spec.roles": [{"name": "w", "width": 8}]})
        run = validate_manifest(doc)
        assert isinstance(run, Run)
        role = run.spec.roles[0]
        assert (role.gpus_per_pod, role.spares, role.failure_policy, role.retries) == (
            1,
            0,
            "Fail",
            None,
        )
        assert role.template == {}

    def test_explicit_null_reads_as_unset(self) -> None:
        doc = patched(run_doc(), {"metadata.labels": None, "spec.sparesPerGroup": None})
        run = validate_manifest(doc)
        assert run.metadata.labels == {}
        assert isinstance(run, Run)
        assert run.spec.spares_per_group == 0

    def test_instants_are_normalised_to_utc(self) -> None:
        doc = patched(
            budget_doc(),
            {
                "spec.envelopes[0].start": "2026-01-01T02:00:00+02:00",
                "spec.envelopes[0].end": "2026-06-01T00:00:00",  # naive reads as UTC
            },
        )
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        env = budget.spec.envelopes[0]
        assert env.start == dt.datetime(2026, 1, 1, tzinfo=UTC)
        assert env.start is not None
        assert env.start.tzinfo == UTC
        assert env.end == dt.datetime(2026, 6, 1, tzinfo=UTC)

    def test_datetime_values_are_accepted(self) -> None:
        """Callers that loaded YAML with yaml.safe_load hand us datetimes, naive ones included."""
        doc = patched(
            budget_doc(),
            {
                "spec.envelopes[0].start": dt.datetime(2026, 1, 1),  # naive on purpose
                "spec.envelopes[0].end": dt.datetime(2027, 1, 1, tzinfo=UTC),
            },
        )
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        assert budget.spec.envelopes[0].start == dt.datetime(2026, 1, 1, tzinfo=UTC)

    def test_gpu_hours_accepts_ints_and_floats(self) -> None:
        budget = validate_manifest(patched(budget_doc(), {"spec.envelopes[1].gpuHours": 12.5}))
        assert isinstance(budget, Budget)
        assert budget.spec.envelopes[1].gpu_hours == 12.5

    def test_input_is_not_mutated_and_not_shared(self) -> None:
        doc = patched(
            full_run_doc(), {"metadata.namespace": "", "spec.follow.onUpstreamFailure": ""}
        )
        before = copy.deepcopy(doc)
        run = validate_manifest(doc)
        assert doc == before
        doc["spec"]["roles"][0]["template"]["spec"]["containers"][0]["image"] = "evil:2"
        doc["metadata"]["labels"]["team"] = "other"
        assert isinstance(run, Run)
        assert run.spec.roles[0].template["spec"] == before["spec"]["roles"][0]["template"]["spec"]
        assert run.metadata.labels == {"team": "rai"}

    def test_optional_budget_blocks(self) -> None:
        doc = patched(
            budget_doc(),
            {
                "spec.envelopes[0].sharing": "none",
                "spec.envelopes[0].preActivation": {"allowAdmission": True},
                "spec.envelopes[0].lending": {"allow": True, "to": ["org:x*"], "maxConcurrency": 4},
                "spec.autoRenew": {"period": "720h"},
            },
        )
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        env = budget.spec.envelopes[0]
        assert env.sharing == "none"
        assert env.pre_activation is not None
        assert env.pre_activation.allow_admission is True
        assert env.pre_activation.allow_reservations is True
        assert env.lending is not None
        assert env.lending.to == ("org:x*",)
        assert budget.spec.auto_renew is not None
        assert budget.spec.auto_renew.notify_before == "0s"

    def test_cap_may_bound_hours_only(self) -> None:
        doc = patched(
            budget_doc(),
            {"spec.aggregateCaps[0].maxConcurrency": DELETE, "spec.aggregateCaps[0].gpuHours": 50},
        )
        budget = validate_manifest(doc)
        assert isinstance(budget, Budget)
        assert budget.spec.aggregate_caps[0].max_concurrency is None
        assert budget.spec.aggregate_caps[0].gpu_hours == 50.0

    def test_lending_cap_unchecked_when_lending_is_off(self) -> None:
        doc = patched(
            budget_doc(), {"spec.envelopes[0].lending": {"allow": False, "maxConcurrency": 0}}
        )
        assert isinstance(validate_manifest(doc), Budget)

    def test_borrow_cap_unchecked_when_borrowing_is_off(self) -> None:
        doc = patched(run_doc(), {"spec.funding": {"allowBorrow": False, "maxBorrowGPUs": 0}})
        assert isinstance(validate_manifest(doc), Run)


# --------------------------------------------------------------------------------------------
# Structure: top level, unknown fields, types, required fields, paths
# --------------------------------------------------------------------------------------------


class TestStructure:
    def test_not_a_mapping(self) -> None:
        assert errors(["kind", "Run"]) == ["<document>: expected mapping, got list"]
        assert errors("Run", "steps[0].apply") == ["steps[0].apply: expected mapping, got str"]

    def test_api_version_and_kind_required(self) -> None:
        assert errors({"metadata": {}}) == ["apiVersion: required", "kind: required"]

    def test_wrong_api_version(self) -> None:
        assert errors(patched(run_doc(), {"apiVersion": "batch/v1"})) == [
            "apiVersion: must be 'rq.davidlangworthy.io/v1', got 'batch/v1'"
        ]

    def test_api_version_type(self) -> None:
        assert errors(patched(run_doc(), {"apiVersion": 1})) == [
            "apiVersion: expected str, got int"
        ]

    def test_unsupported_kind_is_named(self) -> None:
        assert errors(patched(run_doc(), {"kind": "Reservation"})) == [
            "kind: unsupported kind 'Reservation': must be Budget or Run"
        ]

    def test_kind_type(self) -> None:
        assert errors(patched(run_doc(), {"kind": ["Run"]})) == ["kind: expected str, got list"]

    def test_unknown_fields_everywhere(self) -> None:
        doc = patched(
            budget_doc(),
            {
                "status": {},
                "metadata.uid": "x",
                "spec.envelopes[1].maxGPUHours": 5,
                "spec.aggregateCaps[0].concurrency": 3,
            },
        )
        assert errors(doc) == [
            "status: unknown field",
            "metadata.uid: unknown field",
            "spec.envelopes[1].maxGPUHours: unknown field",
            "spec.aggregateCaps[0].concurrency: unknown field",
        ]

    def test_attribute_names_are_not_wire_names(self) -> None:
        doc = patched(run_doc(), {"spec.resources": {"gpu_type": "H100", "total_gpus": 8}})
        assert errors(doc) == [
            "spec.resources.gpu_type: unknown field",
            "spec.resources.total_gpus: unknown field",
            "spec.resources.gpuType: required",
            "spec.resources.totalGPUs: required",
        ]

    def test_required_fields(self) -> None:
        assert errors({"apiVersion": API_VERSION, "kind": "Run"}) == [
            "metadata: required",
            "spec: required",
        ]
        doc = patched(run_doc(), {"metadata.name": DELETE, "spec.resources.totalGPUs": None})
        assert errors(doc) == ["metadata.name: required", "spec.resources.totalGPUs: required"]

    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            ({"spec.resources.totalGPUs": "8"}, "spec.resources.totalGPUs: expected int, got str"),
            (
                {"spec.resources.totalGPUs": 8.0},
                "spec.resources.totalGPUs: expected int, got float",
            ),
            (
                {"spec.resources.totalGPUs": True},
                "spec.resources.totalGPUs: expected int, got bool",
            ),
            ({"spec.resources.gpuType": 100}, "spec.resources.gpuType: expected str, got int"),
            ({"spec.resources": [8]}, "spec.resources: expected mapping, got list"),
            ({"spec.roles": {"name": "w"}}, "spec.roles: expected list, got mapping"),
            (
                {"spec.funding": {"allowBorrow": "yes"}},
                "spec.funding.allowBorrow: expected bool, got str",
            ),
            ({"metadata.labels": {"team": 7}}, "metadata.labels[team]: expected str, got int"),
            ({"metadata.labels": {1: "x"}}, "metadata.labels[1]: expected str, got int"),
            ({"spec.follow": {"after": ["a", 3]}}, "spec.follow.after[1]: expected str, got int"),
            (
                {"spec.resources.totalGPUs": 2**31},
                "spec.resources.totalGPUs: must be between -2147483648 and 2147483647 (int32)",
            ),
            (
                {"spec.roles": [{"name": "w", "width": 8, "failurePolicy": "Sometimes"}]},
                "spec.roles[0].failurePolicy: must be one of 'Fail', 'Ignore', 'Retry', "
                "got 'Sometimes'",
            ),
            (
                {"spec.follow": {"after": ["a"], "onUpstreamFailure": "retry"}},
                "spec.follow.onUpstreamFailure: must be one of '', 'fail', 'wait', got 'retry'",
            ),
            (
                {"spec.roles": [{"name": "w", "width": 8, "template": {"x": float("nan")}}]},
                "spec.roles[0].template.x: must be a finite number",
            ),
            (
                {
                    "spec.roles": [
                        {"name": "w", "width": 8, "template": {"at": dt.date(2026, 1, 1)}}
                    ]
                },
                "spec.roles[0].template.at: expected a JSON value, got timestamp",
            ),
        ],
    )
    def test_type_errors(self, change: dict[str, object], expected: str) -> None:
        assert errors(patched(run_doc(), change)) == [expected]

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            ("lots", "spec.envelopes[1].gpuHours: expected number, got str"),
            (True, "spec.envelopes[1].gpuHours: expected number, got bool"),
            (float("inf"), "spec.envelopes[1].gpuHours: must be a finite number"),
        ],
    )
    def test_number_errors(self, value: object, expected: str) -> None:
        assert errors(patched(budget_doc(), {"spec.envelopes[1].gpuHours": value})) == [expected]

    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (
                "2026-01-01",
                "must be an RFC 3339 timestamp such as 2026-01-05T00:00:00Z, got '2026-01-01'",
            ),
            (
                "tomorrow",
                "must be an RFC 3339 timestamp such as 2026-01-05T00:00:00Z, got 'tomorrow'",
            ),
            (
                "2026-13-01T00:00:00Z",
                "must be an RFC 3339 timestamp such as 2026-01-05T00:00:00Z, "
                "got '2026-13-01T00:00:00Z'",
            ),
            (1767225600, "expected timestamp, got int"),
        ],
    )
    def test_timestamp_errors(self, value: object, expected: str) -> None:
        doc = patched(budget_doc(), {"spec.envelopes[0].start": value})
        assert errors(doc) == [f"spec.envelopes[0].start: {expected}"]

    def test_path_prefix(self) -> None:
        doc = patched(malleable_run_doc(), {"spec.malleable.stepGPUs": 0})
        assert errors(doc, "steps[3].apply") == [
            "steps[3].apply.spec.malleable.stepGPUs: must be >= 1"
        ]
        assert errors(doc) == ["spec.malleable.stepGPUs: must be >= 1"]

    def test_all_errors_reported_at_once(self) -> None:
        """Structural and semantic errors of one document come back together, in walk order."""
        doc = patched(
            full_run_doc(),
            {
                "metadata.name": "Ra1",
                "spec.resources.gpuType": "",
                "spec.resources.colour": "red",
                "spec.locality.groupGPUs": "4",
                "spec.malleable.stepGPUs": 0,
                "spec.sparesPerGroup": -1,
                "spec.runtime.maxDuration": "0s",
                "spec.roles[0].retries": DELETE,
            },
        )
        assert errors(doc) == [
            "spec.resources.colour: unknown field",
            "spec.locality.groupGPUs: expected int, got str",
            f"metadata.name: {DNS_LABEL_RULE}",
            "spec.resources.gpuType: must not be empty",
            "spec.malleable.stepGPUs: must be >= 1",
            "spec.sparesPerGroup: must be >= 0",
            "spec.runtime.maxDuration: must be > 0",
            "spec.roles[0].retries: required when failurePolicy is Retry",
        ]

    def test_semantic_rules_skip_ill_typed_values(self) -> None:
        """A value with a type error gets one message, not a cascade of rule failures."""
        doc = patched(role_run_doc(), {"spec.resources.totalGPUs": "8"})
        assert errors(doc) == ["spec.resources.totalGPUs: expected int, got str"]

    def test_nothing_is_constructed_on_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        calls: list[object] = []
        real = msgspec.convert

        def spy(obj: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append(obj)
            return real(obj, *args, **kwargs)

        monkeypatch.setattr(msgspec, "convert", spy)
        result: list[object] = []
        with pytest.raises(ManifestError):
            result.append(validate_manifest(patched(run_doc(), {"spec.sparesPerGroup": -1})))
        assert result == []
        assert calls == []
        validate_manifest(run_doc())
        assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# Budget rules (SPEC §A.1 + gpuHours)
# --------------------------------------------------------------------------------------------

WEST_WINDOW = "spec.envelopes[0]"

BUDGET_CASES: list[tuple[str, dict[str, object], list[str]]] = [
    ("owner-empty", {"spec.owner": ""}, ["spec.owner: must not be empty"]),
    ("owner-blank", {"spec.owner": "  "}, ["spec.owner: must not be empty"]),
    ("owner-missing", {"spec.owner": DELETE}, ["spec.owner: required"]),
    (
        "no-envelopes",
        {"spec.envelopes": [], "spec.aggregateCaps": DELETE},
        ["spec.envelopes: must have at least 1 item"],
    ),
    ("envelopes-missing", {"spec.envelopes": DELETE}, ["spec.envelopes: required"]),
    (
        "envelope-name-empty",
        {"spec.envelopes[2].name": ""},
        ["spec.envelopes[2].name: must not be empty"],
    ),
    (
        "envelope-name-duplicate",
        {"spec.envelopes[2].name": "west"},
        ["spec.envelopes[2].name: duplicate envelope name 'west' (also at spec.envelopes[0])"],
    ),
    (
        "flavor-empty",
        {"spec.envelopes[2].flavor": ""},
        ["spec.envelopes[2].flavor: must not be empty"],
    ),
    (
        "selector-empty",
        {"spec.envelopes[0].selector": {}},
        ["spec.envelopes[0].selector: must have at least 1 entry"],
    ),
    (
        "selector-missing",
        {"spec.envelopes[0].selector": DELETE},
        ["spec.envelopes[0].selector: required"],
    ),
    (
        "concurrency-zero",
        {"spec.envelopes[0].concurrency": 0},
        ["spec.envelopes[0].concurrency: must be > 0"],
    ),
    (
        "concurrency-negative",
        {"spec.envelopes[0].concurrency": -4},
        ["spec.envelopes[0].concurrency: must be > 0"],
    ),
    ("start-missing", {"spec.envelopes[0].start": DELETE}, ["spec.envelopes[0].start: required"]),
    ("end-missing", {"spec.envelopes[0].end": DELETE}, ["spec.envelopes[0].end: required"]),
    (
        "window-null",
        {"spec.envelopes[0].start": None, "spec.envelopes[0].end": None},
        ["spec.envelopes[0].start: required", "spec.envelopes[0].end: required"],
    ),
    (
        "end-equals-start",
        {"spec.envelopes[0].end": "2026-01-01T00:00:00Z"},
        ["spec.envelopes[0].end: must be after start"],
    ),
    (
        "end-before-start",
        {"spec.envelopes[0].end": "2025-12-31T23:59:59Z"},
        ["spec.envelopes[0].end: must be after start"],
    ),
    (
        "sharing-unknown",
        {"spec.envelopes[0].sharing": "everyone"},
        ["spec.envelopes[0].sharing: must be one of '', 'family', 'none', got 'everyone'"],
    ),
    (
        "lending-cap-zero",
        {"spec.envelopes[0].lending": {"allow": True, "maxConcurrency": 0}},
        ["spec.envelopes[0].lending.maxConcurrency: must be > 0"],
    ),
    (
        "gpu-hours-zero",
        {"spec.envelopes[1].gpuHours": 0},
        ["spec.envelopes[1].gpuHours: must be > 0"],
    ),
    (
        "gpu-hours-negative",
        {"spec.envelopes[1].gpuHours": -1.5},
        ["spec.envelopes[1].gpuHours: must be > 0"],
    ),
    (
        "cap-name-empty",
        {"spec.aggregateCaps[0].name": ""},
        ["spec.aggregateCaps[0].name: must not be empty"],
    ),
    (
        "cap-name-duplicate",
        {
            "spec.aggregateCaps[1]": {
                "name": "h100-total",
                "flavor": "A100",
                "envelopes": ["spare"],
                "maxConcurrency": 4,
            }
        },
        [
            "spec.aggregateCaps[1].name: duplicate aggregate cap name 'h100-total' "
            "(also at spec.aggregateCaps[0])"
        ],
    ),
    (
        "cap-flavor-empty",
        {"spec.aggregateCaps[0].flavor": ""},
        ["spec.aggregateCaps[0].flavor: must not be empty"],
    ),
    (
        "cap-no-envelopes",
        {"spec.aggregateCaps[0].envelopes": []},
        ["spec.aggregateCaps[0].envelopes: must have at least 1 item"],
    ),
    (
        "cap-unknown-envelope",
        {"spec.aggregateCaps[0].envelopes": ["west", "north"]},
        [
            "spec.aggregateCaps[0].envelopes[1]: unknown envelope 'north': "
            "must name an envelope of this budget"
        ],
    ),
    (
        "cap-flavor-mismatch",
        {"spec.aggregateCaps[0].envelopes": ["west", "spare"]},
        [
            "spec.aggregateCaps[0].envelopes[1]: envelope 'spare' has flavor 'A100': "
            "must match the cap's flavor 'H100'"
        ],
    ),
    (
        "cap-duplicate-envelope",
        {"spec.aggregateCaps[0].envelopes": ["west", "east", "west"]},
        [
            "spec.aggregateCaps[0].envelopes[2]: duplicate envelope 'west' "
            "(also at spec.aggregateCaps[0].envelopes[0])"
        ],
    ),
    (
        "cap-empty-member",
        {"spec.aggregateCaps[0].envelopes": ["west", ""]},
        ["spec.aggregateCaps[0].envelopes[1]: must not be empty"],
    ),
    (
        "cap-max-zero",
        {"spec.aggregateCaps[0].maxConcurrency": 0},
        ["spec.aggregateCaps[0].maxConcurrency: must be > 0"],
    ),
    (
        "cap-hours-negative",
        {"spec.aggregateCaps[0].gpuHours": -5},
        ["spec.aggregateCaps[0].gpuHours: must be > 0"],
    ),
    (
        "cap-bounds-nothing",
        {"spec.aggregateCaps[0].maxConcurrency": DELETE},
        ["spec.aggregateCaps[0]: must set maxConcurrency or gpuHours (a cap must bound something)"],
    ),
    (
        "cap-skips-reference-check-when-an-envelope-is-unreadable",
        {"spec.envelopes[2]": "spare"},
        ["spec.envelopes[2]: expected mapping, got str"],
    ),
    ("parent-empty", {"spec.parents": ["org:ai", ""]}, ["spec.parents[1]: must not be empty"]),
    (
        "parent-duplicate",
        {"spec.parents": ["org:ai", "org:x", "org:ai"]},
        ["spec.parents[2]: duplicate parent 'org:ai' (also at spec.parents[0])"],
    ),
    (
        "parent-is-owner",
        {"spec.parents": ["org:ai:rai"]},
        ["spec.parents[0]: must not be the budget's own owner 'org:ai:rai'"],
    ),
    (
        "renew-period-missing",
        {"spec.autoRenew": {"notifyBefore": "24h"}},
        ["spec.autoRenew.period: required"],
    ),
    (
        "renew-period-invalid",
        {"spec.autoRenew": {"period": "monthly"}},
        [f"spec.autoRenew.period: 'monthly' {DURATION_RULE}"],
    ),
    (
        "renew-period-zero",
        {"spec.autoRenew": {"period": "0s"}},
        ["spec.autoRenew.period: must be > 0"],
    ),
    (
        "renew-notify-invalid",
        {"spec.autoRenew": {"period": "720h", "notifyBefore": "a week"}},
        [f"spec.autoRenew.notifyBefore: 'a week' {DURATION_RULE}"],
    ),
    ("budget-name-empty", {"metadata.name": ""}, ["metadata.name: must not be empty"]),
    (
        "budget-name-invalid",
        {"metadata.name": "Team_Budget"},
        [f"metadata.name: {DNS_SUBDOMAIN_RULE}"],
    ),
]


class TestBudgetRules:
    @pytest.mark.parametrize(
        ("change", "expected"),
        [pytest.param(c, e, id=i) for i, c, e in BUDGET_CASES],
    )
    def test_rule(self, change: dict[str, object], expected: list[str]) -> None:
        assert errors(patched(budget_doc(), change)) == expected

    def test_budget_name_may_be_a_subdomain(self) -> None:
        budget = validate_manifest(patched(budget_doc(), {"metadata.name": "q1.rai"}))
        assert budget.metadata.name == "q1.rai"


# --------------------------------------------------------------------------------------------
# Run rules (SPEC §A.2 + runtime)
# --------------------------------------------------------------------------------------------

RUN_CASES: list[tuple[str, dict[str, object], list[str]]] = [
    ("name-empty", {"metadata.name": ""}, ["metadata.name: must not be empty"]),
    ("name-not-dns", {"metadata.name": "Ra_1"}, [f"metadata.name: {DNS_LABEL_RULE}"]),
    ("name-dotted", {"metadata.name": "ra.1"}, [f"metadata.name: {DNS_LABEL_RULE}"]),
    ("name-trailing-dash", {"metadata.name": "ra-"}, [f"metadata.name: {DNS_LABEL_RULE}"]),
    (
        "name-too-long",
        {"metadata.name": "r" * 64},
        ["metadata.name: must be at most 63 characters (DNS-1123 label)"],
    ),
    (
        "namespace-not-dns",
        {"metadata.namespace": "Team A"},
        [f"metadata.namespace: {DNS_LABEL_RULE}"],
    ),
    (
        "gpu-type-empty",
        {"spec.resources.gpuType": ""},
        ["spec.resources.gpuType: must not be empty"],
    ),
    ("total-zero", {"spec.resources.totalGPUs": 0}, ["spec.resources.totalGPUs: must be >= 1"]),
    (
        "total-negative",
        {"spec.resources.totalGPUs": -8},
        ["spec.resources.totalGPUs: must be >= 1"],
    ),
    ("group-zero", {"spec.locality": {"groupGPUs": 0}}, ["spec.locality.groupGPUs: must be >= 1"]),
    ("spares-negative", {"spec.sparesPerGroup": -1}, ["spec.sparesPerGroup: must be >= 0"]),
    (
        "borrow-cap-zero",
        {"spec.funding": {"allowBorrow": True, "maxBorrowGPUs": 0}},
        ["spec.funding.maxBorrowGPUs: must be > 0"],
    ),
    (
        "sponsor-empty",
        {"spec.funding": {"sponsors": ["org:x", ""]}},
        ["spec.funding.sponsors[1]: must not be empty"],
    ),
    (
        "sponsor-duplicate",
        {"spec.funding": {"sponsors": ["org:x", "org:x"]}},
        ["spec.funding.sponsors[1]: duplicate sponsor 'org:x' (also at spec.funding.sponsors[0])"],
    ),
    (
        "after-empty-list",
        {"spec.follow": {"after": []}},
        ["spec.follow.after: must have at least 1 item"],
    ),
    ("after-missing", {"spec.follow": {}}, ["spec.follow.after: required"]),
    (
        "after-empty-name",
        {"spec.follow": {"after": [""]}},
        ["spec.follow.after[0]: must not be empty"],
    ),
    (
        "after-duplicate",
        {"spec.follow": {"after": ["prep", "prep"]}},
        ["spec.follow.after[1]: duplicate run 'prep' (also at spec.follow.after[0])"],
    ),
    (
        "after-self",
        {"spec.follow": {"after": ["prep", "ra1"]}},
        ["spec.follow.after[1]: must not name the run itself ('ra1')"],
    ),
    (
        "after-not-a-run-name",
        {"spec.follow": {"after": ["rai/prep"]}},
        [f"spec.follow.after[0]: {DNS_LABEL_RULE}"],
    ),
    (
        "grace-invalid",
        {"spec.follow": {"after": ["prep"], "upstreamFailureGrace": "-5m"}},
        [f"spec.follow.upstreamFailureGrace: '-5m' {DURATION_RULE}"],
    ),
    (
        "grace-empty",
        {"spec.follow": {"after": ["prep"], "upstreamFailureGrace": ""}},
        ["spec.follow.upstreamFailureGrace: must be a duration such as 30s, 15m or 1h30m"],
    ),
    (
        "checkpoint-invalid",
        {"spec.runtime": {"checkpoint": "soon"}},
        [f"spec.runtime.checkpoint: 'soon' {DURATION_RULE}"],
    ),
    (
        "max-duration-invalid",
        {"spec.runtime": {"maxDuration": "1 hour"}},
        [f"spec.runtime.maxDuration: '1 hour' {DURATION_RULE}"],
    ),
    (
        "max-duration-zero",
        {"spec.runtime": {"maxDuration": "0s"}},
        ["spec.runtime.maxDuration: must be > 0"],
    ),
    (
        "preemption-grace-invalid",
        {"spec.runtime": {"preemptionGrace": "5 minutes"}},
        [f"spec.runtime.preemptionGrace: '5 minutes' {DURATION_RULE}"],
    ),
]

MALLEABLE_CASES: list[tuple[str, dict[str, object], list[str]]] = [
    ("min-zero", {"spec.malleable.minTotalGPUs": 0}, ["spec.malleable.minTotalGPUs: must be >= 1"]),
    ("max-zero", {"spec.malleable.maxTotalGPUs": 0}, ["spec.malleable.maxTotalGPUs: must be >= 1"]),
    ("step-zero", {"spec.malleable.stepGPUs": 0}, ["spec.malleable.stepGPUs: must be >= 1"]),
    ("step-missing", {"spec.malleable.stepGPUs": DELETE}, ["spec.malleable.stepGPUs: required"]),
    (
        "min-above-max",
        {"spec.malleable.minTotalGPUs": 20},
        ["spec.malleable.minTotalGPUs: must be <= maxTotalGPUs (16)"],
    ),
    (
        "total-below-min",
        {"spec.resources.totalGPUs": 2},
        ["spec.resources.totalGPUs: must be >= minTotalGPUs (4)"],
    ),
    (
        "total-above-max",
        {"spec.resources.totalGPUs": 20},
        ["spec.resources.totalGPUs: must be <= maxTotalGPUs (16)"],
    ),
    (
        "total-off-step",
        {"spec.resources.totalGPUs": 10},
        [
            "spec.resources.totalGPUs: must be minTotalGPUs plus a multiple of stepGPUs "
            "(totalGPUs - minTotalGPUs = 6, stepGPUs = 4)"
        ],
    ),
    (
        "max-off-ladder-without-desired",
        {"spec.malleable.maxTotalGPUs": 14},
        [
            "spec.malleable.maxTotalGPUs: must be minTotalGPUs plus a multiple of stepGPUs when "
            "desiredTotalGPUs is unset (it defaults to maxTotalGPUs; maxTotalGPUs - minTotalGPUs "
            "= 10, stepGPUs = 4)"
        ],
    ),
    (
        "desired-zero",
        {"spec.malleable.desiredTotalGPUs": 0},
        ["spec.malleable.desiredTotalGPUs: must be >= 1"],
    ),
    (
        "desired-below-min",
        {"spec.malleable.desiredTotalGPUs": 2},
        ["spec.malleable.desiredTotalGPUs: must be >= minTotalGPUs (4)"],
    ),
    (
        "desired-above-max",
        {"spec.malleable.desiredTotalGPUs": 20},
        ["spec.malleable.desiredTotalGPUs: must be <= maxTotalGPUs (16)"],
    ),
    (
        "desired-off-step",
        {"spec.malleable.desiredTotalGPUs": 13},
        [
            "spec.malleable.desiredTotalGPUs: must be minTotalGPUs plus a multiple of stepGPUs "
            "(desiredTotalGPUs - minTotalGPUs = 9, stepGPUs = 4)"
        ],
    ),
]

ROLE_CASES: list[tuple[str, dict[str, object], list[str]]] = [
    (
        "two-roles",
        {"spec.roles[1]": {"name": "other", "width": 8}},
        ["spec.roles: must have at most 1 item (v1 runs have one role), got 2"],
    ),
    ("role-name-missing", {"spec.roles[0].name": DELETE}, ["spec.roles[0].name: required"]),
    (
        "role-name-not-dns",
        {"spec.roles[0].name": "Worker"},
        [f"spec.roles[0].name: {DNS_LABEL_RULE}"],
    ),
    ("width-zero", {"spec.roles[0].width": 0}, ["spec.roles[0].width: must be >= 1"]),
    (
        "gpus-per-pod-zero",
        {"spec.roles[0].gpusPerPod": 0},
        ["spec.roles[0].gpusPerPod: must be >= 1"],
    ),
    (
        "width-times-gpus-mismatch",
        {"spec.roles[0].width": 3},
        ["spec.roles[0]: width × gpusPerPod (3 × 4 = 12) must equal totalGPUs (8)"],
    ),
    (
        "defaults-count-in-product",
        {"spec.roles[0]": {"name": "worker"}},
        ["spec.roles[0]: width × gpusPerPod (1 × 1 = 1) must equal totalGPUs (8)"],
    ),
    ("role-group-zero", {"spec.roles[0].groupGPUs": 0}, ["spec.roles[0].groupGPUs: must be >= 1"]),
    ("role-spares-negative", {"spec.roles[0].spares": -1}, ["spec.roles[0].spares: must be >= 0"]),
    (
        "retry-without-retries",
        {"spec.roles[0].failurePolicy": "Retry"},
        ["spec.roles[0].retries: required when failurePolicy is Retry"],
    ),
    (
        "retry-with-zero-retries",
        {"spec.roles[0].failurePolicy": "Retry", "spec.roles[0].retries": 0},
        ["spec.roles[0].retries: must be >= 1"],
    ),
    (
        "retries-without-retry",
        {"spec.roles[0].retries": 2},
        ["spec.roles[0].retries: must not be set unless failurePolicy is Retry"],
    ),
    (
        "retries-with-ignore",
        {"spec.roles[0].failurePolicy": "Ignore", "spec.roles[0].retries": 2},
        ["spec.roles[0].retries: must not be set unless failurePolicy is Retry"],
    ),
    (
        "backoff-invalid",
        {"spec.roles[0].backoff": "later"},
        [f"spec.roles[0].backoff: 'later' {DURATION_RULE}"],
    ),
]


class TestRunRules:
    @pytest.mark.parametrize(
        ("change", "expected"), [pytest.param(c, e, id=i) for i, c, e in RUN_CASES]
    )
    def test_rule(self, change: dict[str, object], expected: list[str]) -> None:
        assert errors(patched(run_doc(), change)) == expected

    @pytest.mark.parametrize(
        ("change", "expected"), [pytest.param(c, e, id=i) for i, c, e in MALLEABLE_CASES]
    )
    def test_malleable_rule(self, change: dict[str, object], expected: list[str]) -> None:
        assert errors(patched(malleable_run_doc(), change)) == expected

    @pytest.mark.parametrize(
        ("change", "expected"), [pytest.param(c, e, id=i) for i, c, e in ROLE_CASES]
    )
    def test_role_rule(self, change: dict[str, object], expected: list[str]) -> None:
        assert errors(patched(role_run_doc(), change)) == expected

    @pytest.mark.parametrize("total", [4, 8, 12, 16])
    def test_totals_on_the_ladder_are_valid(self, total: int) -> None:
        run = validate_manifest(patched(malleable_run_doc(), {"spec.resources.totalGPUs": total}))
        assert isinstance(run, Run)
        assert run.min_width == 4

    def test_max_may_sit_off_the_ladder_when_desired_is_set(self) -> None:
        doc = patched(
            malleable_run_doc(),
            {"spec.malleable.maxTotalGPUs": 14, "spec.malleable.desiredTotalGPUs": 12},
        )
        run = validate_manifest(doc)
        assert isinstance(run, Run)
        assert run.desired_width == 12

    def test_zero_durations_are_valid_where_allowed(self) -> None:
        doc = patched(
            run_doc(),
            {
                "spec.runtime": {"checkpoint": "0s", "preemptionGrace": "0"},
                "spec.follow": {"after": ["prep"], "upstreamFailureGrace": "0s"},
            },
        )
        assert isinstance(validate_manifest(doc), Run)


class TestTemplate:
    def template_doc(self, pod_spec: dict[str, object]) -> dict[str, Any]:
        return patched(role_run_doc(), {"spec.roles[0].template": {"spec": pod_spec}})

    @pytest.mark.parametrize(
        ("key", "reason"),
        [
            ("nodeName", "gpu-fleet places the pods"),
            ("schedulerName", "gpu-fleet schedules the pods"),
            ("restartPolicy", "gpu-fleet handles restarts"),
        ],
    )
    def test_owned_pod_fields(self, key: str, reason: str) -> None:
        doc = self.template_doc({key: "x", "containers": [{"name": "c", "image": "i"}]})
        assert errors(doc) == [f"spec.roles[0].template.spec.{key}: must not be set ({reason})"]

    @pytest.mark.parametrize("name", RESERVED_ENV)
    def test_reserved_env(self, name: str) -> None:
        containers = [
            {"name": "side", "image": "s"},
            {
                "name": "workload",
                "image": "i",
                "env": [{"name": "OK", "value": "1"}, {"name": name}],
            },
        ]
        assert errors(self.template_doc({"containers": containers})) == [
            f"spec.roles[0].template.spec.containers[1].env[1].name: "
            f"must not set {name} (gpu-fleet injects it)"
        ]

    def test_light_validation_ignores_other_shapes(self) -> None:
        shapes: list[dict[str, object]] = [
            {"containers": "nope"},
            {"containers": ["nope", {"env": "x"}]},
            {},
        ]
        for pod_spec in shapes:
            assert isinstance(validate_manifest(self.template_doc(pod_spec)), Run)
        doc = patched(role_run_doc(), {"spec.roles[0].template": {"metadata": {"nodeName": "x"}}})
        assert isinstance(validate_manifest(doc), Run)


# --------------------------------------------------------------------------------------------
# Text: YAML, JSON, documents, lists
# --------------------------------------------------------------------------------------------

BUDGET_YAML = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {name: rai, namespace: rai}
spec:
  owner: "org:ai:rai"
  envelopes:
    - name: west
      flavor: H100
      selector: {region: no}
      concurrency: 8
      start: 2026-01-01T00:00:00Z
      end: 2027-01-01T00:00:00Z
"""

RUN_YAML = """\
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {name: ra1}
spec:
  resources: {gpuType: H100, totalGPUs: 8}
"""


class TestParseManifests:
    def test_multi_document_yaml(self) -> None:
        out = parse_manifests(f"---\n{BUDGET_YAML}---\n{RUN_YAML}")
        assert [type(m) for m in out] == [Budget, Run]
        assert out[1].key == "default/ra1"

    def test_yaml_scalars_mean_what_they_look_like(self) -> None:
        """``no`` stays a string and an unquoted instant is parsed as a timestamp (YAML 1.2)."""
        (budget,) = parse_manifests(BUDGET_YAML)
        assert isinstance(budget, Budget)
        env = budget.spec.envelopes[0]
        assert env.selector == {"region": "no"}
        assert env.start == dt.datetime(2026, 1, 1, tzinfo=UTC)

    def test_loader_resolution(self) -> None:
        (doc,) = load_documents(
            "a: [yes, on, true, False, 010, 0x1f, 1:30, 1_000, 12, -3, 1.5, 1e3, .inf, ~, "
            "2026-01-01, 2026-01-01T00:00:00Z]"
        )
        assert doc == {
            "a": [
                "yes", "on", True, False, "010", "0x1f", "1:30", "1_000", 12, -3, 1.5, 1000.0,
                float("inf"), None, "2026-01-01", "2026-01-01T00:00:00Z",
            ]
        }  # fmt: skip

    def test_octal_looking_count_is_a_type_error(self) -> None:
        text = RUN_YAML.replace("totalGPUs: 8", "totalGPUs: 010")
        assert parse_errors(text) == ["spec.resources.totalGPUs: expected int, got str"]

    def test_json(self) -> None:
        text = json.dumps(budget_doc())
        (budget,) = parse_manifests(text, "b.json")
        assert budget == validate_manifest(budget_doc())

    def test_flow_yaml_that_starts_like_json(self) -> None:
        (run,) = parse_manifests(
            "{apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: a},\n"
            " spec: {resources: {gpuType: H100, totalGPUs: 1}}}\n"
        )
        assert isinstance(run, Run)

    def test_empty_input_and_empty_documents(self) -> None:
        assert parse_manifests("") == []
        assert parse_manifests("---\n---\n# nothing\n") == []
        out = parse_manifests(f"---\n---\n{RUN_YAML}---\n")
        assert [type(m) for m in out] == [Run]

    def test_single_document_has_no_prefix(self) -> None:
        text = RUN_YAML.replace("totalGPUs: 8", "totalGPUs: 0")
        assert parse_errors(f"---\n{text}---\n") == ["spec.resources.totalGPUs: must be >= 1"]

    def test_documents_prefix_counts_position_in_file(self) -> None:
        bad = RUN_YAML.replace("totalGPUs: 8", "totalGPUs: 0")
        assert parse_errors(f"{BUDGET_YAML}---\n---\n{bad}") == [
            "documents[2].spec.resources.totalGPUs: must be >= 1"
        ]

    def test_errors_of_all_documents_and_all_or_nothing(self) -> None:
        bad_run = RUN_YAML.replace("totalGPUs: 8", "totalGPUs: 0")
        bad_budget = BUDGET_YAML.replace("concurrency: 8", "concurrency: 0")
        text = f"{bad_budget}---\n{RUN_YAML}---\n{bad_run}---\nkind: Pod\n"
        assert parse_errors(text) == [
            "documents[0].spec.envelopes[0].concurrency: must be > 0",
            "documents[2].spec.resources.totalGPUs: must be >= 1",
            "documents[3].apiVersion: required",
            "documents[3].kind: unsupported kind 'Pod': must be Budget, Run or NotificationChannel",
        ]

    def test_kind_list(self) -> None:
        items = [budget_doc(), run_doc()]
        text = json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
        out = parse_manifests(text)
        assert out == [validate_manifest(budget_doc()), validate_manifest(run_doc())]

    def test_kind_list_errors(self) -> None:
        bad = patched(run_doc(), {"spec.resources.totalGPUs": 0})
        text = yaml.safe_dump({"kind": "List", "items": [run_doc(), bad]})
        assert parse_errors(text) == ["items[1].spec.resources.totalGPUs: must be >= 1"]
        two = f"{RUN_YAML}---\n" + yaml.safe_dump({"kind": "List", "items": [bad], "extra": 1})
        assert parse_errors(two) == [
            "documents[1].extra: unknown field",
            "documents[1].items[0].spec.resources.totalGPUs: must be >= 1",
        ]
        assert parse_errors("kind: List\n") == ["items: required"]
        assert parse_errors("kind: List\nitems: {}\n") == ["items: expected list, got mapping"]

    def test_yaml_syntax_error_names_source_line_and_column(self) -> None:
        assert parse_errors("kind: Run\nspec: [1, 2\n", "run.yaml") == [
            "run.yaml: line 3, column 1: expected ',' or ']', but got '<stream end>' "
            "(while parsing a flow sequence)"
        ]

    def test_duplicate_keys_are_rejected(self) -> None:
        text = RUN_YAML.replace("kind: Run\n", "kind: Run\nkind: Budget\n")
        assert parse_errors(text, "run.yaml") == [
            "run.yaml: line 3, column 1: found duplicate key 'kind' (while constructing a mapping)"
        ]

    def test_merge_keys_may_be_overridden(self) -> None:
        (doc,) = load_documents("base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  x: 3\n")
        assert doc == {"base": {"x": 1, "y": 2}, "derived": {"x": 3, "y": 2}}

    def test_unsafe_tags_are_refused(self) -> None:
        lines = parse_errors("!!python/object:os.system {}\n", "evil.yaml")
        assert len(lines) == 1
        assert lines[0].startswith("evil.yaml: line 1, column 1: could not determine a constructor")


# --------------------------------------------------------------------------------------------
# Round trips (what the ledger stores must validate back to the same spec)
# --------------------------------------------------------------------------------------------


def round_trip(manifest: Budget | Run) -> Budget | Run:
    return validate_manifest(msgspec.json.decode(msgspec.json.encode(manifest)))


class TestRoundTrip:
    @pytest.mark.parametrize(
        "doc",
        [
            pytest.param(budget_doc(), id="budget"),
            pytest.param(run_doc(), id="run"),
            pytest.param(full_run_doc(), id="full-run"),
            pytest.param(malleable_run_doc(), id="malleable"),
            pytest.param(
                patched(
                    budget_doc(),
                    {
                        "spec.envelopes[0].lending": {"allow": True, "to": ["*"]},
                        "spec.envelopes[0].preActivation": {"allowReservations": False},
                        "spec.autoRenew": {"period": "720h", "notifyBefore": "24h"},
                    },
                ),
                id="budget-with-blocks",
            ),
        ],
    )
    def test_encode_then_validate_is_identity(self, doc: dict[str, Any]) -> None:
        first = validate_manifest(doc)
        assert round_trip(first) == first
        assert parse_manifests(msgspec.json.encode(first).decode()) == [first]
        assert parse_manifests(yaml.safe_dump(msgspec.to_builtins(first))) == [first]


NAMES = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,14}[a-z0-9])?", fullmatch=True)
DURATIONS = st.sampled_from(["0s", "30s", "15m", "1h30m", "2h", "1.5h", "36h"])
POSITIVE_DURATIONS = st.sampled_from(["30s", "15m", "1h30m", "2h", "1.5h", "36h"])


@st.composite
def valid_runs(draw: st.DrawFn) -> dict[str, Any]:
    """Random runs that satisfy every rule, built the way a user would write them."""
    name = draw(NAMES)
    spec: dict[str, Any] = {"resources": {"gpuType": draw(st.sampled_from(["H100", "A100-80GB"]))}}
    if draw(st.booleans()):
        lo, step = draw(st.integers(1, 32)), draw(st.integers(1, 8))
        rungs = draw(st.integers(0, 6))
        total = lo + step * draw(st.integers(0, rungs))
        if draw(st.booleans()):  # the maximum may sit off the ladder only with a desired width
            hi = lo + step * rungs + draw(st.integers(0, step - 1))
            desired = lo + step * draw(st.integers(0, rungs))
            spec["malleable"] = {"maxTotalGPUs": hi, "desiredTotalGPUs": desired}
        else:
            spec["malleable"] = {"maxTotalGPUs": lo + step * rungs}
        spec["malleable"].update({"minTotalGPUs": lo, "stepGPUs": step})
    else:
        total = draw(st.integers(1, 512))
    spec["resources"]["totalGPUs"] = total
    if draw(st.booleans()):
        spec["locality"] = {"groupGPUs": draw(st.integers(1, 64))}
        if draw(st.booleans()):
            spec["locality"]["allowCrossGroupSpread"] = draw(st.booleans())
    if draw(st.booleans()):
        spec["sparesPerGroup"] = draw(st.integers(0, 8))
    if draw(st.booleans()):
        allow = draw(st.booleans())
        spec["funding"] = {
            "allowBorrow": allow,
            "sponsors": draw(st.lists(st.sampled_from(["org:a", "org:b", "x"]), unique=True)),
        }
        if allow and draw(st.booleans()):
            spec["funding"]["maxBorrowGPUs"] = draw(st.integers(1, 64))
    if draw(st.booleans()):
        after = draw(
            st.lists(NAMES.filter(lambda n: n != name), min_size=1, max_size=3, unique=True)
        )
        spec["follow"] = {
            "after": after,
            "onUpstreamFailure": draw(st.sampled_from(["", "wait", "fail"])),
            "upstreamFailureGrace": draw(DURATIONS),
        }
    if draw(st.booleans()):
        spec["runtime"] = {"checkpoint": draw(DURATIONS)}
        if draw(st.booleans()):
            spec["runtime"]["maxDuration"] = draw(POSITIVE_DURATIONS)
        if draw(st.booleans()):
            spec["runtime"]["preemptionGrace"] = draw(DURATIONS)
    if draw(st.booleans()):
        divisors = [d for d in range(1, min(total, 64) + 1) if total % d == 0]
        per_pod = draw(st.sampled_from(divisors))
        policy = draw(st.sampled_from(["Fail", "Retry", "Ignore"]))
        role: dict[str, Any] = {
            "name": draw(NAMES),
            "width": total // per_pod,
            "gpusPerPod": per_pod,
            "failurePolicy": policy,
            "template": {"spec": {"containers": [{"name": "workload", "image": "img:1"}]}},
        }
        if policy == "Retry":
            role["retries"] = draw(st.integers(1, 5))
        spec["roles"] = [role]
    meta: dict[str, Any] = {"name": name}
    if draw(st.booleans()):
        meta["namespace"] = draw(NAMES | st.just(""))
    return {"apiVersion": API_VERSION, "kind": "Run", "metadata": meta, "spec": spec}


JUNK_KEYS = [
    "resources", "gpuType", "totalGPUs", "malleable", "minTotalGPUs", "maxTotalGPUs", "stepGPUs",
    "desiredTotalGPUs", "roles", "name", "width", "gpusPerPod", "failurePolicy", "retries",
    "template", "spec", "containers", "env", "follow", "after", "envelopes", "aggregateCaps",
    "flavor", "selector", "concurrency", "start", "end", "lending", "allow", "maxConcurrency",
    "owner", "parents", "autoRenew", "period", "funding", "sponsors", "runtime", "maxDuration",
    "gpuHours", "sharing", "locality", "groupGPUs",
]  # fmt: skip
JUNK = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats()
    | st.text(max_size=4)
    | st.sampled_from(["", "0s", "H100", "2026-01-01T00:00:00Z", "Retry", "west", "ra1"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(JUNK_KEYS), inner, max_size=5)
    ),
    max_leaves=25,
)


class TestProperties:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(valid_runs())
    def test_valid_runs_validate_and_round_trip(self, doc: dict[str, Any]) -> None:
        run = validate_manifest(doc)
        assert isinstance(run, Run)
        assert run.spec.resources.total_gpus == doc["spec"]["resources"]["totalGPUs"]
        m = run.spec.malleable
        if m is not None:
            assert m.desired_total_gpus == doc["spec"]["malleable"].get(
                "desiredTotalGPUs", m.max_total_gpus
            )
        if run.spec.follow is not None:
            assert run.spec.follow.on_upstream_failure in {"wait", "fail"}
        assert run.metadata.namespace != ""
        assert round_trip(run) == run

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["Budget", "Run"]), JUNK, JUNK)
    def test_any_input_gives_a_manifest_or_a_manifest_error(
        self, kind: str, metadata: object, spec: object
    ) -> None:
        raw = {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}
        outcome: object
        try:
            outcome = validate_manifest(raw)
        except ManifestError as exc:
            outcome = exc
        if isinstance(outcome, ManifestError):
            assert outcome.errors
            assert all(e.path and e.message for e in outcome.errors)
        else:
            assert isinstance(outcome, Budget | Run)


# --------------------------------------------------------------------------------------------
# Nodes and inventories
# --------------------------------------------------------------------------------------------

NODE = {"name": "a1", "gpus": 8, "labels": {"region": "us-west", "gpu.flavor": "H100"}}


class TestNodes:
    def test_valid_node(self) -> None:
        node = validate_node(NODE, "nodes[0]")
        assert node == Node(name="a1", gpus=8, labels={"region": "us-west", "gpu.flavor": "H100"})
        assert node.health is NodeHealth.READY
        assert node.flavor == "H100"

    def test_health_and_zero_gpus(self) -> None:
        node = validate_node({"name": "cpu-1.rack2", "gpus": 0, "health": "Cordoned"}, "n")
        assert node.health is NodeHealth.CORDONED
        assert node.gpus == 0

    @pytest.mark.parametrize(
        ("change", "expected"),
        [
            ({"name": ""}, ["nodes[0].name: must not be empty"]),
            ({"name": "A1_x"}, [f"nodes[0].name: {DNS_SUBDOMAIN_RULE}"]),
            ({"gpus": -1}, ["nodes[0].gpus: must be >= 0"]),
            ({"gpus": "8"}, ["nodes[0].gpus: expected int, got str"]),
            ({"labels": {"zone": 1}}, ["nodes[0].labels[zone]: expected str, got int"]),
            (
                {"health": "Dead"},
                ["nodes[0].health: must be one of 'Ready', 'Cordoned', 'Fenced', got 'Dead'"],
            ),
            ({"gpu": 8}, ["nodes[0].gpu: unknown field"]),
        ],
    )
    def test_node_rules(self, change: dict[str, object], expected: list[str]) -> None:
        with pytest.raises(ManifestError) as info:
            validate_node({**NODE, **change}, "nodes[0]")
        assert str(info.value).splitlines() == expected

    def test_missing_fields(self) -> None:
        with pytest.raises(ManifestError) as info:
            validate_node({}, "fleet.nodes[3]")
        assert str(info.value).splitlines() == [
            "fleet.nodes[3].name: required",
            "fleet.nodes[3].gpus: required",
        ]

    def test_inventory_forms(self) -> None:
        plain = parse_inventory("nodes:\n  - {name: a1, gpus: 8}\n  - {name: a2, gpus: 4}\n")
        assert [n.name for n in plain] == ["a1", "a2"]
        scenario = parse_inventory(
            "name: s\nstart: '2026-01-01T00:00:00Z'\nfleet:\n  nodes:\n    - {name: a1, gpus: 8}\n"
        )
        assert scenario == [Node(name="a1", gpus=8)]
        assert parse_inventory(json.dumps({"nodes": []})) == []

    def test_inventory_errors(self) -> None:
        assert inventory_errors("nodes:\n  - {name: a1, gpus: 8}\n  - {name: a1, gpus: -2}\n") == [
            "nodes[1].gpus: must be >= 0",
            "nodes[1].name: duplicate node name 'a1' (also at nodes[0])",
        ]
        assert inventory_errors("fleet:\n  nodes: [{name: b, gpus: 1}, {name: b, gpus: 1}]\n") == [
            "fleet.nodes[1].name: duplicate node name 'b' (also at fleet.nodes[0])"
        ]
        assert inventory_errors("nodes: []\nextra: 1\n") == ["extra: unknown field"]
        assert inventory_errors("fleet: {nodes: [], size: 3}\n") == ["fleet.size: unknown field"]
        assert inventory_errors("fleet: [a]\n") == ["fleet: expected mapping, got list"]
        assert inventory_errors("") == ["nodes: required"]
        assert inventory_errors("nodes: {a1: 8}\n") == ["nodes: expected list, got mapping"]
        assert inventory_errors("- a1\n") == ["<document>: expected mapping, got list"]
        assert inventory_errors("nodes: []\n---\nnodes: []\n") == [
            "fleet.yaml: expected one document, got 2"
        ]
        assert inventory_errors("nodes: [\n") == [
            "fleet.yaml: line 2, column 1: expected the node content, "
            "but found '<stream end>' (while parsing a flow node)"
        ]


# --------------------------------------------------------------------------------------------
# The shared scenario corpus (when present): every object and applied manifest is valid
# --------------------------------------------------------------------------------------------

SCENARIOS = Path(__file__).resolve().parents[3] / "shared" / "scenarios"


@pytest.mark.skipif(not SCENARIOS.is_dir(), reason="shared scenarios not present")
def test_shared_scenario_manifests_validate() -> None:
    files = sorted(SCENARIOS.glob("*.yaml"))
    assert files
    for path in files:
        text = path.read_text()
        (doc,) = load_documents(text, path.name)
        assert isinstance(doc, dict)
        assert parse_inventory(text, path.name)
        for i, obj in enumerate(doc.get("objects") or ()):
            validate_manifest(obj, f"objects[{i}]")
        for i, step in enumerate(doc.get("steps") or ()):
            if "apply" in step:
                validate_manifest(step["apply"], f"steps[{i}].apply")
