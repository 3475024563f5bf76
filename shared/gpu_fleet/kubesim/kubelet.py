"""A simulated kubelet: bound pods start Running; tests and the demo finish or fail them.

It watches pods in the store like a kubelet watches its node's pods, and writes only through
the status subresource, as a kubelet does.  There are no containers: a pod is Running as soon as
it is bound to a node that exists, and stays so until ``finish`` says how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

from gpu_fleet.kubesim.store import Obj, Store, StoreError


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SimKubelet:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._task: asyncio.Task[None] | None = None
        self.started = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sim kubelet")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> SimKubelet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        pods = self.store.find("", "pods")
        events = self.store.watch(pods, None, "0")
        try:
            async for ev in events:
                if ev["type"] in ("ADDED", "MODIFIED"):
                    self._maybe_start(ev["object"])
        finally:
            await events.aclose()  # type: ignore[attr-defined]

    def _maybe_start(self, pod: Obj) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase != "Pending":
            return
        nodes = self.store.find("", "nodes")
        try:
            self.store.get(nodes, None, node)
        except StoreError:
            return  # bound to a node that does not exist: stays Pending, as on a real cluster
        m = pod["metadata"]
        with contextlib.suppress(StoreError):
            self.store.patch(
                self.store.find("", "pods"),
                m.get("namespace"),
                m["name"],
                {"status": {"phase": "Running", "startTime": _now(), "hostIP": "10.0.0.1"}},
                "status",
            )
            self.started += 1

    def finish(
        self, namespace: str, name: str, phase: str = "Succeeded", exit_code: int = 0
    ) -> None:
        """End a pod's workload: ``Succeeded`` or ``Failed`` (with ``exit_code``)."""
        pods = self.store.find("", "pods")
        terminated = {
            "exitCode": exit_code,
            "reason": "Completed" if phase == "Succeeded" else "Error",
        }
        self.store.patch(
            pods,
            namespace,
            name,
            {
                "status": {
                    "phase": phase,
                    "containerStatuses": [
                        {"name": "workload", "state": {"terminated": terminated}, "ready": False}
                    ],
                }
            },
            "status",
        )

    def finish_run(
        self, namespace: str, run: str, phase: str = "Succeeded", role: str = "Active"
    ) -> list[str]:
        """Finish every running pod of ``run`` with ``role``; the names, sorted."""
        pods = self.store.find("", "pods")
        items, _ = self.store.list(
            pods, namespace, f"rq.davidlangworthy.io/run={run},rq.davidlangworthy.io/role={role}"
        )
        done = []
        for pod in items:
            if (pod.get("status") or {}).get("phase") == "Running":
                self.finish(namespace, pod["metadata"]["name"], phase)
                done.append(pod["metadata"]["name"])
        return sorted(done)
