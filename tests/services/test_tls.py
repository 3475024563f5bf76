"""TLS on every connection: the server, the services and the CLIs, with a CA made in the test.

``trustme`` mints a throwaway CA and certificates for 127.0.0.1.  The services and the stack's
client read the CA from ``GPU_FLEET_NATS_TLS_CA`` (as in a deployment), ``kubectl runs`` takes
``--tls-ca/--tls-cert/--tls-key``; a client that does not trust the CA, or (with mutual TLS)
shows no certificate, is refused.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
import trustme
from tests.services._stack import Stack, budget, run

from gpu_fleet.cli import runs as kubectl_runs
from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.connect import abandon
from gpu_fleet.runtime.stack_security import ServerTls

pytestmark = pytest.mark.asyncio


class Pki:
    """A CA, the server's certificate for 127.0.0.1 and a client certificate, as files."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        client = ca.issue_cert("kubectl-runs@example.org")
        self.ca = folder / "ca.pem"
        self.cert, self.key = folder / "server.pem", folder / "server.key"
        self.client_cert, self.client_key = folder / "client.pem", folder / "client.key"
        ca.cert_pem.write_to_path(str(self.ca))
        server.cert_chain_pems[0].write_to_path(str(self.cert))
        server.private_key_pem.write_to_path(str(self.key))
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))


@pytest_asyncio.fixture(name="pki")
async def _pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


async def refused(url: str, **options: object) -> str:
    """Connecting fails; returns why."""
    nc = nats.NATS()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=5, **options)
    except Exception as exc:
        await abandon(nc)
        return f"{type(exc).__name__}: {exc}"
    await nc.close()
    raise AssertionError("the connection was accepted")


@pytest_asyncio.fixture(name="stack")
async def _stack(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setenv("GPU_FLEET_NATS_TLS_CA", str(pki.ca))
    stack = Stack(tmp_path)
    stack.security.tls = ServerTls(str(pki.cert), str(pki.key))
    try:
        await stack.start()
        yield stack
    finally:
        await stack.stop()


async def test_the_stack_runs_over_tls_and_refuses_clients_that_do_not_verify(
    stack: Stack, pki: Pki
) -> None:
    assert stack.client.client_id is not None
    assert stack.client._transport is not None
    assert isinstance(
        stack.client._transport._io_writer.get_extra_info("ssl_object"), ssl.SSLObject
    )  # type: ignore[union-attr]
    await stack.node("n0", 8)
    await stack.apply(budget("team", "org:team"))
    await stack.apply(run("team", "train", 8))  # the manager asks the binder: both over TLS
    view = await stack.api("get", {"namespace": "team", "name": "train"})
    assert view["phase"] == "Running"
    # A client that does not trust the CA is refused by its own TLS check ...
    why = await refused(stack.url, tls=ssl.create_default_context())
    assert "CERTIFICATE_VERIFY_FAILED" in why
    # ... and one that speaks plain NATS by the server.
    options = ClientAuth(user="admin", password=stack.security.passwords["admin"])
    plain = {k: v for k, v in options.connect_options().items() if k != "tls"}
    why = await refused(stack.nats.url, **plain)
    assert "tls" in why.lower() or "secure" in why.lower()


async def test_mutual_tls_and_kubectl_runs_tls_flags(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``verify`` the server wants a client certificate the CA signed."""
    monkeypatch.setenv("GPU_FLEET_NATS_TLS_CA", str(pki.ca))
    monkeypatch.setenv("GPU_FLEET_NATS_TLS_CERT", str(pki.client_cert))
    monkeypatch.setenv("GPU_FLEET_NATS_TLS_KEY", str(pki.client_key))
    stack = Stack(tmp_path / "mtls")
    stack.security.tls = ServerTls(str(pki.cert), str(pki.key), ca=str(pki.ca), verify=True)
    try:
        await stack.start()  # services and client present the client certificate (env)
        await stack.node("n0", 4)
        for var in ("GPU_FLEET_NATS_TLS_CA", "GPU_FLEET_NATS_TLS_CERT", "GPU_FLEET_NATS_TLS_KEY"):
            monkeypatch.delenv(var)
        no_cert = ClientAuth(tls_ca=str(pki.ca)).ssl_context()
        why = await refused(stack.url, tls=no_cert)
        assert why  # the handshake or the first read fails without a certificate

        def kubectl(*extra: str) -> tuple[int, str, str]:
            code = kubectl_runs.main(["get", "-A", "--nats-url", stack.url, *extra])
            out, err = capsys.readouterr()
            return code, out, err

        code, _, err = await asyncio.to_thread(kubectl, "--tls-ca", str(pki.ca))
        assert code == 1, err
        code, out, err = await asyncio.to_thread(
            kubectl,
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.client_cert),
            "--tls-key",
            str(pki.client_key),
        )
        assert code == 0, err
        assert "No runs" in out or "NAMESPACE" in out
    finally:
        await stack.stop()
