"""``python -m gpu_fleet_manager``: run the manager against any NATS URL.

Configuration comes from flags, each with an environment variable (for compose and Helm).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from gpu_fleet import kube
from gpu_fleet.core.engine import Settings
from gpu_fleet.core.manifests import ManifestError, decode_text, parse_inventory
from gpu_fleet.core.timeutil import parse_duration, parse_instant
from gpu_fleet.runtime import heap, logs, observe
from gpu_fleet.runtime.ledger_keys import LedgerKeyError, LedgerKeys
from gpu_fleet.runtime.replies import ApiLimits
from gpu_fleet.runtime.together import run_together
from gpu_fleet_manager.service import Manager, ManagerConfig


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpu-fleet-manager", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--clock", choices=("wall", "virtual"), default=env("GPU_FLEET_CLOCK", "wall"))
    p.add_argument("--start", default=env("GPU_FLEET_START"), help="virtual clock start (RFC 3339)")
    p.add_argument("--inventory", default=env("GPU_FLEET_INVENTORY"), help="node inventory YAML")
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    p.add_argument("--tick", default=env("GPU_FLEET_TICK", "1s"), help="reconcile interval")
    p.add_argument("--activation-lead", default=env("GPU_FLEET_ACTIVATION_LEAD", "15m"))
    p.add_argument("--accounting-period", default=env("GPU_FLEET_ACCOUNTING_PERIOD", "24h"))
    p.add_argument("--no-binder", action="store_true", help="plan placements in-process")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=int(env("GPU_FLEET_SNAPSHOT_EVERY", "500")),
        help="ledger batches between state snapshots (0 disables them)",
    )
    p.add_argument(
        "--snapshot-min-seconds",
        type=float,
        default=float(env("GPU_FLEET_SNAPSHOT_MIN_SECONDS", "10")),
        help="seconds at least between state snapshots (a burst pays one per this, not more)",
    )
    p.add_argument(
        "--ledger-packing",
        choices=("on", "off"),
        default=env("GPU_FLEET_LEDGER_PACKING", "on"),
        help="append several events as one ledger message (off: one message per event, while"
        " services older than packing still read the ledger; docs/deploy.md)",
    )
    limits = ApiLimits()
    for flag, var, value, text in (
        (
            "--max-request-bytes",
            "MAX_REQUEST_BYTES",
            limits.max_request_bytes,
            "requests larger than this are refused (413) before decoding",
        ),
        (
            "--max-reply-bytes",
            "MAX_REPLY_BYTES",
            limits.max_reply_bytes,
            "upper bound of a reply (the NATS server's max_payload lowers it)",
        ),
        (
            "--page-size",
            "PAGE_SIZE",
            limits.page_size,
            "list items per page when a request gives no limit",
        ),
        (
            "--max-object-bytes",
            "MAX_OBJECT_BYTES",
            limits.max_object_bytes,
            "largest Budget, Run or node once encoded",
        ),
        (
            "--max-objects-per-namespace",
            "MAX_OBJECTS_PER_NAMESPACE",
            limits.max_objects_per_namespace,
            "Runs, Budgets and NotificationChannels one namespace may hold",
        ),
        (
            "--max-pending-per-client",
            "MAX_PENDING_PER_CLIENT",
            limits.max_pending_per_client,
            "requests one client connection may have waiting (more are refused, 429)",
        ),
    ):
        p.add_argument(
            flag,
            type=int,
            default=int(env(f"GPU_FLEET_{var}", str(value))),
            help=f"{text} (env GPU_FLEET_{var}; default {value})",
        )
    kube.add_arguments(p)
    observe.add_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure("manager", args.log_level)
    heap.enable()  # its heap is its folded state: freeze it, sweep now and then (runtime.heap)
    nodes = []
    if args.inventory:
        try:
            text = decode_text(Path(args.inventory).read_bytes(), args.inventory)
            nodes = parse_inventory(text, source=args.inventory)
        except (OSError, ManifestError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        ledger_keys = LedgerKeys.from_env()  # GPU_FLEET_LEDGER_KEY / _PUBLIC_KEY (security.md)
    except LedgerKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ManagerConfig(
        nats_url=args.nats_url,
        clock=args.clock,
        start=parse_instant(args.start) if args.start else None,
        inventory=nodes,
        settings=Settings(
            activation_lead=parse_duration(args.activation_lead),
            accounting_period=parse_duration(args.accounting_period),
        ),
        tick_seconds=max(0.05, parse_duration(args.tick) or 1),
        use_binder=not args.no_binder,
        snapshot_every=max(0, args.snapshot_every),
        snapshot_min_seconds=max(0.0, args.snapshot_min_seconds),
        limits=ApiLimits(
            max_request_bytes=max(1024, args.max_request_bytes),
            max_reply_bytes=max(4096, args.max_reply_bytes),
            page_size=max(1, args.page_size),
            max_object_bytes=max(1024, args.max_object_bytes),
            max_objects_per_namespace=max(1, args.max_objects_per_namespace),
            max_pending_per_client=max(1, args.max_pending_per_client),
        ),
        metrics_port=args.metrics_port,
        ready_max_lag=args.ready_max_lag,
        ledger_keys=ledger_keys,
        ledger_packing=args.ledger_packing == "on",
    )

    conn = kube.connection(args)
    try:
        mapping = kube.mapping(args.kube_mapping)
        leader = kube.leader(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def amain() -> int:
        manager = Manager(config)
        if not conn.configured:
            return await manager.serve()
        # Manager side of the Kubernetes bridge: Run/Budget objects in, status out.
        bridge = kube.KubeBridge(
            kube.BridgeConfig(
                nats_url=args.nats_url,
                connection=conn,
                objects=True,
                pods=False,
                mapping=mapping,
                leader=leader,
                ledger_keys=ledger_keys.reader() if ledger_keys else None,
            )
        )
        return await run_together(manager, bridge)

    # Non-zero when the service stopped because something broke (e.g. its NATS
    # connection closed for good): the supervisor then starts a fresh process.
    return asyncio.run(amain())


if __name__ == "__main__":
    sys.exit(main())
