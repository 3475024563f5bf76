"""``gpu-fleet team add``: a team credential minted into a running stack works at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from tests.services._stack import wait_until

from gpu_fleet.cli.main import main
from gpu_fleet.runtime.connect import abandon
from gpu_fleet.runtime.ledger_keys import HEADER, LedgerKeys
from gpu_fleet.runtime.natsd import EmbeddedNats
from gpu_fleet.runtime.stack_security import StackSecurity


def env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, value = line.removeprefix("export ").split("=", 1)
        out[key] = value
    return out


@pytest.mark.asyncio
async def test_team_add_mints_a_credential_the_running_server_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "stack"
    security = StackSecurity.load_or_create(data / "security")
    server = EmbeddedNats(data / "nats", security=security.server_config)  # as ProcessStack
    await asyncio.to_thread(server.start)
    try:
        code = main(
            ["team", "add", "org:vision", "--data-dir", str(data), "--nats-url", server.url]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert "team org_vision: NATS user team-org_vision" in out
        assert "the running nats-server reloaded its users" in out
        env = env_file(data / "security" / "team-org_vision.env")
        assert env["GPU_FLEET_TEAM"] == "org_vision"
        assert (data / "security" / "team-org_vision.env").stat().st_mode & 0o077 == 0

        async def connects() -> bool:
            nc = nats.NATS()
            try:
                await nc.connect(
                    env["GPU_FLEET_NATS_URL"],
                    user=env["GPU_FLEET_NATS_USER"],
                    password=env["GPU_FLEET_NATS_PASSWORD"],
                    allow_reconnect=False,
                )
            except (nats.errors.Error, OSError):
                await abandon(nc)
                return False
            await nc.close()
            return True

        await wait_until(connects, "the team's user to be accepted")
        # Minting again keeps the same credential.
        assert main(["team", "add", "org_vision", "--data-dir", str(data)]) == 0
        again = env_file(data / "security" / "team-org_vision.env")
        assert again["GPU_FLEET_NATS_PASSWORD"] == env["GPU_FLEET_NATS_PASSWORD"]
    finally:
        await asyncio.to_thread(server.stop)


def test_team_add_refuses_an_unusable_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["team", "add", "x" * 80, "--data-dir", str(tmp_path)]) == 2
    assert "error: team: " in capsys.readouterr().err


def test_ledger_keys_writes_a_pair_and_never_overwrites_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["ledger-keys", "--out", str(tmp_path)]) == 0
    assert "kubectl create secret generic gpu-fleet-ledger-keys" in capsys.readouterr().out
    keys = LedgerKeys.load(str(tmp_path / "ledger.key"))
    public = LedgerKeys.load(public_path=str(tmp_path / "ledger.pub"))
    signature = keys.sign(7, "fleet.ledger.X", b"{}")
    assert public.verify(7, "fleet.ledger.X", b"{}", {HEADER: signature})
    assert not public.verify(8, "fleet.ledger.X", b"{}", {HEADER: signature})
    assert (tmp_path / "ledger.key").stat().st_mode & 0o077 == 0
    before = (tmp_path / "ledger.key").read_bytes()
    assert main(["ledger-keys", "--out", str(tmp_path)]) == 2
    assert "already holds a ledger key" in capsys.readouterr().err
    assert (tmp_path / "ledger.key").read_bytes() == before
