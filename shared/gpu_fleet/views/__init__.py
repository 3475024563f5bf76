"""Read models: pure pictures of the folded ledger at an instant, for people and for the API.

``report`` is the whole fleet (scenario reports, ``fleet.api.report``); ``runs`` is what
``kubectl runs get|list|explain|leases|budgets`` show; ``fleet_map`` is the picture of every GPU
slot, the timeline and the budget burn (``fleet.api.fleetmap``, ``kubectl runs top|viz``), and
``fleet_page`` renders it as one self-contained HTML page.

This package must never change state or do I/O: it reads folded state and returns plain data.
"""

from gpu_fleet.views.fleet_map import fleet_map
from gpu_fleet.views.fleet_page import CLASS_COLOURS, render_page
from gpu_fleet.views.report import build_report
from gpu_fleet.views.runs import NotFoundError, budgets, explain, leases, list_runs, run_view

__all__ = [
    "CLASS_COLOURS",
    "NotFoundError",
    "budgets",
    "build_report",
    "explain",
    "fleet_map",
    "leases",
    "list_runs",
    "render_page",
    "run_view",
]
