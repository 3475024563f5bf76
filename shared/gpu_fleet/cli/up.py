"""``gpu-fleet up``: the whole stack on an embedded NATS server, as separate processes.

A small supervisor: a service that dies is restarted (with a growing delay), because the ledger
makes every service restartable at any point.  SIGINT/SIGTERM stop everything cleanly.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from gpu_fleet.cli.stack import SERVICES, ProcessStack

RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)


def default_inventory() -> str | None:
    path = Path.cwd() / "examples" / "inventory.yaml"
    return str(path) if path.exists() else None


def up(
    data_dir: str,
    inventory: str | None,
    port: int,
    log_level: str,
    kube_args: list[str] | None = None,
) -> int:
    stack = ProcessStack(
        data_dir, inventory=inventory, log_level=log_level, port=port, kube_args=kube_args
    )
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    stack.start()
    print(f"gpu-fleet is up: NATS at {stack.nats.url} (JetStream data in {data_dir}/nats)")
    print(f"  services: {', '.join(SERVICES)} (logs in {data_dir}/<service>.log)")
    if kube_args:
        print(f"  kubernetes bridge: {' '.join(kube_args)} (manager: runs/budgets, binder: pods)")
    print(f"  try:      export GPU_FLEET_NATS_URL={stack.nats.url}; kubectl runs get -A")
    print("  stop:     Ctrl-C")
    restarts: dict[str, int] = {}
    try:
        while not stop.wait(0.5):
            for name in stack.dead():
                n = restarts.get(name, 0)
                delay = RESTART_DELAYS[min(n, len(RESTART_DELAYS) - 1)]
                print(f"service {name} exited; restarting in {delay}s", file=sys.stderr)
                time.sleep(delay)
                stack.procs.pop(name, None)
                stack.spawn(name)
                restarts[name] = n + 1
    finally:
        print("stopping gpu-fleet ...")
        stack.stop()
    return 0
