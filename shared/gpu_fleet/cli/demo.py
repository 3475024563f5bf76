"""``gpu-fleet demo`` (``make demo``): the real stack, the real CLI, a sample fleet, example runs.

It starts an embedded NATS server and the four services as separate processes, registers the
sample inventory, submits the example manifests with ``kubectl runs submit`` and shows plans,
leases, budget usage and explanations with the same commands a user types, draws the fleet
(``kubectl runs top``) and writes the fleet map page (``kubectl runs viz``) - then stops
everything cleanly and prints the page's path.  Nothing here is simulated: decisions are made
by the manager, placements by the binder's CP-SAT planner, and every number is folded from the
JetStream ledger.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
import tempfile
from pathlib import Path

import nats

from gpu_fleet.cli import runs
from gpu_fleet.cli.stack import SERVICES, ProcessStack, wait_for_services


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n## {text}")


def _kubectl(url: str, line: str) -> int:
    print(f"$ kubectl runs {line}")
    argv = [*shlex.split(line), "--nats-url", url]
    return runs.main(argv)


async def _ready(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await wait_for_services(nc, SERVICES, timeout=120)
    finally:
        await nc.close()


def demo(examples: Path, inventory: Path, keep: str | None = None, page: Path | None = None) -> int:
    """Run the demo; ``page`` is where the fleet map goes (default ``var/fleet.html``)."""
    page = page or Path.cwd() / "var" / "fleet.html"
    manifests = sorted((examples / "manifests").glob("*.yaml"))
    if not manifests or not inventory.exists():
        print(f"error: demo needs {examples}/manifests/*.yaml and {inventory}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu-fleet-demo-") as tmp:
        data = keep or tmp
        stack = ProcessStack(data, inventory=str(inventory), log_level="warning")
        _say("Starting embedded NATS (JetStream) and the manager, binder, forecaster, notifier")
        stack.start()
        try:
            asyncio.run(_ready(stack.admin_url))
            print(f"stack is up at {stack.nats.url}; service logs in {data}")
            url = stack.admin_url
            failures = 0
            for path in manifests:
                _say(f"Submitting {path.name}: {_first_comment(path)}")
                failures += _kubectl(url, f"submit -f {shlex.quote(str(path))}") != 0
            _say("Every run, across namespaces")
            failures += _kubectl(url, "get -A") != 0
            _say("Leases: one per (run, node, group, role, payer at mint); class derived now")
            failures += _kubectl(url, "leases -A") != 0
            _say("Budget usage and headroom per envelope")
            failures += _kubectl(url, "budgets -A") != 0
            _say("Why is partner/eval-4 co-funded?")
            failures += _kubectl(url, "explain eval-4 -n partner") != 0
            _say("When will rai/sweep-6 start?")
            failures += _kubectl(url, "plan sweep-6 -n rai") != 0
            failures += _kubectl(url, "explain sweep-6 -n rai") != 0
            _say("rai/train-8 finishes: its leases close, and sweep-6 can now be funded")
            failures += _kubectl(url, "complete train-8 -n rai") != 0
            failures += _kubectl(url, "get -n rai") != 0
            failures += _kubectl(url, "budgets -n rai") != 0
            _say("The fleet as a picture: GPUs by funding class per domain and node")
            failures += _kubectl(url, "top -o wide --color never") != 0
            _say("The fleet map, timeline and budget burn as one HTML page (works offline)")
            failures += _kubectl(url, f"viz -o {shlex.quote(str(page))}") != 0
            dead = stack.dead()
            if dead:
                print(f"error: services died during the demo: {', '.join(dead)}", file=sys.stderr)
                failures += 1
        finally:
            _say("Stopping the stack (SIGTERM: services drain and exit)")
            stack.stop()
        if page.exists():
            print(f"fleet map: {page.resolve()} (open it in a browser)")
            print("  live: `gpu-fleet up` serves it at http://127.0.0.1:9100/, from the ledger")
        print("done." if not failures else f"{failures} demo command(s) failed")
        return 0 if not failures else 1


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return path.stem
