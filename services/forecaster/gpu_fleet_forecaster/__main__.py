"""``python -m gpu_fleet_forecaster``: run the forecaster against any NATS URL."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gpu_fleet.runtime import heap, logs, observe
from gpu_fleet.runtime.ledger_keys import LedgerKeyError, LedgerKeys
from gpu_fleet_forecaster.service import Forecaster, ForecasterConfig


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpu-fleet-forecaster", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    p.add_argument(
        "--clock",
        choices=("wall", "ledger"),
        default=env("GPU_FLEET_FORECAST_CLOCK", "wall"),
        help="'now' for a forecast: the wall clock, or the ledger's latest event time "
        "(use with a manager on a virtual clock)",
    )
    observe.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("forecaster", args.log_level)
    heap.enable()  # its heap is its folded state: freeze it, sweep now and then (runtime.heap)
    try:
        ledger_keys = LedgerKeys.from_env()  # GPU_FLEET_LEDGER_KEY / _PUBLIC_KEY (security.md)
    except LedgerKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def amain() -> int:
        forecaster = Forecaster(
            ForecasterConfig(
                nats_url=args.nats_url,
                clock=args.clock,
                metrics_port=args.metrics_port,
                ready_max_lag=args.ready_max_lag,
                ledger_keys=ledger_keys,
            )
        )
        return await forecaster.serve()

    # Non-zero when the service stopped because something broke (e.g. its NATS
    # connection closed for good): the supervisor then starts a fresh process.
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
