"""``python -m gpu_fleet_notifier``: run the notifier against any NATS URL."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gpu_fleet.core.timeutil import DurationError, parse_duration
from gpu_fleet.runtime import logs, observe
from gpu_fleet.runtime.ledger_keys import LedgerKeyError, LedgerKeys
from gpu_fleet_notifier.dispatch import DeliveryConfig
from gpu_fleet_notifier.policy import Backoff
from gpu_fleet_notifier.service import Notifier, NotifierConfig


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    defaults = DeliveryConfig()
    p = argparse.ArgumentParser(prog="gpu-fleet-notifier", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    p.add_argument(
        "--clock",
        choices=("wall", "ledger"),
        default=env("GPU_FLEET_NOTIFY_CLOCK", "wall"),
        help="'now' for deadlines: the wall clock, or the latest ledger event's time",
    )
    p.add_argument(
        "--expiry-lead",
        default=env("GPU_FLEET_EXPIRY_LEAD", "15m"),
        help="warn a team this long before a lease's end or its funding's (channels add leads)",
    )
    p.add_argument("--durable", default=env("GPU_FLEET_NOTIFY_DURABLE", "notifier"))
    p.add_argument(
        "--ack-wait",
        default=env("GPU_FLEET_NOTIFY_ACK_WAIT", "10s"),
        help="redelivery of a ledger message a crashed notifier left unacknowledged",
    )
    p.add_argument(
        "--delivery-ack-wait",
        default=env("GPU_FLEET_NOTIFY_DELIVERY_ACK_WAIT", ""),
        help="redelivery of an attempt a crash left unfinished (default 2x timeout + 5s)",
    )
    p.add_argument(
        "--secrets-dir",
        default=env("GPU_FLEET_SECRETS_DIR"),
        help="mounted Kubernetes Secrets: <dir>/<namespace>/<name>/<key> (secretRef.name)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=int(env("GPU_FLEET_NOTIFY_MAX_ATTEMPTS", str(defaults.max_attempts))),
        help="attempts per delivery before it is dead-lettered",
    )
    p.add_argument(
        "--attempt-timeout",
        default=env("GPU_FLEET_NOTIFY_ATTEMPT_TIMEOUT", "10s"),
        help="how long one webhook request may take",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(env("GPU_FLEET_NOTIFY_CONCURRENCY", str(defaults.concurrency))),
        help="requests in flight per receiver",
    )
    p.add_argument(
        "--breaker-threshold",
        type=int,
        default=int(env("GPU_FLEET_NOTIFY_BREAKER_THRESHOLD", str(defaults.breaker_threshold))),
        help="consecutive failures that open a receiver's circuit breaker",
    )
    p.add_argument(
        "--breaker-cooldown",
        default=env("GPU_FLEET_NOTIFY_BREAKER_COOLDOWN", "1m"),
        help="how long an open breaker waits before a trial request",
    )
    p.add_argument("--backoff-base", default=env("GPU_FLEET_NOTIFY_BACKOFF_BASE", "2s"))
    p.add_argument("--backoff-cap", default=env("GPU_FLEET_NOTIFY_BACKOFF_CAP", "10m"))
    p.add_argument(
        "--time-scale",
        type=float,
        default=float(env("GPU_FLEET_NOTIFY_TIME_SCALE", "1")),
        help="delivery clock speed (tests and demos: 0.001 makes a second last a millisecond)",
    )
    observe.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("notifier", args.log_level)
    durations: dict[str, int] = {}
    flags = ["expiry_lead", "ack_wait", "attempt_timeout", "breaker_cooldown"]
    flags += ["backoff_base", "backoff_cap"]
    if args.delivery_ack_wait:
        flags.append("delivery_ack_wait")
    for flag in flags:
        try:
            durations[flag] = parse_duration(getattr(args, flag))
        except DurationError as exc:
            print(f"error: --{flag.replace('_', '-')}: {exc}", file=sys.stderr)
            return 2
    for flag in ("max_attempts", "concurrency", "breaker_threshold"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')}: must be >= 1", file=sys.stderr)
            return 2
    if not 0 < args.time_scale <= 1:
        print("error: --time-scale: must be in (0, 1]", file=sys.stderr)
        return 2
    delivery = DeliveryConfig(
        max_attempts=args.max_attempts,
        attempt_timeout=float(max(1, durations["attempt_timeout"])),
        concurrency=args.concurrency,
        breaker_threshold=args.breaker_threshold,
        breaker_cooldown=float(durations["breaker_cooldown"]),
        backoff=Backoff(base=float(durations["backoff_base"]), cap=float(durations["backoff_cap"])),
        ack_wait=float(durations["delivery_ack_wait"]) if args.delivery_ack_wait else None,
    )
    try:
        ledger_keys = LedgerKeys.from_env()  # GPU_FLEET_LEDGER_KEY / _PUBLIC_KEY (security.md)
    except LedgerKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = NotifierConfig(
        nats_url=args.nats_url,
        clock=args.clock,
        expiry_lead=durations["expiry_lead"],
        durable=args.durable,
        ack_wait=float(max(1, durations["ack_wait"])),
        delivery=delivery,
        secrets_dir=args.secrets_dir,
        time_scale=args.time_scale,
        metrics_port=args.metrics_port,
        ready_max_lag=args.ready_max_lag,
        ledger_keys=ledger_keys,
    )

    async def amain() -> int:
        return await Notifier(config).serve()

    # Non-zero when the service stopped because something broke (e.g. its NATS
    # connection closed for good): the supervisor then starts a fresh process.
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
