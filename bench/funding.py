"""Funding benchmark: one full evaluation and one cover decision, against a plain fold.

Run: ``.venv/bin/python bench/funding.py [--quick]``.

What is measured, per world size (envelopes x open leases):

* **fold** (the baseline): ``fold_all(events)`` over the very events that build the world -
  nodes registered, budgets applied, runs submitted, leases minted.  Nothing can be decided about
  a fleet faster than its state can be folded, and the fold does no funding work here (every
  lease is minted at the same instant, so the meter is never advanced and no hours are charged),
  so it is the honest "cost of merely having this many objects" on this machine, measured in the
  same process.  Ratios are against it.
* **evaluation**: ``evaluate(meter, inputs, t)`` at the ledger clock - the whole stable matching
  (``fill``) over every open lease, then the per-envelope / per-cap / per-run summary.  Inputs
  are assembled once (``FleetState.funding_inputs()``, index cached) and timed separately.
  Median of an adaptive number of repetitions (as many as fit in ~10 s), the first left out;
  the first is shown on its own.  It builds the proposal lists, which the index keeps for
  every later evaluation at which the same envelope windows are open (``Proposer.at``), as a
  running manager does between budget changes, and parses every lease's first slot, which the
  process keeps - so the first is what the first evaluation of a freshly started manager costs.
* **after a budget change**: one evaluation right after an unchanged Budget is applied again
  (folded as ``BudgetApplied``): a new index, so new proposal lists, but the process's caches
  and the nodes' places carried over (``EnvelopeIndex.node_places``), as in a running manager
  after any budget change (building the index itself is the ``build_index`` column).
* **per instant**: the clock moved by one second with an event that changes nobody's funding
  (an ETA report), then the evaluation a decision at that instant reads (median of five).  A
  few envelopes set GPU-hours, so the meter is charged and the matching depends on it; a known
  matching is reused when every GPU-hour check provably comes out the same
  (``incremental.rebase_fill``), and the charge is array additions (``charges.Charges``).
* **cover**: one ``cover(...)`` admission decision against a *precomputed* evaluation (the cached
  picture cover is designed to read), for a different requesting run each call - 200 calls, a
  mix of existing runs (family sharing, sponsors) and fresh ones, 1-64 GPUs, at the location of a
  random node of the run's flavor.  Median and p95.

The world is synthesized with a seeded RNG: a few orgs, teams under them and sub-teams under
those (so owner, child, sibling and cousin tiers all occur); one Budget per owner with several
envelopes (H100/A100, region selectors or ``*``, active windows, a few future windows with
``allowAdmission``, a few expired, ~20 % lending, some aggregate caps, a few GPU-hour limits);
8-GPU nodes labelled region/cluster/fabric.domain/gpu.flavor, created as leases need them;
runs in team namespaces (~15 % may borrow from sponsors in another org), each holding 1-12
leases of 1-8 GPUs on unique physical slots, group indices 0..n, ~10 % spares, and a minted
payer.  Total envelope concurrency is ~100 % of leased GPUs, unevenly spread, so the matching
has real contention (multiple proposal rounds, family sharing, loans, unfunded claims).

Runs are submitted at varied instants in the week before the leases (so admission time ranks
claims as it does in production); every lease is minted at one instant after all of them, so no
lease is open while the clock moves and the fold charges no hours.

Goals (from the issue): a cover decision under 5 ms at 10k open leases and 500 envelopes; a full
evaluation under 1 s at 100k open leases.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from _common import load_line, machine_line, median, pct, repeat_adaptive, timed
from gpu_fleet.core.funding import (
    CoverFailure,
    CoverRequest,
    Evaluation,
    FundingInputs,
    build_index,
    cover,
    evaluate,
    location_of,
)
from gpu_fleet.core.ledger import (
    BudgetApplied,
    Event,
    FleetState,
    LeaseMinted,
    NodeRegistered,
    RunEtaReported,
    RunSubmitted,
    fold,
    fold_all,
)
from gpu_fleet.core.model import (
    AggregateCap,
    Budget,
    BudgetSpec,
    Envelope,
    Funding,
    Lease,
    LeaseRole,
    Lending,
    Locality,
    Node,
    ObjectMeta,
    Payer,
    PreActivation,
    Resources,
    Run,
    RunSpec,
    slot,
)

FLAVORS = ("H100-80GB", "A100-80GB")
FLAVOR_SHARE = (0.6, 0.4)
REGIONS = ("us-west", "us-east", "eu-central")
GPUS_PER_NODE = 8
NODES_PER_DOMAIN = 32
DOMAINS_PER_CLUSTER = 8
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z: budgets and nodes
T_LEASE = T0 + 8 * 86_400  # every lease is minted here (the ledger clock when measuring)
COVER_GOAL_S = 0.005
EVAL_GOAL_S = 1.0
EVAL_GOAL_X = 1.2  # the evaluation against the fold of the same events


def _dt(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


@dataclass
class Owner:
    name: str
    namespace: str
    parent: str | None
    org: str
    level: int  # 0 org, 1 team, 2 sub-team


@dataclass
class World:
    events: list[Event]
    owners: list[Owner]
    runs: list[Run]
    n_envelopes: int
    n_leases: int
    n_nodes: int
    leased_gpus: int
    total_concurrency: int


def _owners(n_owners: int, rng: random.Random) -> list[Owner]:
    n_orgs = max(3, n_owners // 30)
    owners = [Owner(f"org{i:02}", f"org{i:02}", None, f"org{i:02}", 0) for i in range(n_orgs)]
    teams: list[Owner] = []
    while len(owners) < n_owners:
        i = len(owners)
        if teams and rng.random() < 0.55:
            parent = rng.choice(teams)
            o = Owner(f"{parent.name}-s{i:04}", f"ns-{i:04}", parent.name, parent.org, 2)
        else:
            org = rng.choice(owners[:n_orgs])
            o = Owner(f"{org.name}-t{i:04}", f"ns-{i:04}", org.name, org.org, 1)
            teams.append(o)
        owners.append(o)
    return owners


def _budgets(
    owners: Sequence[Owner], n_envelopes: int, gpus_by_flavor: dict[str, int], rng: random.Random
) -> tuple[list[Budget], dict[tuple[str, str], list[Payer]], int]:
    """One Budget per owner, ``n_envelopes`` envelopes in all; returns payers by (owner, flavor)."""
    counts = [1] * len(owners)
    for _ in range(n_envelopes - len(owners)):
        counts[rng.randrange(len(owners))] += 1
    shares = zip(FLAVORS, FLAVOR_SHARE, strict=True)
    per_flavor = {f: max(1, round(n_envelopes * share)) for f, share in shares}
    mean_conc = {f: 1.0 * gpus_by_flavor[f] / per_flavor[f] for f in FLAVORS}
    budgets: list[Budget] = []
    payers: dict[tuple[str, str], list[Payer]] = {}
    total_conc = 0
    for o, k in zip(owners, counts, strict=True):
        envs: list[Envelope] = []
        for j in range(k):
            flavor = rng.choices(FLAVORS, FLAVOR_SHARE)[0]
            conc = max(1, round(mean_conc[flavor] * rng.uniform(0.3, 1.7)))
            u = rng.random()
            if u < 0.05:  # opens later, cover may plan against it
                start, end = T_LEASE + 3 * 86_400, T_LEASE + 60 * 86_400
                pre: PreActivation | None = PreActivation(allow_admission=True)
            elif u < 0.08:  # expired
                start, end, pre = T0 - 60 * 86_400, T0 + 86_400, None
            else:
                start, end, pre = T0 - 30 * 86_400, T0 + 90 * 86_400, None
            selector = {"region": rng.choice(REGIONS)} if rng.random() < 0.7 else {"region": "*"}
            lending = None
            if rng.random() < 0.2:
                to = rng.choice([(), ("*",), (f"{rng.choice(owners).org}*",)])
                lend_max = rng.choice([None, max(1, conc // 4)])
                lending = Lending(allow=True, to=to, max_concurrency=lend_max)
            hours = conc * 24.0 * rng.uniform(0.6, 3.0) if rng.random() < 0.05 else None
            sharing = "none" if rng.random() < 0.05 else ""
            envs.append(
                Envelope(
                    name=f"e{j}-{flavor[:4].lower()}",
                    flavor=flavor,
                    selector=selector,
                    concurrency=conc,
                    start=_dt(start),
                    end=_dt(end),
                    gpu_hours=hours,
                    sharing=sharing,  # type: ignore[arg-type]
                    pre_activation=pre,
                    lending=lending,
                )
            )
            total_conc += conc
            payers.setdefault((o.name, flavor), []).append(
                Payer(namespace=o.namespace, budget="quota", envelope=envs[-1].name, owner=o.name)
            )
        caps: list[AggregateCap] = []
        for flavor in FLAVORS:
            members = [e for e in envs if e.flavor == flavor]
            if len(members) >= 2 and rng.random() < 0.4:
                total = sum(e.concurrency for e in members)
                caps.append(
                    AggregateCap(
                        name=f"cap-{flavor[:4].lower()}",
                        flavor=flavor,
                        envelopes=tuple(e.name for e in members),
                        max_concurrency=max(1, round(total * rng.uniform(0.5, 0.9))),
                        gpu_hours=total * 24.0 * 2 if rng.random() < 0.2 else None,
                    )
                )
        budgets.append(
            Budget(
                metadata=ObjectMeta(name="quota", namespace=o.namespace),
                spec=BudgetSpec(
                    owner=o.name,
                    envelopes=tuple(envs),
                    aggregate_caps=tuple(caps),
                    parents=(o.parent,) if o.parent else (),
                ),
            )
        )
    return budgets, payers, total_conc


class _NodePool:
    """Creates 8-GPU nodes on demand per (flavor, region) and hands out unique slots."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self._cur: dict[tuple[str, str], tuple[str, int]] = {}  # -> (node, next free ordinal)
        self._domains = 0
        self._in_domain: dict[tuple[str, str], tuple[int, int]] = {}  # -> (domain, nodes in it)

    def _new_node(self, flavor: str, region: str) -> str:
        dom, used = self._in_domain.get((flavor, region), (-1, NODES_PER_DOMAIN))
        if used >= NODES_PER_DOMAIN:
            dom, used = self._domains, 0
            self._domains += 1
        self._in_domain[(flavor, region)] = (dom, used + 1)
        name = f"n{len(self.nodes):06}"
        labels = {
            "region": region,
            "cluster": f"{region}-c{dom // DOMAINS_PER_CLUSTER}",
            "fabric.domain": f"d{dom:05}",
            "gpu.flavor": flavor,
        }
        self.nodes.append(Node(name=name, gpus=GPUS_PER_NODE, labels=labels))
        return name

    def take(self, flavor: str, region: str, width: int) -> tuple[str, tuple[str, ...]]:
        node, nxt = self._cur.get((flavor, region), ("", GPUS_PER_NODE))
        if nxt + width > GPUS_PER_NODE:
            node, nxt = self._new_node(flavor, region), 0
        self._cur[(flavor, region)] = (node, nxt + width)
        return node, tuple(slot(node, i) for i in range(nxt, nxt + width))


def build_world(n_envelopes: int, n_leases: int, seed: int = 7) -> World:
    rng = random.Random(seed * 1_000_003 + n_envelopes * 7 + n_leases)
    n_owners = max(6, n_envelopes // 5)
    owners = _owners(n_owners, rng)
    runners = [o for o in owners if o.level > 0]

    # Plan runs and lease widths first so envelope concurrency can be sized to the demand.
    plans: list[tuple[Owner, str, str, list[int]]] = []
    remaining = n_leases
    gpus_by_flavor = dict.fromkeys(FLAVORS, 0)
    while remaining > 0:
        k = min(remaining, rng.randint(1, 12))
        flavor = rng.choices(FLAVORS, FLAVOR_SHARE)[0]
        group = rng.choice((1, 2, 4, 8))
        widths = [group if rng.random() < 0.8 else rng.randint(1, 8) for _ in range(k)]
        plans.append((rng.choice(runners), flavor, rng.choice(REGIONS), widths))
        gpus_by_flavor[flavor] += sum(widths)
        remaining -= k
    budgets, payers, total_conc = _budgets(owners, n_envelopes, gpus_by_flavor, rng)
    by_name = {o.name: o for o in owners}

    pool = _NodePool()
    runs: list[Run] = []
    leases: list[Lease] = []
    submit_at: list[int] = []
    for i, (o, flavor, region, widths) in enumerate(plans):
        funding = None
        sponsors: tuple[str, ...] = ()
        if rng.random() < 0.15:
            others = [x.name for x in owners if x.org != o.org]
            sponsors = tuple(rng.sample(others, min(len(others), rng.randint(1, 3))))
            funding = Funding(
                allow_borrow=True,
                sponsors=sponsors,
                max_borrow_gpus=rng.choice([None, 8, 32, 128]),
            )
        run = Run(
            metadata=ObjectMeta(name=f"run-{i:06}", namespace=o.namespace),
            spec=RunSpec(
                resources=Resources(gpu_type=flavor, total_gpus=sum(widths)),
                locality=Locality(group_gpus=max(widths)),
                funding=funding,
            ),
        )
        runs.append(run)
        submit_at.append(T0 + 86_400 + rng.randrange(7 * 86_400 - 1))
        own_payers = payers.get((o.name, flavor)) or (
            payers.get((o.parent, flavor), []) if o.parent else []
        )
        sponsor_payers = [p for s in sponsors for p in payers.get((s, flavor), [])]
        for g, w in enumerate(widths):
            node, slots = pool.take(flavor, region, w)
            if sponsor_payers and rng.random() < 0.3:
                minted: Payer | None = rng.choice(sponsor_payers)
            elif own_payers:
                minted = rng.choice(own_payers)
            else:
                minted = None
            leases.append(
                Lease(
                    id=f"l{len(leases):07}",
                    run=run.key,
                    node=node,
                    slots=slots,
                    role=LeaseRole.SPARE if rng.random() < 0.1 else LeaseRole.ACTIVE,
                    group=g,
                    minted_payer=minted,
                    start=T_LEASE,
                    end=T_LEASE + 86_400 * rng.randint(1, 14) if rng.random() < 0.3 else None,
                )
            )
    del by_name
    events: list[Event] = []
    events.extend(NodeRegistered(at=T0, node=n) for n in pool.nodes)
    events.extend(BudgetApplied(at=T0, budget=b) for b in budgets)
    order = sorted(range(len(runs)), key=lambda i: (submit_at[i], i))
    events.extend(RunSubmitted(at=submit_at[i], run=runs[i]) for i in order)
    events.extend(LeaseMinted(at=T_LEASE, lease=x) for x in leases)
    return World(
        events=events,
        owners=owners,
        runs=runs,
        n_envelopes=sum(len(b.spec.envelopes) for b in budgets),
        n_leases=len(leases),
        n_nodes=len(pool.nodes),
        leased_gpus=sum(x.width for x in leases),
        total_concurrency=total_conc,
    )


def _cover_requests(
    world: World, state: FleetState, ev: Evaluation, n: int, rng: random.Random
) -> list[CoverRequest]:
    """``n`` admissions: 3/4 existing runs growing, 1/4 fresh runs in random team namespaces."""
    nodes_by_flavor: dict[str, list[Node]] = {}
    for node in state.nodes.values():
        nodes_by_flavor.setdefault(node.flavor, []).append(node)
    teams = [o for o in world.owners if o.level > 0]
    reqs: list[CoverRequest] = []
    for i in range(n):
        if rng.random() < 0.75:
            run = rng.choice(world.runs)
            admitted = state.admitted[run.key]
            rf = ev.runs.get(run.key)
            borrowed = rf.borrowed if rf is not None else 0
        else:
            template = rng.choice(world.runs)
            o = rng.choice(teams)
            run = Run(
                metadata=ObjectMeta(name=f"new-{i:04}", namespace=o.namespace),
                spec=template.spec,
            )
            admitted, borrowed = T_LEASE, 0
        node = rng.choice(nodes_by_flavor[run.flavor])
        reqs.append(
            CoverRequest(
                run=run,
                quantity=rng.choice((1, 2, 4, 8, 8, 16, 32, 64)),
                location=location_of(node.labels),
                now=T_LEASE,
                admitted=admitted,
                already_borrowed=borrowed,
            )
        )
    return reqs


@dataclass
class Row:
    envelopes: int
    leases: int
    nodes: int
    gpus: int
    fold_s: float
    index_s: float
    inputs_s: float
    eval_s: float
    eval_first_s: float
    eval_budget_change_s: float
    instant_s: float
    eval_reps: int
    cover_p50_s: float
    cover_p95_s: float
    cover_ok: int
    cover_calls: int
    funded_share: float
    unfunded_share: float
    borrowed_share: float


def measure(n_envelopes: int, n_leases: int, *, cover_calls: int, eval_budget_s: float) -> Row:
    world = build_world(n_envelopes, n_leases)
    gc.collect()
    fold_times = repeat_adaptive(lambda: fold_all(world.events), budget_s=3.0, max_reps=5)
    state = fold_all(world.events)
    index_s, _ = timed(lambda: build_index(state.budgets.values()))
    state.index  # noqa: B018 - build and cache the index the engine would hold
    inputs_s, inputs = timed(state.funding_inputs)
    assert isinstance(inputs, FundingInputs)
    meter = state.meter
    at = float(state.clock)
    assert meter.t == at, "the fold must not have advanced the meter past the clock"

    ev_times = repeat_adaptive(lambda: evaluate(meter, inputs, at), budget_s=eval_budget_s)
    ev = evaluate(meter, inputs, at)

    hours = meter.hours_view(inputs.index, inputs.period_hours)
    reqs = _cover_requests(world, state, ev, cover_calls, random.Random(n_envelopes + n_leases))
    cover_times: list[float] = []
    ok = 0
    for req in reqs:
        t, res = timed(
            lambda req=req: cover(  # type: ignore[misc]
                inputs.index,
                ev,
                req,
                remaining_hours=hours.remaining_envelope,
                remaining_cap_hours=hours.remaining_cap,
                period_hours=inputs.period_hours,
            )
        )
        cover_times.append(t)
        ok += not isinstance(res, CoverFailure)
    changed = _after_budget_change(state, at)
    instant = median(_instants(state))

    widths = {x.id: x.width for x in inputs.leases}
    total = sum(widths.values()) or 1
    by_cls: dict[str, int] = {}
    for lid, cls in ev.fill.funding_class.items():
        by_cls[cls.value] = by_cls.get(cls.value, 0) + widths[lid]
    return Row(
        envelopes=world.n_envelopes,
        leases=world.n_leases,
        nodes=world.n_nodes,
        gpus=world.leased_gpus,
        fold_s=median(fold_times),
        index_s=index_s,
        inputs_s=inputs_s,
        eval_s=median(ev_times[1:] or ev_times),
        eval_first_s=ev_times[0],
        eval_budget_change_s=changed,
        instant_s=instant,
        eval_reps=len(ev_times),
        cover_p50_s=median(cover_times),
        cover_p95_s=pct(cover_times, 95),
        cover_ok=ok,
        cover_calls=len(reqs),
        funded_share=1 - by_cls.get("unfunded", 0) / total,
        unfunded_share=by_cls.get("unfunded", 0) / total,
        borrowed_share=by_cls.get("borrowed", 0) / total,
    )


def _after_budget_change(state: FleetState, at: float) -> float:
    """Seconds of the first evaluation after one Budget is applied again, unchanged (the state
    is left with that Budget, as it was)."""
    budget = state.budgets[min(state.budgets)]
    fold(state, BudgetApplied(at=state.clock, budget=budget))
    state.index  # noqa: B018 - built before the clock starts, as ``build_index`` is timed apart
    inputs = state.funding_inputs()
    seconds, _ = timed(lambda: evaluate(state.meter, inputs, at))
    return seconds


def _instants(state: FleetState, count: int = 6) -> list[float]:
    """Seconds of each of ``count`` instants a second apart, the first left out (nothing is
    known before it): the clock moved by an event that changes nobody's funding (an ETA
    report), which charges the meter, then the evaluation a decision there reads.  A few
    envelopes set GPU-hours, so the matching depends on the meter."""
    run_key = min(state.runs)
    out: list[float] = []
    for _ in range(count):
        at = state.clock + 1
        event = RunEtaReported(at=at, run=run_key, eta=at + 3600)

        def step(event: RunEtaReported = event) -> Evaluation:
            fold(state, event)
            return state.evaluation(float(event.at))

        out.append(timed(step)[0])
    return out[1:]


def _goal(row: Row) -> str:
    out = []
    if row.leases >= 10_000 and row.leases < 100_000 and row.envelopes >= 500:
        out.append(f"cover<5ms: {'yes' if row.cover_p50_s < COVER_GOAL_S else 'NO'}")
    if row.leases >= 100_000:
        out.append(f"eval<1s: {'yes' if row.eval_s < EVAL_GOAL_S else 'NO'}")
        ratio_ok = row.eval_s <= EVAL_GOAL_X * row.fold_s
        out.append(f"eval<={EVAL_GOAL_X}x fold: {'yes' if ratio_ok else 'NO'}")
    return "; ".join(out) or "-"


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}" if s >= 0.01 else f"{s * 1e3:.2f}"


def report(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| envelopes | open leases | GPUs leased | nodes | fold ms (baseline) "
        "| evaluation ms (x fold) | first evaluation ms (x fold) "
        "| after a budget change ms (x fold) | per instant ms (x fold) | cover p50 ms (x fold) "
        "| cover p95 ms | goal |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.envelopes} | {r.leases} | {r.gpus} | {r.nodes} | {_ms(r.fold_s)} "
            f"| {_ms(r.eval_s)} ({r.eval_s / r.fold_s:.2f}x, n={r.eval_reps}) "
            f"| {_ms(r.eval_first_s)} ({r.eval_first_s / r.fold_s:.2f}x) "
            f"| {_ms(r.eval_budget_change_s)} ({r.eval_budget_change_s / r.fold_s:.2f}x) "
            f"| {_ms(r.instant_s)} ({r.instant_s / r.fold_s:.3f}x) "
            f"| {_ms(r.cover_p50_s)} ({r.cover_p50_s / r.fold_s:.4f}x) "
            f"| {_ms(r.cover_p95_s)} | {_goal(r)} |"
        )
    lines += [
        "",
        "| envelopes | open leases | build_index ms | funding_inputs ms "
        "| funded GPUs | borrowed GPUs | unfunded GPUs | cover plans / calls |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.envelopes} | {r.leases} | {_ms(r.index_s)} | {_ms(r.inputs_s)} "
            f"| {r.funded_share:.0%} | {r.borrowed_share:.0%} | {r.unfunded_share:.0%} "
            f"| {r.cover_ok}/{r.cover_calls} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only 1k/10k leases (< 60 s)")
    ap.add_argument("--cover-calls", type=int, default=200)
    ap.add_argument("--eval-budget", type=float, default=10.0, help="seconds per size")
    args = ap.parse_args(argv)
    sizes: list[tuple[int, int]] = [(100, 1_000), (1_000, 1_000), (100, 10_000), (500, 10_000)]
    if args.quick:
        budget = min(args.eval_budget, 3.0)
    else:
        sizes += [(1_000, 10_000), (100, 100_000), (1_000, 100_000)]
        budget = args.eval_budget
    print(f"# bench/funding.py ({'quick' if args.quick else 'full'})")
    print(f"machine: {machine_line()}; load average at start {load_line()}")
    t_all = time.perf_counter()
    rows: list[Row] = []
    for n_env, n_leases in sizes:
        gc.collect()
        t0 = time.perf_counter()
        rows.append(measure(n_env, n_leases, cover_calls=args.cover_calls, eval_budget_s=budget))
        r = rows[-1]
        print(
            f"  {n_env} envelopes x {n_leases} leases: fold {_ms(r.fold_s)} ms, "
            f"evaluation {_ms(r.eval_s)} ms, cover p50 {_ms(r.cover_p50_s)} ms "
            f"({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    print()
    print("\n".join(report(rows)))
    total = time.perf_counter() - t_all
    print(f"\ntotal bench time {total:.1f} s; load average at end {load_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
