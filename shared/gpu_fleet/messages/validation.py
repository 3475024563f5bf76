"""The rules every fleet API request must pass before a handler sees it, one error per field.

Decoding (msgspec) already guarantees types; this adds what types cannot say: names follow
Kubernetes' rules (``gpu_fleet.core.names``), counts are positive, free text is short and on one
line.  Every problem comes back as a ``FieldErrorOut`` whose path is the request field
(``name``, ``node.name``, ``continue``), so a client can point at what to fix, and no message
repeats the offending value, so no error reply can grow with its input.

The rules per request are in one ``match`` ending in ``assert_never``: a new request type that
no rule covers fails mypy, not production.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, assert_never

from gpu_fleet.core.names import (
    dns_label_problem,
    dns_subdomain_problem,
    label_value_problem,
    owner_problem,
)
from gpu_fleet.messages import api

SOURCE_MAX: Final = 1024
"""Characters of ``apply``'s ``source`` (a file name echoed in parse errors)."""
ETA_MAX: Final = 64
"""Characters of an ``eta`` string (an RFC 3339 instant is 20 to 35)."""
CONTINUE_MAX: Final = 1024
"""Characters of a ``continue`` token (ours are well under 200)."""
COUNT_MAX: Final = 1_000_000
"""Upper bound of GPU counts in requests (``by``, ``desired``, ``max_borrow``)."""
INSTANT_MAX: Final = 253_402_300_799
"""The last second of year 9999, the largest instant RFC 3339 can write."""

Requests = (
    api.RunRef
    | api.ApplyRequest
    | api.DeleteRequest
    | api.ShrinkRequest
    | api.SponsorsRequest
    | api.NodeRequest
    | api.EtaRequest
    | api.ListRequest
    | api.LeasesRequest
    | api.ClockRequest
    | api.ReportRequest
    | api.FleetMapRequest
    | api.RetryRequest
)


class _Problems:
    def __init__(self) -> None:
        self.items: list[api.FieldErrorOut] = []

    def check(self, path: str, value: str | None, rule: Callable[[str], str | None]) -> None:
        if value is None:
            return
        problem = rule(value)
        if problem is not None:
            self.items.append(api.FieldErrorOut(path, problem))

    def count(self, path: str, value: int | None, minimum: int) -> None:
        if value is None:
            return
        if value < minimum:
            self.items.append(api.FieldErrorOut(path, f"must be >= {minimum}"))
        elif value > COUNT_MAX:
            self.items.append(api.FieldErrorOut(path, f"must be <= {COUNT_MAX}"))

    def text(self, path: str, value: str | None, limit: int) -> None:
        if value is None:
            return
        if len(value) > limit:
            message = f"must be no more than {limit} characters (got {len(value)})"
            self.items.append(api.FieldErrorOut(path, message))
        elif not value.isprintable():
            self.items.append(api.FieldErrorOut(path, "must be printable text on one line"))

    def instant(self, path: str, value: int | None) -> None:
        if value is not None and not 0 <= value <= INSTANT_MAX:
            message = f"must be a Unix time between 0 and {INSTANT_MAX} (year 9999)"
            self.items.append(api.FieldErrorOut(path, message))

    def run_ref(self, namespace: str | None, name: str | None) -> None:
        self.check("namespace", namespace, dns_label_problem)
        self.check("name", name, dns_label_problem)

    def page(self, limit: int | None, token: str | None) -> None:
        self.count("limit", limit, 1)
        self.text("continue", token, CONTINUE_MAX)


def request_problems(req: Requests) -> list[api.FieldErrorOut]:
    """Every rule ``req`` breaks, each at its field's path; empty when the request is valid."""
    p = _Problems()
    match req:
        case api.RunRef(namespace=ns, name=name):
            p.run_ref(ns, name)
        case api.ApplyRequest(source=source):
            p.text("source", source, SOURCE_MAX)
        case api.DeleteRequest(kind=kind, namespace=ns, name=name):
            p.check("namespace", ns, dns_label_problem)
            p.check("name", name, dns_label_problem if kind == "Run" else dns_subdomain_problem)
        case api.ShrinkRequest(namespace=ns, name=name, by=by, desired=desired):
            p.run_ref(ns, name)
            p.count("by", by, 1)
            p.count("desired", desired, 0)
        case api.SponsorsRequest(namespace=ns, name=name, sponsor=sponsor, max_borrow=most):
            p.run_ref(ns, name)
            p.check("sponsor", sponsor, owner_problem)
            p.count("max_borrow", most, 0)
        case api.NodeRequest(op=op, name=name, node=node):
            if op != "register":
                p.check("name", name, dns_subdomain_problem)
            elif node is None:
                p.items.append(api.FieldErrorOut("node", "required for register"))
        case api.EtaRequest(namespace=ns, name=name, eta=eta):
            p.run_ref(ns, name)
            if isinstance(eta, str):
                p.text("eta", eta, ETA_MAX)
            else:
                p.instant("eta", eta)
        case api.ListRequest(namespace=ns, limit=limit, continue_=token):
            p.check("namespace", ns, dns_label_problem)
            p.page(limit, token)
        case api.LeasesRequest(namespace=ns, name=name, limit=limit, continue_=token):
            p.run_ref(ns, name)
            p.page(limit, token)
        case api.ClockRequest(advance_to=advance_to):
            p.instant("advance_to", advance_to)
        case api.ReportRequest(label=label):
            p.check("label", label, label_value_problem)
        case api.FleetMapRequest():
            pass  # no fields yet
        case api.RetryRequest(namespace=ns, name=name, attempt=attempt, pod=pod):
            p.run_ref(ns, name)
            p.count("attempt", attempt, 0)
            p.text("pod", pod, 253)
        case _:
            assert_never(req)
    return p.items
