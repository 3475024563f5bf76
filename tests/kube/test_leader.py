"""Leader election over a coordination.k8s.io Lease (emulator store, fake clock).

The electors alone first (who wins, a standby waits while the holder renews, expiry by the
standby's own clock, a released Lease is taken at once, a holder that sees another holder
gives up), then two whole bridges against the real fleet: only the leader acts, a standby
takes over when the leader dies without releasing, and a bridge that loses its Lease exits.
Waits are bounded polls of conditions; time that matters is the fake clock.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from _kube import Stack, budget_obj, gpu_node, new_store, run_obj, wait_until

from gpu_fleet.kube.bridge import BridgeConfig, KubeBridge
from gpu_fleet.kube.leader import LeaderElector, LeaderSettings
from gpu_fleet.kube.settings import add_arguments, leader
from gpu_fleet.kubesim.kubelet import SimKubelet
from gpu_fleet.kubesim.memory import MemoryClient
from gpu_fleet.kubesim.store import Store

G = "rq.davidlangworthy.io"


class FakeClock:
    def __init__(self, t: float = 1_767_225_600.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _settings(clock: FakeClock, **kw: Any) -> LeaderSettings:
    base: dict[str, Any] = {
        "namespace": "gpu-fleet",
        "name": "fleet",
        "lease_seconds": 15,
        "renew_seconds": 10,
        "retry_seconds": 0.02,
        "clock": clock,
    }
    return LeaderSettings(**{**base, **kw})


def _lease(store: Store, name: str = "fleet-x") -> dict[str, Any]:
    return store.get(store.find("coordination.k8s.io", "leases"), "gpu-fleet", name)


@pytest.mark.asyncio
async def test_electors_one_holder_expiry_by_own_clock_release_and_loss() -> None:
    store = Store()
    clock = FakeClock()
    a = LeaderElector(MemoryClient(store), _settings(clock), "fleet-x", "a")
    b = LeaderElector(MemoryClient(store), _settings(clock), "fleet-x", "b")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()  # held, and just renewed
    spec = _lease(store)["spec"]
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == 15
    assert spec["renewTime"].endswith(".000000Z")  # MicroTime
    clock.t += 14
    assert not await b.try_acquire_or_renew()  # 14 s since b first saw the record
    assert await a.try_acquire_or_renew()  # a renews: the record changes
    clock.t += 14
    assert not await b.try_acquire_or_renew()  # b saw the renewal: not expired for b
    clock.t += 16  # a stopped renewing 16 s ago by b's clock
    assert await b.try_acquire_or_renew()
    spec = _lease(store)["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1)
    # a, still running, notices on its next renewal that b holds the Lease and gives up.
    a.leading = True
    a.settings = _settings(clock, retry_seconds=0.0)
    assert (await a.hold()) == "lease fleet-x is held by b"
    assert not a.leading
    # A clean stop releases: a waiting candidate takes over at once, no expiry needed.
    b.leading = True
    await b.release()
    c = LeaderElector(MemoryClient(store), _settings(clock), "fleet-x", "c")
    assert await c.try_acquire_or_renew()
    assert _lease(store)["spec"]["leaseTransitions"] == 2


@pytest.mark.asyncio
async def test_two_candidates_racing_for_an_expired_lease_only_one_wins() -> None:
    store = Store()
    clock = FakeClock()
    old = LeaderElector(MemoryClient(store), _settings(clock), "fleet-x", "old")
    assert await old.try_acquire_or_renew()
    cands = [LeaderElector(MemoryClient(store), _settings(clock), "fleet-x", n) for n in ("p", "q")]
    for c in cands:
        assert not await c.try_acquire_or_renew()
    clock.t += 20
    won = await asyncio.gather(*(c.try_acquire_or_renew() for c in cands))
    assert sorted(won) == [False, True]


def test_bad_settings_name_the_field() -> None:
    s = LeaderSettings(lease_seconds=10, renew_seconds=10, retry_seconds=2)
    assert s.problems() == ["renew seconds: must be > 0 and below the lease seconds"]


# -- two bridges ---------------------------------------------------------------------------


class Fleet:
    def __init__(self, stack: Stack, store: Store, clock: FakeClock) -> None:
        self.stack = stack
        self.store = store
        self.clock = clock
        self.bridges: list[KubeBridge] = []

    def bridge(self, identity: str) -> KubeBridge:
        b = KubeBridge(
            BridgeConfig(
                nats_url=self.stack.url,
                resync_seconds=2.0,
                forecasts=False,
                leader=_settings(self.clock, identity=identity, release_on_stop=False),
            ),
            client_factory=lambda: MemoryClient(self.store, bookmark_every=0.5),
        )
        self.bridges.append(b)
        return b

    def pods(self, run: str) -> list[dict[str, Any]]:
        items, _ = self.store.list(self.store.find("", "pods"), "rai", f"{G}/run={run}")
        return items


@pytest_asyncio.fixture(name="fleet")
async def _fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    stack = Stack(tmp_path)
    store = new_store()
    kubelet = SimKubelet(store)
    f = Fleet(stack, store, FakeClock())
    try:
        await stack.start()
        await kubelet.start()
        for name, clique in (("a1", "A"), ("a2", "A"), ("b1", "B"), ("b2", "B")):
            store.create(store.find("", "nodes"), None, gpu_node(name, clique=clique))
        yield f
        assert [b.pass_failures for b in f.bridges] == [0] * len(f.bridges)
    finally:
        for b in f.bridges:
            await b.stop()
        await kubelet.stop()
        await stack.stop()


@pytest.mark.asyncio
async def test_a_standby_takes_over_when_the_leader_dies_and_a_loser_exits(fleet: Fleet) -> None:
    a, b = fleet.bridge("a"), fleet.bridge("b")
    await a.start()
    await wait_until(lambda: a.working and len(a.state.nodes) == 4, "a leads and works")
    await b.start()
    assert b.elector is not None
    tries = b.elector.attempts
    await wait_until(lambda: b.elector.attempts >= tries + 5, "b keeps trying")
    assert (b.working, b.passes, b.elector.holder) == (False, 0, "a")  # b stands by

    rt = fleet.store.find(G, "budgets")
    fleet.store.create(rt, "rai", budget_obj("rai", "org:ai:rai"))
    fleet.store.create(fleet.store.find(G, "runs"), "rai", run_obj("rai", "one", 4))
    await wait_until(
        lambda: (
            len(fleet.pods("one")) == 4
            and all(p["spec"].get("nodeName") for p in fleet.pods("one"))
        ),
        "the leader binds the first run",
    )
    assert b.passes == 0

    # The leader dies without releasing: b waits out the Lease by its own clock.
    await a.stop()
    tries = b.elector.attempts
    await wait_until(lambda: b.elector.attempts >= tries + 5, "b tries while the lease is live")
    assert not b.working
    fleet.clock.t += 16
    await wait_until(lambda: b.working, "b takes over once the lease expired")
    fleet.store.create(fleet.store.find(G, "runs"), "rai", run_obj("rai", "two", 4))
    await wait_until(
        lambda: (
            len(fleet.pods("two")) == 4
            and all(p["spec"].get("nodeName") for p in fleet.pods("two"))
        ),
        "the new leader binds the next run",
    )

    # Someone else takes the Lease: b notices at its next renewal and exits (code 1).
    lease = _lease(fleet.store, "fleet-bridge")
    fleet.store.patch(
        fleet.store.find("coordination.k8s.io", "leases"),
        "gpu-fleet",
        "fleet-bridge",
        {"spec": {**lease["spec"], "holderIdentity": "intruder"}},
    )
    await wait_until(lambda: b.exit_code == 1 and b.failure, "b exits on losing the lease")
    assert "held by intruder" in (b.failure or "")


def test_flags_and_environment_turn_election_on_and_bad_values_are_named() -> None:
    p = argparse.ArgumentParser()
    add_arguments(p, env={})
    assert leader(p.parse_args([])) is None
    env = {"GPU_FLEET_KUBE_LEADER_ELECT": "true", "GPU_FLEET_KUBE_LEADER_NAMESPACE": "ops"}
    p = argparse.ArgumentParser()
    add_arguments(p, env=env)
    got = leader(p.parse_args(["--kube-leader-lease-seconds", "30"]))
    assert got is not None
    assert (got.namespace, got.name, got.lease_seconds, got.renew_seconds) == (
        "ops",
        "gpu-fleet",
        30.0,
        10.0,
    )
    with pytest.raises(ValueError, match="--kube-leader-retry-seconds: not a number"):
        leader(p.parse_args(["--kube-leader-retry-seconds", "soon"]))
    with pytest.raises(ValueError, match="renew seconds: must be > 0 and below the lease"):
        leader(p.parse_args(["--kube-leader-renew-seconds", "20"]))
