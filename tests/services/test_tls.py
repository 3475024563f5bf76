"""TLS on every connection: the server, the services and the CLIs, with a CA made in the test.

``trustme`` mints a throwaway CA and certificates for 127.0.0.1.  The services and the stack's
client read the CA from ``GPU_FLEET_NATS_TLS_CA`` (as in a deployment), ``kubectl runs`` takes
``--tls-ca/--tls-cert/--tls-key``; a client that does not trust the CA, or (with mutual TLS)
shows no certificate, is refused.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import trustme
from tests.services._stack import Stack, budget, run

from gpu_fleet.cli import runs as kubectl_runs
from gpu_fleet.runtime.client_auth import ClientAuth
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


def handshake(port: int, ctx: ssl.SSLContext) -> tuple[bytes, str]:
    """What a raw client sees: the server's plain-text INFO line, then the TLS outcome
    (``ok: <first line>`` after sending PING, or the TLS error)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        info = b""
        while not info.endswith(b"\r\n"):
            chunk = raw.recv(1)
            if not chunk:
                break
            info += chunk
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"CONNECT {}\r\nPING\r\n")
                return info, f"ok: {tls.recv(4096)!r}"
        except (ssl.SSLError, OSError) as exc:
            return info, f"{type(exc).__name__}: {exc}"


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
    assert stack.client.is_connected  # over TLS: the server accepts nothing else (below)
    await stack.node("n0", 8)
    await stack.apply(budget("team", "org:team"))
    await stack.apply(run("team", "train", 8))  # the manager asks the binder: both over TLS
    view = await stack.api("get", {"namespace": "team", "name": "train"})
    assert view["phase"] == "Running"
    # The server insists on TLS before anything else ...
    trusting = ClientAuth(tls_ca=str(pki.ca)).ssl_context()
    assert trusting is not None
    info, outcome = await asyncio.to_thread(handshake, stack.nats.port, trusting)
    assert b'"tls_required":true' in info
    assert outcome.startswith("ok: ")  # the CA's client gets through TLS
    # ... and a client that does not trust the CA fails to verify the server.
    _, outcome = await asyncio.to_thread(handshake, stack.nats.port, ssl.create_default_context())
    assert "CERTIFICATE_VERIFY_FAILED" in outcome


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
        assert no_cert is not None
        _, outcome = await asyncio.to_thread(handshake, stack.nats.port, no_cert)
        assert "PONG" not in outcome, outcome

        def kubectl(*extra: str) -> tuple[int, str, str]:
            code = kubectl_runs.main(["get", "-A", "--nats-url", stack.url, *extra])
            out, err = capsys.readouterr()
            return code, out, err

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
        assert "Run  Phase  Reason  GPUs" in out
    finally:
        await stack.stop()
