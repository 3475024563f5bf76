"""The embedded stack's security profile: users, passwords, the ledger key pair, TLS files.

``gpu-fleet up``, ``make demo`` and the tests' stacks run with authorization on by default: the
first start writes a profile into ``<data dir>/security`` (files readable by their owner only)
and every later start reuses it, so the ledger signed by the manager's key stays readable and
clients keep their passwords.  ``gpu-fleet team add`` adds a team user to the profile; the
running server picks it up on a config reload (SIGHUP), nobody restarts.

The server side is a nats-server config fragment (``server_config``): one user per role with
the permissions of ``runtime.permissions``, one per team, and an optional ``tls`` block.  JSON
is valid nats-server config syntax, so the fragment is written with ``json.dumps``: no quoting
bugs whatever a password holds.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gpu_fleet.runtime.client_auth import ClientAuth
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.natsd_cluster import servers
from gpu_fleet.runtime.permissions import (
    ROLES,
    role_permissions,
    team_inbox,
    team_ok,
    team_permissions,
)

USERS_FILE = "users.json"
PRIVATE_KEY_FILE = "ledger.key"
PUBLIC_KEY_FILE = "ledger.pub"


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate; with ``ca`` and ``verify`` clients must present one too."""

    cert: str
    key: str
    ca: str | None = None
    verify: bool = False

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cert_file": self.cert, "key_file": self.key}
        if self.ca:
            out["ca_file"] = self.ca
        if self.verify:
            out["verify"] = True
        return out


@dataclass
class StackSecurity:
    """Passwords per role and team, the ledger keys and, optionally, TLS - kept in ``folder``."""

    folder: Path
    passwords: dict[str, str]
    teams: dict[str, str]
    keys: LedgerKeys
    tls: ServerTls | None = None
    client_tls: ClientAuth = field(default_factory=ClientAuth)  # CA/cert/key every client uses
    root: str | None = None  # tests only: an unrestricted user, to play the attacker

    # -- persistence -----------------------------------------------------------------------
    @classmethod
    def load_or_create(cls, folder: str | os.PathLike[str], *, root: bool = False) -> StackSecurity:
        """The profile in ``folder``, created on first use (passwords, ledger key pair)."""
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        users = path / USERS_FILE
        if users.exists():
            data = json.loads(users.read_text())
            keys = LedgerKeys.load(str(path / PRIVATE_KEY_FILE))
        else:
            data = {"roles": {role: secrets.token_urlsafe(24) for role in ROLES}, "teams": {}}
            keys = LedgerKeys.generate()
            keys.write(path / PRIVATE_KEY_FILE, path / PUBLIC_KEY_FILE)
        if root and not data.get("root"):
            data["root"] = secrets.token_urlsafe(24)
        security = cls(
            folder=path,
            passwords=dict(data["roles"]),
            teams=dict(data.get("teams", {})),
            keys=keys,
            root=data.get("root"),
        )
        security.save()
        return security

    def save(self) -> None:
        data: dict[str, Any] = {"roles": self.passwords, "teams": self.teams}
        if self.root:
            data["root"] = self.root
        _write_private(self.folder / USERS_FILE, json.dumps(data, indent=2, sort_keys=True))

    def add_team(self, team: str) -> str:
        """Add (or keep) a team user; returns its password.  Call ``save`` and reload the server."""
        if not team_ok(team):
            raise ValueError(f"team {team!r}: must be 1-64 of A-Z a-z 0-9 _ -")
        return self.teams.setdefault(team, secrets.token_urlsafe(24))

    # -- server side -----------------------------------------------------------------------
    def server_config(self) -> str:
        """The nats-server config fragment: ``authorization`` (and ``tls`` when set)."""
        users = [
            {"user": role, "password": pw, "permissions": role_permissions(role)}
            for role, pw in sorted(self.passwords.items())
        ]
        users += [
            {"user": f"team-{team}", "password": pw, "permissions": team_permissions(team)}
            for team, pw in sorted(self.teams.items())
        ]
        if self.root:
            users.append({"user": "root", "password": self.root})
        conf: dict[str, Any] = {"authorization": {"users": users}}
        if self.tls is not None:
            conf["tls"] = self.tls.config()
        return json.dumps(conf, indent=2)

    # -- client side -----------------------------------------------------------------------
    def url_for(self, role: str, url: str) -> str:
        """``url`` with ``role``'s user and password in it (how in-process services connect)."""
        if role == "root":
            if self.root is None:
                raise ValueError("this profile has no root user")
            return with_userinfo(url, "root", self.root)
        return with_userinfo(url, role, self.passwords[role])

    def team_auth(self, team: str) -> ClientAuth:
        """What a team's client connects with: its user, password and inbox prefix."""
        return ClientAuth(
            user=f"team-{team}",
            password=self.teams[team],
            inbox_prefix=team_inbox(team),
            team=team,
            tls_ca=self.client_tls.tls_ca,
        )

    def role_auth(self, role: str) -> ClientAuth:
        if role == "root":
            assert self.root is not None
            return ClientAuth(user="root", password=self.root, tls_ca=self.client_tls.tls_ca)
        return ClientAuth(user=role, password=self.passwords[role], tls_ca=self.client_tls.tls_ca)

    @property
    def public_key_file(self) -> Path:
        return self.folder / PUBLIC_KEY_FILE

    @property
    def private_key_file(self) -> Path:
        return self.folder / PRIVATE_KEY_FILE


def with_userinfo(url: str, user: str, password: str) -> str:
    """``nats://host:port`` -> ``nats://user:password@host:port`` (passwords are URL-safe).

    A cluster's URL lists its servers separated by commas (``natsd_cluster.servers``): each
    gets the credentials, so a client failing over logs in to any of them.
    """
    return ",".join(_with_userinfo(one, user, password) for one in servers(url))


def _with_userinfo(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def redact(url: str) -> str:
    """A URL fit for a log line: the password replaced by ``***`` (in every server listed)."""
    return ",".join(_redact(one) for one in servers(url))


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
