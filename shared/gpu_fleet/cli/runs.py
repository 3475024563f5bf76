"""``kubectl-runs`` (so ``kubectl runs ...`` works): researchers' and team leads' CLI.

It talks to the fleet API over NATS (``--nats-url`` or ``GPU_FLEET_NATS_URL``); it never decides
anything itself - what it prints is what the manager folded from the ledger.  Exit codes: 0 ok,
1 the request failed (not found, unavailable), 2 usage or validation errors (each field error
is printed as ``error: <path>: <reason>``).  Errors are one line, never a traceback.
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

from gpu_fleet.cli import pictures
from gpu_fleet.cli.stack import ApiCallError, call
from gpu_fleet.core.manifests import load_documents
from gpu_fleet.core.timeutil import format_instant

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TERMINAL = ("Completed", "Failed")


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


async def cmd_submit(nc: Any, args: argparse.Namespace) -> int:
    docs: list[str] = []
    for path in args.file:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        docs.append(_with_namespace(text, args.namespace, args.follow))
    results: list[Any] = []
    for path, text in zip(args.file, docs, strict=True):
        results.extend(await call(nc, "apply", {"documents": text, "source": path}))
    rows = [[f"{r['namespace']}/{r['name']}", r["kind"], r["action"]] for r in results]
    runs = [r for r in results if r["kind"] == "Run"]
    for r in runs:
        view = await call(nc, "get", {"namespace": r["namespace"], "name": r["name"]})
        r["phase"] = view["phase"]
        r["message"] = view["message"]
    render = table(
        "Submitted",
        ["Object", "Kind", "Action", "Phase", "Message"],
        [[*row, r.get("phase"), r.get("message")] for row, r in zip(rows, results, strict=True)],
    )
    _emit(args, results, render)
    return EXIT_OK


def _with_namespace(text: str, namespace: str, follow: list[str] | None) -> str:
    """Default the namespace of documents that omit it, and append ``--follow`` edges."""
    try:
        raw_docs = load_documents(text)
    except Exception:  # the manager reports parse errors with their position
        return text
    out = []
    for doc in raw_docs:
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
    return json.dumps({"kind": "List", "items": out}) if len(out) != 1 else json.dumps(out[0])


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
    view = await call(nc, "get", ref)
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
        view = await call(nc, "get", ref)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        title = f"[{stamp}] iteration {i}"
        _emit(args, view, table(title, ["Field", "Value"], _plan_rows(view, None)))
        if view["phase"] in TERMINAL or (args.watch_count and i >= args.watch_count):
            return EXIT_OK
        await asyncio.sleep(max(0.1, args.watch_interval))


async def cmd_explain(nc: Any, args: argparse.Namespace) -> int:
    rows = await call(nc, "explain", _ref(args))
    _emit(
        args,
        rows,
        table("Run Explanation", ["Field", "Value"], [[r["field"], r["value"]] for r in rows]),
    )
    return EXIT_OK


async def cmd_get(nc: Any, args: argparse.Namespace) -> int:
    if args.run:
        view = await call(nc, "get", _ref(args))
        views = [view]
    else:
        namespace = None if args.all_namespaces else args.namespace
        views = await call(nc, "list", {"namespace": namespace})
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
    leases = await call(nc, "leases", body)
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
    budgets = await call(nc, "budgets", {"namespace": namespace})
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
    result = await call(nc, "sponsors", body)
    _emit(args, result, table("Run Sponsors", ["Sponsor"], [[s] for s in result["sponsors"]]))
    return EXIT_OK


async def cmd_shrink(nc: Any, args: argparse.Namespace) -> int:
    if args.by <= 0:
        print("error: --by must be > 0", file=sys.stderr)
        return EXIT_USAGE
    result = await call(nc, "shrink", {**_ref(args), "by": args.by})
    _emit(
        args,
        result,
        table("Shrink Requested", ["Run", "DesiredGPUs"], [[result["run"], result["desiredGPUs"]]]),
    )
    return EXIT_OK


async def cmd_simple(nc: Any, args: argparse.Namespace) -> int:
    """complete | fail | delete."""
    if args.command == "delete":
        result = await call(nc, "delete", {"kind": "Run", **_ref(args)})
        _emit(args, result, f"deleted run {_ref(args)['namespace']}/{_ref(args)['name']}")
        return EXIT_OK
    result = await call(nc, args.command, _ref(args))
    _emit(
        args,
        result,
        table(f"Run {result['phase']}", ["Run", "Phase"], [[result["run"], result["phase"]]]),
    )
    return EXIT_OK


async def cmd_eta(nc: Any, args: argparse.Namespace) -> int:
    result = await call(nc, "eta", {**_ref(args), "eta": args.time})
    _emit(args, result, table("ETA Set", ["Run", "ETA"], [[result["run"], result["eta"]]]))
    return EXIT_OK


async def cmd_node(nc: Any, args: argparse.Namespace) -> int:
    result = await call(nc, "node", {"op": args.op, "name": args.node})
    _emit(args, result, f"node {result['node']}: {result['health']}")
    return EXIT_OK


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


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    # _Parsers too, so that they type as parents of the _Parser subcommands.  ``base`` has no
    # -o: ``top`` and ``viz`` give -o their own meaning (wide; an output file).
    base = _Parser(add_help=False)
    base.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    base.add_argument("-n", "--namespace", default=env("GPU_FLEET_NAMESPACE", "default"))
    base.add_argument("--timeout", type=float, default=30.0)
    common = _Parser(add_help=False, parents=[base])
    common.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p = _Parser(prog="kubectl runs", description=(__doc__ or "").splitlines()[0], parents=[common])
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
}


async def _run(args: argparse.Namespace) -> int:
    async def quiet(_: Exception) -> None:
        return None

    try:
        nc = await asyncio.wait_for(
            nats.connect(
                args.nats_url,
                connect_timeout=2,
                max_reconnect_attempts=1,
                allow_reconnect=False,
                error_cb=quiet,
            ),
            timeout=5,
        )
    except (OSError, nats.errors.NoServersError, TimeoutError) as exc:
        print(
            f"error: cannot reach NATS at {args.nats_url} ({type(exc).__name__}); "
            "is the stack up? (gpu-fleet up)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    try:
        return await HANDLERS[args.command](nc, args)
    except ApiCallError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        for e in exc.errors:
            print(f"error: {e.get('path')}: {e.get('message')}", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("validation", "bad_request") else EXIT_FAILED
    except nats.errors.NoRespondersError:
        print(
            "error: no manager is answering on fleet.api (is gpu-fleet-manager running?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except nats.errors.TimeoutError:
        print("error: the manager did not answer in time", file=sys.stderr)
        return EXIT_FAILED
    finally:
        await nc.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "completions":
        return cmd_completions(args, parser)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
