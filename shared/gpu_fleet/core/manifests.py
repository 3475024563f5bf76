"""Manifests in, typed specs out: parsing, defaulting and validation of Budgets, Runs and nodes.

Everything a user writes passes through here once, before the core sees it, so the rest of the
core can trust its inputs.  Three choices shape this module:

* **All errors at once.**  A user fixing a manifest wants the whole list, not one error per
  attempt.  So the document is walked against the Structs' own type information
  (``msgspec.inspect``) instead of being handed to ``msgspec.convert`` directly (which stops at the
  first problem): unknown fields, wrong types and missing fields are collected with exact paths
  (wire names, ``[i]`` indices: ``spec.envelopes[1].concurrency``), then the semantic rules of
  SPEC §A.1/§A.2 (plus ours: DESIGN decisions 1-3) run over whatever was well typed.  Only a
  document with no error at all is converted, so nothing is ever partially constructed.
* **Every message names its rule** (``must be >= 1``, ``required``, ``unknown field``,
  ``duplicate envelope name 'west' (also at spec.envelopes[0])``): the message is the user's only
  documentation at the moment it matters.
* **YAML means what it looks like.**  PyYAML's ``safe_load`` implements YAML 1.1, where ``no`` is
  ``False``, ``010`` is octal, ``1:30`` is ninety and an unquoted instant is a ``datetime``.  Our
  loader resolves plain scalars the YAML 1.2 way (only ``true``/``false`` are booleans, decimal
  numbers only, timestamps stay strings) and rejects duplicate keys, which PyYAML silently
  overwrites.  ``validate_manifest`` still accepts ``datetime`` values, for callers that loaded
  their YAML some other way.

Defaults follow SPEC §A: ``metadata.namespace`` ``default`` (also for an empty namespace, the one
namespaced-key rule of §F.1.8), ``malleable.desiredTotalGPUs`` = ``maxTotalGPUs``,
``follow.onUpstreamFailure`` ``""`` -> ``wait``; the Structs' own defaults cover the rest
(``locality.allowCrossGroupSpread`` true, ``follow.upstreamFailureGrace`` 30m, ...).  An explicit
``null`` for a field that is not nullable reads as "not set", as the Kubernetes API server does.

This module is pure: it parses text it is given and never reads files.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml

from gpu_fleet.core.model import API_VERSION, Budget, Node, Run
from gpu_fleet.core.timeutil import DurationError, parse_duration

__all__ = [
    "FieldError",
    "ManifestError",
    "load_documents",
    "parse_inventory",
    "parse_manifests",
    "validate_manifest",
    "validate_node",
]

# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class FieldError(msgspec.Struct, frozen=True):
    """One problem at one place: ``path`` uses wire names (``spec.roles[0].width``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ManifestError(ValueError):
    """Every problem found in one input, one ``<path>: <message>`` per line.

    ``source`` names the input (a file name) when the error came from parsing text; the lines
    themselves carry only paths, so callers decide how to present the source.
    """

    def __init__(self, errors: Iterable[FieldError], source: str | None = None) -> None:
        self.errors: list[FieldError] = list(errors)
        self.source = source
        super().__init__("\n".join(str(e) for e in self.errors))


class _Errors:
    """Accumulates FieldErrors for one input; an empty path means the whole document."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(FieldError(path or "<document>", message))

    def __len__(self) -> int:
        return len(self.items)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _index(prefix: str, i: int | str) -> str:
    return f"{prefix}[{i}]"


# --------------------------------------------------------------------------------------------
# YAML and JSON loading
# --------------------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_YAML11_TAGS_DROPPED = frozenset(
    {
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
    }
)


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and no silent duplicate keys.

    Why: with YAML 1.1 resolution a selector value ``no`` becomes ``False``, a leading-zero count
    becomes octal and ``start: 2026-01-01T00:00:00Z`` becomes a datetime, so what the user sees is
    not what we validate.  Under this loader a plain scalar is a bool only for true/false, a number
    only in decimal (or ``.inf``/``.nan``, which the float check then rejects), and everything else
    stays a string; timestamps are parsed by the validator, which can say what is wrong with them.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue  # merge keys may be overridden; complex keys fail in the base class
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_TAGS_DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based), which is how editors address a position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context:
            text += f" ({exc.context})"
        return text
    return str(exc)


def load_documents(text: str, source: str = "<input>") -> list[object]:
    """Split ``text`` (YAML or JSON) into its documents, ``None`` for an empty one.

    JSON is tried first when the text looks like JSON, because its parser is exact and fast;
    anything else (including flow-style YAML that merely starts with ``{``) goes to the YAML
    loader described on ``_Loader``.  Other modules reading user YAML (scenario files) should
    load through here so they resolve scalars the same way.

    Raises ManifestError (path = ``source``) with the line and column of a syntax error.
    """
    if text.lstrip().startswith(("{", "[")):
        try:
            return [msgspec.json.decode(text)]
        except msgspec.DecodeError:
            pass
    try:
        return list(yaml.load_all(text, Loader=_Loader))  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ManifestError([FieldError(source, _yaml_problem(exc))], source=source) from exc


# --------------------------------------------------------------------------------------------
# Structural walk: types, unknown fields, required fields
# --------------------------------------------------------------------------------------------


class _InvalidType:
    """Marker for a value that failed its type check (its error is already recorded)."""


_INVALID: Final = _InvalidType()
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _kind(value: object) -> str:
    """Name a value's type the way a YAML or JSON author thinks of it."""
    match value:
        case None:
            return "null"
        case bool():
            return "bool"
        case int():
            return "int"
        case float():
            return "float"
        case str():
            return "str"
        case dt.datetime() | dt.date():
            return "timestamp"
        case Mapping():
            return "mapping"
        case list() | tuple():
            return "list"
    return type(value).__name__


@functools.cache
def _struct_info(cls: type[msgspec.Struct]) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


def _nullable(t: mi.Type) -> bool:
    return isinstance(t, mi.UnionType) and any(isinstance(m, mi.NoneType) for m in t.types)


def _field_default(f: mi.Field) -> object:
    if f.default_factory is not msgspec.NODEFAULT:
        return f.default_factory()
    return f.default


_TIMESTAMP_RULE = "must be an RFC 3339 timestamp such as 2026-01-05T00:00:00Z"
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?$"
)


def _timestamp(value: object, path: str, errs: _Errors) -> object:
    """An RFC 3339 string (or a datetime a YAML 1.1 loader produced) -> aware UTC datetime.

    Naive instants are read as UTC (as ``model.to_instant`` does); normalising here makes specs
    compare equal however their instants were written.
    """
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        if not _RFC3339.match(value.strip()):
            errs.add(path, f"{_TIMESTAMP_RULE}, got {value!r}")
            return _INVALID
        try:
            parsed = dt.datetime.fromisoformat(value.strip().upper().replace("Z", "+00:00"))
        except ValueError:
            errs.add(path, f"{_TIMESTAMP_RULE}, got {value!r}")
            return _INVALID
    else:
        errs.add(path, f"expected timestamp, got {_kind(value)}")
        return _INVALID
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _json_value(value: object, path: str, errs: _Errors) -> object:
    """A deep copy of a schemaless value (pod templates), refusing what JSON cannot carry.

    Copying keeps the returned spec independent of the caller's dict; refusing non-JSON values
    (a datetime from a YAML 1.1 loader, say) keeps specs round-trippable through the ledger.
    """
    match value:
        case None | bool() | int() | str():
            return value
        case float():
            if not math.isfinite(value):
                errs.add(path, "must be a finite number")
                return _INVALID
            return value
        case Mapping():
            out: dict[str, object] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    errs.add(_index(path, repr(key)), f"key must be a string, got {_kind(key)}")
                    continue
                out[key] = _json_value(item, _join(path, key), errs)
            return out
        case list() | tuple():
            return [_json_value(item, _index(path, i), errs) for i, item in enumerate(value)]
    errs.add(path, f"expected a JSON value, got {_kind(value)}")
    return _INVALID


def _walk(t: mi.Type, value: object, path: str, errs: _Errors) -> object:
    """Type-check ``value`` against ``t``; return a clean copy or ``_INVALID``.

    The clean copy uses wire names, fills Struct defaults and drops invalid Struct fields, so the
    semantic rules can read it with ``dict.get`` and see only well-typed values.  An invalid list
    element or map value is kept as ``None`` so that indices (and thus paths) stay right; ``None``
    is never a valid element in our schemas, so rules skip it.
    """
    match t:
        case mi.StructType():
            return _walk_struct(t, value, path, errs)
        case mi.UnionType():
            if value is None:
                return None
            members = [m for m in t.types if not isinstance(m, mi.NoneType)]
            if len(members) != 1:  # pragma: no cover - the model only uses ``X | None``
                raise TypeError(f"unsupported union at {path}: {t!r}")
            return _walk(members[0], value, path, errs)
        case mi.IntType():
            if not isinstance(value, int) or isinstance(value, bool):
                errs.add(path, f"expected int, got {_kind(value)}")
                return _INVALID
            if not _INT32_MIN <= value <= _INT32_MAX:
                errs.add(path, f"must be between {_INT32_MIN} and {_INT32_MAX} (int32)")
                return _INVALID
            return value
        case mi.FloatType():
            if not isinstance(value, int | float) or isinstance(value, bool):
                errs.add(path, f"expected number, got {_kind(value)}")
                return _INVALID
            if not math.isfinite(value):
                errs.add(path, "must be a finite number")
                return _INVALID
            return float(value)
        case mi.StrType():
            if not isinstance(value, str):
                errs.add(path, f"expected str, got {_kind(value)}")
                return _INVALID
            return value
        case mi.BoolType():
            if not isinstance(value, bool):
                errs.add(path, f"expected bool, got {_kind(value)}")
                return _INVALID
            return value
        case mi.LiteralType():
            return _choice(value, tuple(t.values), path, errs)
        case mi.EnumType():
            return _choice(value, tuple(m.value for m in t.cls), path, errs)
        case mi.DateTimeType():
            return _timestamp(value, path, errs)
        case mi.DictType():
            if not isinstance(value, Mapping):
                errs.add(path, f"expected mapping, got {_kind(value)}")
                return _INVALID
            # A string map (labels, selector) addresses entries as ``labels[k]``; a schemaless
            # object (a pod template) is a tree of fields, addressed ``template.spec.containers``.
            schemaless = isinstance(t.value_type, mi.AnyType | mi.CustomType)
            out: dict[object, object] = {}
            for key, item in value.items():
                key_path = (
                    _join(path, key) if schemaless and isinstance(key, str) else _index(path, key)
                )
                clean_key = _walk(t.key_type, key, key_path, errs)
                clean_item = _walk(t.value_type, item, key_path, errs)
                if clean_key is not _INVALID:
                    out[clean_key] = None if clean_item is _INVALID else clean_item
            return out
        case mi.VarTupleType() | mi.ListType():
            if not isinstance(value, list | tuple):
                errs.add(path, f"expected list, got {_kind(value)}")
                return _INVALID
            items = [
                _walk(t.item_type, item, _index(path, i), errs) for i, item in enumerate(value)
            ]
            return [None if item is _INVALID else item for item in items]
        case mi.AnyType() | mi.CustomType():
            return _json_value(value, path, errs)
    raise TypeError(f"unsupported type at {path}: {t!r}")  # pragma: no cover


def _choice(value: object, allowed: tuple[object, ...], path: str, errs: _Errors) -> object:
    if not isinstance(value, str):
        errs.add(path, f"expected str, got {_kind(value)}")
        return _INVALID
    if value not in allowed:
        errs.add(path, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
        return _INVALID
    return value


def _walk_struct(
    t: mi.StructType,
    value: object,
    path: str,
    errs: _Errors,
    handled: frozenset[str] = frozenset(),
) -> object:
    """Check a mapping against a Struct: unknown keys first (in the document's order), then each
    declared field in declaration order.  ``handled`` keys were checked by the caller."""
    if not isinstance(value, Mapping):
        errs.add(path, f"expected mapping, got {_kind(value)}")
        return _INVALID
    fields = {f.encode_name: f for f in t.fields}
    for key in value:
        if not isinstance(key, str):
            errs.add(_index(path, repr(key)), f"key must be a string, got {_kind(key)}")
        elif key not in fields and key not in handled:
            errs.add(_join(path, key), "unknown field")
    out: dict[str, object] = {}
    for name, f in fields.items():
        if name in handled:
            continue
        fpath = _join(path, name)
        raw = value.get(name)
        if raw is None and not (name in value and _nullable(f.type)):
            if f.required:
                errs.add(fpath, "required")
            else:
                out[name] = _field_default(f)
            continue
        clean = _walk(f.type, raw, fpath, errs)
        if clean is not _INVALID:
            out[name] = clean
    return out


# --------------------------------------------------------------------------------------------
# Typed reads of a clean tree (None = unset or invalid: the rule does not apply)
# --------------------------------------------------------------------------------------------


def _get_int(d: Mapping[str, object], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _get_float(d: Mapping[str, object], key: str) -> float | None:
    v = d.get(key)
    return v if isinstance(v, float) else None


def _get_str(d: Mapping[str, object], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def _get_map(d: Mapping[str, object], key: str) -> dict[str, object] | None:
    v = d.get(key)
    return v if isinstance(v, dict) else None


def _get_list(d: Mapping[str, object], key: str) -> list[object] | None:
    v = d.get(key)
    return v if isinstance(v, list) else None


def _get_time(d: Mapping[str, object], key: str) -> dt.datetime | None:
    v = d.get(key)
    return v if isinstance(v, dt.datetime) else None


# --------------------------------------------------------------------------------------------
# Shared rules
# --------------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL_RULE = (
    "must be a DNS-1123 label (lowercase letters, digits and '-', "
    "starting and ending with a letter or digit)"
)
DNS_SUBDOMAIN_RULE = (
    "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
    "each part starting and ending with a letter or digit)"
)
RESERVED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NNODES", "NODE_RANK")
"""Rendezvous variables gpu-fleet injects into workload containers; users must not set them."""


def _check_label(value: str | None, path: str, errs: _Errors) -> None:
    """Names that end up in pod names and label values must be DNS-1123 labels (1-63)."""
    if value is None:
        return
    if not value:
        errs.add(path, "must not be empty")
    elif len(value) > 63:
        errs.add(path, "must be at most 63 characters (DNS-1123 label)")
    elif not _DNS_LABEL.match(value):
        errs.add(path, DNS_LABEL_RULE)


def _check_subdomain(value: str | None, path: str, errs: _Errors) -> None:
    if value is None:
        return
    if not value:
        errs.add(path, "must not be empty")
    elif len(value) > 253:
        errs.add(path, "must be at most 253 characters (DNS-1123 subdomain)")
    elif not _DNS_SUBDOMAIN.match(value):
        errs.add(path, DNS_SUBDOMAIN_RULE)


def _check_non_empty(value: str | None, path: str, errs: _Errors) -> None:
    if value is not None and not value.strip():
        errs.add(path, "must not be empty")


def _check_min(value: int | float | None, minimum: int, path: str, errs: _Errors) -> bool:
    """``value >= minimum``; True when the value is set and passes (so dependent rules run)."""
    if value is None:
        return False
    if value < minimum:
        errs.add(path, f"must be >= {minimum}")
        return False
    return True


def _check_positive(value: int | float | None, path: str, errs: _Errors) -> None:
    if value is not None and value <= 0:
        errs.add(path, "must be > 0")


def _check_duration(value: str | None, path: str, errs: _Errors) -> int | None:
    """Seconds of a Go-style duration, or None (with an error when the text is not one)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except DurationError as exc:
        errs.add(path, str(exc))
        return None


def _check_unique_strings(
    items: list[object] | None,
    path: str,
    what: str,
    errs: _Errors,
    extra: Callable[[str, str], None] | None = None,
) -> None:
    """Each entry non-empty and unique; ``extra(value, path)`` adds list-specific rules."""
    seen: dict[str, str] = {}
    for i, item in enumerate(items or ()):
        ipath = _index(path, i)
        if not isinstance(item, str):
            continue
        if not item.strip():
            errs.add(ipath, "must not be empty")
            continue
        if item in seen:
            errs.add(ipath, f"duplicate {what} {item!r} (also at {seen[item]})")
            continue
        seen[item] = ipath
        if extra is not None:
            extra(item, ipath)


def _check_metadata(meta: dict[str, object] | None, path: str, errs: _Errors, kind: str) -> None:
    """Run names become pod and lease names, hence labels; Budgets are plain object names."""
    if meta is None:
        return
    check_name = _check_label if kind == "Run" else _check_subdomain
    check_name(_get_str(meta, "name"), _join(path, "name"), errs)
    namespace = _get_str(meta, "namespace")
    if namespace == "":
        meta["namespace"] = "default"  # one namespaced-key rule: empty means default
    else:
        _check_label(namespace, _join(path, "namespace"), errs)


# --------------------------------------------------------------------------------------------
# Budget rules (SPEC §A.1, DESIGN decision 1)
# --------------------------------------------------------------------------------------------


def _check_envelope(env: dict[str, object], path: str, errs: _Errors) -> None:
    _check_non_empty(_get_str(env, "name"), _join(path, "name"), errs)
    _check_non_empty(_get_str(env, "flavor"), _join(path, "flavor"), errs)
    selector = _get_map(env, "selector")
    if selector is not None and not selector:
        errs.add(_join(path, "selector"), "must have at least 1 entry")
    _check_positive(_get_int(env, "concurrency"), _join(path, "concurrency"), errs)
    # start/end are optional in the Struct only so legacy objects can be represented; a manifest
    # must bound its window (INV-WINDOW-REQUIRED).  Absent keys hold the default None here; keys
    # whose value failed its type check are absent and already reported.
    for bound in ("start", "end"):
        if bound in env and env[bound] is None:
            errs.add(_join(path, bound), "required")
    start, end = _get_time(env, "start"), _get_time(env, "end")
    if start is not None and end is not None and end <= start:
        errs.add(_join(path, "end"), "must be after start")
    _check_positive(_get_float(env, "gpuHours"), _join(path, "gpuHours"), errs)
    lending = _get_map(env, "lending")
    if lending is not None and lending.get("allow") is True:
        max_conc = _get_int(lending, "maxConcurrency")
        _check_positive(max_conc, _join(_join(path, "lending"), "maxConcurrency"), errs)


def _check_cap(
    cap: dict[str, object],
    path: str,
    errs: _Errors,
    declared: Mapping[str, str | None] | None,
) -> None:
    """``declared`` maps envelope names to flavors; None when an envelope was unreadable, in
    which case "no such envelope" would be a guess and is not reported."""
    _check_non_empty(_get_str(cap, "flavor"), _join(path, "flavor"), errs)
    flavor = _get_str(cap, "flavor")
    members = _get_list(cap, "envelopes")
    mpath = _join(path, "envelopes")
    if members is not None and not members:
        errs.add(mpath, "must have at least 1 item")

    def member_rules(name: str, ipath: str) -> None:
        if declared is None:
            return
        if name not in declared:
            errs.add(ipath, f"unknown envelope {name!r}: must name an envelope of this budget")
            return
        env_flavor = declared[name]
        if flavor and env_flavor is not None and env_flavor != flavor:
            errs.add(
                ipath,
                f"envelope {name!r} has flavor {env_flavor!r}: "
                f"must match the cap's flavor {flavor!r}",
            )

    _check_unique_strings(members, mpath, "envelope", errs, member_rules)
    _check_positive(_get_int(cap, "maxConcurrency"), _join(path, "maxConcurrency"), errs)
    _check_positive(_get_float(cap, "gpuHours"), _join(path, "gpuHours"), errs)
    if (
        "maxConcurrency" in cap
        and "gpuHours" in cap
        and cap["maxConcurrency"] is None
        and cap["gpuHours"] is None
    ):
        errs.add(path, "must set maxConcurrency or gpuHours (a cap must bound something)")


def _check_budget_spec(spec: dict[str, object], path: str, errs: _Errors) -> None:
    owner = _get_str(spec, "owner")
    _check_non_empty(owner, _join(path, "owner"), errs)

    envelopes = _get_list(spec, "envelopes")
    epath = _join(path, "envelopes")
    if envelopes is not None and not envelopes:
        errs.add(epath, "must have at least 1 item")
    declared: dict[str, str | None] | None = {} if envelopes is not None else None
    seen: dict[str, str] = {}
    for i, env in enumerate(envelopes or ()):
        ipath = _index(epath, i)
        if not isinstance(env, dict):
            declared = None
            continue
        _check_envelope(env, ipath, errs)
        name = _get_str(env, "name")
        if name is None:
            declared = None
        elif name.strip():
            if name in seen:
                errs.add(
                    _join(ipath, "name"), f"duplicate envelope name {name!r} (also at {seen[name]})"
                )
            else:
                seen[name] = ipath
                if declared is not None:
                    declared[name] = _get_str(env, "flavor")

    caps = _get_list(spec, "aggregateCaps")
    cpath = _join(path, "aggregateCaps")
    cap_seen: dict[str, str] = {}
    for j, cap in enumerate(caps or ()):
        jpath = _index(cpath, j)
        if not isinstance(cap, dict):
            continue
        _check_cap(cap, jpath, errs, declared)
        name = _get_str(cap, "name")
        _check_non_empty(name, _join(jpath, "name"), errs)
        if name and name.strip():
            if name in cap_seen:
                errs.add(
                    _join(jpath, "name"),
                    f"duplicate aggregate cap name {name!r} (also at {cap_seen[name]})",
                )
            else:
                cap_seen[name] = jpath

    def parent_rules(parent: str, ipath: str) -> None:
        if owner is not None and parent == owner:
            errs.add(ipath, f"must not be the budget's own owner {owner!r}")

    ppath = _join(path, "parents")
    _check_unique_strings(_get_list(spec, "parents"), ppath, "parent", errs, parent_rules)

    renew = _get_map(spec, "autoRenew")
    if renew is not None:
        rpath = _join(path, "autoRenew")
        period = _check_duration(_get_str(renew, "period"), _join(rpath, "period"), errs)
        _check_positive(period, _join(rpath, "period"), errs)
        _check_duration(_get_str(renew, "notifyBefore"), _join(rpath, "notifyBefore"), errs)


# --------------------------------------------------------------------------------------------
# Run rules (SPEC §A.2, DESIGN decisions 2-3)
# --------------------------------------------------------------------------------------------


def _check_malleable(
    m: dict[str, object], total: int | None, path: str, rpath: str, errs: _Errors
) -> None:
    """The width ladder: ``min, min+step, ... <= max``; total and desired must sit on it.

    ``rpath`` is the path of ``spec.resources`` (where totalGPUs errors belong).  Relations are
    checked only between values that are themselves valid, so one mistake gives one message.
    """
    lo, hi, step = (_get_int(m, k) for k in ("minTotalGPUs", "maxTotalGPUs", "stepGPUs"))
    ok_lo = _check_min(lo, 1, _join(path, "minTotalGPUs"), errs)
    ok_hi = _check_min(hi, 1, _join(path, "maxTotalGPUs"), errs)
    ok_step = _check_min(step, 1, _join(path, "stepGPUs"), errs)
    if not (ok_lo and ok_hi and ok_step):
        return
    assert lo is not None
    assert hi is not None
    assert step is not None
    if lo > hi:
        errs.add(_join(path, "minTotalGPUs"), f"must be <= maxTotalGPUs ({hi})")
        return

    def on_ladder(value: int, vpath: str, name: str) -> None:
        if value < lo:
            errs.add(vpath, f"must be >= minTotalGPUs ({lo})")
        elif value > hi:
            errs.add(vpath, f"must be <= maxTotalGPUs ({hi})")
        elif (value - lo) % step:
            errs.add(
                vpath,
                f"must be minTotalGPUs plus a multiple of stepGPUs "
                f"({name} - minTotalGPUs = {value - lo}, stepGPUs = {step})",
            )

    if total is not None and total >= 1:
        on_ladder(total, _join(rpath, "totalGPUs"), "totalGPUs")
    desired = _get_int(m, "desiredTotalGPUs")
    dpath = _join(path, "desiredTotalGPUs")
    if desired is None:
        if "desiredTotalGPUs" not in m:
            return  # present but ill-typed: already reported
        # SPEC: the persisted default is the maximum, so the maximum must then be on the ladder.
        # Say so at maxTotalGPUs: the user never wrote a desiredTotalGPUs to blame.
        if (hi - lo) % step:
            errs.add(
                _join(path, "maxTotalGPUs"),
                f"must be minTotalGPUs plus a multiple of stepGPUs when desiredTotalGPUs is unset "
                f"(it defaults to maxTotalGPUs; maxTotalGPUs - minTotalGPUs = {hi - lo}, "
                f"stepGPUs = {step})",
            )
        m["desiredTotalGPUs"] = hi
    elif _check_min(desired, 1, dpath, errs):
        on_ladder(desired, dpath, "desiredTotalGPUs")


def _check_template(template: dict[str, object], path: str, errs: _Errors) -> None:
    """Light checks on the schemaless pod template: only what gpu-fleet itself must own."""
    pod = _get_map(template, "spec")
    if pod is None:
        return
    spath = _join(path, "spec")
    owned = {
        "nodeName": "must not be set (gpu-fleet places the pods)",
        "schedulerName": "must not be set (gpu-fleet schedules the pods)",
        "restartPolicy": "must not be set (gpu-fleet handles restarts)",
    }
    for key, message in owned.items():
        if key in pod:
            errs.add(_join(spath, key), message)
    containers = _get_list(pod, "containers")
    for ci, container in enumerate(containers or ()):
        if not isinstance(container, dict):
            continue
        env = _get_list(container, "env")
        for ei, var in enumerate(env or ()):
            if isinstance(var, dict) and var.get("name") in RESERVED_ENV:
                errs.add(
                    _join(_index(_join(_index(_join(spath, "containers"), ci), "env"), ei), "name"),
                    f"must not set {var['name']} (gpu-fleet injects it)",
                )


def _check_role(role: dict[str, object], total: int | None, path: str, errs: _Errors) -> None:
    _check_label(_get_str(role, "name"), _join(path, "name"), errs)
    width, per_pod = _get_int(role, "width"), _get_int(role, "gpusPerPod")
    ok_width = _check_min(width, 1, _join(path, "width"), errs)
    ok_per_pod = _check_min(per_pod, 1, _join(path, "gpusPerPod"), errs)
    if ok_width and ok_per_pod and total is not None and total >= 1:
        assert width is not None
        assert per_pod is not None
        if width * per_pod != total:
            errs.add(
                path,
                f"width × gpusPerPod ({width} × {per_pod} = {width * per_pod}) "
                f"must equal totalGPUs ({total})",
            )
    _check_min(_get_int(role, "groupGPUs"), 1, _join(path, "groupGPUs"), errs)
    _check_min(_get_int(role, "spares"), 0, _join(path, "spares"), errs)
    policy = _get_str(role, "failurePolicy")
    retries = _get_int(role, "retries")
    rpath = _join(path, "retries")
    if policy == "Retry":
        if "retries" in role and role["retries"] is None:
            errs.add(rpath, "required when failurePolicy is Retry")
        else:
            _check_min(retries, 1, rpath, errs)
    elif policy is not None and role.get("retries") is not None:
        errs.add(rpath, "must not be set unless failurePolicy is Retry")
    _check_duration(_get_str(role, "backoff"), _join(path, "backoff"), errs)
    template = _get_map(role, "template")
    if template is not None:
        _check_template(template, _join(path, "template"), errs)


def _check_run_spec(
    spec: dict[str, object], run_name: str | None, path: str, errs: _Errors
) -> None:
    resources = _get_map(spec, "resources")
    rpath = _join(path, "resources")
    total: int | None = None
    if resources is not None:
        _check_non_empty(_get_str(resources, "gpuType"), _join(rpath, "gpuType"), errs)
        total = _get_int(resources, "totalGPUs")
        _check_min(total, 1, _join(rpath, "totalGPUs"), errs)

    locality = _get_map(spec, "locality")
    if locality is not None:
        lpath = _join(path, "locality")
        _check_min(_get_int(locality, "groupGPUs"), 1, _join(lpath, "groupGPUs"), errs)

    malleable = _get_map(spec, "malleable")
    if malleable is not None:
        _check_malleable(malleable, total, _join(path, "malleable"), rpath, errs)

    _check_min(_get_int(spec, "sparesPerGroup"), 0, _join(path, "sparesPerGroup"), errs)

    funding = _get_map(spec, "funding")
    if funding is not None:
        fpath = _join(path, "funding")
        if funding.get("allowBorrow") is True:
            max_borrow = _get_int(funding, "maxBorrowGPUs")
            _check_positive(max_borrow, _join(fpath, "maxBorrowGPUs"), errs)
        sponsors = _get_list(funding, "sponsors")
        _check_unique_strings(sponsors, _join(fpath, "sponsors"), "sponsor", errs)

    follow = _get_map(spec, "follow")
    if follow is not None:
        _check_follow(follow, run_name, _join(path, "follow"), errs)

    runtime = _get_map(spec, "runtime")
    if runtime is not None:
        tpath = _join(path, "runtime")
        _check_duration(_get_str(runtime, "checkpoint"), _join(tpath, "checkpoint"), errs)
        max_duration = _get_str(runtime, "maxDuration")
        seconds = _check_duration(max_duration, _join(tpath, "maxDuration"), errs)
        _check_positive(seconds, _join(tpath, "maxDuration"), errs)
        _check_duration(_get_str(runtime, "preemptionGrace"), _join(tpath, "preemptionGrace"), errs)

    roles = _get_list(spec, "roles")
    opath = _join(path, "roles")
    if roles is not None and len(roles) > 1:
        errs.add(opath, f"must have at most 1 item (v1 runs have one role), got {len(roles)}")
    for i, role in enumerate(roles or ()):
        if isinstance(role, dict):
            _check_role(role, total, _index(opath, i), errs)


def _check_follow(
    follow: dict[str, object], run_name: str | None, path: str, errs: _Errors
) -> None:
    after = _get_list(follow, "after")
    apath = _join(path, "after")
    if after is not None and not after:
        errs.add(apath, "must have at least 1 item")

    def upstream_rules(name: str, ipath: str) -> None:
        if run_name is not None and name == run_name:
            errs.add(ipath, f"must not name the run itself ({name!r})")
        else:
            _check_label(name, ipath, errs)

    _check_unique_strings(after, apath, "run", errs, upstream_rules)
    if follow.get("onUpstreamFailure") == "":
        follow["onUpstreamFailure"] = "wait"  # SPEC: "" means the default, wait
    grace = _get_str(follow, "upstreamFailureGrace")
    _check_duration(grace, _join(path, "upstreamFailureGrace"), errs)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

_S = TypeVar("_S", bound=msgspec.Struct)

_KINDS: Final[dict[str, type[Budget] | type[Run]]] = {"Budget": Budget, "Run": Run}


def _manifest(raw: object, path: str, errs: _Errors) -> Budget | Run | None:
    """Validate one manifest into ``errs``; the typed value only if this document had no error."""
    if not isinstance(raw, Mapping):
        errs.add(path, f"expected mapping, got {_kind(raw)}")
        return None
    before = len(errs)
    api_path, kind_path = _join(path, "apiVersion"), _join(path, "kind")
    api, kind = raw.get("apiVersion"), raw.get("kind")
    if api is None:
        errs.add(api_path, "required")
    elif not isinstance(api, str):
        errs.add(api_path, f"expected str, got {_kind(api)}")
    elif api != API_VERSION:
        errs.add(api_path, f"must be {API_VERSION!r}, got {api!r}")
    if kind is None:
        errs.add(kind_path, "required")
        return None
    if not isinstance(kind, str):
        errs.add(kind_path, f"expected str, got {_kind(kind)}")
        return None
    cls = _KINDS.get(kind)
    if cls is None:
        errs.add(kind_path, f"unsupported kind {kind!r}: must be Budget or Run")
        return None

    handled = frozenset({"apiVersion", "kind"})
    clean = _walk_struct(_struct_info(cls), raw, path, errs, handled)
    if not isinstance(clean, dict):  # pragma: no cover - raw is a Mapping
        return None
    meta = _get_map(clean, "metadata")
    _check_metadata(meta, _join(path, "metadata"), errs, kind)
    spec = _get_map(clean, "spec")
    if spec is not None:
        spath = _join(path, "spec")
        if cls is Budget:
            _check_budget_spec(spec, spath, errs)
        else:
            name = _get_str(meta, "name") if meta is not None else None
            _check_run_spec(spec, name, spath, errs)
    if len(errs) > before:
        return None
    clean["apiVersion"] = API_VERSION
    clean["kind"] = kind
    return _construct(clean, cls, path, errs)


def _construct(clean: object, cls: type[_S], path: str, errs: _Errors) -> _S | None:
    """The one conversion into Structs; a failure here means the walk missed a rule."""
    try:
        return msgspec.convert(clean, cls)
    except msgspec.ValidationError as exc:  # pragma: no cover - guarded by the walk
        errs.add(path, f"invalid: {exc}")
        return None


def validate_manifest(raw: object, path: str = "") -> Budget | Run:
    """Validate and default one decoded manifest (a dict from YAML or JSON).

    ``path`` prefixes every error path, so a manifest embedded in a larger file reports where it
    sits (``steps[3].apply.spec.malleable.stepGPUs: must be >= 1``).  Raises ManifestError with
    every problem of the document; returns the frozen Budget or Run with defaults applied.
    """
    errs = _Errors()
    result = _manifest(raw, path, errs)
    if errs or result is None:
        raise ManifestError(errs.items)
    return result


_LIST_FIELDS = frozenset({"apiVersion", "kind", "items", "metadata"})


def parse_manifests(text: str, source: str = "<input>") -> list[Budget | Run]:
    """Every Budget and Run in ``text`` (YAML or JSON, ``---``-separated, ``kind: List`` allowed).

    Empty documents are skipped.  When the file holds more than one document, paths are prefixed
    ``documents[i]`` where ``i`` is the document's 0-based position in the file (empty documents
    count, so the index matches what the user sees).  All documents are checked before anything is
    returned: one bad document fails the whole input, so an apply is all or nothing.
    """
    documents = load_documents(text, source)
    present = [(i, doc) for i, doc in enumerate(documents) if doc is not None]
    multi = len(present) > 1
    errs = _Errors()
    out: list[Budget | Run] = []
    for i, doc in present:
        prefix = _index("documents", i) if multi else ""
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            for key in doc:
                if key not in _LIST_FIELDS:
                    errs.add(_join(prefix, str(key)), "unknown field")
            items = doc.get("items")
            ipath = _join(prefix, "items")
            if not isinstance(items, list):
                errs.add(
                    ipath, "required" if items is None else f"expected list, got {_kind(items)}"
                )
                continue
            for j, item in enumerate(items):
                manifest = _manifest(item, _index(ipath, j), errs)
                if manifest is not None:
                    out.append(manifest)
        else:
            manifest = _manifest(doc, prefix, errs)
            if manifest is not None:
                out.append(manifest)
    if errs:
        raise ManifestError(errs.items, source=source)
    return out


def _node(raw: object, path: str, errs: _Errors) -> Node | None:
    before = len(errs)
    clean = _walk_struct(_struct_info(Node), raw, path, errs)
    if not isinstance(clean, dict):
        return None
    _check_subdomain(_get_str(clean, "name"), _join(path, "name"), errs)
    _check_min(_get_int(clean, "gpus"), 0, _join(path, "gpus"), errs)
    if len(errs) > before:
        return None
    return _construct(clean, Node, path, errs)


def validate_node(raw: object, path: str) -> Node:
    """Validate one inventory row: DNS-1123 name, ``gpus >= 0``, string labels, optional health."""
    errs = _Errors()
    node = _node(raw, path, errs)
    if errs or node is None:
        raise ManifestError(errs.items)
    return node


def parse_inventory(text: str, source: str = "<input>") -> list[Node]:
    """The nodes of an inventory file: ``{nodes: [...]}`` or ``{fleet: {nodes: [...]}}``.

    The ``nodes`` form is the whole file, so any other top-level key is an unknown field.  The
    ``fleet`` form may sit inside a larger file (a scenario), so other top-level keys are left to
    their owner, but the ``fleet`` block itself is strict.  Node names must be unique.
    """
    documents = [doc for doc in load_documents(text, source) if doc is not None]
    errs = _Errors()
    if len(documents) > 1:
        errs.add(source, f"expected one document, got {len(documents)}")
        raise ManifestError(errs.items, source=source)
    doc = documents[0] if documents else {}
    base = ""
    nodes: object = None
    if not isinstance(doc, Mapping):
        errs.add("", f"expected mapping, got {_kind(doc)}")
    elif "nodes" in doc or "fleet" not in doc:
        base = "nodes"
        nodes = doc.get("nodes")
        for key in doc:
            if key != "nodes":
                errs.add(str(key), "unknown field")
    else:
        fleet = doc["fleet"]
        base = "fleet.nodes"
        if not isinstance(fleet, Mapping):
            errs.add("fleet", f"expected mapping, got {_kind(fleet)}")
            base = ""
        else:
            nodes = fleet.get("nodes")
            for key in fleet:
                if key != "nodes":
                    errs.add(_join("fleet", str(key)), "unknown field")
    out: list[Node] = []
    if base and nodes is None:
        errs.add(base, "required")
    elif base and not isinstance(nodes, list):
        errs.add(base, f"expected list, got {_kind(nodes)}")
    elif isinstance(nodes, list):
        seen: dict[str, str] = {}
        for i, raw in enumerate(nodes):
            npath = _index(base, i)
            node = _node(raw, npath, errs)
            name = raw.get("name") if isinstance(raw, Mapping) else None
            if isinstance(name, str) and name:
                if name in seen:
                    errs.add(
                        _join(npath, "name"), f"duplicate node name {name!r} (also at {seen[name]})"
                    )
                else:
                    seen[name] = npath
            if node is not None:
                out.append(node)
    if errs:
        raise ManifestError(errs.items, source=source)
    return out
