"""Idle GPUs next to waiting runs (issue 19, break 10): right by design, and ``explain`` says why.

After a burst (200 runs of 1-3 GPUs from 4 namespaces whose concurrency-3 budgets share one
family, on the sample inventory) free GPUs sat next to waiting 1-GPU runs.  Two designed rules
explain every such GPU: a budget-only wait starts unfunded only at the activation lead bound
(DESIGN decision 4), and the free slots of a pending capacity reservation's intended slice are
closed to runs that would still hold them when it is due (DESIGN decision 5).  These tests build
each situation small and check the waiting runs' ``explain``.
"""

from __future__ import annotations

from gpu_fleet.core.engine import Fleet, Settings
from gpu_fleet.core.manifests import parse_inventory, parse_manifests
from gpu_fleet.core.timeutil import parse_instant
from gpu_fleet.views import explain

T0 = parse_instant("2026-03-02T00:00:00Z")


def fleet_with(inventory: str, concurrency: int) -> Fleet:
    fleet = Fleet(Settings())
    for node in parse_inventory(inventory):
        fleet.register_node(node, T0)
    for ns in ("t0", "t1"):
        (budget,) = parse_manifests(f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Budget
metadata: {{name: b, namespace: {ns}}}
spec:
  owner: "org:f:{ns}"
  parents: ["org:f"]
  envelopes:
    - {{name: e, flavor: H100, selector: {{region: r}}, concurrency: {concurrency},
       start: "2026-01-01T00:00:00Z", end: "2027-01-01T00:00:00Z"}}
""")
        fleet.apply(budget, T0)
    return fleet


def submit(fleet: Fleet, ns: str, name: str, gpus: int) -> None:
    (run,) = parse_manifests(f"""
apiVersion: rq.davidlangworthy.io/v1
kind: Run
metadata: {{name: {name}, namespace: {ns}}}
spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}
""")
    fleet.apply(run, T0)


def rows(fleet: Fleet, key: str) -> dict[str, str]:
    return dict(explain(fleet.state, key, T0))


TWO_DOMAINS = """nodes:
  - {name: a1, gpus: 2, labels: {region: r, cluster: c, fabric.domain: A, gpu.flavor: H100}}
  - {name: b1, gpus: 2, labels: {region: r, cluster: c, fabric.domain: B, gpu.flavor: H100}}
"""


def test_a_free_gpu_held_for_a_reservation_ahead_is_named_on_the_waiting_run() -> None:
    """DESIGN 5: z (2 GPUs) reserved b1's free GPU; w (1 GPU, no end) may not take it."""
    fleet = fleet_with(TWO_DOMAINS, concurrency=10)
    for name, gpus in (("x", 2), ("y", 1), ("z", 2), ("w", 1)):
        submit(fleet, "t0", name, gpus)
    waiting = rows(fleet, "t0/w")
    assert waiting["Phase"] == "Pending"
    assert waiting["FreeGPUs"] == "1 H100 GPUs are free now (b1: 1)"
    assert waiting["HeldForReservation"] == (
        "1 free GPU(s) (b1: 1) are held for reservation z-res-1772409600 of t0/z"
        " (activates 2026-03-02T00:15:30Z): backfill may not delay it (DESIGN decision 5)"
    )
    assert rows(fleet, "t0/z")["HeldForThisRun"] == (
        "1 free GPU(s) (b1: 1) are in this run's intended slice, kept for it until the rest"
        " frees up (1 GPU(s) short)"
    )


def test_a_budget_only_wait_says_it_waits_for_budget_not_capacity() -> None:
    """DESIGN 4: the family's headroom is committed; the run starts unfunded at the bound."""
    fleet = fleet_with(TWO_DOMAINS, concurrency=1)
    for ns, name in (("t0", "a"), ("t1", "b"), ("t0", "c")):
        submit(fleet, ns, name, 1)
    waiting = rows(fleet, "t0/c")
    assert waiting["FreeGPUs"] == "2 H100 GPUs are free now (a1: 1, b1: 1)"
    assert waiting["IdleBecause"].startswith(
        "the run waits for budget headroom, not capacity: its reservation c-res-"
    )
    assert waiting["IdleBecause"].endswith(
        "activates at 2026-03-02T00:15:00Z and starts it unfunded, cutting nobody"
        " (DESIGN decision 4)"
    )


def test_a_running_run_or_a_full_fleet_adds_nothing() -> None:
    fleet = fleet_with(TWO_DOMAINS, concurrency=10)
    submit(fleet, "t0", "x", 2)
    assert "FreeGPUs" not in rows(fleet, "t0/x")
    for name in ("y", "z"):
        submit(fleet, "t0", name, 1)
    submit(fleet, "t0", "full", 1)
    assert rows(fleet, "t0/full")["Phase"] == "Pending"
    assert "FreeGPUs" not in rows(fleet, "t0/full")
