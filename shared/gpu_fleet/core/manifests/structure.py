"""The structural walk: a decoded document checked against the Structs' own type information.

The document is walked with ``msgspec.inspect`` instead of being handed to ``msgspec.convert``
directly (which stops at the first problem): unknown fields, wrong types and missing fields are
collected with exact paths, and the semantic rules then run over whatever was well typed.  Only
a document with no error at all is converted (``construct``), so nothing is ever partially
constructed.  An explicit ``null`` for a field that is not nullable reads as "not set", as the
Kubernetes API server does.
"""

import datetime as dt
import functools
import math
import re
from collections.abc import Mapping
from typing import Final, TypeVar

import msgspec
import msgspec.inspect as mi

from gpu_fleet.core.manifests.errors import ErrorList, index_path, join_path
from gpu_fleet.core.names import quote


class _InvalidType:
    """Marker for a value that failed its type check (its error is already recorded)."""


_INVALID: Final = _InvalidType()
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def kind_name(value: object) -> str:
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
def struct_info(cls: type[msgspec.Struct]) -> mi.StructType:
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


def _timestamp(value: object, path: str, errs: ErrorList) -> object:
    """An RFC 3339 string (or a datetime a YAML 1.1 loader produced) -> aware UTC datetime.

    Naive instants are read as UTC (as ``model.to_instant`` does); normalising here makes specs
    compare equal however their instants were written.
    """
    if isinstance(value, dt.datetime):
        parsed = value
    elif isinstance(value, str):
        if not _RFC3339.match(value.strip()):
            errs.add(path, f"{_TIMESTAMP_RULE}, got {quote(value)}")
            return _INVALID
        try:
            parsed = dt.datetime.fromisoformat(value.strip().upper().replace("Z", "+00:00"))
        except ValueError:
            errs.add(path, f"{_TIMESTAMP_RULE}, got {quote(value)}")
            return _INVALID
    else:
        errs.add(path, f"expected timestamp, got {kind_name(value)}")
        return _INVALID
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC)


def _json_value(value: object, path: str, errs: ErrorList) -> object:
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
                    errs.add(
                        index_path(path, repr(key)), f"key must be a string, got {kind_name(key)}"
                    )
                    continue
                out[key] = _json_value(item, join_path(path, key), errs)
            return out
        case list() | tuple():
            return [_json_value(item, index_path(path, i), errs) for i, item in enumerate(value)]
    errs.add(path, f"expected a JSON value, got {kind_name(value)}")
    return _INVALID


def _walk(t: mi.Type, value: object, path: str, errs: ErrorList) -> object:
    """Type-check ``value`` against ``t``; return a clean copy or ``_INVALID``.

    The clean copy uses wire names, fills Struct defaults and drops invalid Struct fields, so the
    semantic rules can read it with ``dict.get`` and see only well-typed values.  An invalid list
    element or map value is kept as ``None`` so that indices (and thus paths) stay right; ``None``
    is never a valid element in our schemas, so rules skip it.
    """
    match t:
        case mi.StructType():
            return walk_struct(t, value, path, errs)
        case mi.UnionType():
            if value is None:
                return None
            members = [m for m in t.types if not isinstance(m, mi.NoneType)]
            if len(members) != 1:  # pragma: no cover - the model only uses ``X | None``
                raise TypeError(f"unsupported union at {path}: {t!r}")
            return _walk(members[0], value, path, errs)
        case mi.IntType():
            if not isinstance(value, int) or isinstance(value, bool):
                errs.add(path, f"expected int, got {kind_name(value)}")
                return _INVALID
            if not _INT32_MIN <= value <= _INT32_MAX:
                errs.add(path, f"must be between {_INT32_MIN} and {_INT32_MAX} (int32)")
                return _INVALID
            return value
        case mi.FloatType():
            if not isinstance(value, int | float) or isinstance(value, bool):
                errs.add(path, f"expected number, got {kind_name(value)}")
                return _INVALID
            if not math.isfinite(value):
                errs.add(path, "must be a finite number")
                return _INVALID
            return float(value)
        case mi.StrType():
            if not isinstance(value, str):
                errs.add(path, f"expected str, got {kind_name(value)}")
                return _INVALID
            return value
        case mi.BoolType():
            if not isinstance(value, bool):
                errs.add(path, f"expected bool, got {kind_name(value)}")
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
                errs.add(path, f"expected mapping, got {kind_name(value)}")
                return _INVALID
            # A string map (labels, selector) addresses entries as ``labels[k]``; a schemaless
            # object (a pod template) is a tree of fields, addressed ``template.spec.containers``.
            schemaless = isinstance(t.value_type, mi.AnyType | mi.CustomType)
            out: dict[object, object] = {}
            for key, item in value.items():
                key_path = (
                    join_path(path, key)
                    if schemaless and isinstance(key, str)
                    else index_path(path, key)
                )
                clean_key = _walk(t.key_type, key, key_path, errs)
                clean_item = _walk(t.value_type, item, key_path, errs)
                if clean_key is not _INVALID:
                    out[clean_key] = None if clean_item is _INVALID else clean_item
            return out
        case mi.VarTupleType() | mi.ListType():
            if not isinstance(value, list | tuple):
                errs.add(path, f"expected list, got {kind_name(value)}")
                return _INVALID
            items = [
                _walk(t.item_type, item, index_path(path, i), errs) for i, item in enumerate(value)
            ]
            return [None if item is _INVALID else item for item in items]
        case mi.AnyType() | mi.CustomType():
            return _json_value(value, path, errs)
    raise TypeError(f"unsupported type at {path}: {t!r}")  # pragma: no cover


def _choice(value: object, allowed: tuple[object, ...], path: str, errs: ErrorList) -> object:
    if not isinstance(value, str):
        errs.add(path, f"expected str, got {kind_name(value)}")
        return _INVALID
    if value not in allowed:
        errs.add(path, f"must be one of {', '.join(repr(a) for a in allowed)}, got {quote(value)}")
        return _INVALID
    return value


def walk_struct(
    t: mi.StructType,
    value: object,
    path: str,
    errs: ErrorList,
    handled: frozenset[str] = frozenset(),
) -> object:
    """Check a mapping against a Struct: unknown keys first (in the document's order), then each
    declared field in declaration order.  ``handled`` keys were checked by the caller."""
    if not isinstance(value, Mapping):
        errs.add(path, f"expected mapping, got {kind_name(value)}")
        return _INVALID
    fields = {f.encode_name: f for f in t.fields}
    for key in value:
        if not isinstance(key, str):
            errs.add(index_path(path, repr(key)), f"key must be a string, got {kind_name(key)}")
        elif key not in fields and key not in handled:
            errs.add(join_path(path, key), "unknown field")
    out: dict[str, object] = {}
    for name, f in fields.items():
        if name in handled:
            continue
        fpath = join_path(path, name)
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


def get_int(d: Mapping[str, object], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def get_float(d: Mapping[str, object], key: str) -> float | None:
    v = d.get(key)
    return v if isinstance(v, float) else None


def get_str(d: Mapping[str, object], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


def get_map(d: Mapping[str, object], key: str) -> dict[str, object] | None:
    v = d.get(key)
    return v if isinstance(v, dict) else None


def get_list(d: Mapping[str, object], key: str) -> list[object] | None:
    v = d.get(key)
    return v if isinstance(v, list) else None


def get_time(d: Mapping[str, object], key: str) -> dt.datetime | None:
    v = d.get(key)
    return v if isinstance(v, dt.datetime) else None


_S = TypeVar("_S", bound=msgspec.Struct)


def construct(clean: object, cls: type[_S], path: str, errs: ErrorList) -> _S | None:
    """The one conversion into Structs; a failure here means the walk missed a rule."""
    try:
        return msgspec.convert(clean, cls)
    except msgspec.ValidationError as exc:  # pragma: no cover - guarded by the walk
        errs.add(path, f"invalid: {exc}")
        return None
