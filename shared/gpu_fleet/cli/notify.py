"""``kubectl runs notify``: a team's NotificationChannels - list, test, history, delete.

Channels are applied like any manifest (``kubectl runs submit -f channel.yaml``).  These
commands talk to the notifier (``fleet.notifier.*``), which knows what was delivered:

* ``notify list`` - each channel with its target (path elided), format, filter, lead times, the
  receiver's breaker state and the deliveries waiting;
* ``notify test CHANNEL`` - the notifier sends one signed sample now and this prints what the
  receiver answered (exit 1 when it did not accept it);
* ``notify history [CHANNEL] [--run R]`` - every attempt of every delivery, oldest first, with
  its outcome: delivered, retry (and when the next attempt is due), dead (the dead letter);
* ``notify delete CHANNEL`` - through the fleet API, like every change.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import nats.errors

from gpu_fleet.cli.stack import call
from gpu_fleet.core.timeutil import format_duration, format_instant

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NOTIFIER_TIMEOUT = 30.0  # a test waits for the receiver (one attempt, its own timeout)


class NotifierError(RuntimeError):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("notify", help="notification channels: list, test, history, delete")
    ops = p.add_subparsers(dest="notify_op", required=True, parser_class=type(p))
    ls = ops.add_parser("list", help="channels and their delivery state", parents=[common])
    ls.add_argument("-A", "--all-namespaces", action="store_true")
    t = ops.add_parser("test", help="send a signed sample, print the answer", parents=[common])
    t.add_argument("channel", metavar="CHANNEL")
    h = ops.add_parser("history", help="deliveries, attempts and outcomes", parents=[common])
    h.add_argument("channel", nargs="?", metavar="CHANNEL")
    h.add_argument("--run", help="only deliveries about this run (name or namespace/name)")
    h.add_argument("--limit", type=int, default=200, help="the newest N records (default 200)")
    h.add_argument("-A", "--all-namespaces", action="store_true")
    d = ops.add_parser(
        "delete", help="delete a channel (pending deliveries are dropped)", parents=[common]
    )
    d.add_argument("channel", metavar="CHANNEL")


async def _ask(nc: Any, endpoint: str, body: dict[str, Any]) -> Any:
    try:
        msg = await nc.request(
            f"fleet.notifier.{endpoint}", json.dumps(body).encode(), timeout=NOTIFIER_TIMEOUT
        )
    except nats.errors.NoRespondersError:
        raise NotifierError(
            "no notifier is answering on fleet.notifier (is gpu-fleet-notifier running?)",
            "unavailable",
        ) from None
    data = json.loads(msg.data) if msg.data else None
    if isinstance(data, dict) and "error" in data and "code" in data:
        raise NotifierError(str(data["error"]), str(data["code"]))
    return data


def _split(ref: str, namespace: str) -> tuple[str, str]:
    if "/" in ref:
        ns, name = ref.split("/", 1)
        return ns, name
    return namespace, ref


def _when(t: float | None) -> str:
    return "-" if t is None else format_instant(int(t))


async def cmd_notify(nc: Any, args: argparse.Namespace, emit: Any, table: Any) -> int:
    try:
        return await _dispatch(nc, args, emit, table)
    except NotifierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == "bad_request" else EXIT_FAILED


async def _dispatch(nc: Any, args: argparse.Namespace, emit: Any, table: Any) -> int:
    op = args.notify_op
    if op == "list":
        namespace = None if args.all_namespaces else args.namespace
        rows = await _ask(nc, "channels", {"namespace": namespace})
        emit(
            args,
            rows,
            table(
                "Notification Channels",
                ["Channel", "Target", "Format", "Leads", "Breaker", "Pending", "Delivered", "Dead"],
                [
                    [
                        r["channel"],
                        r["target"],
                        r["format"],
                        ",".join(format_duration(s) for s in r["lead_times"]),
                        r["breaker"],
                        r["pending"],
                        r["delivered"],
                        r["dead"],
                    ]
                    for r in rows
                ],
            ),
        )
        return EXIT_OK
    if op == "test":
        ns, name = _split(args.channel, args.namespace)
        reply = await _ask(nc, "test", {"namespace": ns, "name": name})
        status = reply.get("status")
        answer = reply.get("body") or reply.get("error") or ""
        emit(
            args,
            reply,
            table(
                "Channel Test",
                ["Field", "Value"],
                [
                    ["Channel", reply["channel"]],
                    ["Target", reply["target"]],
                    ["Delivered", "yes" if reply["delivered"] else "no"],
                    ["Status", status if status is not None else "-"],
                    ["Answer", answer.strip()[:200]],
                    ["Id", reply.get("id")],
                    ["Signature", reply.get("signature") or "(unsigned)"],
                    ["Took", f"{reply.get('ms', 0):.0f} ms"],
                ],
            ),
        )
        return EXIT_OK if reply["delivered"] else EXIT_FAILED
    if op == "history":
        body: dict[str, Any] = {"limit": args.limit}
        if args.channel:
            ns, name = _split(args.channel, args.namespace)
            body.update(namespace=ns, channel=name)
        elif not args.all_namespaces:
            body["namespace"] = args.namespace
        if args.run:
            body["run"] = args.run if "/" in args.run else f"{args.namespace}/{args.run}"
        rows = await _ask(nc, "history", body)
        emit(
            args,
            rows,
            table(
                "Delivery History",
                ["Time", "Channel", "Event", "Run", "Attempt", "Outcome", "Status", "Detail"],
                [
                    [
                        _when(r["at"]),
                        r["channel"],
                        r["event"],
                        r["run"] or "-",
                        r["attempt"],
                        r["outcome"] + (" (test)" if r.get("test") else ""),
                        r.get("status") if r.get("status") is not None else "-",
                        _detail(r),
                    ]
                    for r in rows
                ],
            ),
        )
        return EXIT_OK
    ns, name = _split(args.channel, args.namespace)
    result = await call(
        nc,
        "delete",
        {"kind": "NotificationChannel", "namespace": ns, "name": name},
        team=getattr(args, "team", None),
    )
    emit(args, result, f"deleted notification channel {ns}/{name}")
    return EXIT_OK


def _detail(r: dict[str, Any]) -> str:
    parts = []
    if r.get("error"):
        parts.append(str(r["error"]))
    if r.get("retry_after") is not None:
        parts.append(f"Retry-After {r['retry_after']:g}s")
    if r.get("next_at") is not None:
        parts.append(f"next {_when(r['next_at'])}")
    return "; ".join(parts) or "-"
