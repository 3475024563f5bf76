"""Parse and validate a scenario file (``scenario-format.md``) into frozen, typed values.

The loader is the only place that reads scenario YAML, so the engine that replays a scenario
(in process or ``--via-nats``) receives values that are already valid: instants are Unix
seconds, durations are seconds, manifests are the same ``Budget``/``Run`` Structs the
controllers use, and every step knows its index for error messages and event ordering.

Validation collects *every* problem before failing, each as ``"field.path: message"``
(``steps[3].apply.spec.malleable.stepGPUs: must be >= 1``), because the CLI exits 2 with that
list and an author should fix a file in one pass, not one error per run.

Besides shape, the loader checks what only the whole file can tell: steps are in time order,
node names are unique, steps and expectations name nodes, runs, budgets and report labels that
the file defines.  A typo there would otherwise surface as a confusing engine no-op or a
failed expectation far from its cause.

YAML is read through ``manifests.load_documents`` so a scenario resolves scalars exactly as
``gpu-fleet apply`` does (YAML 1.2 core schema: ``no`` is a string, duplicate keys are errors,
an unquoted ``2024-01-02T00:00:00Z`` stays a string).  Callers that hand-build the raw mapping
with PyYAML's ``safe_load`` get ``datetime`` values instead; those are accepted wherever an
instant is, as is JSON text.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import msgspec

from gpu_fleet.core.funding.cycles import parent_cycle
from gpu_fleet.core.manifests import (
    ManifestError,
    load_documents,
    load_source,
    validate_manifest,
    validate_nodes,
)
from gpu_fleet.core.model import Budget, Instant, Node, Run, run_key, to_instant
from gpu_fleet.core.timeutil import DurationError, format_instant, parse_duration, parse_instant
from gpu_fleet.scenario.expectations import Expectation, collect_expectations

FINAL_REPORT: Final = "final"
"""Label of the report always captured at the last step's time; steps may not use it."""


class ScenarioError(ValueError):
    """An invalid scenario file; ``errors`` holds one ``"path: message"`` per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("\n".join(errors))


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Cluster settings of a scenario; every duration is in whole seconds."""

    accounting_period: int = 86400
    preemption_grace: int = 0
    preemption_grace_max: int = 3600
    activation_lead: int = 900
    activation_lead_per_gpu: int = 30


# Wire key -> (field name, smallest allowed value).  An accounting period of zero would make
# every GPU-hour look-ahead empty, so it must be positive; the others may be zero.
_SETTINGS: Final[dict[str, tuple[str, int]]] = {
    "accountingPeriod": ("accounting_period", 1),
    "preemptionGrace": ("preemption_grace", 0),
    "preemptionGraceMax": ("preemption_grace_max", 0),
    "activationLead": ("activation_lead", 0),
    "activationLeadPerGPU": ("activation_lead_per_gpu", 0),
}


# --------------------------------------------------------------------------------------------
# Steps: one tagged Struct per action, tag = the key used in the file
# --------------------------------------------------------------------------------------------


class _Step(msgspec.Struct, frozen=True, kw_only=True, tag_field="action"):
    """Base of every step: when it happens (Unix seconds) and its position in ``steps:``."""

    at: Instant
    index: int


class ApplyStep(_Step, frozen=True, kw_only=True, tag="apply"):
    """Create or update an object (a Run, or a Budget, e.g. to change its concurrency)."""

    manifest: Budget | Run


class DeleteStep(_Step, frozen=True, kw_only=True, tag="delete"):
    kind: str  # "Run" or "Budget"
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return run_key(self.namespace, self.name)


class FenceNodeStep(_Step, frozen=True, kw_only=True, tag="fenceNode"):
    """The node failed (deleted, or tainted out-of-service)."""

    node: str


class CordonNodeStep(_Step, frozen=True, kw_only=True, tag="cordonNode"):
    """The node takes no new work; existing work is untouched (cordon is not failure)."""

    node: str


class CompleteStep(_Step, frozen=True, kw_only=True, tag="complete"):
    """The run's workload finished successfully; ``run`` is ``namespace/name``."""

    run: str


class FailStep(_Step, frozen=True, kw_only=True, tag="fail"):
    """The run's workload failed; ``run`` is ``namespace/name``."""

    run: str


class ShrinkStep(_Step, frozen=True, kw_only=True, tag="shrink"):
    """A voluntary shrink of a malleable run to ``desired_total_gpus``."""

    run: str
    desired_total_gpus: int


class ReportStep(_Step, frozen=True, kw_only=True, tag="report"):
    """Capture a report labelled ``label`` at this instant."""

    label: str


class EtaStep(_Step, frozen=True, kw_only=True, tag="eta"):
    """The workload reports an estimated completion (``eta`` is Unix seconds).

    Extension beyond ``scenario-format.md``, mirroring the CLI's ``eta RUN TIME``.  Its ``at``
    accepts ``+<duration>``, which like every ``+`` in a scenario counts from the scenario's
    start, not from the step.
    """

    run: str
    eta: Instant


Step = (
    ApplyStep
    | DeleteStep
    | FenceNodeStep
    | CordonNodeStep
    | CompleteStep
    | FailStep
    | ShrinkStep
    | ReportStep
    | EtaStep
)
"""Everything a scenario can do at an instant (a tagged union on ``action``)."""

STEP_ACTIONS: Final = (
    "apply",
    "delete",
    "fenceNode",
    "cordonNode",
    "complete",
    "fail",
    "shrink",
    "report",
    "eta",
)


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """A validated scenario.  ``source`` names the file (or ``<scenario>``) for messages."""

    name: str
    start: Instant
    settings: Settings
    nodes: tuple[Node, ...]
    objects: tuple[Budget | Run, ...]
    steps: tuple[Step, ...]
    expectations: tuple[Expectation, ...]
    source: str

    @property
    def end(self) -> Instant:
        """When the ``final`` report is captured: the last step's time, or start if none."""
        return self.steps[-1].at if self.steps else self.start

    @property
    def report_labels(self) -> tuple[str, ...]:
        """Labels of all reports the scenario produces, in order (``final`` last)."""
        labels = [s.label for s in self.steps if isinstance(s, ReportStep)]
        return (*labels, FINAL_REPORT)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Same shape ``manifests`` accepts: a full date and time; a missing offset reads as UTC.  The
# check is needed because ``datetime.fromisoformat`` also takes ``20260105`` or a bare date.
_RFC3339: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?$"
)

_TOP_LEVEL: Final = ("name", "start", "settings", "fleet", "objects", "steps", "expect")


def _manifest_errors(exc: ManifestError) -> list[str]:
    return [str(fe) for fe in exc.errors]


def _parse_instant_value(value: object) -> Instant:
    """An absolute instant: an RFC 3339 string, or the datetime YAML made of an unquoted one."""
    if isinstance(value, dt.datetime):
        return to_instant(value)
    if isinstance(value, str) and _RFC3339.match(value.strip()):
        return parse_instant(value)
    raise ValueError("must be an RFC 3339 timestamp such as 2026-01-05T00:00:00Z")


def _parse_at(value: object, start: Instant | None) -> Instant | None:
    """``+<duration>`` from ``start``, or an absolute instant.

    Raises ``ValueError`` with a message ready to follow ``path: ``.  A bare number (YAML reads
    ``+60`` as the int 60) is refused rather than guessed to be seconds.  Returns ``None`` for a
    relative time when ``start`` itself is invalid: that error is already reported once.
    """
    hint = "must be '+<duration>' (e.g. +10m) or an RFC 3339 timestamp"
    if isinstance(value, str) and value.strip().startswith("+"):
        try:
            offset = parse_duration(value.strip()[1:])
        except DurationError as exc:
            raise ValueError(f"{hint}: {exc}") from None
        return None if start is None else start + offset
    if isinstance(value, dt.datetime | str):
        try:
            return _parse_instant_value(value)
        except ValueError:
            raise ValueError(f"{hint}, got {value!r}") from None
    raise ValueError(f"{hint}, got {value!r}")


def _parse_duration_setting(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0  # YAML reads `0` as an int; zero needs no unit to be unambiguous
    if not isinstance(value, str):
        raise ValueError(f"must be a duration such as 30s, 15m or 1h30m, got {value!r}")
    return parse_duration(value)


def _parse_settings(raw: object, errors: list[str]) -> Settings:
    if raw is None:
        return Settings()
    if not isinstance(raw, Mapping):
        errors.append("settings: must be a mapping")
        return Settings()
    values: dict[str, int] = {}
    for key, value in raw.items():
        path = f"settings.{key}"
        if key not in _SETTINGS:
            errors.append(f"{path}: unknown field")
            continue
        field, minimum = _SETTINGS[key]
        try:
            seconds = _parse_duration_setting(value)
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
            continue
        if seconds < minimum:
            errors.append(f"{path}: must be at least {minimum}s")
            continue
        values[field] = seconds
    return msgspec.structs.replace(Settings(), **values)


def _parse_nodes(raw: object, errors: list[str]) -> list[Node]:
    if raw is None:
        return []
    if not isinstance(raw, Mapping):
        errors.append("fleet: must be a mapping with nodes")
        return []
    for key in raw:
        if key != "nodes":
            errors.append(f"fleet.{key}: unknown field")
    items = raw.get("nodes")
    if items is None:
        return []
    if not isinstance(items, list):
        errors.append("fleet.nodes: must be a list")
        return []
    try:
        return validate_nodes(items, "fleet.nodes")
    except ManifestError as exc:
        errors.extend(_manifest_errors(exc))
        return []


def _parse_objects(raw: object, errors: list[str]) -> list[Budget | Run]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.append("objects: must be a list of Budget and Run manifests")
        return []
    objects: list[Budget | Run] = []
    for i, item in enumerate(raw):
        try:
            objects.append(validate_manifest(item, f"objects[{i}]"))
        except ManifestError as exc:
            errors.extend(_manifest_errors(exc))
    return objects


def _check_parent_cycles(objects: list[Budget | Run], steps: list[Step], errors: list[str]) -> None:
    """Budgets are applied in file order (objects, then steps); one closing a parent cycle
    would be refused by the engine mid-run, so the file is refused up front instead."""
    applied: list[Budget] = []
    where = [(f"objects[{i}]", m) for i, m in enumerate(objects)]
    where += [(f"steps[{s.index}].apply", s.manifest) for s in steps if isinstance(s, ApplyStep)]
    for path, manifest in where:
        if not isinstance(manifest, Budget):
            continue
        cycle = parent_cycle(applied, [manifest])
        if cycle is not None:
            errors.append(f"{path}.spec.parents: parents form a cycle: {cycle[1]}")
            continue
        applied = [b for b in applied if b.key != manifest.key] + [manifest]


class _Known:
    """What the file has defined so far, to catch references to nodes/objects that never exist.

    Objects count from the moment they are applied (``objects:`` at T0, ``apply`` steps from
    their index on); a delete does not un-define them, since acting on a deleted run is a
    legitimate thing for a scenario to probe.
    """

    def __init__(self, nodes: list[Node], objects: list[Budget | Run]) -> None:
        self.nodes = [n.name for n in nodes]
        self.runs: set[str] = set()
        self.budgets: set[str] = set()
        for obj in objects:
            self.add(obj)

    def add(self, obj: Budget | Run) -> None:
        (self.runs if isinstance(obj, Run) else self.budgets).add(obj.key)


def _parse_ref(
    raw: object, path: str, errors: list[str], extra: tuple[str, ...] = ()
) -> str | None:
    """``{namespace, name}`` (namespace defaults to ``default``) as a ``namespace/name`` key."""
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: must be a mapping with namespace and name")
        return None
    ok = True
    for key in raw:
        if key not in {"namespace", "name", *extra}:
            errors.append(f"{path}.{key}: unknown field")
            ok = False
    namespace = raw.get("namespace", "default")
    if not isinstance(namespace, str) or not namespace:
        errors.append(f"{path}.namespace: must be a non-empty string")
        ok = False
    name = raw.get("name")
    if name is None:
        errors.append(f"{path}.name: required")
        ok = False
    elif not isinstance(name, str) or not name:
        errors.append(f"{path}.name: must be a non-empty string")
        ok = False
    if not ok:
        return None
    assert isinstance(namespace, str)
    assert isinstance(name, str)
    return run_key(namespace, name)


def _parse_action(
    action: str,
    raw: object,
    *,
    path: str,
    at: Instant,
    index: int,
    start: Instant | None,
    known: _Known,
    errors: list[str],
) -> Step | None:
    """Build one step from its action key and value; ``None`` (with errors) if invalid."""
    match action:
        case "apply":
            try:
                manifest = validate_manifest(raw, path)
            except ManifestError as exc:
                errors.extend(_manifest_errors(exc))
                return None
            known.add(manifest)
            return ApplyStep(at=at, index=index, manifest=manifest)
        case "fenceNode" | "cordonNode":
            if not isinstance(raw, str) or not raw:
                errors.append(f"{path}: must be a node name")
                return None
            if raw not in known.nodes:
                errors.append(
                    f"{path}: unknown node {raw!r} (fleet: {', '.join(known.nodes) or 'none'})"
                )
                return None
            if action == "fenceNode":
                return FenceNodeStep(at=at, index=index, node=raw)
            return CordonNodeStep(at=at, index=index, node=raw)
        case "report":
            if not isinstance(raw, str) or not raw:
                errors.append(f"{path}: must be a non-empty report label")
                return None
            if raw == FINAL_REPORT:
                errors.append(
                    f"{path}: {FINAL_REPORT!r} is reserved for the report captured after the "
                    "last step"
                )
                return None
            return ReportStep(at=at, index=index, label=raw)
        case "delete":
            if not isinstance(raw, Mapping):
                errors.append(f"{path}: must be a mapping with kind, namespace and name")
                return None
            kind = raw.get("kind")
            key = _parse_ref(raw, path, errors, extra=("kind",))
            if kind is None:
                errors.append(f"{path}.kind: required")
                return None
            if kind not in {"Run", "Budget"}:
                errors.append(f"{path}.kind: must be Run or Budget")
                return None
            if key is None:
                return None
            assert isinstance(kind, str)
            defined = known.runs if kind == "Run" else known.budgets
            if key not in defined:
                errors.append(f"{path}: no {kind} {key} is defined before this step")
                return None
            namespace, name = key.split("/", 1)
            return DeleteStep(at=at, index=index, kind=kind, namespace=namespace, name=name)
        case _:
            extra = {"shrink": ("desiredTotalGPUs",), "eta": ("at",)}.get(action, ())
            key = _parse_ref(raw, path, errors, extra=extra)
            if key is None:
                return None
            assert isinstance(raw, Mapping)
            if key not in known.runs:
                errors.append(f"{path}: no Run {key} is defined before this step")
                return None
            if action == "complete":
                return CompleteStep(at=at, index=index, run=key)
            if action == "fail":
                return FailStep(at=at, index=index, run=key)
            if action == "shrink":
                desired = raw.get("desiredTotalGPUs")
                if desired is None:
                    errors.append(f"{path}.desiredTotalGPUs: required")
                    return None
                if not isinstance(desired, int) or isinstance(desired, bool):
                    errors.append(f"{path}.desiredTotalGPUs: must be an integer")
                    return None
                if desired < 1:
                    errors.append(f"{path}.desiredTotalGPUs: must be >= 1")
                    return None
                return ShrinkStep(at=at, index=index, run=key, desired_total_gpus=desired)
            assert action == "eta"
            if "at" not in raw:
                errors.append(f"{path}.at: required")
                return None
            try:
                eta = _parse_at(raw["at"], start)
            except ValueError as exc:
                errors.append(f"{path}.at: {exc}")
                return None
            if eta is None:
                return None
            return EtaStep(at=at, index=index, run=key, eta=eta)


def _parse_steps(
    raw: object, start: Instant | None, known: _Known, errors: list[str]
) -> list[Step]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.append("steps: must be a list")
        return []
    steps: list[Step] = []
    previous: tuple[int, Instant] | None = None
    labels: dict[str, int] = {}
    for i, item in enumerate(raw):
        path = f"steps[{i}]"
        if not isinstance(item, Mapping):
            errors.append(f"{path}: must be a mapping with at and one action")
            continue
        actions = [k for k in item if k in STEP_ACTIONS]
        for key in item:
            if key != "at" and key not in STEP_ACTIONS:
                errors.append(f"{path}.{key}: unknown field")
        at: Instant | None = None
        if "at" not in item:
            errors.append(f"{path}.at: required")
        else:
            try:
                at = _parse_at(item["at"], start)
            except ValueError as exc:
                errors.append(f"{path}.at: {exc}")
        if at is not None and start is not None and at < start:
            errors.append(f"{path}.at: must not be earlier than start ({format_instant(start)})")
        if at is not None and previous is not None and at < previous[1]:
            errors.append(
                f"{path}.at: must not be earlier than the previous step "
                f"(steps[{previous[0]}] at {format_instant(previous[1])})"
            )
        if at is not None:
            previous = (i, at)
        if len(actions) != 1:
            if not actions:
                errors.append(f"{path}: needs one action ({', '.join(STEP_ACTIONS)})")
            else:
                errors.append(
                    f"{path}: has {len(actions)} actions ({', '.join(actions)}); one each"
                )
            continue
        action = actions[0]
        step = _parse_action(
            action,
            item[action],
            path=f"{path}.{action}",
            at=at or 0,
            index=i,
            start=start,
            known=known,
            errors=errors,
        )
        if isinstance(step, ReportStep):
            if step.label in labels:
                errors.append(
                    f"{path}.report: duplicate label {step.label!r} "
                    f"(also steps[{labels[step.label]}])"
                )
            labels.setdefault(step.label, i)
        if step is not None and at is not None:
            steps.append(step)
    return steps


def _check_expectation_refs(
    expectations: list[Expectation], labels: set[str], known: _Known, errors: list[str]
) -> None:
    """Report labels, runs and budgets named by expectations must exist in the file."""
    for e in expectations:
        path = f"expect[{e.index}]"
        if not e.machine_checkable:
            continue
        if e.report not in labels:
            errors.append(
                f"{path}.report: no report labelled {e.report!r} "
                f"(labels: {', '.join(sorted(labels))})"
            )
        if e.kind == "run" and e.raw["run"] not in known.runs:
            errors.append(f"{path}.run: no Run {e.raw['run']} is defined in this scenario")
        elif e.kind == "reservation":
            res = e.raw["reservation"]
            assert isinstance(res, Mapping)
            if res["run"] not in known.runs:
                errors.append(
                    f"{path}.reservation.run: no Run {res['run']} is defined in this scenario"
                )
        elif e.kind == "budget" and e.raw["budget"] not in known.budgets:
            errors.append(f"{path}.budget: no Budget {e.raw['budget']} is defined in this scenario")


def load_scenario(text: str, source: str = "<scenario>") -> Scenario:
    """Parse and validate scenario YAML; raise ``ScenarioError`` listing every problem."""
    try:
        documents = load_documents(text, source)
    except ManifestError as exc:
        raise _file_error(exc, source) from None
    return _scenario_of(documents, source)


def _file_error(exc: ManifestError, source: str) -> ScenarioError:
    """A loader error as scenario lines: ``<file>: not valid YAML: [documents[i]: ]reason``."""
    return ScenarioError(
        [
            f"{source}: not valid YAML: "
            + (fe.message if fe.path == source else f"{fe.path}: {fe.message}")
            for fe in exc.errors
        ]
    )


def _scenario_of(documents: list[object], source: str) -> Scenario:
    """The one document of a scenario file (empty documents around it are fine)."""
    present = [doc for doc in documents if doc is not None]
    if len(present) > 1:
        raise ScenarioError([f"{source}: expected one YAML document, got {len(present)}"])
    return parse_scenario(present[0] if present else None, source)


def parse_scenario(raw: object, source: str = "<scenario>") -> Scenario:
    """Validate an already decoded scenario (a mapping as from YAML or JSON).

    For callers that build scenarios in code (tests, generators) or decode them some other way;
    ``datetime`` values from PyYAML's YAML 1.1 ``safe_load`` are accepted as instants.
    """
    if not isinstance(raw, Mapping):
        raise ScenarioError([f"{source}: must be a mapping (name, start, fleet, ...)"])
    errors: list[str] = []
    for key in raw:
        if key not in _TOP_LEVEL:
            errors.append(f"{key}: unknown field")

    name = raw.get("name")
    if name is None:
        errors.append("name: required")
    elif not isinstance(name, str) or not name.strip():
        errors.append("name: must be a non-empty string")

    start: Instant | None = None
    if raw.get("start") is None:
        errors.append("start: required")
    else:
        try:
            start = _parse_instant_value(raw["start"])
        except ValueError:
            errors.append(f"start: must be an RFC 3339 timestamp, got {raw['start']!r}")

    settings = _parse_settings(raw.get("settings"), errors)
    nodes = _parse_nodes(raw.get("fleet"), errors)
    objects = _parse_objects(raw.get("objects"), errors)
    known = _Known(nodes, objects)
    steps = _parse_steps(raw.get("steps"), start, known, errors)

    _check_parent_cycles(objects, steps, errors)

    expectations, expectation_errors = collect_expectations(raw.get("expect"), "expect")
    errors.extend(expectation_errors)
    labels = {s.label for s in steps if isinstance(s, ReportStep)} | {FINAL_REPORT}
    _check_expectation_refs(expectations, labels, known, errors)

    if errors:
        raise ScenarioError(errors)
    assert isinstance(name, str)
    assert start is not None
    return Scenario(
        name=name,
        start=start,
        settings=settings,
        nodes=tuple(nodes),
        objects=tuple(objects),
        steps=tuple(steps),
        expectations=tuple(expectations),
        source=source,
    )


def load_scenario_file(path: str | os.PathLike[str]) -> Scenario:
    """Read and load a scenario file; ``source`` is the path as given.

    The bytes go through ``load_source``, the loader ``kubectl runs submit`` and ``gpu-fleet
    validate`` use, so a binary, empty or ``---``-only file gets the same one-line reason.
    """
    source = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ScenarioError([f"{source}: cannot read: {exc.strerror}"]) from None
    try:
        documents = load_source(data, source)
    except ManifestError as exc:
        raise _file_error(exc, source) from None
    return _scenario_of(documents, source)
