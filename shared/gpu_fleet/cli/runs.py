"""``kubectl-runs`` (so ``kubectl runs ...`` works): researchers' and team leads' CLI.

It talks to the fleet API over NATS (``--nats-url`` or ``GPU_FLEET_NATS_URL``); it never decides
anything itself - what it prints is what the manager folded from the ledger.  Exit codes: 0 ok,
1 the request failed (not found, unavailable, outcome unknown), 2 usage or validation errors
(each field error is printed as ``error: <path>: <reason>``, prefixed by the file for
``submit``).  Errors are one line, never a traceback.

Global options (``--nats-url``, ``-n``, ``-o``, ``--timeout``) work before the verb, as with
``kubectl --server X get pods``, and after it; a value given after the verb wins.  Lists are
read a page at a time (``limit``/``continue``) and printed whole.  The help text is plain
(``DESCRIPTION``), not this docstring: a terminal shows no reStructuredText.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import nats.errors
import yaml
from nats.aio.client import Client

from gpu_fleet.cli import notify, pictures
from gpu_fleet.cli.stack import ApiCallError, call
from gpu_fleet.core.manifests import ManifestError, dump_documents, load_source
from gpu_fleet.core.timeutil import format_instant
from gpu_fleet.runtime import client_auth
from gpu_fleet.runtime.connect import abandon
from gpu_fleet.runtime.natsd_cluster import split_userinfo
from gpu_fleet.runtime.stack_security import redact

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TERMINAL = ("Completed", "Failed")
DESCRIPTION = (
    "Submit, follow and explain gpu-fleet runs and budgets over the fleet API (NATS). "
    "Installed as kubectl-runs, so 'kubectl runs VERB' works too."
)
PAGE_LIMIT = 500
"""Items asked for per list page; the manager may return fewer (its reply size bound)."""


class OutcomeUnknownError(Exception):
    """A mutating request was sent but no answer came back: it may or may not have applied."""

    def __init__(self, what: str, check: str) -> None:
        super().__init__(what)
        self.what = what
        self.check = check


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"error: {message}\n")


def table(title: str | None, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(headers), *[["-" if c is None or c == "" else str(c) for c in r] for r in rows]]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]
    return "\n".join(([title] if title else []) + lines)


def _emit(args: argparse.Namespace, data: Any, render: str) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(data, sort_keys=False).rstrip())
    else:
        print(render)


def _ref(args: argparse.Namespace) -> dict[str, str]:
    name: str = args.run
    ns = args.namespace
    if "/" in name:
        ns, name = name.split("/", 1)
    return {"namespace": ns, "name": name}


# -- commands ---------------------------------------------------------------------------------


async def api(nc: Any, args: argparse.Namespace, endpoint: str, body: dict[str, Any]) -> Any:
    """One fleet API call with the ``--timeout`` the user gave (on the team's prefix with
    ``--team``: docs/security.md)."""
    return await call(nc, endpoint, body, timeout=args.timeout, team=getattr(args, "team", None))


async def list_all(
    nc: Any, args: argparse.Namespace, endpoint: str, body: dict[str, Any]
) -> list[Any]:
    """Every item of a list endpoint, following ``metadata.continue`` page by page.

    A manager from before paging answers with a bare list; that is the whole list.
    """
    items: list[Any] = []
    token = ""
    while True:
        request = {**body, "limit": PAGE_LIMIT, "continue": token or None}
        page = await api(nc, args, endpoint, request)
        if isinstance(page, list):
            return page
        items.extend(page.get("items") or [])
        token = (page.get("metadata") or {}).get("continue") or ""
        if not token:
            return items


def _read_source(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _source_errors(path: str, exc: ManifestError) -> list[str]:
    """One line per problem, each naming the file: ``error: FILE: documents[1].spec.x: ...``."""
    return [
        f"error: {path}: {e.message}" if e.path == (exc.source or path) else f"error: {path}: {e}"
        for e in exc.errors
    ]


def _submitted_names(documents: list[object]) -> list[str]:
    """``Kind namespace/name`` of each document that names itself, for the unknown-outcome hint."""
    names = []
    for doc in documents:
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            meta = doc["metadata"]
            names.append(f"{doc.get('kind')} {meta.get('namespace')}/{meta.get('name')}")
    return names


def _check_hint(names: list[str]) -> str:
    runs = [n.split(" ", 1)[1] for n in names if n.startswith("Run ")]
    if runs:
        return "; ".join(f"kubectl runs get {ref}" for ref in runs)
    return "kubectl runs budgets -A"


Prepared = list[tuple[str, str, list[object]]]
"""Per file to submit: its name, the text to send, its documents."""


def prepare_submit(args: argparse.Namespace) -> Prepared | None:
    """Read and check every file before anything is sent (or NATS is even dialled).

    Returns None after printing one ``error: FILE: ...`` line per problem: a bad file, like an
    unreadable one, is a usage error (exit 2) and nothing of the submission is sent.
    """
    prepared: Prepared = []
    for path in args.file:
        try:
            data = _read_source(path)
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            return None
        try:
            documents = load_source(data, path)
        except ManifestError as exc:
            for line in _source_errors(path, exc):
                print(line, file=sys.stderr)
            return None
        documents = _with_namespace(documents, args.namespace, args.follow)
        prepared.append((path, dump_documents(documents), documents))
    return prepared


async def cmd_submit(nc: Any, args: argparse.Namespace) -> int:
    """Submit every file prepared by ``prepare_submit``, in order.

    A request that times out may still have been committed (the manager appends to the ledger
    before it answers), so that is reported as "outcome unknown" with the way to check, never
    as a failure: re-submitting the same file is safe either way (apply creates or updates).
    """
    prepared: Prepared = args.prepared
    results: list[Any] = []
    for path, text, documents in prepared:
        try:
            applied = await api(nc, args, "apply", {"documents": text, "source": path})
        except ApiCallError as exc:
            exc.errors = [{**e, "path": f"{path}: {e.get('path')}"} for e in exc.errors]
            raise
        except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError) as exc:
            names = _submitted_names(documents)
            raise OutcomeUnknownError(
                f"{path}: no answer within {args.timeout:g}s ({type(exc).__name__}); the"
                " submission may or may not have been applied"
                f" ({', '.join(names) or 'unnamed documents'})",
                _check_hint(names),
            ) from exc
        results.extend(applied)
    rows = [[f"{r['namespace']}/{r['name']}", r["kind"], r["action"]] for r in results]
    runs = [r for r in results if r["kind"] == "Run"]
    for r in runs:
        view = await api(nc, args, "get", {"namespace": r["namespace"], "name": r["name"]})
        r["phase"] = view["phase"]
        r["message"] = view["message"]
    render = table(
        "Submitted",
        ["Object", "Kind", "Action", "Phase", "Message"],
        [[*row, r.get("phase"), r.get("message")] for row, r in zip(rows, results, strict=True)],
    )
    _emit(args, results, render)
    return EXIT_OK


def _with_namespace(
    documents: list[object], namespace: str, follow: list[str] | None
) -> list[object]:
    """Default the namespace of documents that omit it, and append ``--follow`` edges.

    Documents keep their positions (empty ones stay ``None``), so the manager's
    ``documents[i]`` paths point at the user's own file.
    """
    out: list[object] = []
    for doc in documents:
        if isinstance(doc, dict):
            meta = doc.setdefault("metadata", {})
            if isinstance(meta, dict) and "namespace" not in meta:
                meta["namespace"] = namespace
            if follow and doc.get("kind") == "Run":
                spec = doc.setdefault("spec", {})
                fol = spec.setdefault("follow", {}) if isinstance(spec, dict) else {}
                after = list(fol.get("after", [])) if isinstance(fol, dict) else []
                for name in (f for item in follow for f in item.split(",") if f):
                    if name not in after:
                        after.append(name)
                if isinstance(fol, dict):
                    fol["after"] = after
        out.append(doc)
    return out


async def _forecast(nc: Any, ref: dict[str, str]) -> Any:
    try:
        msg = await nc.request("fleet.forecast.run", json.dumps(ref).encode(), timeout=5)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    try:
        data = json.loads(msg.data)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "error" not in data else None


def _plan_rows(view: dict[str, Any], forecast: Any) -> list[list[object]]:
    rows: list[list[object]] = [
        ["Run", f"{view['namespace']}/{view['name']}"],
        ["Phase", view["phase"]],
        ["Message", view["message"]],
    ]
    res = view.get("reservationDetail")
    if res:
        rows.append(["EarliestStart", res["earliestStart"]])
        if res["deficitGPUs"]:
            rows.append(["Deficit", f"{res['deficitGPUs']} GPUs"])
        rows.append(["Confidence", res["confidence"]])
        rows.append(["Remedies", "; ".join(res["remedies"])])
    if forecast:
        for key, label in (("p50", "ForecastP50"), ("p90", "ForecastP90")):
            if forecast.get(key) is not None:
                rows.append([label, format_instant(int(forecast[key]))])
        if forecast.get("basis"):
            rows.append(["ForecastBasis", forecast["basis"]])
    return rows


async def cmd_plan(nc: Any, args: argparse.Namespace) -> int:
    ref = _ref(args)
    view = await api(nc, args, "get", ref)
    forecast = await _forecast(nc, ref)
    _emit(
        args,
        {"run": view, "forecast": forecast},
        table("Run Plan", ["Field", "Value"], _plan_rows(view, forecast)),
    )
    return EXIT_OK


async def cmd_watch(nc: Any, args: argparse.Namespace) -> int:
    ref = _ref(args)
    i = 0
    while True:
        i += 1
        view = await api(nc, args, "get", ref)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        title = f"[{stamp}] iteration {i}"
        _emit(args, view, table(title, ["Field", "Value"], _plan_rows(view, None)))
        if view["phase"] in TERMINAL or (args.watch_count and i >= args.watch_count):
            return EXIT_OK
        await asyncio.sleep(max(0.1, args.watch_interval))


async def cmd_explain(nc: Any, args: argparse.Namespace) -> int:
    rows = await api(nc, args, "explain", _ref(args))
    _emit(
        args,
        rows,
        table("Run Explanation", ["Field", "Value"], [[r["field"], r["value"]] for r in rows]),
    )
    return EXIT_OK


async def cmd_get(nc: Any, args: argparse.Namespace) -> int:
    if args.run:
        view = await api(nc, args, "get", _ref(args))
        views = [view]
    else:
        namespace = None if args.all_namespaces else args.namespace
        views = await list_all(nc, args, "list", {"namespace": namespace})
    rows = [
        [
            f"{v['namespace']}/{v['name']}",
            v["phase"],
            v["reason"],
            v["width"]["allocated"],
            v["funding"]["owned"],
            v["funding"]["shared"],
            v["funding"]["borrowed"],
            v["funding"]["unfunded"],
            v["earliestStart"],
        ]
        for v in views
    ]
    _emit(
        args,
        views if not args.run else views[0],
        table(
            "Runs",
            [
                "Run",
                "Phase",
                "Reason",
                "GPUs",
                "Owned",
                "Shared",
                "Borrowed",
                "Unfunded",
                "EarliestStart",
            ],
            rows,
        ),
    )
    return EXIT_OK


async def cmd_leases(nc: Any, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"namespace": None if args.all_namespaces else args.namespace}
    if args.run:
        body = _ref(args)
    leases = await list_all(nc, args, "leases", body)
    rows = [
        [
            x["id"],
            x["run"],
            x["role"],
            len(x["slots"]),
            x["node"],
            x["class"] or "-",
            _payer(x["payer"]),
            x["start"],
            x["end"],
            x["closureReason"],
        ]
        for x in leases
    ]
    _emit(
        args,
        leases,
        table(
            "Run Leases",
            ["Lease", "Run", "Role", "GPUs", "Node", "Class", "Payer", "Start", "End", "Closure"],
            rows,
        ),
    )
    return EXIT_OK


def _payer(p: Any) -> str:
    if not p:
        return "-"
    return f"{p['namespace']}/{p['budget']}/{p['envelope']}"


async def cmd_budgets(nc: Any, args: argparse.Namespace) -> int:
    namespace = None if args.all_namespaces else args.namespace
    budgets = await list_all(nc, args, "budgets", {"namespace": namespace})
    rows = [
        [
            f"{b['namespace']}/{b['name']}",
            e["name"],
            e["flavor"],
            e["concurrency"],
            e["owned"],
            e["shared"],
            e["borrowed"],
            e["unfunded"],
            e["headroom"],
            f"{e['gpuHoursUsed']:.2f}",
        ]
        for b in budgets
        for e in b["envelopes"]
    ]
    _emit(
        args,
        budgets,
        table(
            "Budget Usage",
            [
                "Budget",
                "Envelope",
                "Flavor",
                "Concurrency",
                "Owned",
                "Shared",
                "Borrowed",
                "Unfunded",
                "Headroom",
                "GPUHours",
            ],
            rows,
        ),
    )
    return EXIT_OK


async def cmd_sponsors(nc: Any, args: argparse.Namespace) -> int:
    body = {**_ref(args), "op": args.op}
    if args.op != "list":
        if not args.sponsor:
            print(f"error: sponsors {args.op} needs a SPONSOR", file=sys.stderr)
            return EXIT_USAGE
        body["sponsor"] = args.sponsor
        if args.max:
            body["max_borrow"] = args.max
    result = await api(nc, args, "sponsors", body)
    _emit(args, result, table("Run Sponsors", ["Sponsor"], [[s] for s in result["sponsors"]]))
    return EXIT_OK


async def cmd_shrink(nc: Any, args: argparse.Namespace) -> int:
    if args.by <= 0:
        print("error: --by must be > 0", file=sys.stderr)
        return EXIT_USAGE
    result = await api(nc, args, "shrink", {**_ref(args), "by": args.by})
    _emit(
        args,
        result,
        table("Shrink Requested", ["Run", "DesiredGPUs"], [[result["run"], result["desiredGPUs"]]]),
    )
    return EXIT_OK


async def cmd_simple(nc: Any, args: argparse.Namespace) -> int:
    """complete | fail | delete."""
    if args.command == "delete":
        result = await api(nc, args, "delete", {"kind": "Run", **_ref(args)})
        _emit(args, result, f"deleted run {_ref(args)['namespace']}/{_ref(args)['name']}")
        return EXIT_OK
    result = await api(nc, args, args.command, _ref(args))
    _emit(
        args,
        result,
        table(f"Run {result['phase']}", ["Run", "Phase"], [[result["run"], result["phase"]]]),
    )
    return EXIT_OK


async def cmd_eta(nc: Any, args: argparse.Namespace) -> int:
    result = await api(nc, args, "eta", {**_ref(args), "eta": args.time})
    _emit(args, result, table("ETA Set", ["Run", "ETA"], [[result["run"], result["eta"]]]))
    return EXIT_OK


async def cmd_node(nc: Any, args: argparse.Namespace) -> int:
    result = await api(nc, args, "node", {"op": args.op, "name": args.node})
    _emit(args, result, f"node {result['node']}: {result['health']}")
    return EXIT_OK


async def cmd_notify(nc: Any, args: argparse.Namespace) -> int:
    return await notify.cmd_notify(nc, args, _emit, table)


COMPLETIONS = {
    "bash": """_kubectl_runs() {{
  local cur="${{COMP_WORDS[COMP_CWORD]}}"
  COMPREPLY=( $(compgen -W "{words}" -- "$cur") )
}}
complete -F _kubectl_runs kubectl-runs
""",
    "zsh": """#compdef kubectl-runs
_arguments '1:command:({words})'
""",
    "fish": """complete -c kubectl-runs -f -a "{words}"
""",
}


def cmd_completions(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    words = " ".join(sorted(sub.choices))
    if args.shell not in COMPLETIONS:
        print(f"error: unsupported shell {args.shell!r} (bash, zsh, fish)", file=sys.stderr)
        return EXIT_USAGE
    print(COMPLETIONS[args.shell].format(words=words), end="")
    return EXIT_OK


def _common(defaults: bool, output: bool = True) -> _Parser:
    """The global options, once with their defaults (for the top level) and once without.

    argparse copies a subparser's defaults over the namespace the top-level parser filled in,
    so with defaults on both ``kubectl runs --nats-url URL get -A`` dialled the default URL
    (issue 19).  The subcommands' copy uses ``SUPPRESS``: an option given after the verb still
    wins, one given before it survives, and the top level supplies the defaults.
    """
    env = os.environ.get

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    # A _Parser too, so that it types as a parent of the _Parser subcommands.
    common = _Parser(add_help=False)
    common.add_argument(
        "--nats-url",
        default=default(env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222")),
        help="NATS server of the fleet (env GPU_FLEET_NATS_URL; default nats://127.0.0.1:4222)",
    )
    common.add_argument(
        "-n",
        "--namespace",
        default=default(env("GPU_FLEET_NAMESPACE", "default")),
        help="namespace of the run, and of documents that omit one (env GPU_FLEET_NAMESPACE)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=default(30.0),
        help="seconds to wait for each answer from the fleet (default 30)",
    )
    client_auth.add_flags(common, suppress=not defaults)
    if output:  # ``top`` and ``viz`` give -o their own meaning (wide; an output file)
        common.add_argument(
            "-o",
            "--output",
            choices=("table", "json", "yaml"),
            default=default("table"),
            help="output format (default table)",
        )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(defaults=False)
    base = _common(defaults=False, output=False)
    p = _Parser(prog="kubectl runs", description=DESCRIPTION, parents=[_common(defaults=True)])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(
        name: str, help_: str, run: bool = True, optional_run: bool = False
    ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, parents=[common])
        if run:
            sp.add_argument("run", nargs="?" if optional_run else None, metavar="RUN")
        return sp

    s = add("submit", "submit Runs/Budgets from YAML or JSON files", run=False)
    s.add_argument("-f", "--file", action="append", required=True, help="file ('-' for stdin)")
    s.add_argument("--follow", action="append", help="run(s) this one follows (repeat or comma)")
    add("plan", "when will the run start, and what would make it sooner")
    w = add("watch", "follow a run until it ends")
    w.add_argument("--watch-interval", type=float, default=2.0)
    w.add_argument("--watch-count", type=int, default=0)
    add("explain", "why the run is where it is")
    g = add("get", "one run, or all runs of the namespace", optional_run=True)
    g.add_argument("-A", "--all-namespaces", action="store_true")
    lsp = add("leases", "leases of a run (open and closed), or of the namespace", optional_run=True)
    lsp.add_argument("-A", "--all-namespaces", action="store_true")
    b = add("budgets", "budget usage and headroom per envelope", run=False)
    b.add_argument("-A", "--all-namespaces", action="store_true")
    sp = sub.add_parser("sponsors", help="list, add or remove a run's sponsors", parents=[common])
    sp.add_argument("op", choices=("list", "add", "remove"))
    sp.add_argument("run", metavar="RUN")
    sp.add_argument("sponsor", nargs="?", metavar="SPONSOR")
    sp.add_argument("--max", type=int, default=0, help="maxBorrowGPUs to set when adding")
    sh = add("shrink", "shrink a malleable run")
    sh.add_argument("--by", type=int, required=True)
    add("complete", "mark a run's workload finished (local mode)")
    add("fail", "mark a run's workload failed (local mode)")
    add("delete", "delete a run (closes its leases)")
    e = add("eta", "report a run's expected completion (RFC 3339); forecasts use it")
    e.add_argument("time", metavar="TIME")
    nd = sub.add_parser(
        "node", help="cordon, fence or uncordon a node (local mode)", parents=[common]
    )
    nd.add_argument("op", choices=("cordon", "fence", "uncordon"))
    nd.add_argument("node")
    pictures.add_parsers(sub, base)
    notify.add_parser(sub, common)
    c = sub.add_parser("completions", help="shell completion script", parents=[common])
    c.add_argument("shell")
    return p


HANDLERS = {
    "submit": cmd_submit,
    "plan": cmd_plan,
    "watch": cmd_watch,
    "explain": cmd_explain,
    "get": cmd_get,
    "leases": cmd_leases,
    "budgets": cmd_budgets,
    "sponsors": cmd_sponsors,
    "shrink": cmd_shrink,
    "complete": cmd_simple,
    "fail": cmd_simple,
    "delete": cmd_simple,
    "node": cmd_node,
    "eta": cmd_eta,
    "top": pictures.cmd_top,
    "viz": pictures.cmd_viz,
    "notify": cmd_notify,
}


def _unknown_outcome_check(args: argparse.Namespace) -> str | None:
    """How to check a command whose answer did not come; None for a read (nothing to check).

    The manager commits to the ledger before it answers, so a lost answer after a change says
    nothing about the change.  (``submit`` says the same with its files' names.)
    """
    if args.command in ("complete", "fail", "shrink", "eta") or (
        args.command == "sponsors" and args.op != "list"
    ):
        ref = _ref(args)
        return f"kubectl runs get {ref['namespace']}/{ref['name']}"
    if args.command == "delete":
        ref = _ref(args)
        return f"kubectl runs get {ref['namespace']}/{ref['name']} (not found once deleted)"
    if args.command == "node":
        return f"kubectl runs node {args.op} {args.node} again (the same state twice is safe)"
    return None


async def _run(args: argparse.Namespace) -> int:
    async def quiet(_: Exception) -> None:
        return None

    try:
        auth = client_auth.from_args(args)
        bare, credentials = split_userinfo(args.nats_url)  # reaches every server of a cluster
        options = {**credentials, **auth.connect_options()}
    except client_auth.ClientAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    args.team = auth.team
    nc = Client()
    try:
        await asyncio.wait_for(
            nc.connect(
                bare,
                connect_timeout=2,
                max_reconnect_attempts=1,
                allow_reconnect=False,
                error_cb=quiet,
                **options,
            ),
            timeout=5,
        )
    except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
        await abandon(nc)
        print(
            f"error: cannot reach NATS at {redact(args.nats_url)} ({type(exc).__name__}); "
            "is the stack up? (gpu-fleet up)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except nats.errors.Error as exc:  # e.g. 'Authorization Violation': wrong credentials
        await abandon(nc)
        print(f"error: NATS at {redact(args.nats_url)} refused us: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return await HANDLERS[args.command](nc, args)
    except ApiCallError as exc:
        # The field errors say it all, one line each; the summary only when there are none,
        # or when (a not-found, say) it is the one thing to say.
        details = [e for e in exc.errors if e.get("message") != exc.message]
        if not details or len(exc.errors) > len(details):
            print(f"error: {exc.message}", file=sys.stderr)
        for e in details:
            print(f"error: {e.get('path')}: {e.get('message')}", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("validation", "bad_request") else EXIT_FAILED
    except nats.errors.NoRespondersError:
        print(
            "error: no manager is answering on fleet.api (is gpu-fleet-manager running?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OutcomeUnknownError as exc:
        print(f"error: outcome unknown: {exc.what}; check with: {exc.check}", file=sys.stderr)
        return EXIT_FAILED
    except nats.errors.TimeoutError:
        check = _unknown_outcome_check(args)
        if check is None:
            print(f"error: the manager did not answer within {args.timeout:g}s", file=sys.stderr)
        else:
            print(
                f"error: outcome unknown: no answer within {args.timeout:g}s; the {args.command}"
                f" may or may not have been applied; check with: {check}",
                file=sys.stderr,
            )
        return EXIT_FAILED
    except nats.errors.MaxPayloadError:
        print(
            "error: the request is larger than the NATS server accepts (max_payload);"
            " split the file",
            file=sys.stderr,
        )
        return EXIT_USAGE
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completions":
        return cmd_completions(args, parser)
    if args.command == "submit":
        args.prepared = prepare_submit(args)
        if args.prepared is None:
            return EXIT_USAGE
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
