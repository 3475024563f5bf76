"""``make demo-k8s``: the stack against an emulated Kubernetes API server, driven by kubectl.

It starts the emulator (``kubesim``: an API server with real semantics over HTTP) and its
simulated kubelet in this process, then ``gpu-fleet up``'s process stack with ``--kube-url``
(embedded NATS, manager + its half of the bridge, binder + its half, forecaster, notifier), and
then does what a team does: ``kubectl apply`` the CRDs, GPU nodes (a real cluster's kubelets
would register them), Budgets and a gang Run.  It shows the pods landing on the leased nodes of
one fabric domain, the Run's status, and - once the kubelet finishes the pods - the Run
Completed and its leases closed.  Uses the real ``kubectl --server`` when it is on PATH (with
``--validate=false``: the emulator serves no OpenAPI document), the Python client otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import yaml

from gpu_fleet.cli.stack import SERVICES, ProcessStack, call, wait_for_services
from gpu_fleet.kubesim.kubelet import SimKubelet
from gpu_fleet.kubesim.server import ApiServer
from gpu_fleet.kubesim.store import Store, StoreError
from gpu_fleet.runtime import logs
from gpu_fleet.runtime.follower import LedgerFollower
from gpu_fleet.runtime.ledger_stream import LedgerStream

RUN_LABEL = "rq.davidlangworthy.io/run"
GROUP = "rq.davidlangworthy.io"


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n## {text}", flush=True)


class Demo:
    def __init__(self, root: Path, store: Store, server: ApiServer, kubectl: str | None) -> None:
        self.root = root
        self.store = store
        self.server = server
        self.kubectl_bin = kubectl

    async def kubectl(self, *args: str, show: bool = True) -> str:
        """Run ``kubectl --server URL ARGS`` (or apply through the store when there is none)."""
        print(f"$ kubectl {' '.join(args)}", flush=True)
        if self.kubectl_bin is None:
            return self._apply_without_kubectl(args)
        proc = await asyncio.create_subprocess_exec(
            self.kubectl_bin,
            "--server",
            self.server.url,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        text = out.decode()
        if show:
            print(text.rstrip(), flush=True)
        if proc.returncode:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {text.strip()}")
        return text

    def _apply_without_kubectl(self, args: tuple[str, ...]) -> str:
        if args[:1] != ("apply",):
            return ""
        path = Path(args[args.index("-f") + 1])
        files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
        for f in files:
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc:
                    continue
                group, _, _version = str(doc["apiVersion"]).rpartition("/")
                plural = next(
                    rt.plural
                    for rt in self.store.types.values()
                    if rt.group == group and rt.kind == doc["kind"]
                )
                try:
                    self.store.create(self.store.find(group, plural), None, doc)
                    print(f"{doc['kind'].lower()}/{doc['metadata']['name']} created")
                except StoreError as exc:
                    print(exc.message)
        return ""

    def pods(self, namespace: str, run: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.store.find("", "pods"), namespace, f"{RUN_LABEL}={run}")
        return items

    def objects(self, group: str, plural: str, namespace: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.store.find(group, plural), namespace)
        return items

    def show_events(self, namespace: str) -> None:
        """The Run's Events (events.k8s.io/v1), oldest first (names are ``<run>.<ledger
        address>.<reason>``, the address ``<seq in hex>[-<index in hex>]``, so it orders
        events of the same instant)."""

        def address(event: dict[str, Any]) -> tuple[int, int]:
            seq, _, index = event["metadata"]["name"].split(".")[-2].partition("-")
            return int(seq, 16), int(index or "0", 16)

        events = sorted(
            self.objects("events.k8s.io", "events", namespace),
            key=lambda e: (e.get("eventTime", ""), address(e)),
        )
        for e in events:
            print(f"  {e['eventTime']}  {e['type']:<7} {e['reason']:<10} {e['note']}")

    def run_status(self, namespace: str, name: str) -> dict[str, Any]:
        runs = self.store.find("rq.davidlangworthy.io", "runs")
        try:
            status: dict[str, Any] = self.store.get(runs, namespace, name).get("status") or {}
        except StoreError:
            return {}
        return status


async def _until(probe: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


RUN_COLUMNS = (
    "NAME:.metadata.name,PHASE:.status.phase,REASON:.status.reason,"
    "ALLOC:.status.width.allocated,OWNED:.status.funding.ownedGPUs,NODES:.status.nodes"
)
POD_COLUMNS = (
    "NAME:.metadata.name,NODE:.spec.nodeName,PHASE:.status.phase,"
    "GPUS:.metadata.annotations.rq\\.davidlangworthy\\.io/gpus"
)


async def run_demo(root: Path, data: Path, *, quiet_logs: bool = True) -> int:
    if quiet_logs:
        logs.configure("demo", "warning")
    store = Store()
    server = ApiServer(store, bookmark_every=5.0)
    kubelet = SimKubelet(store)
    await server.start()
    await kubelet.start()
    demo = Demo(root, store, server, shutil.which("kubectl"))
    stack = ProcessStack(
        data, log_level="warning", kube_args=["--kube-url", server.url], inventory=None
    )
    _say(f"Emulated Kubernetes API server at {server.url} (kubesim) with a simulated kubelet")
    try:
        await demo.kubectl("apply", "--validate=false", "-f", str(root / "crds"))
        await demo.kubectl(
            "apply", "--validate=false", "-f", str(root / "examples/kubernetes/nodes.yaml")
        )
        _say("Starting NATS and the services; manager and binder run the Kubernetes bridge")
        await asyncio.to_thread(stack.start)
        nc = await nats.connect(stack.admin_url)
        try:
            await wait_for_services(nc, SERVICES, timeout=180)
            print(f"stack is up at {stack.nats.url}; service logs in {data}")

            follower = LedgerFollower(LedgerStream(nc, keys=stack.reader_keys))

            async def nodes_in() -> dict[str, Any]:
                await follower.catch_up()
                return dict(follower.state.nodes) if len(follower.state.nodes) >= 4 else {}

            nodes = await _until(nodes_in, "the four GPU nodes in the topology")
            print("the bridge registered the GPU nodes from their labels (ledger view):")
            for name, n in sorted(nodes.items()):
                labels = ", ".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
                print(f"  {name:<7} gpus={n.gpus} {n.health.value:<6} {labels}")
            _say("A team applies its Budget and a gang Run with kubectl")
            await demo.kubectl(
                "apply", "--validate=false", "-f", str(root / "examples/manifests/01-budgets.yaml")
            )
            await demo.kubectl(
                "apply", "--validate=false", "-f", str(root / "examples/kubernetes/gang-run.yaml")
            )

            def bound() -> list[dict[str, Any]]:
                pods = demo.pods("vision", "train-gang")
                return (
                    pods if len(pods) == 4 and all(p["spec"].get("nodeName") for p in pods) else []
                )

            pods = await _until(bound, "the gang's pods bound")
            _say("Pods created from the role template and bound to the leased nodes")
            await demo.kubectl("get", "pods", "-n", "vision", "-o", f"custom-columns={POD_COLUMNS}")
            cliques = sorted({nodes[p["spec"]["nodeName"]].labels["fabric.domain"] for p in pods})
            print(f"fabric domains used: {', '.join(cliques)}")
            env = {e["name"]: e["value"] for e in pods[0]["spec"]["containers"][0].get("env", [])}
            print(f"rendezvous env of {pods[0]['metadata']['name']}: {json.dumps(env)}")
            await _until(
                lambda: demo.run_status("vision", "train-gang").get("phase") == "Running",
                "status Running",
            )
            _say("The Run's status, written back by the bridge")
            await demo.kubectl("get", "runs", "-A", "-o", f"custom-columns={RUN_COLUMNS}")
            await demo.kubectl(
                "get", "budgets", "-n", "vision", "-o", "jsonpath={.items[0].status.headroom}"
            )
            print()
            for c in demo.run_status("vision", "train-gang").get("conditions", []):
                print(f"  condition {c['type']:<10} {c['status']:<6} {c['reason']}")
            _say("Read-only mirrors of the ledger's leases, and the Run's Events")
            await _until(
                lambda: (
                    len(
                        [
                            o
                            for o in demo.objects(GROUP, "gpuleases", "vision")
                            if (o.get("status") or {}).get("fundingClass")
                        ]
                    )
                    == len({p["spec"]["nodeName"] for p in pods})
                ),
                "GPULease mirrors",
            )
            await demo.kubectl("get", "runs,budgets,gpuleases", "-n", "vision")
            await _until(
                lambda: (
                    {"Admitted", "Bound"}
                    <= {e["reason"] for e in demo.objects("events.k8s.io", "events", "vision")}
                ),
                "Admitted and Bound events",
            )
            demo.show_events("vision")
            _say("The workload finishes: the kubelet marks every pod Succeeded")
            await _until(
                lambda: all(
                    p["status"]["phase"] == "Running" for p in demo.pods("vision", "train-gang")
                ),
                "pods running",
            )
            finished = kubelet.finish_run("vision", "train-gang")
            print(f"finished: {', '.join(finished)}")
            await _until(
                lambda: demo.run_status("vision", "train-gang").get("phase") == "Completed",
                "status Completed",
            )
            await demo.kubectl("get", "runs", "-A", "-o", f"custom-columns={RUN_COLUMNS}")
            leases = await call(nc, "leases", {"namespace": "vision", "name": "train-gang"})
            print("leases of vision/train-gang (from the ledger):")
            for x in leases:
                print(f"  {x['id']:<28} node={x['node']:<7} closed: {x['closureReason']}")
            await _until(
                lambda: not demo.pods("vision", "train-gang"), "pods of closed leases deleted"
            )
            print("the pods of the closed leases are gone")
            await _until(
                lambda: not demo.objects(GROUP, "gpuleases", "vision"), "GPULease mirrors removed"
            )
            print("the GPULease mirrors of the closed leases are gone; the Run's Events:")
            await _until(
                lambda: (
                    "Completed"
                    in {e["reason"] for e in demo.objects("events.k8s.io", "events", "vision")}
                ),
                "Completed event",
            )
            demo.show_events("vision")
            dead = stack.dead()
            if dead:
                print(f"error: services died during the demo: {', '.join(dead)}", file=sys.stderr)
                return 1
        finally:
            await nc.close()
    finally:
        _say("Stopping the stack and the emulator")
        await asyncio.to_thread(stack.stop)
        await kubelet.stop()
        await server.stop()
    print("done.")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_fleet.kubesim.demo", description=__doc__)
    p.add_argument("--root", default=str(Path.cwd()), help="the repository (crds/, examples/)")
    p.add_argument("--keep", default=None, help="keep data and service logs in this folder")
    args = p.parse_args(argv)
    root = Path(args.root)
    with tempfile.TemporaryDirectory(prefix="gpu-fleet-demo-k8s-") as tmp:
        try:
            return asyncio.run(run_demo(root, Path(args.keep or tmp)))
        except (TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
