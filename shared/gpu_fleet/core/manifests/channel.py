"""The rules of a NotificationChannel: where a team's notices go, which ones, signed how.

A channel is validated like every manifest (all errors at once, each with its field path) before
the ledger records it.  Two rules matter beyond shape:

* a webhook must be signed, so ``secretRef`` is required with ``target.webhook``; the reference
  names exactly one place (a Secret, a file or an environment variable), and only the reference
  is recorded - the secret's value never reaches the ledger;
* a webhook URL must not carry credentials (``user:password@``), for the same reason.

Filters name events from ``model.NOTIFICATION_EVENTS`` (a typo would silently match nothing),
and lead times are positive durations, unique, at most ``MAX_LEAD_TIMES`` of them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from gpu_fleet.core.manifests.errors import ErrorList, index_path, join_path
from gpu_fleet.core.manifests.rules import (
    check_duration,
    check_label,
    check_subdomain,
    check_unique_strings,
)
from gpu_fleet.core.manifests.structure import get_list, get_map, get_str
from gpu_fleet.core.model import NOTIFICATION_EVENTS

MAX_URL_LENGTH = 2048
MAX_LEAD_TIMES = 8
MAX_LEAD_SECONDS = 30 * 86400  # a month: warnings further ahead would be noise, not notice
MAX_FILTER_ITEMS = 64


def check_channel_spec(spec: dict[str, object], path: str, errs: ErrorList) -> None:
    target = get_map(spec, "target")
    tpath = join_path(path, "target")
    webhook = None
    if target is not None:
        webhook = get_str(target, "webhook")
        nats = target.get("nats")
        if webhook is None and nats is not True:
            errs.add(tpath, "must set webhook (an http or https URL) or nats: true")
        elif webhook is not None and nats is True:
            errs.add(tpath, "must set only one of webhook and nats")
        if nats is False and webhook is None:
            errs.add(join_path(tpath, "nats"), "must be true when set (omit it for a webhook)")
        if webhook is not None:
            _check_url(webhook, join_path(tpath, "webhook"), errs)

    secret = get_map(spec, "secretRef")
    spath = join_path(path, "secretRef")
    if secret is not None:
        _check_secret_ref(secret, spath, errs)
    elif webhook is not None:
        errs.add(spath, "required with target.webhook: every webhook is signed")

    filt = get_map(spec, "filter")
    if filt is not None:
        fpath = join_path(path, "filter")
        events = get_list(filt, "events")
        epath = join_path(fpath, "events")
        _check_size(events, epath, MAX_FILTER_ITEMS, errs)
        check_unique_strings(
            events, epath, "event", errs, lambda name, ipath: _known_event(name, ipath, errs)
        )
        runs = get_list(filt, "runs")
        rpath = join_path(fpath, "runs")
        _check_size(runs, rpath, MAX_FILTER_ITEMS, errs)
        check_unique_strings(
            runs, rpath, "run", errs, lambda name, ipath: _run_ref(name, ipath, errs)
        )

    leads = get_list(spec, "leadTimes")
    lpath = join_path(path, "leadTimes")
    _check_size(leads, lpath, MAX_LEAD_TIMES, errs)
    seen: dict[int, str] = {}
    for i, item in enumerate(leads or ()):
        ipath = index_path(lpath, i)
        if not isinstance(item, str):
            continue
        seconds = check_duration(item, ipath, errs)
        if seconds is None:
            continue
        if seconds <= 0:
            errs.add(ipath, "must be > 0")
        elif seconds > MAX_LEAD_SECONDS:
            errs.add(ipath, f"must be at most {MAX_LEAD_SECONDS // 86400}d")
        elif seconds in seen:
            errs.add(ipath, f"duplicate lead time {item!r} (same as {seen[seconds]})")
        else:
            seen[seconds] = ipath


def _check_size(items: list[object] | None, path: str, limit: int, errs: ErrorList) -> None:
    if items is not None and len(items) > limit:
        errs.add(path, f"must have at most {limit} items, got {len(items)}")


def _known_event(name: str, path: str, errs: ErrorList) -> None:
    if name not in NOTIFICATION_EVENTS:
        errs.add(path, f"unknown event {name!r}: must be one of {', '.join(NOTIFICATION_EVENTS)}")


def _run_ref(name: str, path: str, errs: ErrorList) -> None:
    """A run name in the channel's namespace, or ``namespace/name`` (for ``scope: team``)."""
    namespace, _, run = name.rpartition("/")
    if namespace:
        check_label(namespace, path, errs)
    check_label(run, path, errs)


def _check_url(url: str, path: str, errs: ErrorList) -> None:
    if len(url) > MAX_URL_LENGTH:
        errs.add(path, f"must be at most {MAX_URL_LENGTH} characters")
        return
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number in range
    except ValueError as exc:
        errs.add(path, f"must be an http or https URL: {exc}")
        return
    del port
    if parts.scheme not in ("http", "https"):
        errs.add(path, f"must be an http or https URL, got scheme {parts.scheme or '(none)'!r}")
    elif not parts.hostname:
        errs.add(path, "must be an http or https URL with a host")
    elif parts.username is not None or parts.password is not None:
        errs.add(path, "must not carry credentials (user:password@); sign with secretRef instead")
    elif parts.fragment:
        errs.add(path, "must not have a #fragment")


def _check_secret_ref(secret: dict[str, object], path: str, errs: ErrorList) -> None:
    places = [k for k in ("name", "file", "env") if get_str(secret, k) is not None]
    if len(places) != 1:
        errs.add(
            path,
            "must set exactly one of name (a Kubernetes Secret), file or env"
            + (f", got {' and '.join(places)}" if places else ""),
        )
    check_subdomain(get_str(secret, "name"), join_path(path, "name"), errs)
    for key in ("key", "file", "env"):
        value = get_str(secret, key)
        if value is not None and not value.strip():
            errs.add(join_path(path, key), "must not be empty")
    env = get_str(secret, "env")
    if env and not env.replace("_", "a").isalnum():
        errs.add(join_path(path, "env"), "must be an environment variable name (A-Z, 0-9, _)")
