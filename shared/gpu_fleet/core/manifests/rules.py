"""The semantic rules of Budgets and Runs (SPEC §A.1/§A.2, plus DESIGN decisions 1-3).

Every message names its rule (``must be >= 1``, ``required``, ``unknown field``, ``duplicate
envelope name 'west' (also at spec.envelopes[0])``): the message is the user's only
documentation at the moment it matters.  The rules run over a structurally clean tree, so each
reads typed values and skips what the walk already reported.
"""

import re
from collections.abc import Callable, Mapping

from gpu_fleet.core.manifests.errors import ErrorList, index_path, join_path
from gpu_fleet.core.manifests.structure import (
    get_float,
    get_int,
    get_list,
    get_map,
    get_str,
    get_time,
)
from gpu_fleet.core.names import quote
from gpu_fleet.core.timeutil import DurationError, parse_duration

# --------------------------------------------------------------------------------------------
# Shared rules
# --------------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL_RULE = (
    "must be a DNS-1123 label (lowercase letters, digits and '-', "
    "starting and ending with a letter or digit)"
)
DNS_SUBDOMAIN_RULE = (
    "must be a DNS-1123 subdomain (lowercase letters, digits, '-' and '.', "
    "each part starting and ending with a letter or digit)"
)
RESERVED_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NNODES", "NODE_RANK")
"""Rendezvous variables gpu-fleet injects into workload containers; users must not set them."""


def check_label(value: str | None, path: str, errs: ErrorList) -> None:
    """Names that end up in pod names and label values must be DNS-1123 labels (1-63)."""
    if value is None:
        return
    if not value:
        errs.add(path, "must not be empty")
    elif len(value) > 63:
        errs.add(path, "must be at most 63 characters (DNS-1123 label)")
    elif not _DNS_LABEL.match(value):
        errs.add(path, DNS_LABEL_RULE)


def check_subdomain(value: str | None, path: str, errs: ErrorList) -> None:
    if value is None:
        return
    if not value:
        errs.add(path, "must not be empty")
    elif len(value) > 253:
        errs.add(path, "must be at most 253 characters (DNS-1123 subdomain)")
    elif not _DNS_SUBDOMAIN.match(value):
        errs.add(path, DNS_SUBDOMAIN_RULE)


def _check_non_empty(value: str | None, path: str, errs: ErrorList) -> None:
    if value is not None and not value.strip():
        errs.add(path, "must not be empty")


def check_min(value: int | float | None, minimum: int, path: str, errs: ErrorList) -> bool:
    """``value >= minimum``; True when the value is set and passes (so dependent rules run)."""
    if value is None:
        return False
    if value < minimum:
        errs.add(path, f"must be >= {minimum}")
        return False
    return True


def _check_positive(value: int | float | None, path: str, errs: ErrorList) -> None:
    if value is not None and value <= 0:
        errs.add(path, "must be > 0")


def check_duration(value: str | None, path: str, errs: ErrorList) -> int | None:
    """Seconds of a Go-style duration, or None (with an error when the text is not one)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except DurationError as exc:
        errs.add(path, str(exc))
        return None


def check_unique_strings(
    items: list[object] | None,
    path: str,
    what: str,
    errs: ErrorList,
    extra: Callable[[str, str], None] | None = None,
) -> None:
    """Each entry non-empty and unique; ``extra(value, path)`` adds list-specific rules."""
    seen: dict[str, str] = {}
    for i, item in enumerate(items or ()):
        ipath = index_path(path, i)
        if not isinstance(item, str):
            continue
        if not item.strip():
            errs.add(ipath, "must not be empty")
            continue
        if item in seen:
            errs.add(ipath, f"duplicate {what} {quote(item)} (also at {seen[item]})")
            continue
        seen[item] = ipath
        if extra is not None:
            extra(item, ipath)


def check_metadata(meta: dict[str, object] | None, path: str, errs: ErrorList, kind: str) -> None:
    """Run names become pod and lease names, hence labels; Budgets are plain object names."""
    if meta is None:
        return
    # A channel's name is also a NATS subject token and a consumer name: a label, like a Run's.
    check_name = check_label if kind in ("Run", "NotificationChannel") else check_subdomain
    check_name(get_str(meta, "name"), join_path(path, "name"), errs)
    namespace = get_str(meta, "namespace")
    if namespace == "":
        meta["namespace"] = "default"  # one namespaced-key rule: empty means default
    else:
        check_label(namespace, join_path(path, "namespace"), errs)


# --------------------------------------------------------------------------------------------
# Budget rules (SPEC §A.1, DESIGN decision 1)
# --------------------------------------------------------------------------------------------


def _check_envelope(env: dict[str, object], path: str, errs: ErrorList) -> None:
    _check_non_empty(get_str(env, "name"), join_path(path, "name"), errs)
    _check_non_empty(get_str(env, "flavor"), join_path(path, "flavor"), errs)
    selector = get_map(env, "selector")
    if selector is not None and not selector:
        errs.add(join_path(path, "selector"), "must have at least 1 entry")
    _check_positive(get_int(env, "concurrency"), join_path(path, "concurrency"), errs)
    # start/end are optional in the Struct only so legacy objects can be represented; a manifest
    # must bound its window (INV-WINDOW-REQUIRED).  Absent keys hold the default None here; keys
    # whose value failed its type check are absent and already reported.
    for bound in ("start", "end"):
        if bound in env and env[bound] is None:
            errs.add(join_path(path, bound), "required")
    start, end = get_time(env, "start"), get_time(env, "end")
    if start is not None and end is not None and end <= start:
        errs.add(join_path(path, "end"), "must be after start")
    _check_positive(get_float(env, "gpuHours"), join_path(path, "gpuHours"), errs)
    lending = get_map(env, "lending")
    if lending is not None and lending.get("allow") is True:
        max_conc = get_int(lending, "maxConcurrency")
        _check_positive(max_conc, join_path(join_path(path, "lending"), "maxConcurrency"), errs)


def _check_cap(
    cap: dict[str, object],
    path: str,
    errs: ErrorList,
    declared: Mapping[str, str | None] | None,
) -> None:
    """``declared`` maps envelope names to flavors; None when an envelope was unreadable, in
    which case "no such envelope" would be a guess and is not reported."""
    _check_non_empty(get_str(cap, "flavor"), join_path(path, "flavor"), errs)
    flavor = get_str(cap, "flavor")
    members = get_list(cap, "envelopes")
    mpath = join_path(path, "envelopes")
    if members is not None and not members:
        errs.add(mpath, "must have at least 1 item")

    def member_rules(name: str, ipath: str) -> None:
        if declared is None:
            return
        if name not in declared:
            errs.add(ipath, f"unknown envelope {quote(name)}: must name an envelope of this budget")
            return
        env_flavor = declared[name]
        if flavor and env_flavor is not None and env_flavor != flavor:
            errs.add(
                ipath,
                f"envelope {quote(name)} has flavor {quote(env_flavor)}: "
                f"must match the cap's flavor {quote(flavor)}",
            )

    check_unique_strings(members, mpath, "envelope", errs, member_rules)
    _check_positive(get_int(cap, "maxConcurrency"), join_path(path, "maxConcurrency"), errs)
    _check_positive(get_float(cap, "gpuHours"), join_path(path, "gpuHours"), errs)
    if (
        "maxConcurrency" in cap
        and "gpuHours" in cap
        and cap["maxConcurrency"] is None
        and cap["gpuHours"] is None
    ):
        errs.add(path, "must set maxConcurrency or gpuHours (a cap must bound something)")


def check_budget_spec(spec: dict[str, object], path: str, errs: ErrorList) -> None:
    owner = get_str(spec, "owner")
    _check_non_empty(owner, join_path(path, "owner"), errs)

    envelopes = get_list(spec, "envelopes")
    epath = join_path(path, "envelopes")
    if envelopes is not None and not envelopes:
        errs.add(epath, "must have at least 1 item")
    declared: dict[str, str | None] | None = {} if envelopes is not None else None
    seen: dict[str, str] = {}
    for i, env in enumerate(envelopes or ()):
        ipath = index_path(epath, i)
        if not isinstance(env, dict):
            declared = None
            continue
        _check_envelope(env, ipath, errs)
        name = get_str(env, "name")
        if name is None:
            declared = None
        elif name.strip():
            if name in seen:
                errs.add(
                    join_path(ipath, "name"),
                    f"duplicate envelope name {quote(name)} (also at {seen[name]})",
                )
            else:
                seen[name] = ipath
                if declared is not None:
                    declared[name] = get_str(env, "flavor")

    caps = get_list(spec, "aggregateCaps")
    cpath = join_path(path, "aggregateCaps")
    cap_seen: dict[str, str] = {}
    for j, cap in enumerate(caps or ()):
        jpath = index_path(cpath, j)
        if not isinstance(cap, dict):
            continue
        _check_cap(cap, jpath, errs, declared)
        name = get_str(cap, "name")
        _check_non_empty(name, join_path(jpath, "name"), errs)
        if name and name.strip():
            if name in cap_seen:
                errs.add(
                    join_path(jpath, "name"),
                    f"duplicate aggregate cap name {quote(name)} (also at {cap_seen[name]})",
                )
            else:
                cap_seen[name] = jpath

    def parent_rules(parent: str, ipath: str) -> None:
        if owner is not None and parent == owner:
            errs.add(ipath, f"must not be the budget's own owner {quote(owner)}")

    ppath = join_path(path, "parents")
    check_unique_strings(get_list(spec, "parents"), ppath, "parent", errs, parent_rules)

    renew = get_map(spec, "autoRenew")
    if renew is not None:
        rpath = join_path(path, "autoRenew")
        period = check_duration(get_str(renew, "period"), join_path(rpath, "period"), errs)
        _check_positive(period, join_path(rpath, "period"), errs)
        check_duration(get_str(renew, "notifyBefore"), join_path(rpath, "notifyBefore"), errs)


# --------------------------------------------------------------------------------------------
# Run rules (SPEC §A.2, DESIGN decisions 2-3)
# --------------------------------------------------------------------------------------------


def _check_malleable(
    m: dict[str, object], total: int | None, path: str, rpath: str, errs: ErrorList
) -> None:
    """The width ladder: ``min, min+step, ... <= max``; total and desired must sit on it.

    ``rpath`` is the path of ``spec.resources`` (where totalGPUs errors belong).  Relations are
    checked only between values that are themselves valid, so one mistake gives one message.
    """
    lo, hi, step = (get_int(m, k) for k in ("minTotalGPUs", "maxTotalGPUs", "stepGPUs"))
    ok_lo = check_min(lo, 1, join_path(path, "minTotalGPUs"), errs)
    ok_hi = check_min(hi, 1, join_path(path, "maxTotalGPUs"), errs)
    ok_step = check_min(step, 1, join_path(path, "stepGPUs"), errs)
    if not (ok_lo and ok_hi and ok_step):
        return
    assert lo is not None
    assert hi is not None
    assert step is not None
    if lo > hi:
        errs.add(join_path(path, "minTotalGPUs"), f"must be <= maxTotalGPUs ({hi})")
        return

    def on_ladder(value: int, vpath: str, name: str) -> None:
        if value < lo:
            errs.add(vpath, f"must be >= minTotalGPUs ({lo})")
        elif value > hi:
            errs.add(vpath, f"must be <= maxTotalGPUs ({hi})")
        elif (value - lo) % step:
            errs.add(
                vpath,
                f"must be minTotalGPUs plus a multiple of stepGPUs "
                f"({name} - minTotalGPUs = {value - lo}, stepGPUs = {step})",
            )

    if total is not None and total >= 1:
        on_ladder(total, join_path(rpath, "totalGPUs"), "totalGPUs")
    desired = get_int(m, "desiredTotalGPUs")
    dpath = join_path(path, "desiredTotalGPUs")
    if desired is None:
        if "desiredTotalGPUs" not in m:
            return  # present but ill-typed: already reported
        # SPEC: the persisted default is the maximum, so the maximum must then be on the ladder.
        # Say so at maxTotalGPUs: the user never wrote a desiredTotalGPUs to blame.
        if (hi - lo) % step:
            errs.add(
                join_path(path, "maxTotalGPUs"),
                f"must be minTotalGPUs plus a multiple of stepGPUs when desiredTotalGPUs is unset "
                f"(it defaults to maxTotalGPUs; maxTotalGPUs - minTotalGPUs = {hi - lo}, "
                f"stepGPUs = {step})",
            )
        m["desiredTotalGPUs"] = hi
    elif check_min(desired, 1, dpath, errs):
        on_ladder(desired, dpath, "desiredTotalGPUs")


def _check_template(template: dict[str, object], path: str, errs: ErrorList) -> None:
    """Light checks on the schemaless pod template: only what gpu-fleet itself must own."""
    pod = get_map(template, "spec")
    if pod is None:
        return
    spath = join_path(path, "spec")
    owned = {
        "nodeName": "must not be set (gpu-fleet places the pods)",
        "schedulerName": "must not be set (gpu-fleet schedules the pods)",
        "restartPolicy": "must not be set (gpu-fleet handles restarts)",
    }
    for key, message in owned.items():
        if key in pod:
            errs.add(join_path(spath, key), message)
    containers = get_list(pod, "containers")
    for ci, container in enumerate(containers or ()):
        if not isinstance(container, dict):
            continue
        env = get_list(container, "env")
        for ei, var in enumerate(env or ()):
            if isinstance(var, dict) and var.get("name") in RESERVED_ENV:
                errs.add(
                    join_path(
                        index_path(
                            join_path(index_path(join_path(spath, "containers"), ci), "env"), ei
                        ),
                        "name",
                    ),
                    f"must not set {var['name']} (gpu-fleet injects it)",
                )


def _check_role(role: dict[str, object], total: int | None, path: str, errs: ErrorList) -> None:
    check_label(get_str(role, "name"), join_path(path, "name"), errs)
    width, per_pod = get_int(role, "width"), get_int(role, "gpusPerPod")
    ok_width = check_min(width, 1, join_path(path, "width"), errs)
    ok_per_pod = check_min(per_pod, 1, join_path(path, "gpusPerPod"), errs)
    if ok_width and ok_per_pod and total is not None and total >= 1:
        assert width is not None
        assert per_pod is not None
        if width * per_pod != total:
            errs.add(
                path,
                f"width × gpusPerPod ({width} × {per_pod} = {width * per_pod}) "
                f"must equal totalGPUs ({total})",
            )
    check_min(get_int(role, "groupGPUs"), 1, join_path(path, "groupGPUs"), errs)
    check_min(get_int(role, "spares"), 0, join_path(path, "spares"), errs)
    policy = get_str(role, "failurePolicy")
    retries = get_int(role, "retries")
    rpath = join_path(path, "retries")
    if policy == "Retry":
        if "retries" in role and role["retries"] is None:
            errs.add(rpath, "required when failurePolicy is Retry")
        else:
            check_min(retries, 1, rpath, errs)
    elif policy is not None and role.get("retries") is not None:
        errs.add(rpath, "must not be set unless failurePolicy is Retry")
    check_duration(get_str(role, "backoff"), join_path(path, "backoff"), errs)
    template = get_map(role, "template")
    if template is not None:
        _check_template(template, join_path(path, "template"), errs)


def check_run_spec(
    spec: dict[str, object], run_name: str | None, path: str, errs: ErrorList
) -> None:
    resources = get_map(spec, "resources")
    rpath = join_path(path, "resources")
    total: int | None = None
    if resources is not None:
        _check_non_empty(get_str(resources, "gpuType"), join_path(rpath, "gpuType"), errs)
        total = get_int(resources, "totalGPUs")
        check_min(total, 1, join_path(rpath, "totalGPUs"), errs)

    locality = get_map(spec, "locality")
    if locality is not None:
        lpath = join_path(path, "locality")
        check_min(get_int(locality, "groupGPUs"), 1, join_path(lpath, "groupGPUs"), errs)

    malleable = get_map(spec, "malleable")
    if malleable is not None:
        _check_malleable(malleable, total, join_path(path, "malleable"), rpath, errs)

    check_min(get_int(spec, "sparesPerGroup"), 0, join_path(path, "sparesPerGroup"), errs)

    funding = get_map(spec, "funding")
    if funding is not None:
        fpath = join_path(path, "funding")
        if funding.get("allowBorrow") is True:
            max_borrow = get_int(funding, "maxBorrowGPUs")
            _check_positive(max_borrow, join_path(fpath, "maxBorrowGPUs"), errs)
        sponsors = get_list(funding, "sponsors")
        check_unique_strings(sponsors, join_path(fpath, "sponsors"), "sponsor", errs)

    follow = get_map(spec, "follow")
    if follow is not None:
        _check_follow(follow, run_name, join_path(path, "follow"), errs)

    runtime = get_map(spec, "runtime")
    if runtime is not None:
        tpath = join_path(path, "runtime")
        check_duration(get_str(runtime, "checkpoint"), join_path(tpath, "checkpoint"), errs)
        max_duration = get_str(runtime, "maxDuration")
        seconds = check_duration(max_duration, join_path(tpath, "maxDuration"), errs)
        _check_positive(seconds, join_path(tpath, "maxDuration"), errs)
        check_duration(
            get_str(runtime, "preemptionGrace"), join_path(tpath, "preemptionGrace"), errs
        )

    roles = get_list(spec, "roles")
    opath = join_path(path, "roles")
    if roles is not None and len(roles) > 1:
        errs.add(opath, f"must have at most 1 item (v1 runs have one role), got {len(roles)}")
    for i, role in enumerate(roles or ()):
        if isinstance(role, dict):
            _check_role(role, total, index_path(opath, i), errs)


def _check_follow(
    follow: dict[str, object], run_name: str | None, path: str, errs: ErrorList
) -> None:
    after = get_list(follow, "after")
    apath = join_path(path, "after")
    if after is not None and not after:
        errs.add(apath, "must have at least 1 item")

    def upstream_rules(name: str, ipath: str) -> None:
        if run_name is not None and name == run_name:
            errs.add(ipath, f"must not name the run itself ({quote(name)})")
        else:
            check_label(name, ipath, errs)

    check_unique_strings(after, apath, "run", errs, upstream_rules)
    if follow.get("onUpstreamFailure") == "":
        follow["onUpstreamFailure"] = "wait"  # SPEC: "" means the default, wait
    grace = get_str(follow, "upstreamFailureGrace")
    check_duration(grace, join_path(path, "upstreamFailureGrace"), errs)
