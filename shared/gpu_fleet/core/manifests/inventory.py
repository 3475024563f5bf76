"""Node inventories: the one home of the node-list checks, for inventory files and scenarios.

An inventory row is a DNS-1123 name, ``gpus >= 0``, string labels and an optional health; names
are unique within a list.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpu_fleet.core.manifests.documents import INVENTORY_BOUNDS, load_documents
from gpu_fleet.core.manifests.errors import ErrorList, ManifestError, index_path, join_path
from gpu_fleet.core.manifests.rules import check_min, check_subdomain
from gpu_fleet.core.manifests.structure import (
    construct,
    get_int,
    get_str,
    kind_name,
    struct_info,
    walk_struct,
)
from gpu_fleet.core.model import Node
from gpu_fleet.core.names import quote


def _node(raw: object, path: str, errs: ErrorList) -> Node | None:
    before = len(errs)
    clean = walk_struct(struct_info(Node), raw, path, errs)
    if not isinstance(clean, dict):
        return None
    check_subdomain(get_str(clean, "name"), join_path(path, "name"), errs)
    check_min(get_int(clean, "gpus"), 0, join_path(path, "gpus"), errs)
    if len(errs) > before:
        return None
    return construct(clean, Node, path, errs)


def validate_node(raw: object, path: str) -> Node:
    """Validate one inventory row: DNS-1123 name, ``gpus >= 0``, string labels, optional health."""
    errs = ErrorList()
    node = _node(raw, path, errs)
    if errs or node is None:
        raise ManifestError(errs.items)
    return node


def _node_list(items: list[object], base: str, errs: ErrorList) -> list[Node]:
    """Each row validated, names unique: the one node-list check of inventories and scenarios."""
    out: list[Node] = []
    seen: dict[str, str] = {}
    for i, raw in enumerate(items):
        npath = index_path(base, i)
        node = _node(raw, npath, errs)
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if isinstance(name, str) and name:
            if name in seen:
                errs.add(
                    join_path(npath, "name"),
                    f"duplicate node name {quote(name)} (also at {seen[name]})",
                )
                continue
            seen[name] = npath
        if node is not None:
            out.append(node)
    return out


def validate_nodes(items: list[object], base: str) -> list[Node]:
    """Validate a list of inventory rows found at ``base`` (every error at once, names unique)."""
    errs = ErrorList()
    nodes = _node_list(items, base, errs)
    if errs:
        raise ManifestError(errs.items)
    return nodes


def parse_inventory(text: str, source: str = "<input>") -> list[Node]:
    """The nodes of an inventory file: ``{nodes: [...]}`` or ``{fleet: {nodes: [...]}}``.

    The ``nodes`` form is the whole file, so any other top-level key is an unknown field.  The
    ``fleet`` form may sit inside a larger file (a scenario), so other top-level keys are left to
    their owner, but the ``fleet`` block itself is strict.  Node names must be unique.
    """
    documents = [doc for doc in load_documents(text, source, INVENTORY_BOUNDS) if doc is not None]
    errs = ErrorList()
    if len(documents) > 1:
        errs.add(source, f"expected one document, got {len(documents)}")
        raise ManifestError(errs.items, source=source)
    doc = documents[0] if documents else {}
    base = ""
    nodes: object = None
    if not isinstance(doc, Mapping):
        errs.add("", f"expected mapping, got {kind_name(doc)}")
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
            errs.add("fleet", f"expected mapping, got {kind_name(fleet)}")
            base = ""
        else:
            nodes = fleet.get("nodes")
            for key in fleet:
                if key != "nodes":
                    errs.add(join_path("fleet", str(key)), "unknown field")
    out: list[Node] = []
    if base and nodes is None:
        errs.add(base, "required")
    elif base and not isinstance(nodes, list):
        errs.add(base, f"expected list, got {kind_name(nodes)}")
    elif isinstance(nodes, list):
        out = _node_list(nodes, base, errs)
    if errs:
        raise ManifestError(errs.items, source=source)
    return out
