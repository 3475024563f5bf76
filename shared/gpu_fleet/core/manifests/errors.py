"""Manifest errors: every problem of a document, each with the exact path of its field.

A user fixing a manifest wants the whole list, not one error per attempt, so the checks collect
``FieldError``s (wire names, ``[i]`` indices: ``spec.envelopes[1].concurrency``) into one
``ManifestError`` instead of raising at the first.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec


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


class ErrorList:
    """Accumulates FieldErrors for one input; an empty path means the whole document."""

    def __init__(self) -> None:
        self.items: list[FieldError] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(FieldError(path or "<document>", message))

    def __len__(self) -> int:
        return len(self.items)


def join_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def index_path(prefix: str, i: int | str) -> str:
    return f"{prefix}[{i}]"
