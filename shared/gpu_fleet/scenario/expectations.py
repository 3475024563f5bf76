"""Machine-checkable expectations of a scenario file, and the checker that judges a report.

A scenario's ``expect:`` list is written for people first (``text``) and, where possible, for
machines (docs: ``scenario-format.md`` § Expectations).  This module turns that list into
``Expectation`` values and checks them against the JSON-able report document that
``gpu-fleet scenario run -o json`` prints, so the same check serves the in-process runner, the
``--via-nats`` runner and a report read back from disk.

It is deliberately pure: it reads plain dicts and lists (never the engine's objects), so a
report produced by a different process, or an older version, is judged by the same rules.

Matching rules (shared by lease ``where`` filters and reservation fields):

* ``null`` matches only null (``closureReason: null`` means "open");
* ``"*"`` alone matches any non-null value; a trailing ``*`` is a prefix match on strings;
* two RFC 3339 strings match when they name the same instant (``Z`` vs ``+00:00`` is not a
  difference worth failing a scenario over);
* numbers compare as numbers and booleans only with booleans (``True == 1`` in Python, but a
  report's ``group: 1`` is not ``true``);
* a scalar matches a list field when any element matches (``slots: "n1#0"``);
* dotted keys reach into nested objects (``payer.owner``); a null object on the way reads as
  null, but a field that does not exist at all never matches, so a typo cannot pass silently.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import msgspec

from gpu_fleet.core.model import to_instant
from gpu_fleet.core.timeutil import format_instant, parse_instant

ExpectationKind = Literal["run", "leases", "rejections", "reservation", "budget", "text"]

FUNDING_CLASSES: Final = ("owned", "shared", "borrowed", "unfunded")
ENVELOPE_INT_FIELDS: Final = ("concurrency", "headroom", *FUNDING_CLASSES)
GPU_HOURS_TOLERANCE: Final = 0.01
"""``gpuHoursUsed`` is a float accumulated over many intervals; 0.01 GPU-hour is 36 GPU-seconds,
far below anything a scenario author means to distinguish and far above rounding noise."""

_RUN_FIELDS: Final = frozenset(
    {"phase", "reason", "allocated", "spares", "funding", "reservation", "earliestStart"}
)
_COMMON_FIELDS: Final = frozenset({"report", "text"})
_BUDGET_FIELDS: Final = frozenset({"envelope", *ENVELOPE_INT_FIELDS, "gpuHoursUsed"})
_KIND_KEYS: Final = ("run", "leases", "rejections", "budget")

_RFC3339: Final = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})$"
)


class ExpectationError(ValueError):
    """The ``expect:`` list is malformed; ``errors`` holds one ``"path: message"`` per problem.

    All problems are collected before raising so an author fixes a file in one pass.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Expectation(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of ``expect:``.

    ``raw`` is the entry as written, except that YAML timestamps are normalised to RFC 3339
    strings so the value stays JSON-able and compares by instant.  Keeping the raw mapping (not
    one Struct per kind) lets a failure message quote exactly what the author wrote.
    """

    index: int
    raw: dict[str, object]
    report: str = "final"
    text: str | None = None

    @property
    def kind(self) -> ExpectationKind:
        """Which part of a report this expectation checks (``text`` = nothing, it is prose)."""
        if "run" in self.raw:
            return "run"
        if "leases" in self.raw:
            return "leases"
        if "rejections" in self.raw:
            return "rejections"
        if "budget" in self.raw:
            return "budget"
        if "reservation" in self.raw:
            return "reservation"
        return "text"

    @property
    def machine_checkable(self) -> bool:
        return self.kind != "text"


class Outcome(msgspec.Struct, frozen=True):
    """The verdict on one expectation; ``message`` says what was expected and what was found."""

    index: int
    ok: bool
    message: str


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _normalise(value: object) -> object:
    """Make a YAML value JSON-able: timestamps become RFC 3339 UTC strings, recursively."""
    if isinstance(value, dt.datetime):
        return format_instant(to_instant(value))
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _check_key(value: object, path: str, errors: list[str]) -> None:
    """A namespaced key as reports write it: ``namespace/name``, both parts non-empty."""
    if not isinstance(value, str):
        errors.append(f"{path}: must be a string namespace/name")
        return
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        errors.append(f"{path}: must be namespace/name, got {value!r}")


def _check_count(value: object, path: str, errors: list[str]) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        errors.append(f"{path}: must be an integer >= 0")


def _check_instant_or_null(value: object, path: str, errors: list[str]) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _RFC3339.match(value):
        errors.append(f"{path}: must be an RFC 3339 timestamp or null")


def _check_filter(raw: object, path: str, errors: list[str]) -> None:
    """A ``where`` filter or reservation field set: scalar values keyed by (dotted) field."""
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: must be a mapping of field to value")
        return
    for key, value in raw.items():
        if not isinstance(key, str) or not key:
            errors.append(f"{path}: field names must be non-empty strings, got {key!r}")
        elif not _is_scalar(value):
            errors.append(f"{path}.{key}: must be a scalar (string, number, boolean or null)")


def _parse_run(raw: Mapping[str, object], path: str, errors: list[str]) -> None:
    _check_key(raw["run"], f"{path}.run", errors)
    for key in raw:
        if key not in _RUN_FIELDS and key not in _COMMON_FIELDS and key != "run":
            errors.append(f"{path}.{key}: unknown field for a run expectation")
    for key in ("phase", "reason"):
        if key in raw and not isinstance(raw[key], str):
            errors.append(f"{path}.{key}: must be a string")
    for key in ("allocated", "spares"):
        if key in raw:
            _check_count(raw[key], f"{path}.{key}", errors)
    if "reservation" in raw and not isinstance(raw["reservation"], bool):
        errors.append(f"{path}.reservation: must be true or false in a run expectation")
    if "earliestStart" in raw:
        _check_instant_or_null(raw["earliestStart"], f"{path}.earliestStart", errors)
    if "funding" in raw:
        funding = raw["funding"]
        if not isinstance(funding, Mapping):
            errors.append(f"{path}.funding: must be a mapping of funding class to GPUs")
        else:
            for cls, gpus in funding.items():
                if cls not in FUNDING_CLASSES:
                    errors.append(
                        f"{path}.funding.{cls}: unknown funding class "
                        f"(one of {', '.join(FUNDING_CLASSES)})"
                    )
                else:
                    _check_count(gpus, f"{path}.funding.{cls}", errors)


def _parse_leases(
    raw: Mapping[str, object], path: str, errors: list[str], section: str = "leases"
) -> None:
    """A count over one of a report's lists: ``leases``, or ``rejections`` (refused steps)."""
    for key in raw:
        if key not in _COMMON_FIELDS and key != section:
            errors.append(f"{path}.{key}: unknown field for a {section} expectation")
    leases = raw[section]
    lpath = f"{path}.{section}"
    if not isinstance(leases, Mapping):
        errors.append(f"{lpath}: must be a mapping with where and count or min")
        return
    for key in leases:
        if key not in {"where", "count", "min"}:
            errors.append(f"{lpath}.{key}: unknown field (where, count, min)")
    if "where" in leases:
        _check_filter(leases["where"], f"{lpath}.where", errors)
    bounds = [k for k in ("count", "min") if k in leases]
    if len(bounds) != 1:
        errors.append(f"{lpath}: needs exactly one of count or min")
    for key in bounds:
        _check_count(leases[key], f"{lpath}.{key}", errors)


def _parse_reservation(raw: Mapping[str, object], path: str, errors: list[str]) -> None:
    for key in raw:
        if key not in _COMMON_FIELDS and key != "reservation":
            errors.append(f"{path}.{key}: unknown field for a reservation expectation")
    res = raw["reservation"]
    rpath = f"{path}.reservation"
    if not isinstance(res, Mapping):
        errors.append(f"{rpath}: must be a mapping with run and the fields to check")
        return
    if "run" not in res:
        errors.append(f"{rpath}.run: required")
    else:
        _check_key(res["run"], f"{rpath}.run", errors)
    _check_filter({k: v for k, v in res.items() if k != "run"}, rpath, errors)
    if "deficitGPUs" in res:
        _check_count(res["deficitGPUs"], f"{rpath}.deficitGPUs", errors)


def _parse_budget(raw: Mapping[str, object], path: str, errors: list[str]) -> None:
    _check_key(raw["budget"], f"{path}.budget", errors)
    for key in raw:
        if key not in _BUDGET_FIELDS and key not in _COMMON_FIELDS and key != "budget":
            errors.append(f"{path}.{key}: unknown field for a budget expectation")
    if "envelope" not in raw:
        errors.append(f"{path}.envelope: required")
    elif not isinstance(raw["envelope"], str) or not raw["envelope"]:
        errors.append(f"{path}.envelope: must be a non-empty string")
    for key in ENVELOPE_INT_FIELDS:
        if key in raw:
            _check_count(raw[key], f"{path}.{key}", errors)
    if "gpuHoursUsed" in raw and not _is_number(raw["gpuHoursUsed"]):
        errors.append(f"{path}.gpuHoursUsed: must be a number")


def parse_expectations(raw: object, path: str = "expect") -> list[Expectation]:
    """Validate an ``expect:`` list and return its entries in order.

    Raises ``ExpectationError`` listing every problem with its path (``expect[2].leases.count:
    must be an integer >= 0``).  ``None`` (an absent or empty ``expect:``) is an empty list.
    The kind is decided by the key present (``run`` > ``leases`` > ``budget`` >
    ``reservation``), because ``reservation`` is both a kind and a boolean field of a run
    expectation; naming two kinds in one entry is an error rather than a silent choice.
    """
    expectations, errors = collect_expectations(raw, path)
    if errors:
        raise ExpectationError(errors)
    return expectations


def collect_expectations(raw: object, path: str = "expect") -> tuple[list[Expectation], list[str]]:
    """Like ``parse_expectations`` but return the valid entries *and* the errors.

    The loader uses this to go on checking the valid entries against the rest of the file
    (report labels, run names), so one bad entry does not hide problems in the others.
    """
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"{path}: must be a list"]
    errors: list[str] = []
    out: list[Expectation] = []
    for i, item in enumerate(raw):
        ipath = f"{path}[{i}]"
        if not isinstance(item, Mapping):
            errors.append(f"{ipath}: must be a mapping")
            continue
        entry = _normalise(item)
        assert isinstance(entry, dict)
        bad_keys = [k for k in item if not isinstance(k, str)]
        if bad_keys:
            errors.append(f"{ipath}: keys must be strings, got {bad_keys[0]!r}")
            continue
        before = len(errors)
        kinds = [k for k in _KIND_KEYS if k in entry]
        if "reservation" in entry and (
            isinstance(entry["reservation"], Mapping) or "run" not in entry
        ):
            kinds.append("reservation")
        if len(kinds) > 1:
            errors.append(f"{ipath}: names several things to check ({', '.join(kinds)}); one each")
            continue
        report = entry.get("report", "final")
        if not isinstance(report, str) or not report:
            errors.append(f"{ipath}.report: must be a non-empty report label")
        text = entry.get("text")
        if text is not None and not isinstance(text, str):
            errors.append(f"{ipath}.text: must be a string")
        if not kinds:
            extra = [k for k in entry if k not in _COMMON_FIELDS]
            if extra:
                errors.append(f"{ipath}.{extra[0]}: unknown field")
            elif text is None:
                errors.append(
                    f"{ipath}: must name one of run, leases, rejections, reservation or "
                    "budget, or carry text"
                )
        elif kinds[0] == "run":
            _parse_run(entry, ipath, errors)
        elif kinds[0] in ("leases", "rejections"):
            _parse_leases(entry, ipath, errors, kinds[0])
        elif kinds[0] == "budget":
            _parse_budget(entry, ipath, errors)
        else:
            _parse_reservation(entry, ipath, errors)
        if len(errors) == before:
            out.append(
                Expectation(
                    index=i,
                    raw=entry,
                    report=report if isinstance(report, str) else "final",
                    text=text if isinstance(text, str) else None,
                )
            )
    return out, errors


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


class _Missing:
    """Sentinel for a field absent from a report object (distinct from a null value)."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()


def resolve(obj: object, field: str) -> object:
    """Read ``field`` from a report object, following dots into nested objects.

    A literal key wins over a dotted path, so a field whose name contains a dot (a label such
    as ``fabric.domain``) stays reachable.  A null object on the way yields ``None`` (a null
    ``payer`` has a null ``payer.owner``); an absent key yields ``MISSING``.
    """
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        return MISSING
    if field in obj:
        return obj[field]
    head, dot, rest = field.partition(".")
    if not dot or head not in obj:
        return MISSING
    return resolve(obj[head], rest)


def _same_instant(a: str, b: str) -> bool:
    if not (_RFC3339.match(a) and _RFC3339.match(b)):
        return False
    return parse_instant(a) == parse_instant(b)


def matches(expected: object, actual: object) -> bool:
    """Whether a report value satisfies an expected scalar (rules in the module docstring)."""
    if isinstance(actual, _Missing):
        return False
    if expected is None:
        return actual is None
    if expected == "*":
        return actual is not None
    if isinstance(actual, list | tuple):
        return any(matches(expected, element) for element in actual)
    if isinstance(expected, bool):
        return isinstance(actual, bool) and actual is expected
    if _is_number(expected):
        return _is_number(actual) and actual == expected
    if isinstance(expected, str):
        if not isinstance(actual, str):
            return False
        if expected.endswith("*"):
            return actual.startswith(expected[:-1])
        return actual == expected or _same_instant(expected, actual)
    return False


def _show(value: object) -> str:
    """Render a value the way the author would write it in YAML (``null``, ``true``, ``x``)."""
    if isinstance(value, _Missing):
        return "nothing (field missing)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------


class _MalformedReportError(Exception):
    """The report lacks something the check needs; becomes a failed outcome, never a crash."""


def _records(section: object, name: str) -> list[Mapping[str, object]]:
    if section is None:
        return []
    if not isinstance(section, list) or not all(isinstance(r, Mapping) for r in section):
        raise _MalformedReportError(f"report field {name} is not a list of objects")
    return list(section)


def _key_of(record: Mapping[str, object]) -> str:
    return f"{record.get('namespace')}/{record.get('name')}"


def _find_report(document: Mapping[str, object], label: str) -> Mapping[str, object]:
    reports = _records(document.get("reports"), "reports")
    found = [r for r in reports if r.get("label") == label]
    if not found:
        labels = ", ".join(str(r.get("label")) for r in reports) or "none"
        raise _MalformedReportError(f"no report labelled {label!r} (reports: {labels})")
    return found[-1]


def _check_run(report: Mapping[str, object], e: Expectation) -> tuple[bool, str]:
    key = str(e.raw["run"])
    runs = [r for r in _records(report.get("runs"), "runs") if _key_of(r) == key]
    if not runs:
        return False, f"{key}: no such run in report {e.report!r}"
    run = runs[-1]
    wrong: list[str] = []
    right: list[str] = []

    def compare(name: str, expected: object, actual: object, ok: bool) -> None:
        if ok:
            right.append(f"{name} {_show(expected)}")
        else:
            wrong.append(f"{name} expected {_show(expected)}, got {_show(actual)}")

    for name in ("phase", "reason"):
        if name in e.raw:
            actual = run.get(name, MISSING)
            compare(name, e.raw[name], actual, actual == e.raw[name])
    if "allocated" in e.raw:
        actual = resolve(run, "width.allocated")
        compare("allocated", e.raw["allocated"], actual, _num_eq(e.raw["allocated"], actual))
    if "spares" in e.raw:
        actual = run.get("spares", MISSING)
        compare("spares", e.raw["spares"], actual, _num_eq(e.raw["spares"], actual))
    if "funding" in e.raw:
        expected_funding = e.raw["funding"]
        assert isinstance(expected_funding, Mapping)
        funding = run.get("funding", MISSING)
        for cls, gpus in expected_funding.items():
            # A run that holds nothing may report null funding: that is zero of every class.
            actual = 0 if funding is None else resolve(funding, str(cls))
            compare(f"funding.{cls}", gpus, actual, _num_eq(gpus, actual))
    if "reservation" in e.raw:
        held = run.get("reservation", MISSING)
        has = held if isinstance(held, _Missing) else held is not None
        compare("reservation", e.raw["reservation"], has, has is e.raw["reservation"])
    if "earliestStart" in e.raw:
        expected_start = e.raw["earliestStart"]
        actual = run.get("earliestStart", MISSING)
        compare("earliestStart", expected_start, actual, _instant_eq(expected_start, actual))
    if wrong:
        return False, f"{key}: " + "; ".join(wrong)
    return True, f"{key}: " + (", ".join(right) if right else "present")


def _num_eq(expected: object, actual: object) -> bool:
    return _is_number(expected) and _is_number(actual) and expected == actual


def _as_float(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _instant_eq(expected: object, actual: object) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    return isinstance(expected, str) and isinstance(actual, str) and _same_instant(expected, actual)


def _describe_filter(where: Mapping[str, object]) -> str:
    return _show(dict(where)) if where else "{} (all)"


def _check_leases(
    report: Mapping[str, object], e: Expectation, section: str = "leases"
) -> tuple[bool, str]:
    spec = e.raw[section]
    assert isinstance(spec, Mapping)
    where_raw = spec.get("where") or {}
    assert isinstance(where_raw, Mapping)
    where: dict[str, object] = {str(k): v for k, v in where_raw.items()}
    leases = _records(report.get(section), section)
    hits = [
        lease
        for lease in leases
        if all(matches(value, resolve(lease, field)) for field, value in where.items())
    ]
    found = len(hits)
    if "count" in spec:
        bound, ok = f"count {spec['count']}", found == spec["count"]
    else:
        minimum = spec["min"]
        assert isinstance(minimum, int)
        bound, ok = f"at least {minimum}", found >= minimum
    message = f"{section} where {_describe_filter(where)}: expected {bound}, found {found}"
    if not ok and hits:
        ids = ", ".join(str(h.get("id", h.get("step"))) for h in hits[:5])
        message += f" (ids: {ids}{', ...' if found > 5 else ''})"
    unknown = [f for f in where if leases and all(resolve(x, f) is MISSING for x in leases)]
    if unknown:
        message += f" (no {section[:-1]} has field {', '.join(unknown)})"
    return ok, message


def _check_reservation(report: Mapping[str, object], e: Expectation) -> tuple[bool, str]:
    spec = e.raw["reservation"]
    assert isinstance(spec, Mapping)
    key = str(spec["run"])
    records = _records(report.get("reservations"), "reservations")
    mine = [r for r in records if r.get("run") == key]
    if not mine:
        others = sorted({str(r.get("run")) for r in records})
        return False, (
            f"reservation of {key}: none in report {e.report!r}"
            f" (reservations for: {', '.join(others) or 'none'})"
        )
    # Several reservations of one run may coexist in a report; the newest one (last in the
    # report's order) is the one that describes the run's current wait.
    res = mine[-1]
    wrong = []
    for field, expected in spec.items():
        if field == "run":
            continue
        actual = resolve(res, str(field))
        if not matches(expected, actual):
            wrong.append(f"{field} expected {_show(expected)}, got {_show(actual)}")
    if wrong:
        return False, f"reservation of {key}: " + "; ".join(wrong)
    checked = ", ".join(f"{k} {_show(v)}" for k, v in spec.items() if k != "run")
    return True, f"reservation of {key}: " + (checked or "present")


def _check_budget(report: Mapping[str, object], e: Expectation) -> tuple[bool, str]:
    key = str(e.raw["budget"])
    envelope = str(e.raw["envelope"])
    label = f"{key}/{envelope}"
    budgets = [b for b in _records(report.get("budgets"), "budgets") if _key_of(b) == key]
    if not budgets:
        return False, f"{label}: no budget {key} in report {e.report!r}"
    envelopes = _records(budgets[-1].get("envelopes"), "envelopes")
    found = [v for v in envelopes if v.get("name") == envelope]
    if not found:
        names = ", ".join(str(v.get("name")) for v in envelopes) or "none"
        return False, f"{label}: no envelope {envelope!r} in budget {key} (envelopes: {names})"
    env = found[-1]
    wrong: list[str] = []
    right: list[str] = []
    for field in ENVELOPE_INT_FIELDS:
        if field in e.raw:
            actual = env.get(field, MISSING)
            if _num_eq(e.raw[field], actual):
                right.append(f"{field} {_show(actual)}")
            else:
                wrong.append(f"{field} expected {_show(e.raw[field])}, got {_show(actual)}")
    if "gpuHoursUsed" in e.raw:
        expected_hours = e.raw["gpuHoursUsed"]
        actual = env.get("gpuHoursUsed", MISSING)
        want, got = _as_float(expected_hours), _as_float(actual)
        if want is not None and got is not None and abs(got - want) <= GPU_HOURS_TOLERANCE:
            right.append(f"gpuHoursUsed {_show(actual)}")
        else:
            wrong.append(
                f"gpuHoursUsed expected {_show(expected_hours)} (±{GPU_HOURS_TOLERANCE}), "
                f"got {_show(actual)}"
            )
    if wrong:
        return False, f"{label}: " + "; ".join(wrong)
    return True, f"{label}: " + (", ".join(right) if right else "present")


def check_expectation(document: Mapping[str, object], e: Expectation) -> Outcome:
    """Judge one expectation against a report document (see ``check_expectations``)."""
    kind = e.kind
    if kind == "text":
        return Outcome(e.index, True, "text: not machine-checkable")
    try:
        report = _find_report(document, e.report)
        if kind == "run":
            ok, message = _check_run(report, e)
        elif kind in ("leases", "rejections"):
            ok, message = _check_leases(report, e, kind)
        elif kind == "reservation":
            ok, message = _check_reservation(report, e)
        else:
            ok, message = _check_budget(report, e)
    except _MalformedReportError as exc:
        return Outcome(e.index, False, f"[{e.report}] {exc}")
    return Outcome(e.index, ok, f"[{e.report}] {message}")


def check_expectations(
    report: Mapping[str, object], expectations: Sequence[Expectation]
) -> list[Outcome]:
    """Judge every expectation against a report document, one ``Outcome`` each, in order.

    ``report`` is the whole ``-o json`` document (``{"scenario": ..., "reports": [...]}``).
    Prose-only expectations pass with the message ``text: not machine-checkable`` so callers can
    count them without mistaking them for verified claims.  A malformed or incomplete report
    yields failed outcomes, never an exception: the checker's job is to explain, not to crash.
    Messages start with the report label in brackets, then what was expected and what was found
    (``[final] rai/train-8: phase expected Running, got Pending``).
    """
    return [check_expectation(report, e) for e in expectations]
