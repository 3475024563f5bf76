"""Who may do what on NATS: the subject permissions of each role, in one place.

The chart, compose and the embedded stack (``runtime.stack_security``) all render these
tables, so there is one definition of least privilege (docs/security.md lists them).

* Only the **manager** may publish on the ledger's subjects (``fleet.ledger.>``), write the
  snapshot object store, or change/purge/delete the ledger stream.  (It may also call the API:
  the object side of the Kubernetes bridge runs in its process.)
* The **binder** and **forecaster** read the ledger (an ordered consumer on ``FLEET``) and answer
  their own requests; the binder also hosts the pod side of the Kubernetes bridge, which calls
  the operator API (node health, failed pods).
* The **notifier** reads the ledger and owns the ``NOTIFY*`` streams.
* **admin** is the operator (the CLIs of ``gpu-fleet up``, tests): everything except writing the
  ledger or the snapshots.
* A **team** may publish only on ``fleet.api.team.<team>.>`` (the manager derives the team from
  the subject: identity, not a payload field), receive replies only on its own inbox prefix
  ``_INBOX_<team>.>`` and subscribe only to ``fleet.notify.<team>.>``.

Replies to requests are allowed by ``allow_responses`` (the server lets a service answer the
reply subject of a request it received, once), so no service needs to publish on ``_INBOX.>``.
"""

from __future__ import annotations

import re
from typing import Any

from gpu_fleet.messages import subjects

LEDGER_STREAM = "FLEET"
LEDGER_SUBJECTS = "fleet.ledger.>"
SNAPSHOT_STREAM = "OBJ_FLEET_SNAPSHOTS"  # the object store's stream (runtime.snapshots)
SNAPSHOT_SUBJECTS = "$O.FLEET_SNAPSHOTS.>"
TEAM_API_PREFIX = f"{subjects.API_GROUP}.team"
NOTIFY_STREAMS = (
    subjects.NOTIFY_STREAM,
    subjects.OUTBOX_STREAM,
    subjects.HISTORY_STREAM,
    subjects.CHANNEL_STREAM,
)
SERVICE_ROLES = ("manager", "binder", "forecaster", "notifier")
ROLES = (*SERVICE_ROLES, "admin")
_TEAM = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Changing, purging or deleting the truth (or the manager's snapshots) is the manager's alone.
_MUTATE = ("STREAM.UPDATE", "STREAM.DELETE", "STREAM.PURGE", "STREAM.MSG.DELETE")
PROTECTED = [
    LEDGER_SUBJECTS,
    SNAPSHOT_SUBJECTS,
    *(
        f"$JS.API.{verb}.{stream}"
        for stream in (LEDGER_STREAM, SNAPSHOT_STREAM)
        for verb in _MUTATE
    ),
]

# Reading the ledger: stream info, creating it if missing (the followers may start first), an
# ordered push consumer (flow control replies on $JS.FC) and the notifier's durable pull one.
LEDGER_READ = [
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    f"$JS.API.STREAM.INFO.{LEDGER_STREAM}",
    f"$JS.API.STREAM.CREATE.{LEDGER_STREAM}",
    f"$JS.API.CONSUMER.CREATE.{LEDGER_STREAM}",
    f"$JS.API.CONSUMER.CREATE.{LEDGER_STREAM}.>",
    f"$JS.API.CONSUMER.DELETE.{LEDGER_STREAM}.>",
    f"$JS.API.CONSUMER.INFO.{LEDGER_STREAM}.>",
    "$JS.FC.>",
]
SERVICE_SUBSCRIBE = ["_INBOX.>", "$SRV.>"]


def team_ok(team: str) -> bool:
    """A team name is one subject token (``subjects.team_token`` of a Budget owner)."""
    return bool(_TEAM.match(team))


def team_inbox(team: str) -> str:
    """The inbox prefix a team's client must use (``inbox_prefix``): only its replies."""
    return f"_INBOX_{team}"


def team_api(team: str) -> str:
    """``fleet.api.team.<team>``: the only subjects a team may publish on."""
    return f"{TEAM_API_PREFIX}.{team}"


def role_permissions(role: str) -> dict[str, Any]:
    """The nats-server ``permissions`` block of a service role or ``admin``."""
    if role == "manager":
        return _perms(
            publish=[
                LEDGER_SUBJECTS,
                SNAPSHOT_SUBJECTS,
                "$JS.API.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                subjects.BINDER_PLACE,
                # The object side of the Kubernetes bridge runs in the manager's process.
                f"{subjects.API_GROUP}.>",
                subjects.FORECAST_RUN,
            ],
            subscribe=[f"{subjects.API_GROUP}.>", *SERVICE_SUBSCRIBE],
        )
    if role == "binder":
        return _perms(
            publish=[*LEDGER_READ, f"{subjects.API_GROUP}.>", subjects.FORECAST_RUN],
            subscribe=["fleet.binder.>", *SERVICE_SUBSCRIBE],
            deny=PROTECTED,
        )
    if role == "forecaster":
        return _perms(
            publish=LEDGER_READ,
            subscribe=["fleet.forecast.>", *SERVICE_SUBSCRIBE],
            deny=PROTECTED,
        )
    if role == "notifier":
        return _perms(
            publish=[
                "$JS.API.>",
                "$JS.ACK.>",
                "$JS.FC.>",
                f"{subjects.NOTIFY_PREFIX}.>",
                f"{subjects.OUTBOX_PREFIX}.>",
                f"{subjects.HISTORY_PREFIX}.>",
                f"{subjects.CHANNEL_PREFIX}.>",
            ],
            subscribe=[f"{subjects.NOTIFIER_GROUP}.>", *SERVICE_SUBSCRIBE],
            deny=PROTECTED,
        )
    if role == "admin":
        return _perms(publish=[">"], subscribe=[">"], deny=PROTECTED)
    raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")


def team_permissions(team: str) -> dict[str, Any]:
    """A team: its own API prefix, its own inbox, its own notifications; nothing else."""
    if not team_ok(team):
        raise ValueError(f"team {team!r}: must be 1-64 of A-Z a-z 0-9 _ -")
    return {
        "publish": {"allow": [f"{team_api(team)}.>"]},
        "subscribe": {"allow": [f"{team_inbox(team)}.>", f"{subjects.NOTIFY_PREFIX}.{team}.>"]},
    }


def _perms(
    publish: list[str], subscribe: list[str], deny: list[str] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "publish": {"allow": list(publish)},
        "subscribe": {"allow": list(subscribe)},
        "allow_responses": True,
    }
    if deny:
        out["publish"]["deny"] = list(deny)
    return out
