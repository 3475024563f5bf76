"""The live fleet map over real HTTP, against a real stack (embedded nats-server, real manager).

``LiveMap`` reads ``fleet.api.fleetmap`` on every load: the page follows the ledger (a submit
shows up on the next load, no restart), answers 503 with the reason while the manager is away
and recovers when it is back.  ``gpu-fleet up`` is run as a real process tree: it prints the
map's URL and each service's metrics URL, and each of them answers.  Nothing sleeps as an
assertion: what other processes reach in their own time is polled with generous bounds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from _background import EXAMPLES, READY, background_stack

from gpu_fleet.cli.live_map import LiveMap, LiveMapThread
from gpu_fleet.cli.main import main
from gpu_fleet.runtime.natsd import EmbeddedNats, free_port
from gpu_fleet.runtime.stack_security import redact

ROOT = Path(__file__).resolve().parents[2]
FLEET_GPUS = 32  # examples/inventory.yaml
T = TypeVar("T")


def get(url: str) -> tuple[int, str, str]:
    """Status, content type and body of one GET (an HTTP error status is an answer too)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def status_of(url: str) -> int:
    """The status of a GET, 0 while nothing listens yet (a process still starting)."""
    try:
        return get(url)[0]
    except urllib.error.URLError:
        return 0


def poll(probe: Callable[[], T | None], what: str, timeout: float = 120.0) -> T:
    """``probe()`` until it returns something; fail after ``timeout`` (a bound, not a speed)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def slots(page: str) -> list[str]:
    return re.findall(r'<rect class="slot[^"]*"[^>]*>', page)


def test_the_page_follows_the_ledger_and_serves_its_data(tmp_path: Path) -> None:
    with background_stack(tmp_path) as fleet:
        live = LiveMap(fleet.url, free_port(), refresh=7)
        fleet.run(live.start())
        try:
            status, ctype, page = get(live.url)
            assert (status, ctype) == (200, "text/html; charset=utf-8")
            assert len(slots(page)) == FLEET_GPUS
            assert 'data-run="' not in page  # nothing submitted: every slot free
            assert '<meta http-equiv="refresh" content="7">' in page

            manifests = sorted((EXAMPLES / "manifests").glob("*.yaml"))[:2]
            for path in manifests:
                fleet.call("apply", {"documents": path.read_text(), "source": path.name})
            data = fleet.call("fleetmap", {})
            held = [
                s for d in data["domains"] for n in d["nodes"] for s in n["slots"] if "run" in s
            ]
            assert held  # the examples start runs

            status, _, page = get(live.url)  # the next load shows them: no cache, no restart
            assert status == 200
            assert len(slots(page)) == FLEET_GPUS
            assert len([s for s in slots(page) if 'data-run="' in s]) == len(held)

            status, ctype, body = get(live.url + "fleetmap.json")
            assert (status, ctype) == (200, "application/json")
            assert json.loads(body) == data
            assert get(live.url + "healthz")[:1] == (200,)
            status, _, body = get(live.url + "nope")
            assert status == 404
            assert "/fleetmap.json" in body
        finally:
            fleet.run(live.stop())


def test_a_503_page_while_the_manager_is_away_and_the_map_again_when_it_is_back(
    tmp_path: Path,
) -> None:
    with background_stack(tmp_path) as fleet:
        live = LiveMap(fleet.url, free_port(), refresh=3)
        fleet.run(live.start())
        try:
            assert get(live.url)[0] == 200
            fleet.run(fleet.stack.stop_service("manager"))
            status, ctype, page = get(live.url)
            assert (status, ctype) == (503, "text/html; charset=utf-8")
            assert "The fleet map is unavailable: the manager does not answer" in page
            assert '<meta http-equiv="refresh" content="3">' in page  # an open tab retries
            status, _, body = get(live.url + "fleetmap.json")
            assert status == 503
            assert "manager does not answer" in json.loads(body)["error"]

            fleet.run(fleet.stack.start_service("manager"))  # rebuilds from the ledger
            status, _, page = get(live.url)
            assert status == 200
            assert len(slots(page)) == FLEET_GPUS
        finally:
            fleet.run(live.stop())


def test_a_503_page_when_nats_itself_is_down(tmp_path: Path) -> None:
    nats_server = EmbeddedNats(tmp_path / "nats")  # its port, never started
    live = LiveMapThread(LiveMap(nats_server.url, free_port()))
    live.start()
    try:
        status, _, page = get(live.live.url)
        assert status == 503
        assert f"NATS at {nats_server.url} does not answer" in page
        nats_server.start()  # NATS but no manager yet
        try:
            status, _, page = get(live.live.url)
            assert status == 503
            assert "the manager does not answer" in page
        finally:
            nats_server.stop()
    finally:
        live.stop()


def test_the_503_page_never_shows_the_password_in_the_url() -> None:
    url = f"nats://admin:s3cret-pw@127.0.0.1:{free_port()}"  # nothing listens there
    live = LiveMapThread(LiveMap(url, free_port()))
    live.start()
    try:
        status, _, page = get(live.live.url)
        assert status == 503
        assert f"NATS at {redact(url)} does not answer" in page
        assert "s3cret-pw" not in page
    finally:
        live.stop()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--metrics-port", "65534"],
            "--metrics-port: must be 0 (off) or a port in 1..65532 (the first of 4), got 65534",
        ),
        (["--map-port", "70000"], "--map-port: must be 0 (off) or a port in 1..65535"),
        (["--port", "9102"], "--metrics-port: ports 9101..9104 overlap --port or --map-port"),
        (["--map-port", "4222"], "--map-port: 4222 is also --port"),
        (["--map-refresh", "0"], "--map-refresh: must be >= 1 second, got 0"),
    ],
)
def test_up_refuses_port_flags_that_cannot_work(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["up", "--data-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}")
    assert err.count("\n") == 1  # one line, no traceback


def free_block(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now."""
    for base in range(21000 + os.getpid() % 500 * 60, 60000, 7):
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no block of free ports")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_gpu_fleet_up_prints_and_serves_the_map_and_every_services_metrics(
    tmp_path: Path,
) -> None:
    base = free_block(6)
    nats_port, map_port, metrics_port = base, base + 1, base + 2
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpu_fleet.cli.main",
            "up",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            str(nats_port),
            "--map-port",
            str(map_port),
            "--metrics-port",
            str(metrics_port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,  # ./examples/inventory.yaml: the default inventory
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        printed = []
        while not printed or "stop:" not in printed[-1]:
            line = proc.stdout.readline()
            assert line, f"gpu-fleet up ended early: {''.join(printed)}"
            printed.append(line)
        out = "".join(printed)
        map_url = f"http://127.0.0.1:{map_port}/"
        assert f"fleet map: {map_url} (live; reloads every 5 s)" in out
        urls = {
            name: f"http://127.0.0.1:{metrics_port + i}/"
            for i, name in enumerate(("manager", "binder", "forecaster", "notifier"))
        }
        for name, url in urls.items():
            assert re.search(rf"metrics:\s+{name}\s+{url}metrics", out), out

        def page() -> str | None:
            if status_of(map_url + "healthz") != 200:
                return None
            status, _, body = get(map_url)
            if status == 200 and len(slots(body)) == FLEET_GPUS:
                return body  # the manager answers and has registered the inventory
            return None

        poll(page, "the live map with every GPU of the inventory")
        for name, url in urls.items():
            poll(lambda url=url: status_of(url + "readyz") == 200, f"{name} ready")
            assert get(url + "healthz")[0] == 200
            metrics = get(url + "metrics")[2]
            assert "gpu_fleet_ready 1.0" in metrics, name
        manager_metrics = get(urls["manager"] + "metrics")[2]
        free = re.findall(r'gpu_fleet_gpus\{flavor="[^"]+",state="free"\} (\S+)', manager_metrics)
        assert sum(float(v) for v in free) == FLEET_GPUS
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=READY)
    assert proc.returncode == 0, rest
    assert "stopping gpu-fleet" in rest


@pytest.mark.timeout(180)
def test_gpu_fleet_map_serves_a_running_stack_until_sigterm(tmp_path: Path) -> None:
    """The standalone server compose runs: the same page, stopped cleanly by SIGTERM."""
    with background_stack(tmp_path) as fleet:
        port = free_port()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpu_fleet.cli.main",
                "map",
                "--nats-url",
                fleet.url,
                "--port",
                str(port),
                "--refresh",
                "9",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        try:
            first = proc.stdout.readline()
            # The URL carries the admin's password (authorization is on); it is never printed.
            shown = redact(fleet.url)
            assert "***" in shown
            assert first.startswith(f"fleet map of {shown}: http://127.0.0.1:{port}/"), first
            status, _, page = get(f"http://127.0.0.1:{port}/")
            assert status == 200
            assert len(slots(page)) == FLEET_GPUS
            assert '<meta http-equiv="refresh" content="9">' in page
        finally:
            proc.send_signal(signal.SIGTERM)
            _, errors = proc.communicate(timeout=READY)
        assert proc.returncode == 0, errors
        assert '"event":"live_map.listening"' in errors  # JSON log lines on stderr
