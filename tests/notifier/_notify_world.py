"""A small folded world for the notifier's pure tests: one node, one team, channels, leases."""

from __future__ import annotations

from gpu_fleet.core.ledger import (
    BudgetApplied,
    ChannelApplied,
    Event,
    FleetState,
    LeaseMinted,
    NodeRegistered,
    RunSubmitted,
    fold,
)
from gpu_fleet.core.manifests import parse_manifests
from gpu_fleet.core.model import (
    Budget,
    Lease,
    LeaseRole,
    Node,
    NotificationChannel,
    Payer,
    Run,
)

T0 = 1_772_409_600  # 2026-03-02T00:00:00Z
H = 3600
NODE = Node(
    name="n1",
    gpus=8,
    labels={"region": "r", "cluster": "c", "fabric.domain": "f", "gpu.flavor": "H100"},
)


def budget(
    namespace: str = "team",
    owner: str = "org:team",
    *,
    end: str = "2027-01-01T00:00:00Z",
    start: str = "2026-01-01T00:00:00Z",
    hours: float | None = None,
    renew: str = "",
    parents: str = "",
) -> Budget:
    extra = f", gpuHours: {hours}" if hours is not None else ""
    if parents:
        renew += f", parents: ['{parents}']"
    (b,) = parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Budget\n"
        f"metadata: {{name: b, namespace: {namespace}}}\n"
        f"spec: {{owner: '{owner}', envelopes: [{{name: e, flavor: H100, selector: {{region: r}},"
        f" concurrency: 8, start: '{start}', end: '{end}'{extra}}}]{renew}}}\n"
    )
    assert isinstance(b, Budget)
    return b


def run(namespace: str, name: str, gpus: int = 2) -> Run:
    (r,) = parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: Run\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{resources: {{gpuType: H100, totalGPUs: {gpus}}}}}\n"
    )
    assert isinstance(r, Run)
    return r


def channel(
    name: str = "ch", namespace: str = "team", spec: str = "{target: {nats: true}}"
) -> NotificationChannel:
    (c,) = parse_manifests(
        "apiVersion: rq.davidlangworthy.io/v1\nkind: NotificationChannel\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
    assert isinstance(c, NotificationChannel)
    return c


def lease(
    run_key: str, first: int, *, start: int = T0, end: int | None = None, width: int = 2
) -> Lease:
    ns = run_key.split("/", maxsplit=1)[0]
    return Lease(
        id=f"{run_key}@{start}#000",
        run=run_key,
        node="n1",
        slots=tuple(f"n1#{first + i}" for i in range(width)),
        role=LeaseRole.ACTIVE,
        group=0,
        start=start,
        end=end,
        minted_payer=Payer(namespace=ns, budget="b", envelope="e", owner=f"org:{ns}"),
    )


def world(
    *budgets: Budget, leases: tuple[Lease, ...] = (), channels: tuple[NotificationChannel, ...] = ()
) -> FleetState:
    st = FleetState()
    events: list[Event] = [NodeRegistered(at=T0, node=NODE)]
    events += [BudgetApplied(at=T0, budget=b) for b in budgets]
    events += [ChannelApplied(at=T0, channel=c) for c in channels]
    for x in leases:
        ns, name = x.run.split("/")
        events.append(RunSubmitted(at=x.start, run=run(ns, name, x.width)))
        events.append(LeaseMinted(at=x.start, lease=x))
    for e in sorted(events, key=lambda e: e.at):
        fold(st, e)
    return st
