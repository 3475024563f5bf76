"""Why GPUs stay idle while a run waits: what ``explain`` says about free capacity.

Issue 19 saw free GPUs next to waiting 1-GPU runs after a burst of submissions and asked whether
that was right.  It is, in two designed ways, and a waiting run's ``explain`` now says which:

* **Budget-only wait** (DESIGN decision 4): the run's family has committed all its headroom, so
  it waits for budget, not for capacity; its reservation activates at the lead bound and starts
  it unfunded, cutting nobody.  Until then the free GPUs do not help it.
* **Held for reservations** (DESIGN decision 5): a pending capacity reservation closes the free
  slots of its intended slice to every run that would still hold them when the reservation is
  due, so backfill never delays it.  A 1-GPU run without a scheduled end may not take the one
  free GPU another run's reservation is counting on.

Free GPUs in the run's *own* intended slice are kept for it while the rest of its slice frees
up.  Whatever free capacity is left is capacity the run cannot use as it asks (its width, its
domain rule or its spares do not fit there); the reservation's reason says what is short.
This is read-only: it replays the engine's own protection rule (``gang.protects``) and never
changes a decision.
"""

from __future__ import annotations

from gpu_fleet.core.engine.gang import max_duration, protects
from gpu_fleet.core.ledger import FleetState
from gpu_fleet.core.placement.topology import Topology, TopologyError, topology_from
from gpu_fleet.core.timeutil import format_instant


def _free_by_node(topology: Topology) -> dict[str, int]:
    return {
        node: topology.free_gpus(node)
        for domain in topology.domains()
        for node in domain.nodes
        if topology.free_gpus(node)
    }


def _nodes(counts: dict[str, int]) -> str:
    return ", ".join(f"{node}: {n}" for node, n in sorted(counts.items()))


def idle_rows(state: FleetState, key: str) -> list[tuple[str, str]]:
    """``explain`` rows about free GPUs of the run's flavor while the run waits; [] otherwise."""
    run = state.runs.get(key)
    status = state.status.get(key)
    if run is None or status is None or status.phase not in ("Pending", "Waiting"):
        return []
    flavor = run.spec.resources.gpu_type
    try:
        topology = topology_from(state.skeleton(flavor), state.held_by_node)
    except TopologyError:
        return []
    free = _free_by_node(topology)
    total = sum(free.values())
    if not total:
        return []
    rows = [("FreeGPUs", f"{total} {flavor} GPUs are free now ({_nodes(free)})")]
    own = state.pending_reservation(key)
    if own is not None and own.kind == "budget":
        rows.append(
            (
                "IdleBecause",
                "the run waits for budget headroom, not capacity: its reservation"
                f" {own.name} activates at {format_instant(own.earliest_start)} and starts it"
                " unfunded, cutting nobody (DESIGN decision 4)",
            )
        )
        return rows
    mine = (own.earliest_start, own.name) if own is not None else None
    duration = max_duration(run)
    held = 0
    for nodes, entries in state.protected_slices().items():
        counts = {node: free[node] for node in nodes if node in free}
        if not counts:
            continue
        if not protects(entries, key, mine, duration, state.clock):
            if own is not None and tuple(own.nodes) == nodes:
                held += sum(counts.values())
                rows.append(
                    (
                        "HeldForThisRun",
                        f"{sum(counts.values())} free GPU(s) ({_nodes(counts)}) are in this run's"
                        " intended slice, kept for it until the rest frees up"
                        f" ({own.deficit_gpus} GPU(s) short)",
                    )
                )
            continue
        # The holder is who ``protects`` found: the first other run's reservation ahead of
        # ours in the slice's line (those promised after ours never keep us out).
        line = next((e.line for e in entries if e.run == key), None)
        others = [e for e in entries if e.run != key and (line is None or e.line < line)]
        if not others:  # pragma: no cover - protects() is False without another run ahead
            continue
        bound, name, owner = others[0].earliest_start, others[0].name, others[0].run
        held += sum(counts.values())
        ahead = len(others)
        rows.append(
            (
                "HeldForReservation",
                f"{sum(counts.values())} free GPU(s) ({_nodes(counts)}) are held for"
                f" reservation {name} of {owner} (activates {format_instant(bound)}"
                + (
                    f"; {ahead - 1} more reservation(s) there come before this run"
                    if ahead > 1
                    else ""
                )
                + "): backfill may not delay it (DESIGN decision 5)",
            )
        )
    rest = total - held
    if rest and own is not None:
        rows.append(
            (
                "IdleBecause",
                f"{'the other ' if held else ''}{rest} free GPU(s) do not fit the run as it"
                f" asks ({own.reason})",
            )
        )
    return rows
