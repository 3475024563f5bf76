"""Manifests in, typed specs out: parsing, defaulting and validation of Budgets, Runs and nodes.

Everything a user writes passes through here once, before the core sees it, so the rest of the
core can trust its inputs: ``documents`` turns text into plain documents, ``structure`` walks
them against the Structs' types, ``rules`` checks their meaning, ``parse`` and ``inventory`` are
the entry points, and ``source`` holds the rules for a file's bytes (UTF-8, not empty) that every
reader of user files shares.  Every error of a document is reported at once, each with its
field path.

This package must never read files or hold state: it parses the text it is given.
"""

from gpu_fleet.core.manifests.documents import dump_documents, load_documents
from gpu_fleet.core.manifests.errors import FieldError, ManifestError
from gpu_fleet.core.manifests.inventory import parse_inventory, validate_node, validate_nodes
from gpu_fleet.core.manifests.parse import parse_documents, parse_manifests, validate_manifest
from gpu_fleet.core.manifests.source import decode_text, load_source

__all__ = [
    "FieldError",
    "ManifestError",
    "decode_text",
    "dump_documents",
    "load_documents",
    "load_source",
    "parse_documents",
    "parse_inventory",
    "parse_manifests",
    "validate_manifest",
    "validate_node",
    "validate_nodes",
]
