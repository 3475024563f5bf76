"""How a client proves who it is to NATS, and how it checks the server: the usual NATS ways.

One dataclass for every connection - services, ``gpu-fleet`` and ``kubectl-runs`` alike - so
each option has one flag and one environment variable everywhere:

=================  ============================  =========================================
flag               environment                   meaning
=================  ============================  =========================================
``--nats-creds``   ``GPU_FLEET_NATS_CREDS``      a ``.creds`` file (JWT + nkey seed)
``--nats-nkey``    ``GPU_FLEET_NATS_NKEY``       an nkey seed file
``--nats-user``    ``GPU_FLEET_NATS_USER``       user name (with the password)
``--nats-password`` ``GPU_FLEET_NATS_PASSWORD``  password
``--nats-token``   ``GPU_FLEET_NATS_TOKEN``      a token
``--tls-ca``       ``GPU_FLEET_NATS_TLS_CA``     CA bundle that signed the server certificate
``--tls-cert``     ``GPU_FLEET_NATS_TLS_CERT``   client certificate (mutual TLS)
``--tls-key``      ``GPU_FLEET_NATS_TLS_KEY``    its key
``--team``         ``GPU_FLEET_TEAM``            act as this team (``fleet.api.team.<team>``)
=================  ============================  =========================================

A user and password may also ride in the URL (``nats://user:pw@host:4222``).  With ``--team``
the client sends its API requests on the team's prefix and receives replies on the team's own
inbox prefix, the only ones its NATS permissions allow (``runtime.permissions``).
"""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

ENV = {
    "creds": "GPU_FLEET_NATS_CREDS",
    "nkey": "GPU_FLEET_NATS_NKEY",
    "user": "GPU_FLEET_NATS_USER",
    "password": "GPU_FLEET_NATS_PASSWORD",
    "token": "GPU_FLEET_NATS_TOKEN",
    "tls_ca": "GPU_FLEET_NATS_TLS_CA",
    "tls_cert": "GPU_FLEET_NATS_TLS_CERT",
    "tls_key": "GPU_FLEET_NATS_TLS_KEY",
    "team": "GPU_FLEET_TEAM",
}
FLAGS = {
    "creds": ("--nats-creds", "NATS credentials file (.creds: JWT and nkey seed)"),
    "nkey": ("--nats-nkey", "NATS nkey seed file"),
    "user": ("--nats-user", "NATS user name"),
    "password": ("--nats-password", "NATS password (prefer the environment variable)"),
    "token": ("--nats-token", "NATS token (prefer the environment variable)"),
    "tls_ca": ("--tls-ca", "CA certificate(s) to verify the NATS server with"),
    "tls_cert": ("--tls-cert", "client certificate for mutual TLS"),
    "tls_key": ("--tls-key", "the client certificate's private key"),
    "team": ("--team", "act as this team: API requests on fleet.api.team.<team>"),
}


PASSWORD_FILE_ENV = "GPU_FLEET_NATS_PASSWORD_FILE"


class ClientAuthError(ValueError):
    """Contradictory or incomplete connection options (the message names the option)."""


@dataclass(frozen=True)
class ClientAuth:
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    team: str | None = None
    inbox_prefix: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientAuth:
        """The ``GPU_FLEET_NATS_*`` options; ``GPU_FLEET_NATS_PASSWORD_FILE`` names a file
        holding the password (compose mounts one per service) when the password is not set."""
        env = os.environ if env is None else env
        auth = cls(**{name: env.get(var) or None for name, var in ENV.items()})
        password_file = env.get(PASSWORD_FILE_ENV)
        if auth.password is None and password_file:
            try:
                password = Path(password_file).read_text().strip()
            except OSError as exc:
                raise ClientAuthError(
                    f"{PASSWORD_FILE_ENV}: cannot read {password_file}: {exc.strerror}"
                ) from exc
            auth = replace(auth, password=password)
        return auth

    def merged(self, other: ClientAuth) -> ClientAuth:
        """``other``'s options where set, ours elsewhere (flags over the environment)."""
        values = {f.name: getattr(other, f.name) for f in fields(other)}
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def check(self) -> None:
        """Refuse option sets that cannot work, naming the option."""
        ways = [n for n in ("creds", "nkey", "token") if getattr(self, n)]
        if self.user or self.password:
            ways.append("user")
        if len(ways) > 1:
            raise ClientAuthError(f"--nats-{ways[0]} and --nats-{ways[1]}: give one way to log in")
        if bool(self.user) != bool(self.password):
            raise ClientAuthError("--nats-user and --nats-password: give both or neither")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ClientAuthError("--tls-cert and --tls-key: give both or neither")
        for name in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                flag = FLAGS[name][0]
                raise ClientAuthError(f"{flag}: no such file: {path}")

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert and self.tls_key:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (only those that are set)."""
        self.check()
        out: dict[str, Any] = {}
        if self.creds:
            out["user_credentials"] = self.creds
        if self.nkey:
            out["nkeys_seed"] = self.nkey
        if self.user:
            out["user"] = self.user
            out["password"] = self.password
        if self.token:
            out["token"] = self.token
        ctx = self.ssl_context()
        if ctx is not None:
            out["tls"] = ctx
        inbox = self.inbox_prefix or (f"_INBOX_{self.team}" if self.team else None)
        if inbox:
            out["inbox_prefix"] = inbox
        return out


def add_flags(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """The connection flags above (``from_args`` adds the environment under them).

    ``suppress`` leaves an option out of the namespace when not given, for parsers whose
    options may come before or after a verb (``kubectl runs``)."""
    group = parser.add_argument_group("NATS credentials and TLS (docs/security.md)")
    default = argparse.SUPPRESS if suppress else None
    for name, (flag, text) in FLAGS.items():
        group.add_argument(
            flag, dest=f"auth_{name}", default=default, help=f"{text} (env {ENV[name]})"
        )


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ClientAuth:
    """The environment's options overridden by the flags given."""
    flags = ClientAuth(**{name: getattr(args, f"auth_{name}", None) for name in FLAGS})
    return ClientAuth.from_env(env).merged(flags)
