"""YAML and JSON text into plain documents, meaning what they look like.

PyYAML's ``safe_load`` implements YAML 1.1, where ``no`` is ``False``, ``010`` is octal, ``1:30``
is ninety and an unquoted instant is a ``datetime``.  Our loader resolves plain scalars the YAML
1.2 way (only ``true``/``false`` are booleans, decimal numbers only, timestamps stay strings) and
rejects duplicate keys, which PyYAML silently overwrites.

Input is bounded *after* alias expansion: a YAML alias bomb (a few hundred bytes of nested
anchors that expand to billions of nodes) is cheap for PyYAML, which shares the aliased objects,
but every reader that walks or re-encodes the documents pays the expanded size - issue 19's CLI
hung re-wrapping one.  Each document is measured on its node graph before it is constructed, in
time linear in the graph (shared nodes are measured once), and refused over ``MAX_NODES``
nodes, ``MAX_SCALAR_CHARS`` characters of scalars or ``MAX_DEPTH`` levels of nesting, and when
an alias contains itself.  JSON documents get the same bounds.  An inventory file (the
operator's own fleet description) is read with the wider ``INVENTORY_BOUNDS``.

This module is pure: it parses text it is given and never reads files.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import yaml

from gpu_fleet.core.manifests.errors import FieldError, ManifestError
from gpu_fleet.core.names import quote

MAX_NODES: Final = 100_000
"""Nodes (mappings, sequences, keys and scalars) in one document once aliases are expanded."""
MAX_SCALAR_CHARS: Final = 4 * 1024 * 1024
"""Characters of scalars in one document once aliases are expanded."""
MAX_DEPTH: Final = 64
"""Levels of nesting in one document (a pod template needs about a dozen)."""


@dataclass(frozen=True, slots=True)
class DocumentBounds:
    """How large one document may be once aliases are expanded.

    Why two sets: a manifest comes from any user through the API, so its bounds are tight; an
    inventory file is the operator's own description of the fleet, read once at start, and a
    10k-node fleet is about 170k YAML nodes - over the manifest bound, yet nothing hostile.  The
    inventory bounds are still bounds: an alias bomb there is refused just as fast.
    """

    nodes: int = MAX_NODES
    scalar_chars: int = MAX_SCALAR_CHARS
    depth: int = MAX_DEPTH


MANIFEST_BOUNDS: Final = DocumentBounds()
"""Every user document: manifests, API bodies, scenario files."""
INVENTORY_BOUNDS: Final = DocumentBounds(nodes=8_000_000, scalar_chars=256 * 1024 * 1024)
"""An operator's inventory file: room for about 400k fleet nodes of a few labels each."""

_MERGE_TAG = "tag:yaml.org,2002:merge"
_YAML11_TAGS_DROPPED = frozenset(
    {
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:timestamp",
    }
)


class _Strict(yaml.constructor.SafeConstructor):
    """What both loaders add to PyYAML's safe constructor: bounds measured on the node graph
    before anything is constructed, and no silent duplicate keys."""

    document = -1  # index of the document being loaded, for ``documents[i]`` in bound errors
    bounds = MANIFEST_BOUNDS
    implicit_tags = False  # the text has no tag (no ``!``): every tag is our resolvers'
    text_fits = False  # no document of the text can exceed ``bounds`` (``_text_fits``)

    def construct_document(self, node: yaml.Node) -> Any:
        if self.text_fits or _node_tree_fits(node, self.bounds):
            if self.implicit_tags and _PLAIN:
                try:
                    return _plain_value(node)
                except (_NotPlainError, ValueError):
                    pass  # something PyYAML's constructor must build, or word
        else:
            problem = _measure(node, _node_children, _node_chars, self.bounds)
            if problem is not None:
                raise _BoundError(self.document, problem)
        return super().construct_document(node)

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
                    f"found duplicate key {quote(key)}",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Loader(_Strict, yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and no silent duplicate keys.

    Why: with YAML 1.1 resolution a selector value ``no`` becomes ``False``, a leading-zero count
    becomes octal and ``start: 2026-01-01T00:00:00Z`` becomes a datetime, so what the user sees is
    not what we validate.  Under this loader a plain scalar is a bool only for true/false, a number
    only in decimal (or ``.inf``/``.nan``, which the float check then rejects), and everything else
    stays a string; timestamps are parsed by the validator, which can say what is wrong with them.

    This pure-Python loader is the reference: ``_FastLoader`` only ever answers what it would.
    """

    depth = 0  # nesting of the node being composed

    def compose_document(self) -> yaml.Node | None:
        self.document += 1
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The composer recurses per level and PyYAML's scanner slows down with flow nesting, so
        # a deep document is cut off here, while composing, long before Python's own limit.
        self.depth += 1
        try:
            if self.depth > self.bounds.depth:
                limit = self.bounds.depth
                raise _BoundError(self.document, f"nested more than {limit} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


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


_FastLoader: type[_Strict] | None = None
"""The same loader over libyaml's C scanner, parser and composer (about ten times faster), where
PyYAML was built with it.  Why it is safe to use: libyaml cuts nesting at 1,000 levels (so its
recursive composer cannot exhaust the C stack), the node graph it composes goes through the same
bounds, resolvers and constructor, and it is used only on text in ``_libyaml_agrees``'s subset."""
if yaml.__with_libyaml__:

    class _CLoader(_Strict, yaml.CSafeLoader):
        """``_Loader``'s resolvers and constructor on libyaml's parser."""

    _CLoader.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers
    _FastLoader = _CLoader

_PLAIN_TEXT = re.compile(r"[\x20-\x7e\n]*")
_GLUED_COLON = re.compile(r":[^ \n]")


def _libyaml_agrees(text: str) -> bool:
    """Is ``text`` in the subset where libyaml reads exactly what PyYAML's own parser reads?

    Outside it the two differ (found by fuzzing both on the same texts): libyaml accepts tabs,
    byte-order marks and next-line characters where PyYAML refuses them, reads a bare tag
    (``!``) or a block scalar header followed by a comment (``|#``, ``>#``) differently, and
    accepts a colon glued to a plain scalar inside a flow collection (``[a:b]``).  Inside it,
    ``tests/core/test_documents_fast.py`` checks that whatever libyaml reads PyYAML reads
    equally.  A manifest a person or the CLI writes is almost always inside it.
    """
    if not _PLAIN_TEXT.fullmatch(text) or "!" in text or "|" in text or ">" in text:
        return False
    return not (("[" in text or "{" in text) and _GLUED_COLON.search(text))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes exactly the strings ``_Loader`` would not read back as strings.

    The emitter writes a string plain only when its resolvers say a plain scalar would be a
    string, so giving it the loader's resolvers (YAML 1.2 core schema) makes
    ``load_documents(dump_documents(docs)) == docs`` hold: with PyYAML's own YAML 1.1
    resolvers the string ``1e5`` would go out plain and come back a float.
    """


_Dumper.yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def dump_documents(documents: list[object]) -> str:
    """YAML text of ``documents``, one per document in order (``None`` as ``null``), that
    ``load_documents`` reads back equal; the CLI re-sends documents it had to default this way.

    Non-ASCII characters go out escaped: written raw, PyYAML reads a NEL (``\\x85``) or a line
    separator in a quoted key back as a line break (the round-trip property test found it).
    """
    return yaml.dump_all(
        documents, Dumper=_Dumper, explicit_start=True, allow_unicode=False, sort_keys=False
    )


class _BoundError(Exception):
    """A document over the bounds; carries its index in the stream."""

    def __init__(self, index: int, problem: str) -> None:
        super().__init__(problem)
        self.index = index
        self.problem = problem


def _measure(
    root: object, children: Any, scalar_chars: Any, bounds: DocumentBounds, identity: Any = id
) -> str | None:
    """Why the expanded tree under ``root`` is over a bound, or None.

    Post-order over the graph with an explicit stack (no recursion, so depth cannot crash us),
    memoised per node so an alias is measured once however often it is used.  A node met again
    while it is still open is its own ancestor: a recursive alias, infinite once expanded.
    """
    done: dict[int, tuple[int, int, int]] = {}  # node -> (nodes, scalar chars, depth)
    open_nodes: set[int] = set()
    stack: list[tuple[object, bool]] = [(root, False)]
    while stack:
        node, closing = stack.pop()
        key = identity(node)
        kids = children(node)
        if closing:
            open_nodes.discard(key)
            nodes = 1 + sum(done[identity(k)][0] for k in kids)
            chars = scalar_chars(node) + sum(done[identity(k)][1] for k in kids)
            depth = 1 + max((done[identity(k)][2] for k in kids), default=0)
            if nodes > bounds.nodes:
                return f"more than {bounds.nodes} nodes once aliases are expanded"
            if chars > bounds.scalar_chars:
                return f"more than {bounds.scalar_chars} characters once aliases are expanded"
            if depth > bounds.depth:
                return f"nested more than {bounds.depth} levels deep"
            done[key] = (nodes, chars, depth)
            continue
        if key in done:
            continue
        if key in open_nodes:
            return "an alias refers to a node that contains it (infinite once expanded)"
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if identity(k) not in done)
    return None


def _node_children(node: object) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _node_chars(node: object) -> int:
    return len(node.value) if isinstance(node, yaml.ScalarNode) else 0


_PLAIN = True
"""Build tree documents with ``_plain_value`` (tests turn it off to compare with PyYAML's)."""

_TAG = "tag:yaml.org,2002:"
_STR, _MAP, _SEQ = _TAG + "str", _TAG + "map", _TAG + "seq"
_INT, _FLOAT, _BOOL, _NULL = _TAG + "int", _TAG + "float", _TAG + "bool", _TAG + "null"
_INF, _NAN = yaml.constructor.SafeConstructor.inf_value, yaml.constructor.SafeConstructor.nan_value
_SPECIAL_FLOATS = {".inf": _INF, "+.inf": _INF, "-.inf": -_INF, ".nan": _NAN}  # PyYAML's own


class _NotPlainError(Exception):
    """A node ``_plain_value`` leaves to PyYAML's constructor."""


def _plain_value(node: yaml.Node) -> Any:
    """The value PyYAML's safe constructor builds from a tree whose tags all come from our
    resolvers (YAML 1.2 core: decimal ints, plain floats, true/false, null; the rest strings),
    without its per-node dispatch and generators: a third of loading a run manifest.  Raises
    ``_NotPlainError`` (or ``ValueError``) for anything else - a merge key, a duplicate or
    unhashable key, another tag - which the caller hands to PyYAML.  Recursion is bounded by
    the document depth bound, checked before."""
    tag = node.tag
    value = node.value
    if tag == _STR:
        return value
    if tag == _MAP:
        out = {}
        for key_node, value_node in value:
            key = _plain_value(key_node)
            if isinstance(key, dict | list):
                raise _NotPlainError
            out[key] = _plain_value(value_node)
        if len(out) != len(value):
            raise _NotPlainError  # a duplicate key: the strict constructor says which
        return out
    if tag == _SEQ:
        return [_plain_value(item) for item in value]
    if tag == _INT:
        return int(value)  # the resolver's form: decimal, optional sign, no leading zero
    if tag == _FLOAT:
        special = _SPECIAL_FLOATS.get(value.lower())
        return special if special is not None else float(value)
    if tag == _BOOL:
        return value in ("true", "True", "TRUE")
    if tag == _NULL:
        return None
    raise _NotPlainError


NODES_PER_CHAR: Final = 8
"""A bound on the nodes one character of alias-free YAML can compose to (``_text_fits``)."""
_NESTING_MARKS = "[{-:?"


def _text_fits(text: str, bounds: DocumentBounds) -> bool:
    """Is ``text`` so small that no document of it can exceed ``bounds``, whatever it composes
    to?  Then no document needs measuring: most submissions are a few hundred characters, and
    walking their nodes was a tenth of reading them (issue 11).

    Why it holds, for text without an alias (``*``; with one, expansion is not bounded by the
    text): every node is text - a scalar spans at least one character, a collection has an
    indicator of its own (``[``, ``{``, ``-``, ``:`` or ``?``), and an empty scalar comes
    with the indicator or key it completes, at most two for a character - so a document holds
    fewer than ``NODES_PER_CHAR`` nodes a character; a scalar's value is no longer than its
    text (escapes and folding only shorten it); and each level of nesting is a collection,
    so a document is at most one level deeper than the indicator characters it holds.
    ``tests/core/test_document_bounds.py`` checks the three against composed documents.
    """
    if "*" in text:
        return False
    size = len(text)
    if NODES_PER_CHAR * size + 1 > bounds.nodes or size > bounds.scalar_chars:
        return False
    marks = sum(text.count(mark) for mark in _NESTING_MARKS)
    return marks + 1 <= bounds.depth


def _tree_fits(root: object, children: Any, scalar_chars: Any, bounds: DocumentBounds) -> bool:
    """Is the graph under ``root`` a tree within ``bounds``?  True only when ``_measure``
    (same ``children`` and ``scalar_chars``) would find no problem; False leaves the verdict,
    and its words, to ``_measure``.

    Why: every submission is measured, and almost none has an alias.  A tree needs no memo:
    one pre-order pass counts what ``_measure``'s post-order sums, at a fifth of the cost
    (issue 11's admission path).  A leaf reached twice is counted twice, as expansion would;
    a collection reached twice (an alias, or a cycle) ends the walk: counting on would still
    be right (the node bound stops a cycle) but an alias bomb would cost the whole bound.
    """
    max_depth, max_nodes = bounds.depth, bounds.nodes
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(root, 1)]
    pop, push = stack.pop, stack.append
    nodes = chars = 0
    while stack:
        node, depth = pop()
        nodes += 1
        if depth > max_depth or nodes > max_nodes:
            return False
        kids = children(node)
        if not kids:
            chars += scalar_chars(node)
            continue
        if id(node) in seen:
            return False
        seen.add(id(node))
        depth += 1
        for kid in kids:
            push((kid, depth))
    return chars <= bounds.scalar_chars


def _node_tree_fits(root: yaml.Node, bounds: DocumentBounds) -> bool:
    return _tree_fits(root, _node_children, _node_chars, bounds)


def _value_tree_fits(root: object, bounds: DocumentBounds) -> bool:
    return _tree_fits(root, _value_children, _value_chars, bounds)


def _value_children(value: object) -> list[object]:
    if isinstance(value, dict):
        return [part for pair in value.items() for part in pair]
    if isinstance(value, list):
        return value
    return []


def _value_chars(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


def value_problem(value: object, bounds: DocumentBounds = MANIFEST_BOUNDS) -> str | None:
    """The same bounds for a decoded value (JSON text, or a caller's own structure)."""
    if _value_tree_fits(value, bounds):
        return None
    return _measure(value, _value_children, _value_chars, bounds)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` (1-based), which is how editors address a position."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        text = f"line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context:
            text += f" ({exc.context})"
        return " ".join(text.split())
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow
        return (
            f"character {exc.position + 1}: unacceptable character #x{exc.character:04x}"
            if isinstance(exc.character, int)
            else f"character {exc.position + 1}: invalid byte"
        )
    return " ".join(str(exc).split())


def _load_all(
    text: str, bounds: DocumentBounds, loader_class: type[_Strict] = _Loader
) -> Iterator[Any]:
    """``yaml.load_all`` with ``loader_class`` carrying ``bounds`` (PyYAML's own loop)."""
    loader: Any = loader_class(text)  # type: ignore[call-arg]
    loader.bounds = bounds
    loader.implicit_tags = "!" not in text
    loader.text_fits = _text_fits(text, bounds)
    try:
        while loader.check_data():
            yield loader.get_data()
    finally:
        loader.dispose()


def load_documents(
    text: str, source: str = "<input>", bounds: DocumentBounds = MANIFEST_BOUNDS
) -> list[object]:
    """Split ``text`` (YAML or JSON) into its documents, ``None`` for an empty one.

    JSON is tried first when the text looks like JSON, because its parser is exact and fast;
    anything else (including flow-style YAML that merely starts with ``{``) goes to the YAML
    loader described on ``_Loader``.  Other modules reading user YAML (scenario files) should
    load through here so they resolve scalars the same way.

    Raises ManifestError (path = ``source``) with the line and column of a syntax error, or
    (path = ``documents[i]``) naming the bound a document exceeds.
    """
    if text.lstrip().startswith(("{", "[")):
        try:
            value = msgspec.json.decode(text)
        except msgspec.DecodeError:
            pass  # not JSON after all: the YAML loader says what is wrong
        except RecursionError:
            too_deep = f"nested more than {bounds.depth} levels deep"
            raise ManifestError([FieldError("documents[0]", too_deep)], source=source) from None
        else:
            over = value_problem(value, bounds)
            if over is not None:
                raise ManifestError([FieldError("documents[0]", over)], source=source)
            return [value]
    if _FastLoader is not None and _libyaml_agrees(text):
        try:
            return list(_load_all(text, bounds, _FastLoader))
        except (yaml.YAMLError, _BoundError, RecursionError, ValueError):
            pass  # not for the fast path to word: the reference loader says what is wrong
    try:
        return list(_load_all(text, bounds))  # _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ManifestError([FieldError(source, _yaml_problem(exc))], source=source) from exc
    except _BoundError as exc:
        path = f"documents[{exc.index}]"
        raise ManifestError([FieldError(path, exc.problem)], source=source) from None
    except RecursionError:  # the composer recurses per level, before our bound can see it
        problem = f"nested more than {bounds.depth} levels deep"
        raise ManifestError([FieldError(source, problem)], source=source) from None
