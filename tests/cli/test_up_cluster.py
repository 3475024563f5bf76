"""``gpu-fleet up --nats-cluster N``: the flag, and the supervisor watching each cluster member."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import pytest

from gpu_fleet.cli.main import build_parser, main
from gpu_fleet.cli.stack import ProcessStack
from gpu_fleet.cli.up import supervisor_for
from gpu_fleet.runtime.natsd_cluster import STREAM_REPLICAS_ENV, NatsCluster


def test_the_flag_takes_an_odd_server_count_and_names_itself_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert build_parser().parse_args(["up", "--nats-cluster", "3"]).nats_cluster == 3
    assert build_parser().parse_args(["up"]).nats_cluster == 1
    with pytest.raises(SystemExit) as exited:
        main(["up", "--nats-cluster", "2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--nats-cluster" in err
    assert "must be 1, 3 or 5" in err


def test_a_cluster_stack_gives_services_every_url_and_the_replica_count(tmp_path: Path) -> None:
    stack = ProcessStack(tmp_path, nats_cluster=3, port=14222)
    assert isinstance(stack.nats, NatsCluster)
    assert stack.nats.url.split(",") == [f"nats://127.0.0.1:{14222 + i}" for i in range(3)]
    for service in ("manager", "binder", "forecaster", "notifier"):
        assert stack.child_env(service)[STREAM_REPLICAS_ENV] == "3"
    # Authorization is on by default: each member reads the same users, each its own pid file.
    assert {m.security_file for m in stack.nats.members} == {tmp_path / "nats-security.conf"}
    assert len({m.pid_file for m in stack.nats.members}) == 3
    assert {m.store_dir for m in stack.nats.members} == {
        tmp_path / "nats" / f"s{i}" for i in (1, 2, 3)
    }
    names = [c.name for c in supervisor_for(stack).children]
    assert names[:3] == ["nats-server s1", "nats-server s2", "nats-server s3"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_supervisor_restarts_a_killed_member_on_its_ports_and_store(tmp_path: Path) -> None:
    stack = ProcessStack(tmp_path, nats_cluster=3, services=())
    stack.start()
    try:
        cluster = stack.nats
        assert isinstance(cluster, NatsCluster)
        supervisor = supervisor_for(stack)
        supervisor.out = io.StringIO()
        victim = cluster.members[1]
        port, proc = victim.port, victim.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 120
        while not (victim.proc is not None and victim.proc is not proc and victim.healthy()):
            supervisor.tick()
            assert time.monotonic() < deadline, "the member was not restarted"
            time.sleep(0.1)
        assert victim.port == port
        assert "nats-server s2 exited (code -9)" in supervisor.out.getvalue()
        assert all(m.healthy() for m in cluster.members)
    finally:
        stack.stop()
