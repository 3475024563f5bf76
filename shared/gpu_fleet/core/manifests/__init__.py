"""Manifests in, typed specs out: parsing, defaulting and validation of Budgets, Runs and nodes.

Everything a user writes passes through here once, before the core sees it, so the rest of the
core can trust its inputs: ``documents`` turns text into plain documents, ``structure`` walks
them against the Structs' types, ``rules`` checks their meaning, ``parse`` and ``inventory`` are
the entry points.  Every error of a document is reported at once, each with its field path.

This package must never read files or hold state: it parses the text it is given.
"""

from gpu_fleet.core.manifests.documents import load_documents
from gpu_fleet.core.manifests.errors import FieldError, ManifestError
from gpu_fleet.core.manifests.inventory import parse_inventory, validate_node, validate_nodes
from gpu_fleet.core.manifests.parse import parse_manifests, validate_manifest

__all__ = [
    "FieldError",
    "ManifestError",
    "load_documents",
    "parse_inventory",
    "parse_manifests",
    "validate_manifest",
    "validate_node",
    "validate_nodes",
]
