"""Every object the chart renders, and every object the Kubernetes bridge writes, is valid
against Kubernetes' own OpenAPI schemas (kubernetes-validate, strict: unknown fields fail),
offline.  ``make chart-validate`` runs the same check from the command line."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
from pathlib import Path
from typing import Any

import kubernetes_validate as kv
import msgspec
import pytest

from gpu_fleet.core.model import Lease, LeaseRole, MintReason, Run
from gpu_fleet.kube.events import RunEvent, node_left_out_event
from gpu_fleet.kube.leader import LeaderElector, LeaderSettings
from gpu_fleet.kube.pods import PodSettings, headless_service, run_pods
from gpu_fleet.kubesim.memory import MemoryClient
from gpu_fleet.kubesim.store import Store

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "chart_validate", ROOT / "tools" / "chart_validate.py"
)
assert _spec is not None
assert _spec.loader is not None
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

VERSION = kv.latest_version()


@pytest.mark.parametrize("name", list(tool.VALUE_SETS))
def test_every_rendered_object_is_valid(name: str) -> None:
    objs = tool.rendered(tool.VALUE_SETS[name])
    assert len(objs) > 10
    assert tool.problems(objs, VERSION) == []


def test_the_check_names_the_object_the_field_and_the_reason() -> None:
    """The check can fail: a typo'd field and a wrong type in a rendered Deployment."""
    objs = tool.rendered({})
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["replica"] = 2
    (typo,) = tool.problems([dep], VERSION)
    assert typo.startswith(f"Deployment/{dep['metadata']['name']}: spec: ")
    assert "'replica' was unexpected" in typo
    dep = copy.deepcopy(next(o for o in objs if o["kind"] == "Deployment"))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"] = [{"containerPort": "http"}]
    (wrong,) = tool.problems([dep], VERSION)
    assert "containers.0.ports.0.containerPort" in wrong
    assert "is not of type 'integer'" in wrong


def test_the_cli_exits_zero_on_the_chart(capsys: pytest.CaptureFixture[str]) -> None:
    assert tool.main([]) == 0
    assert "all valid" in capsys.readouterr().out


def _run() -> Run:
    return msgspec.convert(
        {
            "kind": "Run",
            "metadata": {"name": "train", "namespace": "rai"},
            "spec": {
                "resources": {"gpuType": "H100", "totalGPUs": 8},
                "roles": [
                    {
                        "name": "trainer",
                        "width": 4,
                        "gpusPerPod": 2,
                        "template": {
                            "metadata": {"labels": {"team": "rai"}},
                            "spec": {
                                "containers": [
                                    {"name": "workload", "image": "trainer:1", "args": ["-v"]}
                                ]
                            },
                        },
                    }
                ],
            },
        },
        Run,
    )


def test_what_the_bridge_writes_is_valid() -> None:
    """Pods (active and spare), the headless Service, an Event and the election Lease."""
    run = _run()
    run_obj = {"metadata": {"name": "train", "namespace": "rai", "uid": "0000-1"}}
    leases = [
        Lease(
            id=f"rai/train@1#{i:03d}",
            run="rai/train",
            node=f"n{i}",
            slots=tuple(f"n{i}#{k}" for k in range(4)),
            role=role,
            group=0,
            start=1,
        )
        for i, role in enumerate((LeaseRole.ACTIVE, LeaseRole.ACTIVE, LeaseRole.SPARE))
    ]
    intents = run_pods(
        run,
        run_obj=run_obj,
        leases=leases,
        open_ids={x.id: x for x in leases},
        noticed=(),
        settings=PodSettings(),
    )
    objs: list[dict[str, Any]] = [i.body for i in intents]
    assert len(objs) == 6  # 2 x 2 active pods, 2 spare placeholders
    # A node failure: lease 0 closes, a swap lease takes its place (required node affinity).
    failed = msgspec.structs.replace(leases[0], closed_at=5, closure_reason="NodeFailure")
    swap = msgspec.structs.replace(
        leases[2], id="rai/train@1#003", role=LeaseRole.ACTIVE, reason=MintReason.SWAP, start=5
    )
    after = [failed, leases[1], swap]
    swapped = run_pods(
        run,
        run_obj=run_obj,
        leases=after,
        open_ids={x.id: x for x in after[1:]},
        noticed=(),
        settings=PodSettings(),
    )
    swap_pods = [i.body for i in swapped if i.lease == swap.id]
    assert [p["spec"]["hostname"] for p in swap_pods] == ["train-active-0", "train-active-1"]
    assert all("affinity" in p["spec"] for p in swap_pods)
    objs += swap_pods
    objs.append(headless_service(run, run_obj))
    event = RunEvent("rai", "train", "0000-1", 42, "Admitted", "Admit", "Normal", "ok", 1)
    objs.append(event.body("bridge-0"))
    node = {"metadata": {"name": "gpu-7", "uid": "0000-2"}}
    objs.append(node_left_out_event(node, "missing label fabric.domain", 1.5, "bridge-0"))
    store = Store()
    settings = LeaderSettings(namespace="gpu-fleet", clock=lambda: 1_767_225_600.5)
    elector = LeaderElector(MemoryClient(store), settings, "gpu-fleet-pods", "pod-a")
    assert asyncio.run(elector.try_acquire_or_renew())
    objs.append(
        store.get(store.find("coordination.k8s.io", "leases"), "gpu-fleet", "gpu-fleet-pods")
    )
    assert tool.problems(objs, VERSION) == []
