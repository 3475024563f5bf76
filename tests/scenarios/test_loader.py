"""Loading scenario files: typed values on success, every problem with its field path on failure."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path

import msgspec
import pytest
import yaml

from gpu_fleet.core.model import Budget, Run
from gpu_fleet.scenario.loader import (
    ApplyStep,
    CompleteStep,
    CordonNodeStep,
    DeleteStep,
    EtaStep,
    FailStep,
    FenceNodeStep,
    ReportStep,
    Scenario,
    ScenarioError,
    Settings,
    ShrinkStep,
    load_scenario,
    load_scenario_file,
    parse_scenario,
)

SHARED_SCENARIOS = Path(__file__).parents[2].parent / "shared" / "scenarios"

T0 = 1767571200  # 2026-01-05T00:00:00Z

HEAD = """\
name: demo
start: "2026-01-05T00:00:00Z"
fleet:
  nodes:
    - name: a1
      gpus: 8
      labels: {region: us-west, cluster: c1, fabric.domain: A, gpu.flavor: H100-80GB}
    - name: a2
      gpus: 8
      labels: {region: us-west, cluster: c1, fabric.domain: A, gpu.flavor: H100-80GB}
objects:
  - apiVersion: rq.davidlangworthy.io/v1
    kind: Budget
    metadata: {name: rai, namespace: rai}
    spec:
      owner: "org:ai:rai"
      envelopes:
        - name: west
          flavor: H100-80GB
          selector: {region: us-west}
          concurrency: 16
          start: "2026-01-01T00:00:00Z"
          end: "2027-01-01T00:00:00Z"
  - apiVersion: rq.davidlangworthy.io/v1
    kind: Run
    metadata: {name: ra1, namespace: rai}
    spec: {resources: {gpuType: H100-80GB, totalGPUs: 8}}
"""

RUN2 = (
    "{apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: ra2, namespace: rai},"
    " spec: {resources: {gpuType: H100-80GB, totalGPUs: 8},"
    " malleable: {minTotalGPUs: 4, maxTotalGPUs: 8, stepGPUs: 4}}}"
)


def scenario(tail: str) -> str:
    return HEAD + textwrap.dedent(tail)


def errors_of(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(text)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


class TestLoadsEveryStepKind:
    def test_full_file(self) -> None:
        s = load_scenario(
            scenario(f"""\
                settings: {{accountingPeriod: 12h, preemptionGrace: 30s, activationLeadPerGPU: 0}}
                steps:
                  - {{at: "+10m", apply: {RUN2}}}
                  - {{at: +11m, shrink: {{namespace: rai, name: ra2, desiredTotalGPUs: 4}}}}
                  - {{at: +12m, cordonNode: a2}}
                  - {{at: +12m, fenceNode: a1}}
                  - {{at: 2026-01-05T00:13:00Z, complete: {{namespace: rai, name: ra1}}}}
                  - {{at: "2026-01-05T01:14:00+01:00", fail: {{namespace: rai, name: ra2}}}}
                  - {{at: +15m, eta: {{namespace: rai, name: ra2, at: +2h}}}}
                  - {{at: +16m, delete: {{kind: Run, namespace: rai, name: ra2}}}}
                  - {{at: +1h30m, report: after}}
                expect:
                  - {{report: after, run: rai/ra1, phase: Completed}}
                  - text: prose
                """),
            source="demo.yaml",
        )
        assert isinstance(s, Scenario)
        assert s.name == "demo"
        assert s.source == "demo.yaml"
        assert s.start == T0
        assert s.settings == Settings(
            accounting_period=12 * 3600, preemption_grace=30, activation_lead_per_gpu=0
        )
        assert [n.name for n in s.nodes] == ["a1", "a2"]
        assert [type(o) for o in s.objects] == [Budget, Run]
        m = 60
        apply = s.steps[0]
        assert isinstance(apply, ApplyStep)
        assert apply.manifest.key == "rai/ra2"
        assert s.steps[1:] == (
            ShrinkStep(at=T0 + 11 * m, index=1, run="rai/ra2", desired_total_gpus=4),
            CordonNodeStep(at=T0 + 12 * m, index=2, node="a2"),
            FenceNodeStep(at=T0 + 12 * m, index=3, node="a1"),
            CompleteStep(at=T0 + 13 * m, index=4, run="rai/ra1"),
            FailStep(at=T0 + 14 * m, index=5, run="rai/ra2"),
            EtaStep(at=T0 + 15 * m, index=6, run="rai/ra2", eta=T0 + 2 * 3600),
            DeleteStep(at=T0 + 16 * m, index=7, kind="Run", namespace="rai", name="ra2"),
            ReportStep(at=T0 + 90 * m, index=8, label="after"),
        )
        assert s.steps[0].at == T0 + 10 * m
        assert s.end == T0 + 90 * m
        assert s.report_labels == ("after", "final")
        assert [e.kind for e in s.expectations] == ["run", "text"]

    def test_defaults_and_unquoted_start(self) -> None:
        s = load_scenario("name: tiny\nstart: 2024-01-02T00:00:00Z\n")
        assert s.start == 1704153600
        assert s.settings == Settings()
        assert (s.nodes, s.objects, s.steps, s.expectations) == ((), (), (), ())
        assert s.end == s.start

    def test_parse_scenario_accepts_pyyaml_datetimes(self) -> None:
        """PyYAML's safe_load makes unquoted timestamps datetimes; they are instants too."""
        raw = yaml.safe_load(
            scenario("""\
                steps:
                  - {at: 2026-01-05T00:05:00Z, report: five}
                  - {at: +6m, eta: {namespace: rai, name: ra1, at: 2026-01-05T03:00:00Z}}
                expect:
                  - {run: rai/ra1, earliestStart: 2026-01-05T01:00:00+01:00}
                """).replace('start: "2026-01-05T00:00:00Z"', "start: 2026-01-05T00:00:00Z")
        )
        assert isinstance(raw["start"], dt.datetime)
        s = parse_scenario(raw, source="mem")
        assert s.start == T0
        assert s.steps == (
            ReportStep(at=T0 + 300, index=0, label="five"),
            EtaStep(at=T0 + 360, index=1, run="rai/ra1", eta=T0 + 3 * 3600),
        )
        assert s.expectations[0].raw["earliestStart"] == "2026-01-05T00:00:00Z"

    def test_json_text_loads(self) -> None:
        s = load_scenario('{"name": "j", "start": "2026-01-05T00:00:00Z"}')
        assert (s.name, s.start) == ("j", T0)

    def test_scenario_round_trips_through_msgspec(self) -> None:
        """Steps form a tagged union, so a scenario can be shipped between processes."""
        s = load_scenario(
            scenario(f"""\
                steps:
                  - {{at: +1m, apply: {RUN2}}}
                  - {{at: +2m, fenceNode: a1}}
                  - {{at: +3m, report: r}}
                expect:
                  - {{report: r, run: rai/ra2, allocated: 4}}
                """)
        )
        wire = msgspec.json.encode(s)
        assert b'"action":"fenceNode"' in wire
        assert msgspec.json.decode(wire, type=Scenario) == s

    def test_delete_namespace_defaults_to_default(self) -> None:
        s = load_scenario(
            "name: d\nstart: '2026-01-05T00:00:00Z'\n"
            "objects:\n"
            "  - {apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: r},\n"
            "     spec: {resources: {gpuType: X, totalGPUs: 1}}}\n"
            "steps:\n  - {at: +1m, delete: {kind: Run, name: r}}\n"
        )
        assert s.steps == (
            DeleteStep(at=T0 + 60, index=0, kind="Run", namespace="default", name="r"),
        )

    def test_load_scenario_file(self, tmp_path: Path) -> None:
        path = tmp_path / "s.yaml"
        path.write_text(scenario(""), encoding="utf-8")
        s = load_scenario_file(path)
        assert s.source == str(path)
        with pytest.raises(ScenarioError) as info:
            load_scenario_file(tmp_path / "missing.yaml")
        assert info.value.errors[0].startswith(f"{tmp_path / 'missing.yaml'}: cannot read")


class TestTopLevelErrors:
    def test_required_and_unknown(self) -> None:
        assert errors_of("foo: 1\nstart: nope\n") == [
            "foo: unknown field",
            "name: required",
            "start: must be an RFC 3339 timestamp, got 'nope'",
        ]

    def test_missing_start_does_not_cascade_into_steps(self) -> None:
        """Relative step times cannot be resolved without start; only start is reported."""
        assert errors_of("name: x\nsteps:\n  - {at: +1m, report: r}\n") == ["start: required"]

    def test_not_yaml_or_not_a_mapping(self) -> None:
        errors = errors_of("name: [unclosed\n")
        assert len(errors) == 1
        assert errors[0].startswith("<scenario>: not valid YAML: line 2, column 1:")
        assert errors_of("- a\n") == ["<scenario>: must be a mapping (name, start, fleet, ...)"]
        assert errors_of("") == ["<scenario>: must be a mapping (name, start, fleet, ...)"]
        assert errors_of("name: a\n---\nname: b\n") == [
            "<scenario>: expected one YAML document, got 2"
        ]

    def test_duplicate_keys_are_refused(self) -> None:
        """PyYAML would silently keep the last `at`; a scenario must not lose a line that way."""
        errors = errors_of("name: x\nstart: '2026-01-05T00:00:00Z'\nname: y\n")
        assert errors == [
            "<scenario>: not valid YAML: line 3, column 1: found duplicate key 'name' "
            "(while constructing a mapping)"
        ]

    def test_settings(self) -> None:
        errors = errors_of(
            "name: x\nstart: '2026-01-05T00:00:00Z'\n"
            "settings: {accountingPeriod: 0s, preemptionGrace: 30, activationLead: soon, bogus: 1s}"
        )
        assert errors == [
            "settings.accountingPeriod: must be at least 1s",
            "settings.preemptionGrace: must be a duration such as 30s, 15m or 1h30m, got 30",
            "settings.activationLead: 'soon' is not a duration such as 30s, 15m or 1h30m",
            "settings.bogus: unknown field",
        ]


class TestFleetAndObjectErrors:
    def test_node_errors_carry_index_paths(self) -> None:
        errors = errors_of(
            "name: x\nstart: '2026-01-05T00:00:00Z'\nfleet:\n  nodes:\n"
            "    - {name: a1, gpus: 8}\n    - {name: a2, gpus: 8}\n    - {name: a3, gpus: -1}\n"
        )
        assert len(errors) == 1
        assert errors[0].startswith("fleet.nodes[2].gpus: ")

    def test_duplicate_node_and_unknown_fleet_key(self) -> None:
        errors = errors_of(
            "name: x\nstart: '2026-01-05T00:00:00Z'\nfleet:\n  racks: []\n  nodes:\n"
            "    - {name: a1, gpus: 8}\n    - {name: a1, gpus: 4}\n"
        )
        assert errors == [
            "fleet.racks: unknown field",
            "fleet.nodes[1].name: duplicate node name 'a1' (also at fleet.nodes[0])",
        ]

    def test_object_errors_carry_index_paths(self) -> None:
        errors = errors_of(
            "name: x\nstart: '2026-01-05T00:00:00Z'\nobjects:\n"
            "  - {apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: r},\n"
            "     spec: {resources: {gpuType: X, totalGPUs: 1}}}\n"
            "  - {apiVersion: rq.davidlangworthy.io/v1, kind: Run, metadata: {name: r2},\n"
            "     spec: {resorces: {}}}\n"
        )
        assert errors
        assert all(e.startswith("objects[1]") for e in errors), errors


class TestStepErrors:
    def test_manifest_error_path_inside_apply(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {at: +1m, report: a}
                  - {at: +2m, report: b}
                  - {at: +3m, report: c}
                  - at: +4m
                    apply:
                      apiVersion: rq.davidlangworthy.io/v1
                      kind: Run
                      metadata: {name: m, namespace: rai}
                      spec:
                        resources: {gpuType: H100-80GB, totalGPUs: 8}
                        malleable: {minTotalGPUs: 4, maxTotalGPUs: 8, stepGPUs: 0}
                """)
        )
        assert [e.split(":")[0] for e in errors] == ["steps[3].apply.spec.malleable.stepGPUs"]
        assert errors[0] == "steps[3].apply.spec.malleable.stepGPUs: must be >= 1"

    def test_time_order(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {at: +20m, report: a}
                  - {at: +10m, report: b}
                  - {at: +10m, report: c}
                  - {at: "2026-01-04T23:00:00Z", report: d}
                """)
        )
        assert errors == [
            "steps[1].at: must not be earlier than the previous step "
            "(steps[0] at 2026-01-05T00:20:00Z)",
            "steps[3].at: must not be earlier than start (2026-01-05T00:00:00Z)",
            "steps[3].at: must not be earlier than the previous step "
            "(steps[2] at 2026-01-05T00:10:00Z)",
        ]

    def test_at_forms(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {report: a}
                  - {at: +60, report: b}
                  - {at: "+10 minutes", report: c}
                  - {at: tomorrow, report: d}
                  - {at: "2026-01-06", report: e}
                """)
        )
        assert errors == [
            "steps[0].at: required",
            "steps[1].at: must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp, got 60",
            "steps[2].at: must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp: "
            "'10 minutes' is not a duration such as 30s, 15m or 1h30m",
            "steps[3].at: must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp, "
            "got 'tomorrow'",
            "steps[4].at: must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp, "
            "got '2026-01-06'",
        ]

    def test_exactly_one_action(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {at: +1m}
                  - {at: +2m, report: a, fenceNode: a1}
                  - {at: +3m, explode: a1}
                  - [at, +4m]
                """)
        )
        assert errors == [
            "steps[0]: needs one action (apply, delete, fenceNode, cordonNode, complete, fail, "
            "shrink, report, eta)",
            "steps[1]: has 2 actions (report, fenceNode); one each",
            "steps[2].explode: unknown field",
            "steps[2]: needs one action (apply, delete, fenceNode, cordonNode, complete, fail, "
            "shrink, report, eta)",
            "steps[3]: must be a mapping with at and one action",
        ]

    def test_references_must_exist(self) -> None:
        errors = errors_of(
            scenario(f"""\
                steps:
                  - {{at: +1m, fenceNode: zz}}
                  - {{at: +1m, complete: {{namespace: rai, name: ra2}}}}
                  - {{at: +2m, apply: {RUN2}}}
                  - {{at: +3m, complete: {{namespace: rai, name: ra2}}}}
                  - {{at: +3m, delete: {{kind: Budget, namespace: rai, name: ra1}}}}
                  - {{at: +3m, delete: {{kind: Pod, namespace: rai, name: ra1}}}}
                  - {{at: +3m, delete: {{namespace: rai, name: ra1}}}}
                """)
        )
        assert errors == [
            "steps[0].fenceNode: unknown node 'zz' (fleet: a1, a2)",
            "steps[1].complete: no Run rai/ra2 is defined before this step",
            "steps[4].delete: no Budget rai/ra1 is defined before this step",
            "steps[5].delete.kind: must be Run or Budget",
            "steps[6].delete.kind: required",
        ]

    def test_action_shapes(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {at: +1m, fenceNode: {name: a1}}
                  - {at: +1m, complete: rai/ra1}
                  - {at: +1m, fail: {namespace: rai}}
                  - {at: +1m, shrink: {namespace: rai, name: ra1}}
                  - {at: +1m, shrink: {namespace: rai, name: ra1, desiredTotalGPUs: 0}}
                  - {at: +1m, shrink: {namespace: rai, name: ra1, desiredTotalGPUs: "4"}}
                  - {at: +1m, complete: {namespace: rai, name: ra1, reason: done}}
                  - {at: +1m, eta: {namespace: rai, name: ra1}}
                  - {at: +1m, eta: {namespace: rai, name: ra1, at: later}}
                  - {at: +1m, report: ""}
                  - {at: +1m, report: final}
                  - {at: +1m, report: x}
                  - {at: +1m, report: x}
                """)
        )
        assert errors == [
            "steps[0].fenceNode: must be a node name",
            "steps[1].complete: must be a mapping with namespace and name",
            "steps[2].fail.name: required",
            "steps[3].shrink.desiredTotalGPUs: required",
            "steps[4].shrink.desiredTotalGPUs: must be >= 1",
            "steps[5].shrink.desiredTotalGPUs: must be an integer",
            "steps[6].complete.reason: unknown field",
            "steps[7].eta.at: required",
            "steps[8].eta.at: must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp, "
            "got 'later'",
            "steps[9].report: must be a non-empty report label",
            "steps[10].report: 'final' is reserved for the report captured after the last step",
            "steps[12].report: duplicate label 'x' (also steps[11])",
        ]

    def test_steps_must_be_a_list(self) -> None:
        assert errors_of(scenario("steps: {at: +1m}\n")) == ["steps: must be a list"]


class TestExpectationErrors:
    def test_shape_errors_and_references(self) -> None:
        errors = errors_of(
            scenario("""\
                steps:
                  - {at: +1m, report: early}
                expect:
                  - {report: early, run: rai/ra1, phase: Running}
                  - {report: late, run: rai/ra1}
                  - {run: rai/ghost}
                  - {reservation: {run: rai/ghost}}
                  - {budget: rai/nobudget, envelope: west}
                  - {run: rai/ra1, allocated: lots}
                  - {report: nowhere, text: "prose is never checked, so its label is free"}
                """)
        )
        assert errors == [
            "expect[5].allocated: must be an integer >= 0",
            "expect[1].report: no report labelled 'late' (labels: early, final)",
            "expect[2].run: no Run rai/ghost is defined in this scenario",
            "expect[3].reservation.run: no Run rai/ghost is defined in this scenario",
            "expect[4].budget: no Budget rai/nobudget is defined in this scenario",
        ]

    def test_everything_is_reported_at_once(self) -> None:
        errors = errors_of("start: 3\nfleet: []\nobjects: {}\nsteps: []\nexpect: {}\n")
        assert errors == [
            "name: required",
            "start: must be an RFC 3339 timestamp, got 3",
            "fleet: must be a mapping with nodes",
            "objects: must be a list of Budget and Run manifests",
            "expect: must be a list",
        ]


@pytest.mark.skipif(
    not SHARED_SCENARIOS.exists(), reason=f"shared scenarios not present at {SHARED_SCENARIOS}"
)
def test_every_shared_scenario_loads() -> None:
    """The shared scenario folder is the contract with the project: every file must load."""
    files = sorted(SHARED_SCENARIOS.glob("*.yaml"))
    assert files
    names: set[str] = set()
    for path in files:
        s = load_scenario_file(path)
        assert s.name not in names, f"{path}: duplicate scenario name {s.name}"
        names.add(s.name)
        assert s.steps, path
        labels = set(s.report_labels)
        assert all(e.report in labels for e in s.expectations if e.machine_checkable), path
