"""``gpu-fleet up`` supervises every child, nats-server included (issue 19, break 7).

The restart policy is checked on a fake clock (no sleeping); one test kills the real
nats-server of a real process stack and waits, by bounded polling, for the API to answer again.
"""

from __future__ import annotations

import asyncio
import io
import signal
import time
from pathlib import Path

import nats
import pytest

from gpu_fleet.cli.stack import ProcessStack, call, wait_until_answers
from gpu_fleet.cli.up import RESTART_DELAYS, NatsChild, Supervisor, supervisor_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeChild:
    def __init__(self, name: str) -> None:
        self.name = name
        self.alive = True
        self.starts = 0
        self.fail_next_start = False

    def running(self) -> bool:
        return self.alive

    def exit_code(self) -> int | None:
        return None if self.alive else -9

    def start(self) -> None:
        if self.fail_next_start:
            self.fail_next_start = False
            raise OSError("port in use")
        self.starts += 1
        self.alive = True


def restart_delay(supervisor: Supervisor, clock: FakeClock, child: FakeChild) -> float:
    """Kill ``child``, tick until it is started again, and return how long that took."""
    child.alive = False
    died = clock.now
    supervisor.tick()
    while not child.alive:
        clock.now += 0.25
        supervisor.tick()
    return clock.now - died


def test_restart_delays_grow_in_a_crash_loop_and_reset_after_a_healthy_minute() -> None:
    """Deaths in a row wait 0.5, 1, 2, 5, 10, 10 s; a child that ran a minute starts afresh."""
    clock = FakeClock()
    nats_child, manager = FakeChild("nats-server"), FakeChild("manager")
    out = io.StringIO()
    supervisor = Supervisor([nats_child, manager], clock=clock, out=out)
    delays = [restart_delay(supervisor, clock, manager) for _ in range(6)]
    assert delays == [*RESTART_DELAYS, RESTART_DELAYS[-1]]
    clock.now += 60  # a healthy minute
    assert restart_delay(supervisor, clock, manager) == RESTART_DELAYS[0]
    assert restart_delay(supervisor, clock, manager) == RESTART_DELAYS[1]
    assert "manager exited (code -9); restarting in 0.5s" in out.getvalue()


def test_a_dead_child_never_delays_noticing_another_and_a_failed_start_is_retried() -> None:
    """Restarts are scheduled, not slept; a start that fails backs off like a death."""
    clock = FakeClock()
    nats_child, manager = FakeChild("nats-server"), FakeChild("manager")
    supervisor = Supervisor([nats_child, manager], clock=clock, out=io.StringIO())
    nats_child.alive = False
    nats_child.fail_next_start = True
    supervisor.tick()  # nats-server: due in 0.5 s
    manager.alive = False
    clock.now += 0.5
    assert supervisor.tick() == []  # nats-server's start failed: retry in 1 s; manager noticed
    clock.now += 0.5
    assert supervisor.tick() == ["manager"]
    clock.now += 0.5
    assert supervisor.tick() == ["nats-server"]
    assert (nats_child.starts, manager.starts) == (1, 1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_up_restarts_a_killed_nats_server_on_its_port_and_data_and_the_api_answers_again(
    tmp_path: Path,
) -> None:
    """Break 7: kill -9 of nats-server left it defunct and the services without NATS."""
    stack = ProcessStack(
        tmp_path, inventory=str(EXAMPLES / "inventory.yaml"), services=("binder", "manager")
    )
    stack.start()
    try:
        supervisor = supervisor_for(stack)
        supervisor.out = io.StringIO()
        asyncio.run(api_answers(stack.admin_url))
        port, proc = stack.nats.port, stack.nats.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 60
        while not NatsChild(stack).running():
            supervisor.tick()
            assert time.monotonic() < deadline, "nats-server was not restarted"
            time.sleep(0.1)
        assert stack.nats.port == port
        assert stack.nats.proc is not proc
        asyncio.run(api_answers(stack.admin_url))  # the services reconnected by themselves
        assert "nats-server exited (code -9)" in supervisor.out.getvalue()
    finally:
        stack.stop()


async def api_answers(url: str) -> None:
    """The manager answers (bounded polling while the services start or reconnect), and the
    inventory it registered from the ledger is all there."""
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        await wait_until_answers(nc, ("fleet.api.seq", b"{}"), timeout=90)
        deadline = time.monotonic() + 60
        while True:
            runs = await call(nc, "list", {}, timeout=10)
            fleet = await call(nc, "fleetmap", {}, timeout=10)
            if fleet["gpus"] == 4 * 8:  # four nodes of 8 GPUs registered from the inventory
                break
            assert time.monotonic() < deadline, "the inventory was not registered"
            await asyncio.sleep(0.1)
        assert runs == []  # nothing was submitted; the list answers from the folded ledger
    finally:
        await nc.close()
