"""A team credential cannot see or touch another team's work.

Two teams, ``org_vision`` (Budget owner ``org:vision`` in namespace ``vision``) and ``org_nlp``
(``org:nlp`` in ``nlp``), each with a NATS user minted into the running stack (the server
reloads its config, nobody restarts).  The manager authorizes by the subject a request arrives
on; the server enforces that a team publishes only there.  Every denial is checked for a clear
error and for the ledger not moving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client
from tests.services._stack import Stack, budget, run, wait_until

from gpu_fleet.cli import runs as kubectl_runs
from gpu_fleet.cli.stack import ApiCallError, call
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.connect import abandon

pytestmark = pytest.mark.asyncio
VISION, NLP = "org_vision", "org_nlp"


async def team_client(stack: Stack, team: str, errors: list[str] | None = None) -> Client:
    """Connect as ``team``, retrying until the reloaded server knows the user and answers it.

    Accepting the user is not the whole reload: while the server re-applies every
    connection's permissions it may close a connection it just accepted, or drop a request
    or its reply (seen under CI load: the first apply unanswered for 20 s, and a connection
    closed under the first request).  So a connection is handed over only once a read-only
    request of the team has come back on it; otherwise it is closed and the next one tried.
    """
    options = stack.security.team_auth(team).connect_options()

    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc))

    async def attempt() -> Client | None:
        nc = nats.NATS()
        try:
            await nc.connect(stack.nats.url, allow_reconnect=False, error_cb=on_error, **options)
            await call(nc, "seq", {}, timeout=2.0, team=team)
        except (nats.errors.Error, OSError):  # refused, closed or unanswered mid-reload
            await abandon(nc)
            return None
        return nc

    return await wait_until(attempt, f"the server to accept and answer team {team}")


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path) -> AsyncIterator[Stack]:
    stack = Stack(tmp_path)
    try:
        await stack.start()
        await stack.node("n0", 8)
        await stack.node("n1", 8)
        await stack.apply(budget("vision", "org:vision"))
        await stack.apply(budget("nlp", "org:nlp"))
        await stack.apply(run("nlp", "bert", 4))
        for team in (VISION, NLP):
            stack.security.add_team(team)
        stack.security.save()
        await asyncio.to_thread(stack.nats.reload)  # what `gpu-fleet team add` does
        yield stack
    finally:
        await stack.stop()


@pytest_asyncio.fixture(name="vision")
async def _vision(stack: Stack) -> AsyncIterator[Client]:
    nc = await team_client(stack, VISION)
    yield nc
    await nc.close()


async def as_team(nc: Client, endpoint: str, body: dict[str, Any]) -> Any:
    return await call(nc, endpoint, body, timeout=20.0, team=VISION)


async def refused(nc: Client, endpoint: str, body: dict[str, Any]) -> dict[str, str]:
    """The request is refused as forbidden; returns its one field error."""
    with pytest.raises(ApiCallError) as info:
        await as_team(nc, endpoint, body)
    assert info.value.code == "forbidden", info.value.message
    (error,) = info.value.errors
    return error


async def test_a_team_works_in_its_own_namespaces(stack: Stack, vision: Client) -> None:
    result = await as_team(vision, "apply", {"documents": run("vision", "resnet", 8)})
    assert result == [{"kind": "Run", "namespace": "vision", "name": "resnet", "action": "created"}]
    view = await as_team(vision, "get", {"namespace": "vision", "name": "resnet"})
    assert view["phase"] == "Running"
    eta = {"namespace": "vision", "name": "resnet", "eta": "2026-03-03T00:00:00Z"}
    assert (await as_team(vision, "eta", eta))["run"] == "vision/resnet"
    await as_team(vision, "complete", {"namespace": "vision", "name": "resnet"})
    await as_team(vision, "delete", {"kind": "Run", "namespace": "vision", "name": "resnet"})
    with pytest.raises(ApiCallError) as info:
        await as_team(vision, "get", {"namespace": "vision", "name": "resnet"})
    assert info.value.code == "not_found"


async def test_every_change_outside_its_namespaces_is_refused_and_changes_nothing(
    stack: Stack, vision: Client
) -> None:
    before = await stack.seq()
    bert = {"namespace": "nlp", "name": "bert"}
    bert_before = await stack.api("get", bert)
    error = await refused(vision, "apply", {"documents": run("nlp", "sneaky", 4)})
    assert error == {
        "path": "documents",
        "message": "Run nlp/sneaky: namespace nlp is not team org_vision's",
    }
    error = await refused(vision, "apply", {"documents": budget("vision", "org:vision", 999)})
    assert error["path"] == "documents"
    assert "a team may not apply Budgets" in error["message"]
    for endpoint, body in (
        ("delete", {"kind": "Run", **bert}),
        ("shrink", {**bert, "by": 1}),
        ("complete", bert),
        ("fail", bert),
        ("eta", {**bert, "eta": "2026-03-03T00:00:00Z"}),
        ("sponsors", {**bert, "op": "add", "sponsor": "vision/b"}),
    ):
        error = await refused(vision, endpoint, body)
        assert error["path"] == "namespace", endpoint
        assert error["message"].endswith("namespace nlp is not team org_vision's"), endpoint
    error = await refused(vision, "delete", {"kind": "Budget", "namespace": "vision", "name": "b"})
    assert error["path"] == "kind"
    error = await refused(vision, "node", {"op": "fence", "name": "n0"})
    assert error["path"] == "op"
    error = await refused(vision, "clock", {"advance_to": 1800000000})
    assert error["path"] == "advance_to"
    assert await stack.seq() == before  # nothing reached the ledger
    assert await stack.api("get", bert) == bert_before


async def test_a_team_reads_only_its_own_runs_and_fleet_aggregates(
    stack: Stack, vision: Client
) -> None:
    await as_team(vision, "apply", {"documents": run("vision", "resnet", 4)})
    bert = {"namespace": "nlp", "name": "bert"}
    for endpoint in ("get", "explain"):
        error = await refused(vision, endpoint, bert)
        assert error["path"] == "namespace"
    for endpoint in ("list", "leases"):
        await refused(vision, endpoint, {"namespace": "nlp"})
    listed = await as_team(vision, "list", {})
    assert [f"{r['namespace']}/{r['name']}" for r in listed] == ["vision/resnet"]
    leases = await as_team(vision, "leases", {})
    assert leases
    assert {lease["run"] for lease in leases} == {"vision/resnet"}
    # Fleet-wide aggregates stay visible: every budget, the map's totals, the report's runs
    # only for the team.
    budgets = await as_team(vision, "budgets", {})
    assert {b["namespace"] for b in budgets} == {"vision", "nlp"}
    fleetmap = await as_team(vision, "fleetmap", {})
    assert "nlp/bert" not in str(fleetmap)
    assert "vision/resnet" in str(fleetmap)
    assert fleetmap == await as_team(vision, "fleetmap", {})  # deterministic
    report = await as_team(vision, "report", {})
    assert "nlp/bert" not in str(report)
    assert "vision/resnet" in str(report)
    operator = await stack.api("fleetmap", {})
    assert "nlp/bert" in str(operator)  # the operator still sees everything


async def test_nats_refuses_a_team_anything_but_its_own_subjects(stack: Stack) -> None:
    """The server's permissions: the operator API, another team's prefix, another team's
    notifications and the ledger are all refused to the team's user."""
    errors: list[str] = []
    nc = await team_client(stack, VISION, errors)
    try:
        await nc.publish("fleet.api.apply", b"{}")
        await nc.publish(f"fleet.api.team.{NLP}.delete", b"{}")
        await nc.subscribe(f"fleet.notify.{NLP}.>")
        await nc.subscribe("fleet.ledger.>")
        await nc.subscribe("_INBOX.>")
        await wait_until(lambda: len(errors) >= 5, "five permission violations")
        text = "\n".join(errors).lower()
        for subject in (
            "fleet.api.apply",
            f"fleet.api.team.{NLP}.delete".lower(),
            f"fleet.notify.{NLP}.>".lower(),
            "fleet.ledger.>",
            "_inbox.>",
        ):
            assert subject in text, subject
        assert text.count("permissions violation") >= 5
        # ... while its own notifications and API answer.
        await nc.subscribe(f"fleet.notify.{VISION}.>")
        await nc.flush()
        assert await call(nc, "seq", {}, timeout=20.0, team=VISION)
    finally:
        await nc.close()


async def test_kubectl_runs_takes_a_team_credential(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await (await team_client(stack, VISION)).close()  # the reload has taken effect
    auth = stack.security.team_auth(VISION)
    assert auth.password is not None
    doc = tmp_path / "run.yaml"
    doc.write_text(run("nlp", "sneaky", 2))
    common = [
        "--nats-url",
        stack.nats.url,
        "--nats-user",
        f"team-{VISION}",
        "--team",
        VISION,
    ]
    env = {"GPU_FLEET_NATS_PASSWORD": auth.password}

    def kubectl(*argv: str) -> tuple[int, str]:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            code = kubectl_runs.main([*argv, *common])
        return code, capsys.readouterr().err

    code, err = await asyncio.to_thread(kubectl, "get", "bert", "-n", "nlp")
    assert code == 1
    assert "error: RunRef nlp/bert: namespace nlp is not team org_vision's" in err
    code, err = await asyncio.to_thread(kubectl, "submit", "-f", str(doc))
    assert code == 1
    assert "namespace nlp is not team org_vision's" in err
    doc.write_text(run("vision", "mine", 2))
    code, err = await asyncio.to_thread(kubectl, "submit", "-f", str(doc))
    assert code == 0, err
    code, err = await asyncio.to_thread(kubectl, "get", "mine", "-n", "vision")
    assert code == 0, err
    env["GPU_FLEET_NATS_PASSWORD"] = "wrong"
    code, err = await asyncio.to_thread(kubectl, "get", "-A")
    assert code == 1
    assert "authorization violation" in err.lower()
    assert "wrong" not in err
    code, err = await asyncio.to_thread(kubectl, "get", "-A", "--tls-key", str(doc))
    assert code == 2
    assert "--tls-cert and --tls-key: give both or neither" in err


async def test_client_options_are_checked_and_named() -> None:
    with pytest.raises(ValueError, match="--nats-token and --nats-user"):
        ClientAuth(token="t", user="u", password="p").connect_options()
    with pytest.raises(ValueError, match="--nats-user and --nats-password"):
        ClientAuth(user="u").connect_options()
    with pytest.raises(ValueError, match="--nats-creds: no such file: /nonexistent"):
        ClientAuth(creds="/nonexistent").connect_options()
    options = ClientAuth(user="team-a", password="p", team="a").connect_options()
    assert options == {"user": "team-a", "password": "p", "inbox_prefix": "_INBOX_a"}
