"""A 3-server JetStream cluster survives the loss of a server (issue 12, "lose a machine").

The stack runs as ``gpu-fleet up --nats-cluster 3`` runs it: three routed nats-servers on
loopback, each with its own store, every stream at 3 replicas, services given all three URLs.
Mid-burst of submits we SIGKILL the server leading the ledger stream; once it is back we kill
the new leader (another server).  No acknowledged decision may be lost, the services must keep
answering, and the folded ledger must hold every invariant.  The pause - from the kill to the
acknowledgement
of a submit sent after it - is measured and printed (docs/reliability.md), never asserted: it
depends on the machine's load.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from nats.aio.client import Client

from gpu_fleet.cli.stack import ProcessStack, wait_for_services
from gpu_fleet.runtime.ledger_stream import STREAM
from gpu_fleet.runtime.natsd_cluster import NatsCluster, servers, split_userinfo, stream_replicas
from gpu_fleet.runtime.stack_security import redact, with_userinfo

ROOT = Path(__file__).resolve().parents[2]


def _chaos() -> ModuleType:
    """bench/chaos.py: the campaign's clients and ledger audit, shared with this test."""
    if "gpu_fleet_bench_chaos" in sys.modules:
        return sys.modules["gpu_fleet_bench_chaos"]
    spec = importlib.util.spec_from_file_location("gpu_fleet_bench_chaos", ROOT / "bench/chaos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


chaos = _chaos()


def test_stream_replicas_reads_the_environment_and_names_the_variable_on_nonsense() -> None:
    assert stream_replicas({}) == 1
    assert stream_replicas({"GPU_FLEET_STREAM_REPLICAS": "3"}) == 3
    for bad in ("0", "6", "three", "-1"):
        with pytest.raises(ValueError, match="GPU_FLEET_STREAM_REPLICAS: must be a whole number"):
            stream_replicas({"GPU_FLEET_STREAM_REPLICAS": bad})


def test_servers_splits_a_comma_separated_url() -> None:
    assert servers("nats://a:1, nats://b:2,,nats://c:3") == [
        "nats://a:1",
        "nats://b:2",
        "nats://c:3",
    ]
    assert servers("nats://a:1") == ["nats://a:1"]


async def _leader(nc: Client) -> str:
    info = await nc.jetstream(timeout=5).stream_info(STREAM)
    assert info.cluster is not None
    assert info.cluster.leader
    return str(info.cluster.leader)


async def _wait_replicas_current(nc: Client, deadline: float) -> None:
    """Every stream's replicas are all current (the restarted server caught up)."""
    js = nc.jetstream(timeout=5)
    while True:
        try:
            streams = await js.streams_info()
            if streams and all(
                s.config.num_replicas == 3
                and s.cluster is not None
                and s.cluster.leader
                and len(s.cluster.replicas or []) == 2
                and all(r.current for r in s.cluster.replicas or [])
                for s in streams
            ):
                return
        except Exception:  # JetStream answers errors while a server rejoins
            pass
        assert time.monotonic() < deadline, "stream replicas did not catch up"
        await asyncio.sleep(0.1)


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.timeout(600)
async def test_three_servers_lose_one_then_another_and_nothing_acknowledged_is_lost(
    tmp_path: Path,
) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(chaos.INVENTORY)
    stack = ProcessStack(
        tmp_path / "data",
        inventory=str(inventory),
        log_level="warning",
        services=("binder", "manager", "notifier"),
        nats_cluster=3,
    )
    await asyncio.to_thread(stack.start)
    cluster = stack.nats
    assert isinstance(cluster, NatsCluster)
    deadline = time.monotonic() + 400
    acks = chaos.Acks()
    pauses: list[float] = []
    nc = await chaos.connect(stack.admin_url, deadline)  # authorization is on
    try:
        await wait_for_services(nc, ("binder", "manager", "notifier"), timeout=180)
        await chaos.attempt(nc, "apply", {"documents": chaos.budget_doc("team", 48)}, deadline)
        await _wait_replicas_current(nc, deadline)
        killed: list[str] = []
        for round_ in range(2):
            acked_at: list[float] = []

            async def submit(
                i: int, round_: int = round_, acked_at: list[float] = acked_at
            ) -> None:
                name = f"r{round_}-{i:02d}"
                doc = chaos.run_doc("team", name, 1 + i % 4)
                await chaos.attempt(nc, "apply", {"documents": doc}, deadline)
                acks.submitted.add(f"team/{name}")
                acked_at.append(time.monotonic())

            tasks = [asyncio.create_task(submit(i)) for i in range(20)]
            while len(acked_at) < 5:  # kill with requests in flight
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            leader = await _leader(nc)
            victim = (
                leader
                if leader not in killed
                else next(m.name for m in cluster.members if m.name not in killed)
            )
            index = [m.name for m in cluster.members].index(victim)
            cluster.kill_member(index)
            killed_at = time.monotonic()
            killed.append(victim)
            # Service continues on two servers: a submit sent now is committed and answered.
            await chaos.attempt(
                nc, "apply", {"documents": chaos.run_doc("team", f"down-{round_}", 1)}, deadline
            )
            pauses.append(time.monotonic() - killed_at)
            acks.submitted.add(f"team/down-{round_}")
            await asyncio.gather(*tasks)
            await asyncio.to_thread(cluster.start_member, index)
            await _wait_replicas_current(nc, deadline)
        assert len(set(killed)) == 2, killed
        assert not stack.dead(), f"services died: {stack.dead()}"
        problems = await chaos.settled_audit(nc, acks, deadline)
        assert problems == []
        state, _ = await chaos.fold_ledger(nc)
        assert len(acks.submitted) == 42
        assert acks.submitted <= set(state.runs)
    finally:
        await nc.close()
        await asyncio.to_thread(stack.stop)
    print(
        f"\nnats cluster: pause after killing the ledger leader: {pauses[0]:.2f} s,"
        f" after killing the second server: {pauses[1]:.2f} s"
    )


def test_credentials_leave_the_url_so_servers_the_cluster_announces_get_them_too() -> None:
    """nats-py adds a cluster's announced ``host:port`` as a new server (it differs from
    ``user:pw@host:port``) and reconnects there without credentials: options avoid that."""
    listed = with_userinfo("nats://127.0.0.1:1,nats://127.0.0.1:2", "admin", "pw")
    assert listed == "nats://admin:pw@127.0.0.1:1,nats://admin:pw@127.0.0.1:2"
    assert redact(listed) == "nats://admin:***@127.0.0.1:1,nats://admin:***@127.0.0.1:2"
    assert split_userinfo(listed) == (
        ["nats://127.0.0.1:1", "nats://127.0.0.1:2"],
        {"user": "admin", "password": "pw"},
    )
    assert split_userinfo("nats://127.0.0.1:1") == (["nats://127.0.0.1:1"], {})
    assert split_userinfo("nats://s3cret@127.0.0.1:1") == (
        ["nats://127.0.0.1:1"],
        {"token": "s3cret"},
    )
