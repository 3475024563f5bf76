"""The one loader's bounds and file rules (``core.manifests.documents`` and ``.source``).

A YAML alias bomb is refused from its node graph, before anything expands it, so a bomb of
9**9 leaves costs milliseconds; the ``timeout`` markers are hang guards, not timing assertions.
"""

from __future__ import annotations

import itertools

import pytest
import yaml
from hypothesis import given, seed, settings
from hypothesis import strategies as st

from gpu_fleet.core.manifests import (
    ManifestError,
    dump_documents,
    load_documents,
    load_source,
    parse_inventory,
    parse_manifests,
)
from gpu_fleet.core.manifests.documents import (
    INVENTORY_BOUNDS,
    MAX_DEPTH,
    MAX_NODES,
    MAX_SCALAR_CHARS,
    DocumentBounds,
    _Loader,
    _measure,
    _node_chars,
    _node_children,
    _node_tree_fits,
    _value_chars,
    _value_children,
    _value_tree_fits,
    value_problem,
)


def bomb(levels: int, fan: int = 9) -> str:
    names = [f"l{i}" for i in range(levels)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * fan)}]"]
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * fan)}]")
    return "\n".join(lines) + "\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_documents(text, "f.yaml")
    return [str(e) for e in info.value.errors]


@pytest.mark.timeout(30)
def test_a_billion_laughs_is_refused_by_its_expanded_node_count() -> None:
    assert errors_of(bomb(9)) == [
        f"documents[0]: more than {MAX_NODES} nodes once aliases are expanded"
    ]


@pytest.mark.timeout(30)
def test_a_bomb_in_a_manifest_field_is_refused_before_validation_walks_it() -> None:
    """The manager parses the same text; a bomb under spec.template must not be walked."""
    text = (
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\nmetadata: {name: r}\n"
        "spec:\n  resources: {gpuType: H100, totalGPUs: 1}\n  template:\n"
        + "".join(f"    {line}\n" for line in bomb(9).splitlines())
    )
    with pytest.raises(ManifestError) as info:
        parse_manifests(text, "run.yaml")
    assert [e.path for e in info.value.errors] == ["documents[0]"]


def test_the_bound_counts_per_document_and_names_its_index() -> None:
    assert errors_of("a: 1\n---\n" + bomb(9)) == [
        f"documents[1]: more than {MAX_NODES} nodes once aliases are expanded"
    ]


def test_a_long_string_aliased_many_times_is_bounded_by_characters() -> None:
    text = f"a: &a {'x' * 100_000}\nb: [" + ", ".join(["*a"] * 50) + "]\n"
    assert errors_of(text) == [
        f"documents[0]: more than {MAX_SCALAR_CHARS} characters once aliases are expanded"
    ]


def test_an_alias_inside_its_own_anchor_is_refused() -> None:
    assert errors_of("a: &a [1, *a]\n") == [
        "documents[0]: an alias refers to a node that contains it (infinite once expanded)"
    ]


@pytest.mark.parametrize(
    "text",
    ["a: " + "[" * 5000, "[" * 5000 + "]" * 5000, "- " * 5000 + "x", "a: " + "{b: " * 5000],
)
def test_deep_nesting_is_refused_not_a_recursion_error(text: str) -> None:
    (line,) = errors_of(text)
    assert line.endswith(f"nested more than {MAX_DEPTH} levels deep")


def test_json_documents_get_the_same_bounds() -> None:
    assert errors_of("[" * 70 + "]" * 70) == [
        f"documents[0]: nested more than {MAX_DEPTH} levels deep"
    ]


def test_a_control_character_is_a_one_line_position() -> None:
    assert errors_of("a: b\x00") == ["f.yaml: character 5: unacceptable character #x0000"]


def test_realistic_aliases_still_load() -> None:
    text = "base: &base {region: r, gpu.flavor: H100}\nnodes:\n" + "".join(
        f"  - {{name: n{i}, labels: *base}}\n" for i in range(500)
    )
    (doc,) = load_documents(text)
    assert isinstance(doc, dict)
    assert len(doc["nodes"]) == 500


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "f.yaml: the file is empty"),
        (b"  \n\t\n", "f.yaml: the file is empty"),
        (
            b"---\n---\n",
            "f.yaml: no documents (only comments, '---' separators or empty documents)",
        ),
        (
            b"# only a comment\n---\n# another\n",
            "f.yaml: no documents (only comments, '---' separators or",
        ),
        (b"\xff\xfekind: Run", "f.yaml: not UTF-8 text (invalid byte at offset 0)"),
        (b"kind: Run\n\xc3(", "f.yaml: not UTF-8 text (invalid byte at offset 10)"),
    ],
)
def test_file_rules(data: bytes, reason: str) -> None:
    with pytest.raises(ManifestError) as info:
        load_source(data, "f.yaml")
    (line,) = str(info.value).splitlines()
    assert line.startswith(reason)


def test_a_byte_order_mark_is_dropped_and_empty_documents_keep_their_places() -> None:
    assert load_source(b"\xef\xbb\xbf---\n---\na: 1\n", "f.yaml") == [None, {"a": 1}]


# The CLI defaults namespaces and re-sends documents as YAML: that must round-trip exactly.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
    | st.sampled_from(["no", "yes", "010", "1e5", "0x1F", "1:30", "2026-01-01T00:00:00Z", "~"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=20,
)


@seed(19)
@settings(max_examples=200, deadline=None)
@given(st.lists(values, min_size=1, max_size=3))
def test_dump_documents_round_trips_through_the_loader(documents: list[object]) -> None:
    assert load_documents(dump_documents(documents)) == documents


def test_a_value_repeated_in_an_error_is_quoted_by_prefix_and_length() -> None:
    """An error reply must not grow with the input: the manager sends these messages back."""
    kind = "K" * 300_000
    with pytest.raises(ManifestError) as info:
        parse_manifests(f"apiVersion: rq.davidlangworthy.io/v1\nkind: {kind}\n")
    (error,) = info.value.errors
    assert error.path == "kind"
    assert (
        error.message
        == f"unsupported kind {'K' * 40!r}... (300000 characters): must be Budget, Run or"
        " NotificationChannel"
    )


def ten_thousand_node_inventory() -> str:
    lines = ["nodes:"]
    for i in range(10_000):
        lines.append(
            f"  - {{name: n{i:05d}, gpus: 8, labels: {{region: r1, cluster: c1, "
            f"fabric.domain: d{i // 32:04d}, gpu.flavor: H100}}}}"
        )
    return "\n".join(lines) + "\n"


def test_an_operators_ten_thousand_node_inventory_loads() -> None:
    """About 170k YAML nodes: over a manifest's bound, inside an inventory file's."""
    text = ten_thousand_node_inventory()
    assert errors_of(text) == [
        f"documents[0]: more than {MAX_NODES} nodes once aliases are expanded"
    ]
    nodes = parse_inventory(text, "fleet.yaml")
    assert len(nodes) == 10_000
    assert nodes[-1].name == "n09999"
    assert nodes[-1].labels["fabric.domain"] == "d0312"


@pytest.mark.timeout(30)
def test_an_alias_bomb_in_an_inventory_is_still_refused() -> None:
    with pytest.raises(ManifestError) as info:
        parse_inventory(bomb(9), "fleet.yaml")
    limit = INVENTORY_BOUNDS.nodes
    assert [str(e) for e in info.value.errors] == [
        f"documents[0]: more than {limit} nodes once aliases are expanded"
    ]


small_bounds = st.builds(
    DocumentBounds,
    nodes=st.integers(1, 40),
    scalar_chars=st.integers(0, 40),
    depth=st.integers(1, 8),
)


@st.composite
def graphs(draw: st.DrawFn) -> object:
    """A value, sometimes with a collection placed twice (what an alias composes to)."""
    value = draw(values)
    collections = [v for v in _walk(value) if isinstance(v, (dict, list))]
    if collections and draw(st.booleans()):
        shared, host = draw(st.sampled_from(collections)), draw(st.sampled_from(collections))
        if isinstance(host, list):
            host.append(shared)  # a cycle when ``host`` is ``shared`` or inside it
        else:
            host["again"] = shared
    return value


def _walk(value: object) -> list[object]:
    out, stack = [], [value]
    while stack:
        v = stack.pop()
        out.append(v)
        stack.extend(v.values() if isinstance(v, dict) else v if isinstance(v, list) else ())
    return out


@seed(11)
@settings(max_examples=400, deadline=None)
@given(graphs(), small_bounds)
def test_the_tree_shortcut_agrees_with_the_measure(value: object, bounds: DocumentBounds) -> None:
    """The one-pass tree walk says "fits" only when the memoised measure finds no problem,
    and on a tree it always decides (the measure's words are kept for every refusal)."""
    reference = _measure(value, _value_children, _value_chars, bounds)
    tree = len({id(v) for v in _walk_bounded(value)}) == len(_walk_bounded(value))
    fits = _value_tree_fits(value, bounds)
    assert not fits or reference is None
    if tree:
        assert fits == (reference is None)
    assert value_problem(value, bounds) == reference
    # The same graph as YAML composes it: aliases for the shared collection.
    if tree or not _cyclic(value):
        node = yaml.compose(yaml.safe_dump(value, sort_keys=False), Loader=_Loader)
        assert node is not None
        graph = _measure(node, _node_children, _node_chars, bounds)
        assert not _node_tree_fits(node, bounds) or graph is None
        if tree:
            assert _node_tree_fits(node, bounds) == (graph is None)


def _walk_bounded(value: object) -> list[object]:
    """Collections reached, each expanded once (so a cycle ends)."""
    out: list[object] = []
    seen: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, (dict, list)):
            out.append(v)
            if id(v) in seen:
                continue
            seen.add(id(v))
            stack.extend(v.values() if isinstance(v, dict) else v)
    return out


def _cyclic(value: object) -> bool:
    return _measure(value, _value_children, _value_chars, DocumentBounds(10**9, 10**9, 10**9)) == (
        "an alias refers to a node that contains it (infinite once expanded)"
    )


# -- the text is small enough (documents._text_fits) ------------------------------------------
YAML_PIECES = [
    *":- [],{}\n#'\"&!|>?ab01.\\",
    *["- ", "? ", ": ", "a: ", "a:", "&x ", "---\n", "...\n", "  ", "\n  ", "null", "~", "''"],
    *['""', '"\\t"', "|\n  x\n", ">\n  x\n", "{a, b}", "[?]", "[a: b]", "- - - a", "{? }"],
]
TEXT_MARKS = "[{-:?"


def _composed_sizes(text: str) -> list[tuple[int, int, int]]:
    """(nodes, scalar characters, depth) of every document the reference composes."""
    unbounded = DocumentBounds(10**9, 10**9, 10**9)
    out = []
    for node in yaml.compose_all(text, Loader=_Loader):
        if node is None:
            continue
        stack: list[tuple[yaml.Node, int]] = [(node, 1)]
        nodes = chars = depth = 0
        while stack:
            n, d = stack.pop()
            nodes, chars, depth = nodes + 1, chars + _node_chars(n), max(depth, d)
            stack.extend((kid, d + 1) for kid in _node_children(n))
        assert _measure(node, _node_children, _node_chars, unbounded) is None
        out.append((nodes, chars, depth))
    return out


def _check_text_claims(text: str) -> None:
    try:
        sizes = _composed_sizes(text)
    except yaml.YAMLError:
        return  # refused whole: nothing of it is measured or loaded
    marks = sum(text.count(m) for m in TEXT_MARKS)
    for nodes, chars, depth in sizes:
        # What ``_text_fits`` relies on, checked tighter than it relies on it.
        assert nodes <= 3 * len(text) + 1, (text, nodes)
        assert chars <= len(text), (text, chars)
        assert depth <= marks + 1, (text, depth)


@seed(23)
@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join))
def test_alias_free_text_composes_to_no_more_than_its_size_allows(text: str) -> None:
    _check_text_claims(text)


@seed(29)
@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from([None, True, False]))
def test_written_documents_compose_to_no_more_than_their_size_allows(
    value: object, flow: bool
) -> None:
    _check_text_claims(yaml.safe_dump(value, default_flow_style=flow, sort_keys=False))


@pytest.mark.parametrize(
    "text", ["?", "? \n? \n", "[?]", "{?}", "- - - - a", "{a, b, c}", "---\n---\n---\n", "a:\nb:\n"]
)
def test_the_densest_texts_still_fit_the_claim(text: str) -> None:
    _check_text_claims(text)


def test_a_small_text_skips_the_walk_and_anything_near_a_bound_takes_it() -> None:
    from gpu_fleet.core.manifests.documents import MANIFEST_BOUNDS, NODES_PER_CHAR, _text_fits  # noqa: PLC0415

    run = "kind: Run\nmetadata: {name: a, namespace: b}\nspec: {resources: {totalGPUs: 8}}\n"
    assert _text_fits(run, MANIFEST_BOUNDS)
    assert not _text_fits(run + "x: *a\n", MANIFEST_BOUNDS)  # an alias
    deepest = "[" * (MAX_DEPTH - 1) + "a" + "]" * (MAX_DEPTH - 1)  # 64 levels: just allowed
    assert _text_fits(deepest, MANIFEST_BOUNDS)
    assert not _text_fits("[" + deepest + "]", MANIFEST_BOUNDS)
    assert not _text_fits("[]: " + deepest, MANIFEST_BOUNDS)  # a colon is a mark too
    assert not _text_fits("a" * (MAX_NODES // NODES_PER_CHAR), MANIFEST_BOUNDS)
    small = DocumentBounds(nodes=10**9, scalar_chars=3, depth=10**9)
    assert not _text_fits("abcd", small)
    assert _text_fits("abc", small)
    # Past the bound the measure decides, word for word; at it, the document loads.
    assert load_documents(deepest) != []
    (line,) = errors_of("[" + deepest + "]")
    assert line.endswith(f"nested more than {MAX_DEPTH} levels deep")
