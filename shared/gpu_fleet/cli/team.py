"""``gpu-fleet team add TEAM`` (a team's NATS credential) and ``gpu-fleet ledger-keys``.

The team's user goes into the stack's security profile (``<data dir>/security/users.json``);
the server config is rewritten and a running ``gpu-fleet up`` server re-reads it on SIGHUP, so
the credential works at once.  The credential is written to ``security/team-<TEAM>.env``
(readable by its owner only) for the team's shell: ``source`` it, then ``kubectl runs ...``.

TEAM is the Budget owner as a subject token (``org:ai:rai`` -> ``org_ai_rai``): the team may
act in the namespaces holding a Budget with that owner (docs/security.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

from gpu_fleet.messages.subjects import team_token
from gpu_fleet.runtime.ledger_keys import LedgerKeys
from gpu_fleet.runtime.natsd import EmbeddedNats
from gpu_fleet.runtime.permissions import team_ok
from gpu_fleet.runtime.stack_security import StackSecurity


def add_parser(sub: Any) -> None:
    team = sub.add_parser("team", help="team credentials for the embedded stack")
    ops = team.add_subparsers(dest="team_command", required=True)
    add = ops.add_parser("add", help="mint (or show) a team's NATS credential")
    add.add_argument("team", help="the Budget owner, e.g. org:ai:rai (or its token org_ai_rai)")
    add.add_argument(
        "--data-dir", default=".gpu-fleet", help="the stack's data folder (default .gpu-fleet)"
    )
    add.add_argument(
        "--nats-url", default="nats://127.0.0.1:4222", help="written into the team's env file"
    )
    add.set_defaults(func=cmd_team_add)
    profile = sub.add_parser(
        "profile", help="write a security profile into a folder (compose's init container)"
    )
    profile.add_argument("folder", help="where users, passwords, keys and the NATS config go")
    profile.set_defaults(func=cmd_profile)
    keys = sub.add_parser("ledger-keys", help="make the ledger's Ed25519 key pair (for the chart)")
    keys.add_argument("--out", default=".", help="folder for ledger.key and ledger.pub")
    keys.set_defaults(func=cmd_ledger_keys)


def cmd_profile(args: argparse.Namespace) -> int:
    """Make (or keep) a profile; write the NATS config and one password file per role.

    compose runs this once before NATS starts: the server reads ``nats-security.conf``, each
    service its ``<role>.password`` (``GPU_FLEET_NATS_PASSWORD_FILE``) and its ledger key.
    """
    folder = Path(args.folder)
    security = StackSecurity.load_or_create(folder)
    _write_private(folder / "nats-security.conf", security.server_config())
    for role, password in security.passwords.items():
        _write_private(folder / f"{role}.password", password + "\n")
    print(f"security profile in {folder}: users {', '.join(sorted(security.passwords))}")
    return 0


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def cmd_ledger_keys(args: argparse.Namespace) -> int:
    """Write a new key pair; refuse to overwrite one (events signed by it would turn unreadable)."""
    out = Path(args.out)
    private, public = out / "ledger.key", out / "ledger.pub"
    if private.exists() or public.exists():
        print(f"error: --out: {out} already holds a ledger key; keep it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    LedgerKeys.generate().write(private, public)
    print(f"wrote {private} (the manager's only) and {public}")
    print(
        "  kubectl create secret generic gpu-fleet-ledger-keys"
        f" --from-file=ledger.key={private} --from-file=ledger.pub={public}"
    )
    print("  helm ... --set auth.ledgerKeysSecret=gpu-fleet-ledger-keys")
    return 0


def cmd_team_add(args: argparse.Namespace) -> int:
    team = team_token(args.team)
    if not team_ok(team):
        print(f"error: team: {args.team!r} is not a usable team name", file=sys.stderr)
        return 2
    data = Path(args.data_dir)
    security = StackSecurity.load_or_create(data / "security")
    password = security.add_team(team)
    security.save()
    server = EmbeddedNats(data / "nats", security=security.server_config)
    server.security_args()  # rewrite the server's config with the new user
    # One server (``up``) or every member of a ``--nats-cluster`` (natsd_cluster.ClusterMember).
    pid_files = [data / "nats-server.pid", *sorted((data / "nats").glob("s*/nats-server.pid"))]
    reloaded = sum(_signal_reload(pid) for pid in pid_files) > 0  # every one is signalled
    env = security.folder / f"team-{team}.env"
    fd = os.open(env, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            f"export GPU_FLEET_NATS_URL={args.nats_url}\n"
            f"export GPU_FLEET_NATS_USER=team-{team}\n"
            f"export GPU_FLEET_NATS_PASSWORD={password}\n"
            f"export GPU_FLEET_TEAM={team}\n"
        )
    print(f"team {team}: NATS user team-{team}; credential in {env}")
    print(f"  use:    source {env}; kubectl runs get -A")
    print(
        f"  scope:  namespaces with a Budget owned by {team}; notifications fleet.notify.{team}.>"
    )
    if reloaded:
        print("  the running nats-server reloaded its users")
    else:
        print("  no running nats-server found: the user is active from the next `gpu-fleet up`")
    return 0


def _signal_reload(pid_file: Path) -> bool:
    """SIGHUP the stack's nats-server - only if the pid file still names one (a stale file's
    pid may have been reused by another process)."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    if b"nats-server" not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGHUP)
        return True
    return False
