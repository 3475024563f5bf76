"""Budget parents must not form a cycle (issue 19, break 6; SPEC §family left it unchecked)."""

from __future__ import annotations

import pytest

from gpu_fleet.core.engine import CommandError, Fleet
from gpu_fleet.core.funding.cycles import parent_cycle
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import Budget
from gpu_fleet.scenario.loader import ScenarioError, parse_scenario


def budget(owner: str, *parents: str, namespace: str | None = None) -> Budget:
    ns = namespace or owner.replace("org:", "").replace(":", "-")
    text = f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: b, namespace: {ns}}}
spec:
  owner: "{owner}"
  parents: {list(parents)!r}
  envelopes:
    - {{name: e, flavor: H100, selector: {{region: r}}, concurrency: 1,
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}}
"""
    (manifest,) = parse_manifests(text.replace("'", '"'))
    assert isinstance(manifest, Budget)
    return manifest


def test_a_forest_is_fine() -> None:
    existing = [budget("org:ai"), budget("org:ai:rai", "org:ai"), budget("org:ai:cv", "org:ai")]
    assert parent_cycle(existing, [budget("org:ai:rai:nlp", "org:ai:rai")]) is None


def test_two_budgets_that_name_each_other_are_a_cycle_named_from_the_one_applied() -> None:
    found = parent_cycle([budget("org:b", "org:a")], [budget("org:a", "org:b")])
    assert found is not None
    assert found[0].spec.owner == "org:a"
    assert found[1] == "org:a -> org:b -> org:a"


def test_the_shortest_cycle_through_the_applied_owner_is_named() -> None:
    existing = [budget("org:b", "org:c"), budget("org:c", "org:a"), budget("org:d", "org:a")]
    found = parent_cycle(existing, [budget("org:a", "org:d", "org:b")])
    assert found is not None
    assert found[1] == "org:a -> org:d -> org:a"


def test_within_one_apply_the_budget_that_closes_the_cycle_is_named() -> None:
    found = parent_cycle([], [budget("org:a", "org:b"), budget("org:b", "org:a")])
    assert found is not None
    assert (found[0].spec.owner, found[1]) == ("org:b", "org:b -> org:a -> org:b")


def test_an_old_cycle_does_not_block_an_unrelated_apply() -> None:
    """A ledger written before the rule may hold a cycle; other budgets still apply."""
    old = [budget("org:a", "org:b"), budget("org:b", "org:a")]
    assert parent_cycle(old, [budget("org:c")]) is None


def test_replacing_a_budget_can_break_a_cycle() -> None:
    old = [budget("org:a", "org:b")]
    assert parent_cycle(old, [budget("org:b", "org:a")]) is not None
    assert parent_cycle(old, [budget("org:a"), budget("org:b", "org:a")]) is None


def test_fleet_apply_refuses_the_budget_and_changes_nothing() -> None:
    fleet = Fleet()
    fleet.apply(budget("org:b", "org:a"), 0)
    before = dict(fleet.state.budgets)
    with pytest.raises(CommandError, match=r"parents form a cycle: org:a -> org:b -> org:a"):
        fleet.apply(budget("org:a", "org:b"), 0)
    assert fleet.state.budgets == before


def test_the_scenario_loader_refuses_a_cycle_at_the_step_that_closes_it() -> None:
    def raw_budget(owner: str, parent: str, ns: str) -> dict[str, object]:
        return {
            "apiVersion": "rq.davidlangworthy.io/v1",
            "kind": "Budget",
            "metadata": {"name": "b", "namespace": ns},
            "spec": {
                "owner": owner,
                "parents": [parent],
                "envelopes": [
                    {
                        "name": "e",
                        "flavor": "H100",
                        "selector": {"region": "r"},
                        "concurrency": 1,
                        "start": "2026-01-01T00:00:00Z",
                        "end": "2027-01-01T00:00:00Z",
                    }
                ],
            },
        }

    raw = {
        "name": "cycle",
        "start": "2026-03-01T00:00:00Z",
        "objects": [raw_budget("org:a", "org:b", "a")],
        "steps": [{"at": "+1h", "apply": raw_budget("org:b", "org:a", "b")}],
    }
    with pytest.raises(ScenarioError) as info:
        parse_scenario(raw)
    assert info.value.errors == [
        "steps[0].apply.spec.parents: parents form a cycle: org:b -> org:a -> org:b"
    ]
