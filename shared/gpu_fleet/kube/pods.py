"""The pods (and headless Service) a run's open leases call for, per SPEC §A.7.  Pure.

A lease holds slots on one node for one group and role; it becomes ``width / gpusPerPod`` pods
of ``gpusPerPod`` GPUs on that node (spares: placeholder pods holding the spare GPUs).  Names are
numbered in the ledger's mint order over the run's whole history, so a name never moves to
another lease: the first gang of a run is ``<run>-active-0 .. <run>-active-<w-1>`` exactly as
SPEC §A.7 says, elastic cohort ``c`` pods are ``<run>-c<c>-active-<i>``, spares
``<run>-spare-<i>``, and a re-admitted gang continues the count.  A spare swap (node failure)
mints a ``Swap`` lease on the spare's slots; its pods are ``<run>-g<group>-swap-<unixnano>``,
pinned to the swap node by a required node affinity, and each takes the hostname and rank of a
pod of the lease it replaces.  Rendezvous env (when the gang has more than one pod) names rank
0 of the *current* gang, ranks ordered by the members' original ordinals.

Under ``failurePolicy: Retry`` each pod carries the attempt it belongs to (annotation
``.../attempt``, 0 for the first run); a retry replaces every active pod of the gang with one of
the new attempt, and while the retry's backoff runs the gang has no active pod at all.

Leases under a preemption notice get no pod (their pod is being stopped with the notice's
grace), so an eviction is never "recovered" by re-creating the pod being preempted.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpu_fleet.core.model import API_VERSION, GROUP, Lease, LeaseRole, MintReason, Role, Run
from gpu_fleet.kube.objects import (
    A_ATTEMPT,
    A_COHORT,
    A_EXPECTED_WIDTH,
    A_FLAVOR,
    A_GPUS,
    A_LEASE,
    A_LEASE_REASON,
    A_NODE,
    A_REPLACES,
    A_RUN_NONCE,
    A_SLOTS,
    A_SWAP_NODE,
    GPU_RESOURCE,
    L_GROUP,
    L_ROLE,
    L_RUN,
    MANAGED_BY,
    MANAGER_NAME,
    SCHEDULER_NAME,
    Obj,
    name_of,
    uid_of,
)

RENDEZVOUS_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NNODES", "NODE_RANK")


@dataclass(frozen=True)
class PodSettings:
    placeholder_image: str = "registry.k8s.io/pause:3.10"  # spare pods hold GPUs, do nothing
    trivial_image: str = "busybox:1.36"  # role-less runs: a placeholder that succeeds
    master_port: int = 29500


@dataclass(frozen=True)
class PodIntent:
    """One pod the ledger calls for: where it must be bound and the manifest to create."""

    name: str
    namespace: str
    node: str
    lease: str
    role: LeaseRole
    gpus: int
    body: Obj
    attempt: int = 0


@dataclass(frozen=True)
class _Member:
    name: str
    lease: Lease
    gpus: int
    ordinal: int
    hostname: str  # its own name, or, for a swap pod, the replaced member's
    order: tuple[int, int]  # (cohort, ordinal of the member it is): rank order in the gang
    replaces: str = ""  # swap pods: the name of the member they replace


def _replaced(swap: Lease, earlier: list[Lease], used: set[str]) -> Lease | None:
    """The lease a swap lease replaces: an active lease of the same group and cohort that
    closed ``NodeFailure`` at the instant the swap was minted (the first such, in mint order)."""
    for x in earlier:
        if (
            x.id not in used
            and x.role is LeaseRole.ACTIVE
            and x.group == swap.group
            and x.cohort == swap.cohort
            and x.closure_reason == "NodeFailure"
            and x.closed_at == swap.start
        ):
            used.add(x.id)
            return x
    return None


def _members(run: Run, leases: Iterable[Lease]) -> list[_Member]:
    """Every pod the run's leases ever called for, in mint order, with stable names.

    A swap lease's pods are named ``<run>-g<group>-swap-<unix nanoseconds of the swap>`` (+k for
    its k-th pod) and take over, one by one, the hostname and rank of the pods of the lease it
    replaces, so the gang's DNS names and ranks (``MASTER_ADDR``, ``NODE_RANK``) stay as they
    were when a spare steps in."""
    gpp = run.spec.roles[0].gpus_per_pod if run.spec.roles else 1
    counters: dict[tuple[LeaseRole, int], int] = {}
    out: list[_Member] = []
    base = run.metadata.name
    seen: list[Lease] = []
    used: set[str] = set()
    by_lease: dict[str, list[_Member]] = {}
    for lease in leases:
        role = lease.role
        cohort = lease.cohort if role is LeaseRole.ACTIVE else 0
        sizes = [gpp] * (lease.width // gpp)
        if lease.width % gpp:
            sizes.append(lease.width % gpp)  # packing did not respect gpusPerPod: one odd pod
        old = (
            _replaced(lease, seen, used)
            if role is LeaseRole.ACTIVE and lease.reason is MintReason.SWAP
            else None
        )
        heirs = by_lease.get(old.id, []) if old is not None else []
        mine: list[_Member] = []
        for k, gpus in enumerate(sizes):
            if old is not None and k < len(heirs):
                h = heirs[k]
                name = f"{base}-g{lease.group}-swap-{lease.start * 10**9 + k}"
                mine.append(_Member(name, lease, gpus, h.ordinal, h.hostname, h.order, h.name))
                continue
            i = counters.get((role, cohort), 0)
            counters[(role, cohort)] = i + 1
            if role is LeaseRole.SPARE:
                name = f"{base}-spare-{i}"
            elif cohort:
                name = f"{base}-c{cohort}-active-{i}"
            else:
                name = f"{base}-active-{i}"
            mine.append(_Member(name, lease, gpus, i, name, (cohort, i)))
        by_lease[lease.id] = mine
        out.extend(mine)
        seen.append(lease)
    return out


def _gpu_container(containers: list[Obj]) -> Obj:
    return next((c for c in containers if c.get("name") == "workload"), containers[0])


def _template(run: Run, role: LeaseRole, settings: PodSettings) -> tuple[Obj, Obj]:
    """(template metadata, template spec) for a member of ``role``."""
    roles: tuple[Role, ...] = run.spec.roles
    if role is LeaseRole.ACTIVE and roles:
        tpl = copy.deepcopy(dict(roles[0].template))
        raw_meta, raw_spec = tpl.get("metadata"), tpl.get("spec")
        meta: Obj = raw_meta if isinstance(raw_meta, dict) else {}
        spec: Obj = raw_spec if isinstance(raw_spec, dict) else {}
        if spec.get("containers"):
            return dict(meta), dict(spec)
    if role is LeaseRole.SPARE:
        return {}, {"containers": [{"name": "workload", "image": settings.placeholder_image}]}
    return {}, {
        "containers": [{"name": "workload", "image": settings.trivial_image, "command": ["true"]}]
    }


def run_pods(
    run: Run,
    *,
    run_obj: Obj,
    leases: Iterable[Lease],
    open_ids: Mapping[str, Lease],
    noticed: Iterable[str],
    settings: PodSettings,
    attempt: int = 0,
    backoff: bool = False,
) -> list[PodIntent]:
    """The pods for the run's open leases (``leases``: all of them, in mint order);
    ``attempt``: the current retry attempt; ``backoff``: a retry waits (no active pods)."""
    noticed_ids = set(noticed)
    members = _members(run, leases)
    live = [
        m
        for m in members
        if m.lease.id in open_ids
        and m.lease.id not in noticed_ids
        and not (backoff and m.lease.role is LeaseRole.ACTIVE)
    ]
    gang = sorted((m for m in live if m.lease.role is LeaseRole.ACTIVE), key=lambda m: m.order)
    ns, run_name = run.metadata.namespace, run.metadata.name
    rank0 = gang[0].hostname if gang else ""
    world = sum(m.gpus for m in gang)
    owner = {
        "apiVersion": API_VERSION,
        "kind": "Run",
        "name": name_of(run_obj),
        "uid": uid_of(run_obj),
        "controller": True,
        "blockOwnerDeletion": True,
    }
    out: list[PodIntent] = []
    for m in live:
        lease = m.lease
        tmeta, spec = _template(run, lease.role, settings)
        labels = {
            **(tmeta.get("labels") or {}),
            L_RUN: run_name,
            L_ROLE: lease.role.value,
            L_GROUP: str(lease.group),
            MANAGED_BY: MANAGER_NAME,
        }
        annotations = {
            **(tmeta.get("annotations") or {}),
            A_GPUS: str(m.gpus),
            A_EXPECTED_WIDTH: str(len(gang) if lease.role is LeaseRole.ACTIVE else 0),
            A_LEASE_REASON: lease.reason.value,
            A_FLAVOR: run.flavor,
            A_RUN_NONCE: uid_of(run_obj)[:12],
            A_LEASE: lease.id,
            A_SLOTS: ",".join(lease.slots),
            A_NODE: lease.node,
        }
        if lease.cohort:
            annotations[A_COHORT] = str(lease.cohort)
        if lease.role is LeaseRole.ACTIVE:
            annotations[A_ATTEMPT] = str(attempt)
        if m.replaces:
            annotations[A_SWAP_NODE] = lease.node
            annotations[A_REPLACES] = m.replaces
        if lease.reason in (MintReason.SWAP, MintReason.PROMISE) and lease.minted_payer:
            payer = lease.minted_payer
            annotations[f"{GROUP}/payer-owner"] = payer.owner
            annotations[f"{GROUP}/payer-namespace"] = payer.namespace
            annotations[f"{GROUP}/payer-budget"] = payer.budget
            annotations[f"{GROUP}/payer-envelope"] = payer.envelope
        containers = [dict(c) for c in spec.get("containers") or []]
        target = _gpu_container(containers)
        resources = dict(target.get("resources") or {})
        resources["requests"] = {**(resources.get("requests") or {}), GPU_RESOURCE: str(m.gpus)}
        resources["limits"] = {**(resources.get("limits") or {}), GPU_RESOURCE: str(m.gpus)}
        target["resources"] = resources
        if lease.role is LeaseRole.ACTIVE and len(gang) > 1:
            rank = next(i for i, g in enumerate(gang) if g.name == m.name)
            env = [e for e in target.get("env") or [] if e.get("name") not in RENDEZVOUS_ENV]
            env += [
                {"name": "MASTER_ADDR", "value": f"{rank0}.{run_name}.{ns}.svc"},
                {"name": "MASTER_PORT", "value": str(settings.master_port)},
                {"name": "WORLD_SIZE", "value": str(world)},
                {"name": "NNODES", "value": str(len(gang))},
                {"name": "NODE_RANK", "value": str(rank)},
            ]
            target["env"] = env
        pod_spec: dict[str, Any] = {
            **spec,
            "containers": containers,
            "schedulerName": SCHEDULER_NAME,
            "restartPolicy": "Never",
            "hostname": m.hostname,
            "subdomain": run_name,
        }
        pod_spec.pop("nodeName", None)
        if m.replaces:  # SPEC §A.7: a swap pod is pinned to the swap node (required affinity)
            affinity = dict(pod_spec.get("affinity") or {})
            affinity["nodeAffinity"] = {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [lease.node]}
                            ]
                        }
                    ]
                }
            }
            pod_spec["affinity"] = affinity
        body: Obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": m.name,
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [owner],
            },
            "spec": pod_spec,
        }
        out.append(PodIntent(m.name, ns, lease.node, lease.id, lease.role, m.gpus, body, attempt))
    return out


def headless_service(run: Run, run_obj: Obj) -> Obj:
    """The Service that gives gang members stable DNS names (``<pod>.<run>.<ns>.svc``)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": run.metadata.name,
            "namespace": run.metadata.namespace,
            "labels": {L_RUN: run.metadata.name, MANAGED_BY: MANAGER_NAME},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Run",
                    "name": name_of(run_obj),
                    "uid": uid_of(run_obj),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "clusterIP": "None",
            "selector": {L_RUN: run.metadata.name, L_ROLE: LeaseRole.ACTIVE.value},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": 29500}],
        },
    }
