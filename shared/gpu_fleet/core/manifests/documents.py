"""YAML and JSON text into plain documents, meaning what they look like.

PyYAML's ``safe_load`` implements YAML 1.1, where ``no`` is ``False``, ``010`` is octal, ``1:30``
is ninety and an unquoted instant is a ``datetime``.  Our loader resolves plain scalars the YAML
1.2 way (only ``true``/``false`` are booleans, decimal numbers only, timestamps stay strings) and
rejects duplicate keys, which PyYAML silently overwrites.

This module is pure: it parses text it is given and never reads files.
"""

import re
from typing import Any

import msgspec
import yaml

from gpu_fleet.core.manifests.errors import FieldError, ManifestError

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
