"""Read models: pure pictures of the folded ledger at an instant, for people and for the API.

``report`` is the whole fleet (scenario reports, ``fleet.api.report``); ``runs`` is what
``kubectl runs get|list|explain|leases|budgets`` show.  Later the fleet map's data lives here.

This package must never change state or do I/O: it reads folded state and returns plain data.
"""

from gpu_fleet.views.report import build_report
from gpu_fleet.views.runs import NotFoundError, budgets, explain, leases, list_runs, run_view

__all__ = [
    "NotFoundError",
    "budgets",
    "build_report",
    "explain",
    "leases",
    "list_runs",
    "run_view",
]
