"""Public entry points for Budget and Run manifests: one document, or every document of a text.

Defaults follow SPEC §A: ``metadata.namespace`` ``default`` (also for an empty namespace, the one
namespaced-key rule of §F.1.8), ``malleable.desiredTotalGPUs`` = ``maxTotalGPUs``,
``follow.onUpstreamFailure`` ``""`` -> ``wait``; the Structs' own defaults cover the rest
(``locality.allowCrossGroupSpread`` true, ``follow.upstreamFailureGrace`` 30m, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from gpu_fleet.core.manifests.channel import check_channel_spec
from gpu_fleet.core.manifests.documents import load_documents
from gpu_fleet.core.manifests.errors import ErrorList, ManifestError, index_path, join_path
from gpu_fleet.core.manifests.rules import check_budget_spec, check_metadata, check_run_spec
from gpu_fleet.core.manifests.structure import (
    construct,
    get_map,
    get_str,
    kind_name,
    struct_info,
    walk_struct,
)
from gpu_fleet.core.model import API_VERSION, Budget, Manifest, NotificationChannel, Run
from gpu_fleet.core.names import quote

_KINDS: Final[dict[str, type[Budget] | type[Run] | type[NotificationChannel]]] = {
    "Budget": Budget,
    "Run": Run,
    "NotificationChannel": NotificationChannel,
}
_SCHEDULING_KINDS: Final = ("Budget", "Run")
"""What a scenario may hold: the objects that change scheduling (channels only notify)."""


def _one_of(kinds: tuple[str, ...]) -> str:
    return kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} or {kinds[-1]}"


def _manifest(
    raw: object, path: str, errs: ErrorList, kinds: tuple[str, ...] = tuple(_KINDS)
) -> Manifest | None:
    """Validate one manifest into ``errs``; the typed value only if this document had no error."""
    if not isinstance(raw, Mapping):
        errs.add(path, f"expected mapping, got {kind_name(raw)}")
        return None
    before = len(errs)
    api_path, kind_path = join_path(path, "apiVersion"), join_path(path, "kind")
    api, kind = raw.get("apiVersion"), raw.get("kind")
    if api is None:
        errs.add(api_path, "required")
    elif not isinstance(api, str):
        errs.add(api_path, f"expected str, got {kind_name(api)}")
    elif api != API_VERSION:
        errs.add(api_path, f"must be {API_VERSION!r}, got {quote(api)}")
    if kind is None:
        errs.add(kind_path, "required")
        return None
    if not isinstance(kind, str):
        errs.add(kind_path, f"expected str, got {kind_name(kind)}")
        return None
    cls = _KINDS.get(kind) if kind in kinds else None
    if cls is None:
        errs.add(kind_path, f"unsupported kind {quote(kind)}: must be {_one_of(kinds)}")
        return None

    handled = frozenset({"apiVersion", "kind"})
    clean = walk_struct(struct_info(cls), raw, path, errs, handled)
    if not isinstance(clean, dict):  # pragma: no cover - raw is a Mapping
        return None
    meta = get_map(clean, "metadata")
    check_metadata(meta, join_path(path, "metadata"), errs, kind)
    spec = get_map(clean, "spec")
    if spec is not None:
        spath = join_path(path, "spec")
        if cls is Budget:
            check_budget_spec(spec, spath, errs)
        elif cls is NotificationChannel:
            check_channel_spec(spec, spath, errs)
        else:
            name = get_str(meta, "name") if meta is not None else None
            check_run_spec(spec, name, spath, errs)
    if len(errs) > before:
        return None
    clean["apiVersion"] = API_VERSION
    clean["kind"] = kind
    return construct(clean, cls, path, errs)


def validate_manifest(raw: object, path: str = "") -> Budget | Run:
    """Validate and default one decoded manifest (a dict from YAML or JSON).

    ``path`` prefixes every error path, so a manifest embedded in a larger file reports where it
    sits (``steps[3].apply.spec.malleable.stepGPUs: must be >= 1``).  Raises ManifestError with
    every problem of the document; returns the frozen Budget or Run with defaults applied.
    """
    errs = ErrorList()
    result = _manifest(raw, path, errs, _SCHEDULING_KINDS)
    if errs or result is None:
        raise ManifestError(errs.items)
    assert not isinstance(result, NotificationChannel)  # refused above: not a scheduling kind
    return result


_LIST_FIELDS = frozenset({"apiVersion", "kind", "items", "metadata"})


def parse_manifests(text: str, source: str = "<input>") -> list[Manifest]:
    """Every Budget, Run and NotificationChannel in ``text`` (YAML or JSON, ``---``-separated,
    ``kind: List`` allowed).

    Empty documents are skipped.  When the file holds more than one document, paths are prefixed
    ``documents[i]`` where ``i`` is the document's 0-based position in the file (empty documents
    count, so the index matches what the user sees).  All documents are checked before anything is
    returned: one bad document fails the whole input, so an apply is all or nothing.
    """
    return parse_documents(load_documents(text, source), source)


def parse_documents(documents: list[object], source: str = "<input>") -> list[Manifest]:
    """``parse_manifests`` for documents already loaded (``load_documents``, ``load_source``)."""
    present = [(i, doc) for i, doc in enumerate(documents) if doc is not None]
    multi = len(present) > 1
    errs = ErrorList()
    out: list[Manifest] = []
    for i, doc in present:
        prefix = index_path("documents", i) if multi else ""
        if isinstance(doc, Mapping) and doc.get("kind") == "List":
            for key in doc:
                if key not in _LIST_FIELDS:
                    errs.add(join_path(prefix, str(key)), "unknown field")
            items = doc.get("items")
            ipath = join_path(prefix, "items")
            if not isinstance(items, list):
                errs.add(
                    ipath, "required" if items is None else f"expected list, got {kind_name(items)}"
                )
                continue
            for j, item in enumerate(items):
                manifest = _manifest(item, index_path(ipath, j), errs)
                if manifest is not None:
                    out.append(manifest)
        else:
            manifest = _manifest(doc, prefix, errs)
            if manifest is not None:
                out.append(manifest)
    if errs:
        raise ManifestError(errs.items, source=source)
    return out
