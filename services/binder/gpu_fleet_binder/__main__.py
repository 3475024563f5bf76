"""``python -m gpu_fleet_binder``: run the binder against any NATS URL."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gpu_fleet import kube
from gpu_fleet.runtime import heap, logs, observe
from gpu_fleet.runtime.ledger_keys import LedgerKeyError, LedgerKeys
from gpu_fleet.runtime.together import run_together
from gpu_fleet_binder.service import Binder, BinderConfig


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpu-fleet-binder", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    kube.add_arguments(p)
    observe.add_flags(p)
    args = p.parse_args(argv)
    logs.configure("binder", args.log_level)
    heap.enable()  # its heap is its folded state: freeze it, sweep now and then (runtime.heap)
    try:
        ledger_keys = LedgerKeys.from_env()  # GPU_FLEET_LEDGER_KEY / _PUBLIC_KEY (security.md)
    except LedgerKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    conn = kube.connection(args)
    try:
        mapping = kube.mapping(args.kube_mapping)
        leader = kube.leader(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def amain() -> int:
        binder = Binder(
            BinderConfig(
                nats_url=args.nats_url,
                metrics_port=args.metrics_port,
                ready_max_lag=args.ready_max_lag,
                ledger_keys=ledger_keys,
            )
        )
        if not conn.configured:
            return await binder.serve()
        # Binder side of the Kubernetes bridge: nodes to topology, pods created and bound.
        bridge = kube.KubeBridge(
            kube.BridgeConfig(
                nats_url=args.nats_url,
                connection=conn,
                objects=False,
                pods=True,
                mapping=mapping,
                leader=leader,
                ledger_keys=ledger_keys,
            )
        )
        return await run_together(binder, bridge)

    # Non-zero when the service stopped because something broke (e.g. its NATS
    # connection closed for good): the supervisor then starts a fresh process.
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
