"""Kubernetes' naming rules and bounded quoting (``gpu_fleet.core.names``)."""

from __future__ import annotations

import pytest

from gpu_fleet.core.names import (
    DNS_LABEL_RULE,
    DNS_SUBDOMAIN_RULE,
    LABEL_VALUE_RULE,
    clamp,
    dns_label_problem,
    dns_subdomain_problem,
    label_value_problem,
    owner_problem,
    quote,
)


@pytest.mark.parametrize("name", ["a", "team-a", "0", "a" * 63, "x1-2-y"])
def test_dns_labels_that_kubernetes_accepts(name: str) -> None:
    assert dns_label_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "must not be empty"),
        ("a" * 64, "must be no more than 63 characters (got 64)"),
        ("Team", DNS_LABEL_RULE),
        ("-a", DNS_LABEL_RULE),
        ("a-", DNS_LABEL_RULE),
        ("a.b", DNS_LABEL_RULE),
        ("a_b", DNS_LABEL_RULE),
        ("a\nb", DNS_LABEL_RULE),
    ],
)
def test_dns_labels_that_kubernetes_refuses(name: str, problem: str) -> None:
    assert dns_label_problem(name) == problem


def test_subdomains_allow_dots_and_253_characters() -> None:
    assert dns_subdomain_problem("node-1.rack-2.example") is None
    assert dns_subdomain_problem(".".join(["a" * 63] * 4)[:253]) is None
    assert dns_subdomain_problem("a" * 254) == "must be no more than 253 characters (got 254)"
    assert dns_subdomain_problem("a..b") == DNS_SUBDOMAIN_RULE


def test_label_values_may_be_empty_and_use_underscores_and_capitals() -> None:
    assert label_value_problem("") is None
    assert label_value_problem("After_Fence.2") is None
    assert label_value_problem("_x") == LABEL_VALUE_RULE
    assert label_value_problem("x" * 64) == "must be no more than 63 characters (got 64)"


def test_owners_are_printable_without_spaces() -> None:
    assert owner_problem("org:ai:rai") is None
    assert owner_problem("org ai") is not None
    assert owner_problem("org\x00") is not None
    assert owner_problem("") == "must not be empty"


def test_quote_shows_a_prefix_and_the_length_never_the_whole_input() -> None:
    """The rule for every error message that repeats user input."""
    assert quote("ghost") == "'ghost'"
    quoted = quote("x" * 600_000)
    assert quoted == f"{'x' * 40!r}... (600000 characters)"
    assert "\n" not in quote("a\r\nb" * 100)


def test_clamp_makes_one_line_of_bounded_length() -> None:
    assert clamp("a\r\nb\tc", 100) == "a b c"
    assert clamp("y" * 1000, 10) == "yyyyyyyyyy... (1000 characters)"
