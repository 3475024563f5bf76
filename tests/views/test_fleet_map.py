"""The fleet map read model and its HTML page, as pure functions of folded state.

The fleet is the repository's example fleet and manifests decided by the real core (``Fleet``),
so the map is checked against the same numbers ``build_report`` gives the other commands.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.manifests import parse_inventory, parse_manifests
from gpu_fleet.core.model import Lease, LeaseRole, NodeHealth
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.views import CLASS_COLOURS, build_report, fleet_map, render_page
from gpu_fleet.views.fleet_map import SLOT_STATES, UNBOUND_TEAM, UNLABELLED, held_series

T0 = parse_instant("2026-03-02T00:00:00Z")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEP = 600  # seconds between the example manifests


def example_fleet() -> tuple[Fleet, int]:
    """The example inventory and every example manifest, one every 10 minutes."""
    fleet = Fleet(Settings())
    for node in parse_inventory((EXAMPLES / "inventory.yaml").read_text()):
        fleet.register_node(node, T0)
    t = T0
    for path in sorted((EXAMPLES / "manifests").glob("*.yaml")):
        for manifest in parse_manifests(path.read_text(), source=str(path)):
            fleet.apply(manifest, t)
        t += STEP
    fleet.advance_to(t)
    return fleet, t


@pytest.fixture(name="fleet", scope="module")
def _fleet() -> tuple[FleetState, int]:
    fleet, t = example_fleet()
    return fleet.state, t


def slots(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for d in data["domains"] for n in d["nodes"] for s in n["slots"]]


def test_every_gpu_is_one_slot_with_the_class_the_report_gives(
    fleet: tuple[FleetState, int],
) -> None:
    state, at = fleet
    data = fleet_map(state, at)
    all_slots = slots(data)
    assert len(all_slots) == data["gpus"] == sum(n.gpus for n in state.nodes.values()) == 32
    assert len({s["slot"] for s in all_slots}) == 32, "a slot is physical and unique"
    report = build_report(state, "now", at)
    expected = {
        slot: lease["class"]
        for lease in report["leases"]
        if lease["closedAt"] is None
        for slot in lease["slots"]
    }
    held = {s["slot"]: s["class"] for s in all_slots if "run" in s}
    assert held == expected
    counts = Counter(s["state"] for s in all_slots)
    assert {k: v for k, v in data["counts"].items() if v} == dict(counts)
    assert counts["free"] == 32 - len(expected)


def test_domains_group_nodes_by_fabric_and_list_their_runs(fleet: tuple[FleetState, int]) -> None:
    state, at = fleet
    data = fleet_map(state, at)
    assert [d["key"] for d in data["domains"]] == ["us-west/c1/A", "us-west/c1/B"]
    for d in data["domains"]:
        assert d["flavors"] == ["H100"]
        assert d["gpus"] == sum(n["gpus"] for n in d["nodes"]) == 16
        on_slots = Counter(s["run"] for n in d["nodes"] for s in n["slots"] if "run" in s)
        assert {r["run"]: r["gpus"] for r in d["runs"]} == dict(on_slots)
    spares = [s for s in slots(data) if s.get("role") == LeaseRole.SPARE.value]
    assert spares, "the family run in example 04 keeps spares"
    assert all(s["payer"] is None or s["payer"].count("/") == 2 for s in slots(data) if "run" in s)


def test_cordoned_and_fenced_nodes_show_unavailable_free_slots() -> None:
    """A cordoned node keeps its leases, but its free slots take no work: unavailable."""
    fleet, at = example_fleet()
    before = fleet_map(fleet.state, at)
    node = next(n for d in before["domains"] for n in d["nodes"] if n["counts"]["free"])
    fleet.set_node_health(node["name"], NodeHealth.CORDONED, at)
    after = fleet_map(fleet.state, at)
    cordoned = next(n for d in after["domains"] for n in d["nodes"] if n["name"] == node["name"])
    assert cordoned["health"] == "Cordoned"
    assert cordoned["counts"]["unavailable"] == node["counts"]["free"]
    assert cordoned["counts"]["free"] == 0
    assert [s.get("run") for s in cordoned["slots"]] == [s.get("run") for s in node["slots"]]
    assert after["counts"]["unavailable"] == node["counts"]["free"]


def test_a_node_without_location_labels_is_drawn_apart() -> None:
    fleet = Fleet(Settings())
    for node in parse_inventory(
        "nodes:\n"
        "  - {name: x1, gpus: 4, labels: {gpu.flavor: H100}}\n"
        "  - {name: a1, gpus: 2, labels: {region: r, cluster: c, fabric.domain: f,"
        " gpu.flavor: H100}}\n"
    ):
        fleet.register_node(node, T0)
    data = fleet_map(fleet.state, T0)
    assert [d["key"] for d in data["domains"]] == ["r/c/f", UNLABELLED]
    assert data["counts"]["free"] == 6
    assert data["timeline"]["rows"] == []
    assert data["burn"] == []


def test_timeline_has_a_row_per_run_with_leases_reservations_and_forecast(
    fleet: tuple[FleetState, int],
) -> None:
    state, at = fleet
    tl = fleet_map(state, at)["timeline"]
    rows = {r["run"]: r for r in tl["rows"]}
    assert set(rows) == set(state.runs)
    waiting = rows["rai/sweep-6"]
    assert waiting["phase"] == "Pending"
    assert waiting["leases"] == []
    (res,) = waiting["reservations"]
    assert res["releasedAt"] is None
    assert waiting["forecast"] is not None
    assert waiting["forecast"]["p50"]["unix"] <= waiting["forecast"]["p90"]["unix"]
    running = rows["rai/train-8"]
    assert running["forecast"] is None
    for lease in running["leases"]:
        assert lease["open"]
        assert lease["until"]["unix"] == at, "an open lease's bar runs to now"
        assert lease["class"] in ("owned", "shared", "borrowed", "unfunded")
    assert tl["start"]["unix"] <= min(x["start"]["unix"] for r in tl["rows"] for x in r["leases"])
    assert tl["end"]["unix"] >= max(at, res["earliestStart"]["unix"])


def test_burn_per_team_matches_the_leases_and_the_envelopes(fleet: tuple[FleetState, int]) -> None:
    state, at = fleet
    burn = {b["team"]: b for b in fleet_map(state, at)["burn"]}
    assert set(burn) == {"org:ai:rai", "org:ai:vision", "org:partner"}
    rai = burn["org:ai:rai"]
    # train-8 started with the second manifest (T0 + 10 min) and holds 8 GPUs until now.
    assert rai["gpusHeld"] == 8
    assert rai["gpuHoursConsumed"] == pytest.approx(8 * (at - (T0 + STEP)) / 3600, abs=1e-6)
    assert rai["concurrency"] == 12
    assert rai["gpuHoursAllowance"] is None
    (env,) = rai["envelopes"]
    assert env["envelope"] == "rai/rai/h100"
    assert env["active"]
    assert env["inUse"] + env["headroom"] == env["concurrency"]


def _lease(lease_id: str, width: int, start: int, end: int | None = None, **kw: Any) -> Lease:
    slots = tuple(f"n#{i}" for i in range(width))
    return Lease(
        id=lease_id, run="a/r", node="n", slots=slots, role=LeaseRole.ACTIVE, group=0,
        start=start, end=end, **kw,
    )  # fmt: skip


def test_held_series_integrates_widths_over_live_intervals() -> None:
    """Two GPUs for an hour, then four more for half an hour, one closed early, one future."""
    leases = [
        _lease("a", 2, 0),
        _lease("b", 4, 3600, closed_at=5400, closure_reason="Completed"),
        _lease("c", 1, 9000, end=10800),  # scheduled end after "now": counts until now
        _lease("d", 8, 99999),  # starts after now: not yet
    ]
    series = held_series(leases, 9900)
    assert series == [
        (0, 2, 0.0),
        (3600, 6, 2.0),
        (5400, 2, 5.0),
        (9000, 3, 7.0),
        (9900, 3, 7.75),
    ]
    assert held_series([], 100) == []


# -- the page ----------------------------------------------------------------------------------


def test_page_has_one_slot_element_per_gpu_coloured_by_its_state(
    fleet: tuple[FleetState, int],
) -> None:
    state, at = fleet
    data = fleet_map(state, at)
    page = render_page(data)
    rects = re.findall(r'<rect class="slot[^"]*"[^>]*>', page)
    assert len(rects) == data["gpus"]
    for rect in rects:
        fill = re.search(r'fill="([^"]+)"', rect)
        st = re.search(r'data-state="([^"]+)"', rect)
        assert fill is not None
        assert st is not None
        assert fill.group(1) == CLASS_COLOURS[st.group(1)]
    for s in SLOT_STATES:
        assert f"background:{CLASS_COLOURS[s]}" in page, f"legend misses {s}"


def test_page_is_self_contained_and_escapes_names(fleet: tuple[FleetState, int]) -> None:
    state, at = fleet
    data = fleet_map(state, at)
    data["domains"][0]["nodes"][0]["name"] = "<script>alert(1)</script>"
    page = render_page(data)
    assert "<script>alert(1)" not in page
    assert "&lt;script&gt;alert(1)" in page
    # Nothing is fetched: no URL to another document, font, image or script.
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    assert "http://" not in page
    assert "https://" not in page
    assert "@import" not in page
    assert page.count("<script>") == 1


def test_a_run_in_a_namespace_nobody_owns_belongs_to_no_team() -> None:
    fleet_, at = example_fleet()
    for manifest in parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        "metadata: {name: orphan, namespace: nobody}\n"
        "spec: {resources: {gpuType: H100, totalGPUs: 1}}\n"
    ):
        fleet_.apply(manifest, at)
    data = fleet_map(fleet_.state, at)
    row = next(r for r in data["timeline"]["rows"] if r["run"] == "nobody/orphan")
    assert row["team"] == UNBOUND_TEAM
