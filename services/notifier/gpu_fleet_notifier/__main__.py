"""``python -m gpu_fleet_notifier``: run the notifier against any NATS URL."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gpu_fleet.core.timeutil import DurationError, parse_duration
from gpu_fleet.runtime import logs, observe
from gpu_fleet_notifier.service import Notifier, NotifierConfig


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpu-fleet-notifier", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    p.add_argument(
        "--clock",
        choices=("wall", "ledger"),
        default=env("GPU_FLEET_NOTIFY_CLOCK", "wall"),
        help="'now' for lease-expiring: the wall clock, or the latest ledger event's time",
    )
    p.add_argument(
        "--expiry-lead",
        default=env("GPU_FLEET_EXPIRY_LEAD", "15m"),
        help="warn a team this long before a lease's scheduled end",
    )
    p.add_argument("--durable", default=env("GPU_FLEET_NOTIFY_DURABLE", "notifier"))
    observe.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("notifier", args.log_level)
    try:
        lead = parse_duration(args.expiry_lead)
    except DurationError as exc:
        print(f"error: --expiry-lead: {exc}", file=sys.stderr)
        return 2
    config = NotifierConfig(
        nats_url=args.nats_url,
        clock=args.clock,
        expiry_lead=lead,
        durable=args.durable,
        metrics_port=args.metrics_port,
        ready_max_lag=args.ready_max_lag,
    )

    async def amain() -> int:
        return await Notifier(config).serve()

    # Non-zero when the service stopped because something broke (e.g. its NATS
    # connection closed for good): the supervisor then starts a fresh process.
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
