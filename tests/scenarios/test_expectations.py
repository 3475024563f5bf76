"""Expectations of scenario files: how they parse and how each matching rule judges a report.

Every rule has a passing and a failing case, so no test here can pass by accident.
"""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any, ClassVar

import pytest

from gpu_fleet.scenario.expectations import (
    Expectation,
    ExpectationError,
    Outcome,
    check_expectations,
    matches,
    parse_expectations,
    resolve,
)

T0 = "2026-01-05T00:00:00Z"

PAYER = {"namespace": "rai", "budget": "rai", "envelope": "west-h100", "owner": "org:ai:rai"}


def lease(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "l-1",
        "run": "rai/ra1",
        "node": "a1",
        "slots": ["a1#0", "a1#1"],
        "role": "Active",
        "group": 0,
        "reason": "Start",
        "payer": PAYER,
        "mintedPayer": PAYER,
        "class": "owned",
        "start": T0,
        "end": None,
        "closureReason": None,
    }
    base.update(overrides)
    return base


def make_report() -> dict[str, Any]:
    final: dict[str, Any] = {
        "label": "final",
        "at": "2026-01-05T00:20:00Z",
        "runs": [
            {
                "namespace": "rai",
                "name": "ra1",
                "phase": "Running",
                "reason": "GangBound",
                "width": {"min": 4, "max": 4, "desired": 4, "allocated": 4},
                "spares": 2,
                "funding": {"owned": 3, "shared": 1, "borrowed": 0, "unfunded": 0},
                "reservation": None,
                "earliestStart": None,
            },
            {
                "namespace": "rai",
                "name": "train-8",
                "phase": "Pending",
                "reason": "Reserved",
                "width": {"min": 8, "max": 8, "desired": 8, "allocated": 0},
                "spares": 0,
                "funding": None,
                "reservation": "res-2",
                "earliestStart": "2026-01-05T02:00:00Z",
            },
        ],
        "leases": [
            lease(),
            lease(id="l-2", node="a2", slots=["a2#0"], group=1, role="Spare"),
            lease(
                id="l-3",
                run="mm/mm1",
                node="b1",
                slots=["b1#0"],
                payer=None,
                mintedPayer=None,
                **{"class": "unfunded"},
                closureReason="RandomPreempt(0x1f)",
            ),
        ],
        "reservations": [
            {
                "name": "res-1",
                "run": "rai/train-8",
                "state": "Released",
                "earliestStart": "2026-01-05T01:00:00Z",
                "deficitGPUs": 4,
            },
            {
                "name": "res-2",
                "run": "rai/train-8",
                "state": "Pending",
                "earliestStart": "2026-01-05T02:00:00Z",
                "deficitGPUs": 8,
                "intendedSlice": {"domain": "A"},
            },
        ],
        "budgets": [
            {
                "namespace": "rai",
                "name": "rai",
                "envelopes": [
                    {
                        "name": "west-h100",
                        "concurrency": 64,
                        "headroom": 60,
                        "owned": 3,
                        "shared": 1,
                        "borrowed": 0,
                        "unfunded": 0,
                        "gpuHoursUsed": 8.004,
                    }
                ],
            }
        ],
        "events": [],
    }
    early = copy.deepcopy(final)
    early["label"] = "early"
    early["runs"][0]["phase"] = "Pending"
    return {"scenario": "demo", "reports": [early, final]}


def check_one(entry: dict[str, Any], report: dict[str, Any] | None = None) -> Outcome:
    [expectation] = parse_expectations([entry])
    [outcome] = check_expectations(report or make_report(), [expectation])
    return outcome


def parse_errors(raw: object) -> list[str]:
    with pytest.raises(ExpectationError) as info:
        parse_expectations(raw)
    return info.value.errors


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class TestParse:
    def test_kinds_defaults_and_text(self) -> None:
        """Each entry keeps its index and raw form; report defaults to final."""
        es = parse_expectations(
            [
                {"run": "rai/ra1", "phase": "Running"},
                {"report": "early", "leases": {"where": {"run": "rai/ra1"}, "count": 1}},
                {"reservation": {"run": "rai/train-8", "state": "Pending"}},
                {"budget": "rai/rai", "envelope": "west-h100", "owned": 3},
                {"text": "prose only"},
                {"run": "rai/ra1", "reservation": False, "text": "both"},
            ]
        )
        assert [e.kind for e in es] == ["run", "leases", "reservation", "budget", "text", "run"]
        assert [e.index for e in es] == [0, 1, 2, 3, 4, 5]
        assert [e.report for e in es] == ["final", "early", "final", "final", "final", "final"]
        assert es[4].text == "prose only"
        assert es[5].text == "both"
        assert not es[4].machine_checkable
        assert es[0].raw == {"run": "rai/ra1", "phase": "Running"}

    def test_none_is_empty(self) -> None:
        assert parse_expectations(None) == []

    def test_yaml_timestamps_become_rfc3339_strings(self) -> None:
        """An unquoted YAML timestamp must compare by instant and stay JSON-able."""
        when = dt.datetime(2026, 1, 5, 2, 0, tzinfo=dt.UTC)
        [e] = parse_expectations([{"run": "rai/train-8", "earliestStart": when}])
        assert e.raw["earliestStart"] == "2026-01-05T02:00:00Z"

    def test_not_a_list(self) -> None:
        assert parse_errors({"run": "x/y"}) == ["expect: must be a list"]

    def test_all_errors_are_collected_with_paths(self) -> None:
        errors = parse_errors(
            [
                "just a string",
                {"run": "no-slash", "allocated": -1, "phase": 3},
                {"leases": {"where": {"slots": ["a"]}, "count": 1, "min": 1}},
                {"leases": {"where": {}, "count": "one"}},
                {"run": "a/b", "funding": {"owned": 1, "gifted": 2}},
                {"reservation": {"state": "Pending"}},
                {"budget": "a/b", "owned": 1},
                {"run": "a/b", "leases": {"count": 0}},
                {"report": "", "text": "x"},
                {"colour": "blue"},
                {},
                {"run": "a/b", "reservation": "yes"},
                {"run": "a/b", "earliestStart": "tomorrow"},
                {"budget": "a/b", "envelope": "e", "gpuHoursUsed": "lots"},
            ]
        )
        assert errors == [
            "expect[0]: must be a mapping",
            "expect[1].run: must be namespace/name, got 'no-slash'",
            "expect[1].phase: must be a string",
            "expect[1].allocated: must be an integer >= 0",
            "expect[2].leases.where.slots: must be a scalar (string, number, boolean or null)",
            "expect[2].leases: needs exactly one of count or min",
            "expect[3].leases.count: must be an integer >= 0",
            "expect[4].funding.gifted: unknown funding class (one of owned, shared, borrowed, "
            "unfunded)",
            "expect[5].reservation.run: required",
            "expect[6].envelope: required",
            "expect[7]: names several things to check (run, leases); one each",
            "expect[8].report: must be a non-empty report label",
            "expect[9].colour: unknown field",
            "expect[10]: must name one of run, leases, rejections, reservation or budget, "
            "or carry text",
            "expect[11].reservation: must be true or false in a run expectation",
            "expect[12].earliestStart: must be an RFC 3339 timestamp or null",
            "expect[13].gpuHoursUsed: must be a number",
        ]

    def test_unknown_field_per_kind(self) -> None:
        errors = parse_errors(
            [
                {"run": "a/b", "phse": "Running"},
                {"leases": {"where": {}, "count": 0, "limit": 2}},
                {"leases": {"where": {}, "count": 0}, "run_": 1},
                {"reservation": {"run": "a/b"}, "state": "Pending"},
                {"budget": "a/b", "envelope": "e", "capacity": 3},
            ]
        )
        assert errors == [
            "expect[0].phse: unknown field for a run expectation",
            "expect[1].leases.limit: unknown field (where, count, min)",
            "expect[2].run_: unknown field for a leases expectation",
            "expect[3].state: unknown field for a reservation expectation",
            "expect[4].capacity: unknown field for a budget expectation",
        ]

    def test_custom_path_prefix(self) -> None:
        assert parse_errors([{}]) == [
            "expect[0]: must name one of run, leases, rejections, reservation or budget, "
            "or carry text"
        ]
        with pytest.raises(ExpectationError) as info:
            parse_expectations([{"run": 1}], path="doc.expect")
        assert info.value.errors == ["doc.expect[0].run: must be a string namespace/name"]
        assert str(info.value) == "doc.expect[0].run: must be a string namespace/name"


# --------------------------------------------------------------------------------------------
# The matching rules, one at a time
# --------------------------------------------------------------------------------------------


class TestMatches:
    @pytest.mark.parametrize(
        ("expected", "actual", "result"),
        [
            (None, None, True),
            (None, "Completed", False),
            ("*", "Completed", True),
            ("*", None, False),
            ("*", 0, True),
            ("RandomPreempt*", "RandomPreempt(0x1f)", True),
            ("RandomPreempt*", "Random", False),
            ("RandomPreempt*", None, False),
            ("Running", "Running", True),
            ("Running", "running", False),
            ("Run*ning", "Running", False),  # only a trailing * is special
            ("Run*ning", "Run*ning", True),
            ("2026-01-05T00:00:00Z", "2026-01-05T00:00:00+00:00", True),
            ("2026-01-05T01:00:00+01:00", "2026-01-05T00:00:00Z", True),
            ("2026-01-05T00:00:00Z", "2026-01-05T00:00:01Z", False),
            (0, 0, True),
            (0, 1, False),
            (0, "0", False),
            ("0", 0, False),
            (0, False, False),
            (1, True, False),
            (True, 1, False),
            (True, True, True),
            (False, True, False),
            (8, 8.0, True),
            ("a1#0", ["a1#0", "a1#1"], True),
            ("a1#5", ["a1#0", "a1#1"], False),
            ("a1#*", ["a1#0"], True),
            ("b1#*", ["a1#0"], False),
            ("x", {"x": 1}, False),
        ],
    )
    def test_scalar_rules(self, expected: object, actual: object, result: bool) -> None:
        assert matches(expected, actual) is result

    def test_missing_field_never_matches_even_null(self) -> None:
        """A typo in a field name must not turn `typo: null` into "matches everything"."""
        assert matches(None, resolve({"closureReason": None}, "closureReasn")) is False
        assert matches(None, resolve({"closureReason": None}, "closureReason")) is True

    def test_dotted_paths(self) -> None:
        record = {"payer": {"owner": "org:a"}, "mintedPayer": None, "labels": {"a.b": "c"}}
        assert resolve(record, "payer.owner") == "org:a"
        assert resolve(record, "mintedPayer.owner") is None  # null on the way reads as null
        assert repr(resolve(record, "payer.nothing")) == "<missing>"
        assert repr(resolve(record, "nope.owner")) == "<missing>"
        assert resolve(record, "labels.a.b") == "c"  # a literal dotted key stays reachable


# --------------------------------------------------------------------------------------------
# Checking a report
# --------------------------------------------------------------------------------------------


class TestRunExpectation:
    def test_all_fields_pass(self) -> None:
        outcome = check_one(
            {
                "run": "rai/ra1",
                "phase": "Running",
                "reason": "GangBound",
                "allocated": 4,
                "spares": 2,
                "funding": {"owned": 3, "shared": 1},
                "reservation": False,
                "earliestStart": None,
            }
        )
        assert outcome.ok, outcome.message
        assert outcome.message == (
            "[final] rai/ra1: phase Running, reason GangBound, allocated 4, spares 2, "
            "funding.owned 3, funding.shared 1, reservation false, earliestStart null"
        )

    def test_phase_mismatch_message(self) -> None:
        outcome = check_one({"run": "rai/train-8", "phase": "Running"})
        assert outcome == Outcome(
            0, False, "[final] rai/train-8: phase expected Running, got Pending"
        )

    def test_report_label_selects_report(self) -> None:
        assert not check_one({"report": "early", "run": "rai/ra1", "phase": "Running"}).ok
        assert check_one({"report": "early", "run": "rai/ra1", "phase": "Pending"}).ok

    def test_every_mismatch_is_listed(self) -> None:
        outcome = check_one(
            {
                "run": "rai/ra1",
                "reason": "Other",
                "allocated": 5,
                "spares": 0,
                "funding": {"borrowed": 1},
                "reservation": True,
                "earliestStart": T0,
            }
        )
        assert not outcome.ok
        assert outcome.message == (
            "[final] rai/ra1: reason expected Other, got GangBound; allocated expected 5, got 4; "
            "spares expected 0, got 2; funding.borrowed expected 1, got 0; "
            "reservation expected true, got false; "
            f"earliestStart expected {T0}, got null"
        )

    def test_reservation_true_and_earliest_start_by_instant(self) -> None:
        ok = check_one(
            {
                "run": "rai/train-8",
                "reservation": True,
                "earliestStart": "2026-01-05T03:00:00+01:00",
            }
        )
        assert ok.ok, ok.message
        bad = check_one({"run": "rai/train-8", "earliestStart": None})
        assert bad.message == (
            "[final] rai/train-8: earliestStart expected null, got 2026-01-05T02:00:00Z"
        )

    def test_null_funding_reads_as_zero(self) -> None:
        assert check_one({"run": "rai/train-8", "funding": {"owned": 0, "unfunded": 0}}).ok
        outcome = check_one({"run": "rai/train-8", "funding": {"owned": 1}})
        assert outcome.message == "[final] rai/train-8: funding.owned expected 1, got 0"

    def test_missing_field_in_report_is_reported(self) -> None:
        report = make_report()
        del report["reports"][1]["runs"][0]["spares"]
        outcome = check_one({"run": "rai/ra1", "spares": 2}, report)
        assert outcome.message == (
            "[final] rai/ra1: spares expected 2, got nothing (field missing)"
        )

    def test_missing_run(self) -> None:
        outcome = check_one({"run": "rai/ghost", "phase": "Running"})
        assert outcome == Outcome(0, False, "[final] rai/ghost: no such run in report 'final'")

    def test_missing_report_label_lists_labels(self) -> None:
        outcome = check_one({"report": "later", "run": "rai/ra1"})
        assert outcome == Outcome(
            0, False, "[later] no report labelled 'later' (reports: early, final)"
        )

    def test_malformed_report_fails_without_raising(self) -> None:
        outcome = check_one({"run": "rai/ra1"}, {"reports": [{"label": "final", "runs": 3}]})
        assert outcome == Outcome(0, False, "[final] report field runs is not a list of objects")


class TestLeasesExpectation:
    @pytest.mark.parametrize(
        ("where", "found"),
        [
            ({"run": "rai/ra1"}, 2),
            ({"run": "rai/ra1", "closureReason": None}, 2),
            ({"closureReason": "*"}, 1),
            ({"closureReason": "RandomPreempt*"}, 1),
            ({"closureReason": "RandomPreempt(0x2*"}, 0),
            ({"payer.owner": "org:ai:rai"}, 2),
            ({"payer.owner": None}, 1),
            ({"mintedPayer.owner": "org:ai:*"}, 2),
            ({"slots": "a1#1"}, 1),
            ({"slots": "a2#0", "role": "Spare"}, 1),
            ({"group": 0}, 2),
            ({"group": 1}, 1),
            ({"group": "0"}, 0),
            ({"start": "2026-01-05T01:00:00+01:00"}, 3),
            ({"class": "unfunded"}, 1),
            ({}, 3),
        ],
    )
    def test_count_by_filter(self, where: dict[str, object], found: int) -> None:
        assert check_one({"leases": {"where": where, "count": found}}).ok
        miss = check_one({"leases": {"where": where, "count": found + 1}})
        assert not miss.ok
        assert f"expected count {found + 1}, found {found}" in miss.message

    def test_min(self) -> None:
        assert check_one({"leases": {"where": {"run": "rai/ra1"}, "min": 2}}).ok
        assert check_one({"leases": {"where": {"run": "rai/ra1"}, "min": 1}}).ok
        outcome = check_one({"leases": {"where": {"run": "rai/ra1"}, "min": 3}})
        assert outcome == Outcome(
            0,
            False,
            "[final] leases where {run: rai/ra1}: expected at least 3, found 2 (ids: l-1, l-2)",
        )

    def test_message_quotes_filter_and_flags_unknown_fields(self) -> None:
        outcome = check_one({"leases": {"where": {"closureReasn": None}, "count": 1}})
        assert outcome == Outcome(
            0,
            False,
            "[final] leases where {closureReasn: null}: expected count 1, found 0 "
            "(no lease has field closureReasn)",
        )

    def test_pass_message(self) -> None:
        outcome = check_one({"report": "early", "leases": {"where": {"group": 1}, "count": 1}})
        assert outcome == Outcome(
            0, True, "[early] leases where {group: 1}: expected count 1, found 1"
        )

    def test_no_leases_section_counts_zero(self) -> None:
        report = {"reports": [{"label": "final"}]}
        assert check_one({"leases": {"where": {"run": "a/b"}, "count": 0}}, report).ok
        assert not check_one({"leases": {"where": {"run": "a/b"}, "min": 1}}, report).ok


class TestRejectionsExpectation:
    """Refused steps are counted like leases, over the report's ``rejections`` list."""

    REJECTED: ClassVar[dict[str, object]] = {
        "step": 3,
        "at": "2026-01-05T00:10:00Z",
        "action": "complete",
        "target": "rai/ra1",
        "reason": "cannot complete run rai/ra1: it is already Failed, which is terminal",
    }

    def report(self) -> dict[str, Any]:
        document = make_report()
        document["reports"][1]["rejections"] = [self.REJECTED]
        return document

    def test_count_by_filter(self) -> None:
        where = {"step": 3, "action": "complete", "reason": "cannot complete run rai/ra1*"}
        assert check_one({"rejections": {"where": where, "count": 1}}, self.report()).ok
        miss = check_one({"rejections": {"where": {"step": 4}, "count": 1}}, self.report())
        assert miss == Outcome(
            0, False, "[final] rejections where {step: 4}: expected count 1, found 0"
        )

    def test_a_report_without_rejections_counts_zero(self) -> None:
        assert check_one({"rejections": {"count": 0}}).ok
        assert not check_one({"rejections": {"min": 1}}).ok

    def test_unknown_field(self) -> None:
        assert parse_errors([{"rejections": {"count": 0}, "phase": "x"}]) == [
            "expect[0].phase: unknown field for a rejections expectation"
        ]


class TestReservationExpectation:
    def test_latest_reservation_of_the_run_is_checked(self) -> None:
        outcome = check_one(
            {"reservation": {"run": "rai/train-8", "state": "Pending", "deficitGPUs": 8}}
        )
        assert outcome == Outcome(
            0, True, "[final] reservation of rai/train-8: state Pending, deficitGPUs 8"
        )

    def test_field_mismatch(self) -> None:
        outcome = check_one({"reservation": {"run": "rai/train-8", "deficitGPUs": 4}})
        assert outcome == Outcome(
            0, False, "[final] reservation of rai/train-8: deficitGPUs expected 4, got 8"
        )

    def test_instants_and_nested_fields(self) -> None:
        assert check_one(
            {
                "reservation": {
                    "run": "rai/train-8",
                    "earliestStart": "2026-01-05T02:00:00+00:00",
                    "intendedSlice.domain": "A",
                }
            }
        ).ok
        assert not check_one(
            {"reservation": {"run": "rai/train-8", "intendedSlice.domain": "B"}}
        ).ok

    def test_no_reservation_for_run(self) -> None:
        outcome = check_one({"reservation": {"run": "rai/ra1", "state": "Pending"}})
        assert outcome == Outcome(
            0,
            False,
            "[final] reservation of rai/ra1: none in report 'final' "
            "(reservations for: rai/train-8)",
        )


class TestBudgetExpectation:
    def test_envelope_fields_pass(self) -> None:
        outcome = check_one(
            {
                "budget": "rai/rai",
                "envelope": "west-h100",
                "concurrency": 64,
                "headroom": 60,
                "owned": 3,
                "shared": 1,
                "borrowed": 0,
                "unfunded": 0,
                "gpuHoursUsed": 8.0,
            }
        )
        assert outcome.ok, outcome.message

    def test_gpu_hours_tolerance(self) -> None:
        assert check_one({"budget": "rai/rai", "envelope": "west-h100", "gpuHoursUsed": 8.01}).ok
        outcome = check_one({"budget": "rai/rai", "envelope": "west-h100", "gpuHoursUsed": 8.02})
        assert outcome == Outcome(
            0,
            False,
            "[final] rai/rai/west-h100: gpuHoursUsed expected 8.02 (±0.01), got 8.004",
        )

    def test_int_mismatch(self) -> None:
        outcome = check_one({"budget": "rai/rai", "envelope": "west-h100", "headroom": 0})
        assert outcome == Outcome(
            0, False, "[final] rai/rai/west-h100: headroom expected 0, got 60"
        )

    def test_missing_budget_or_envelope(self) -> None:
        assert check_one({"budget": "rai/nope", "envelope": "west-h100"}) == Outcome(
            0, False, "[final] rai/nope/west-h100: no budget rai/nope in report 'final'"
        )
        assert check_one({"budget": "rai/rai", "envelope": "east"}) == Outcome(
            0,
            False,
            "[final] rai/rai/east: no envelope 'east' in budget rai/rai (envelopes: west-h100)",
        )


class TestCheckExpectations:
    def test_text_only_is_not_checked_and_order_is_kept(self) -> None:
        es = parse_expectations(
            [
                {"text": "the lottery seed is recorded"},
                {"run": "rai/ra1", "phase": "Running"},
                {"run": "rai/ra1", "phase": "Failed"},
            ]
        )
        outcomes = check_expectations(make_report(), es)
        assert [(o.index, o.ok) for o in outcomes] == [(0, True), (1, True), (2, False)]
        assert outcomes[0].message == "text: not machine-checkable"

    def test_expectation_is_a_plain_struct(self) -> None:
        e = Expectation(index=3, raw={"run": "rai/ra1"})
        assert e.report == "final"
        assert e.kind == "run"
        [outcome] = check_expectations(make_report(), [e])
        assert outcome == Outcome(3, True, "[final] rai/ra1: present")
