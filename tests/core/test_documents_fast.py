"""libyaml's fast path, and the plain constructor, answer exactly what the pure-Python reference
loader answers.

``load_documents`` reads text inside ``_libyaml_agrees``'s subset with libyaml's C parser (about
ten times faster: the manager parses every submission on its event loop) and everything else,
and every text the fast path cannot read, with the pure-Python ``_Loader``.  The property: for
any text, ``load_documents`` returns the same documents, or the same errors, as the reference
alone.  The alphabet is the one a fuzz of both parsers found their differences with (tabs,
byte-order marks, bare tags, block-scalar headers, colons glued to flow scalars), so the subset's
exclusions are exercised, not only its inside.
"""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_fleet.core.manifests import ManifestError, load_documents
from gpu_fleet.core.manifests import documents as docs_module
from gpu_fleet.core.manifests.documents import INVENTORY_BOUNDS, MAX_DEPTH, _libyaml_agrees

PIECES = [
    *":- [],{}\n\n#'\"&*!|>\tab01. %?@`\\~=<;$()^_/+Z",
    *["\ufeff", "\x85", "\u00e9", "true", "no", "010", "1:30", "2026-01-01T00:00:00Z", "a: "],
    *["- ", "&x ", "*x", "---\n", "...\n", "  ", "null", "~", ".inf", "-1", "0x1", "1e3"],
    *["'a''b'", '"\\u00e9"', '"\\t"', "<<: *x\n", "? a\n: b\n", "{a: 1, a: 2}", "|\n  x\n"],
    *["a:b", ":x", "[a:b]", "{a: b:c}"],
]

DIFFERENCES = [  # texts libyaml and PyYAML read differently: the subset must leave them out
    "00no\t- \\{",
    "bno\ufeff\t\ufeff...\n",
    '1:30>2026-01-01!  \\b{"\x85b -:>&x b@',
    "!\n",
    ">#010 - ",
    "|#\\[{?",
    '[\\:@?"\\]',
]

RUN = (
    "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
    "metadata: {name: burst00001, namespace: team}\n"
    "spec: {resources: {gpuType: H100, totalGPUs: 8}}\n"
)


def outcome(text: str, *, fast: bool) -> tuple[str, str]:
    """What ``load_documents`` answers, as comparable text (``repr`` keeps 1, 1.0, True apart).
    Not ``fast``: the reference alone - PyYAML's parser and constructor, without libyaml's
    parser or our plain constructor (``_plain_value``)."""
    saved = docs_module._FastLoader, docs_module._PLAIN
    if not fast:
        docs_module._FastLoader, docs_module._PLAIN = None, False
    try:
        return ("documents", repr(load_documents(text, "f.yaml")))
    except ManifestError as exc:
        return ("errors", repr([str(e) for e in exc.errors]))
    finally:
        docs_module._FastLoader, docs_module._PLAIN = saved


def test_this_build_has_the_fast_path_and_a_submission_takes_it() -> None:
    # PyYAML's wheels carry libyaml; without it every text would silently take the slow path.
    assert yaml.__with_libyaml__
    assert docs_module._FastLoader is not None
    assert _libyaml_agrees(RUN)
    assert outcome(RUN, fast=True) == outcome(RUN, fast=False)


def test_the_texts_the_parsers_disagree_on_are_outside_the_subset() -> None:
    for text in DIFFERENCES:
        assert not _libyaml_agrees(text), text
        assert outcome(text, fast=True) == outcome(text, fast=False)


@settings(max_examples=2000)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map("".join))
def test_any_text_reads_as_the_reference_reads_it(text: str) -> None:
    assert outcome(text, fast=True) == outcome(text, fast=False)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text("abkz.-/_:", min_size=1, max_size=6), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=500)
@given(values, st.sampled_from([None, True, False]))
def test_written_documents_read_as_the_reference_reads_them(value: object, flow: bool) -> None:
    # What people and tools write: block or flow style, every scalar kind, colons in keys.
    text = yaml.safe_dump(value, default_flow_style=flow, sort_keys=False)
    assert outcome(text, fast=True) == outcome(text, fast=False)


def test_bounds_are_refused_with_the_reference_words_on_the_fast_path() -> None:
    deep = "a: " + "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1) + "\n"
    bomb = "a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\n"
    recursive = "a: &a [*a]\n"
    duplicate = "a: 1\nb: 2\na: 3\n"
    for text in (deep, recursive, duplicate, "a: [" * 2000 + "\n"):
        assert _libyaml_agrees(text)
        fast = outcome(text, fast=True)
        assert fast[0] == "errors", text
        assert fast == outcome(text, fast=False)
    small = docs_module.DocumentBounds(nodes=20)
    with pytest.raises(ManifestError, match="more than 20 nodes once aliases are expanded"):
        load_documents(bomb, "f.yaml", small)


def test_an_inventory_takes_the_fast_path_with_its_own_bounds() -> None:
    inventory = "nodes:\n" + "".join(
        f"  - {{name: n{i:05d}, gpus: 8, labels: {{fabric.domain: d{i // 32:04d}}}}}\n"
        for i in range(12000)  # ~9 YAML nodes each: over the manifest bound, not the inventory's
    )
    assert _libyaml_agrees(inventory)
    (document,) = load_documents(inventory, "inventory.yaml", INVENTORY_BOUNDS)
    assert isinstance(document, dict)
    assert len(document["nodes"]) == 12000
    with pytest.raises(ManifestError, match="more than 100000 nodes"):
        load_documents(inventory, "inventory.yaml")


SCALARS = [  # every form a resolver gives a tag to, in each spelling, and strings near them
    *["true", "True", "TRUE", "false", "False", "FALSE", "tRue", "yes", "no", "on", "off"],
    *["null", "Null", "NULL", "~", "", "nULL", "None"],
    *["0", "-0", "+0", "7", "+7", "-7", "010", "0x1F", "0o7", "1_000", "12345678901234567890"],
    *["1.", ".5", "-.5", "+1.5", "1e5", "1E-5", "-1e+5", "1.5e3", "1_0.5", "1e", "e5", "1:30"],
    *[".inf", ".Inf", ".INF", "+.inf", "-.Inf", "-.INF", ".nan", ".NaN", ".NAN", ".iNf", "inf"],
    *["2026-01-01T00:00:00Z", "2026-01-01", "'1'", '"true"', "a b", "=", "<<"],
]
TAGGED = ["!!int 010", "!!int 0x1F", "!!float 1", "!!str 1", "!!bool yes", "!!null ''", "!x y"]


@pytest.mark.parametrize("scalar", SCALARS + TAGGED)
def test_every_scalar_form_reads_as_the_reference_reads_it(scalar: str) -> None:
    """The plain constructor (``_plain_value``) against PyYAML's, value by value: as a value,
    as a key, in a list, and flow style; explicit tags go to PyYAML's constructor."""
    for text in (f"a: {scalar}\n", f"{scalar}: a\n", f"- {scalar}\n- x\n", f"{{k: [{scalar}]}}\n"):
        assert outcome(text, fast=True) == outcome(text, fast=False), text


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # a duplicate key: the strict constructor's words
        "{a: 1, a: 2}\n",
        "? [a, b]\n: c\n",  # an unhashable key
        "? {a: b}\n: c\n",
        "base: &b {x: 1}\nuse:\n  <<: *b\n  y: 2\n",  # a merge key
        "use:\n  <<: {x: 1}\n  x: 2\n",
        "a: &s text\nb: *s\n",  # a scalar reached twice is still a tree
        "a: &m {x: 1}\nb: *m\n",  # a shared mapping is not
    ],
)
def test_what_the_plain_constructor_leaves_to_pyyaml_reads_the_same(text: str) -> None:
    assert outcome(text, fast=True) == outcome(text, fast=False), text


@settings(max_examples=300)
@given(
    st.recursive(
        st.sampled_from(SCALARS),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
            st.lists(st.tuples(st.sampled_from(SCALARS), inner), max_size=3).map(
                lambda kvs: "{" + ", ".join(f"{k}: {v}" for k, v in kvs) + "}"
            ),
        ),
        max_leaves=12,
    )
)
def test_flow_documents_of_every_scalar_form_read_as_the_reference(text: str) -> None:
    assert outcome(text + "\n", fast=True) == outcome(text + "\n", fast=False)


def test_special_floats_are_pyyamls_own_values() -> None:
    """Not only equal in ``repr``: the same sign of NaN and infinity as PyYAML builds them."""
    saved = docs_module._FastLoader, docs_module._PLAIN
    try:
        fast = load_documents("[.nan, .inf, -.inf]\n")[0]
        docs_module._FastLoader, docs_module._PLAIN = None, False
        reference = load_documents("[.nan, .inf, -.inf]\n")[0]
    finally:
        docs_module._FastLoader, docs_module._PLAIN = saved
    assert isinstance(fast, list)
    assert isinstance(reference, list)
    assert [math.copysign(1.0, x) for x in fast] == [math.copysign(1.0, x) for x in reference]
