"""``gpu-fleet``: the operator and developer command line.

The help text is ``DESCRIPTION`` (plain text for a terminal), not this docstring.

Exit codes follow the usual convention: 0 done, 1 a check failed or a command could not apply,
2 usage or validation errors (the message names the field and the rule).  Errors are one-liners
on stderr, never tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_fleet.cli import simulate, team
from gpu_fleet.cli.progress import ProgressBar, progress_wanted
from gpu_fleet.core.funding.cycles import parent_cycle
from gpu_fleet.core.manifests import ManifestError, load_source, parse_documents
from gpu_fleet.core.model import Budget
from gpu_fleet.runtime import client_auth
from gpu_fleet.runtime.stack_security import ServerTls
from gpu_fleet.scenario.expectations import check_expectations
from gpu_fleet.scenario.loader import ScenarioError, load_scenario_file
from gpu_fleet.scenario.runner import run_scenario

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DESCRIPTION = (
    "gpu-fleet: run the stack locally (up, demo), validate manifests, run scenarios, and "
    "simulate traces against other schedulers (simulate)."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's default prints usage; keep it one line
        self.exit(EXIT_USAGE, f"error: {message}\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(indent + line for line in lines)


def render_report(report: dict[str, Any]) -> str:
    """A readable rendering of one scenario report (what ``make demo`` prints)."""
    out = [f"== {report['label']} @ {report['at']}"]
    runs = report["runs"]
    if runs:
        out.append("  Runs")
        out.append(
            _table(
                [
                    "RUN",
                    "PHASE",
                    "REASON",
                    "ALLOC",
                    "SPARES",
                    "OWNED",
                    "SHARED",
                    "BORROWED",
                    "UNFUNDED",
                    "EARLIEST START",
                ],
                [
                    [
                        f"{r['namespace']}/{r['name']}",
                        r["phase"],
                        r["reason"],
                        r["width"]["allocated"],
                        r["spares"],
                        r["funding"]["owned"],
                        r["funding"]["shared"],
                        r["funding"]["borrowed"],
                        r["funding"]["unfunded"],
                        r["earliestStart"],
                    ]
                    for r in runs
                ],
                "    ",
            )
        )
        for r in runs:
            if r["message"]:
                out.append(f"    {r['namespace']}/{r['name']}: {r['message']}")
    open_leases = [x for x in report["leases"] if x["closureReason"] is None]
    closed = [x for x in report["leases"] if x["closureReason"] is not None]
    if open_leases:
        out.append(f"  Open leases ({len(open_leases)})")
        out.append(
            _table(
                ["RUN", "NODE", "SLOTS", "ROLE", "GROUP", "CLASS", "PAYER"],
                [
                    [
                        x["run"],
                        x["node"],
                        _slots(x["slots"]),
                        x["role"],
                        x["group"],
                        x["class"],
                        "/".join(x["payer"][k] for k in ("namespace", "budget", "envelope"))
                        if x["payer"]
                        else None,
                    ]
                    for x in open_leases
                ],
                "    ",
            )
        )
    if closed:
        out.append(f"  Closed leases ({len(closed)})")
        out.append(
            _table(
                ["RUN", "NODE", "SLOTS", "CLOSED AT", "REASON"],
                [
                    [x["run"], x["node"], _slots(x["slots"]), x["closedAt"], x["closureReason"]]
                    for x in closed
                ],
                "    ",
            )
        )
    pending = [r for r in report["reservations"] if r["state"] == "Pending"]
    if pending:
        out.append("  Reservations")
        out.append(
            _table(
                ["NAME", "RUN", "KIND", "EARLIEST START", "DEFICIT", "REASON"],
                [
                    [
                        r["name"],
                        r["run"],
                        r["kind"],
                        r["earliestStart"],
                        r["deficitGPUs"],
                        r["reason"],
                    ]
                    for r in pending
                ],
                "    ",
            )
        )
    rejected = report.get("rejections") or []
    if rejected:
        out.append(f"  Rejected steps ({len(rejected)}; nothing changed, the scenario went on)")
        out.append(
            _table(
                ["STEP", "AT", "ACTION", "TARGET", "REASON"],
                [
                    [f"steps[{r['step']}]", r["at"], r["action"], r["target"], r["reason"]]
                    for r in rejected
                ],
                "    ",
            )
        )
    out.append("  Budgets")
    out.append(
        _table(
            ["ENVELOPE", "CONC", "HEADROOM", "OWNED", "SHARED", "BORROWED", "UNFUNDED", "GPU-H"],
            [
                [
                    f"{b['namespace']}/{b['name']}/{e['name']}",
                    e["concurrency"],
                    e["headroom"],
                    e["owned"],
                    e["shared"],
                    e["borrowed"],
                    e["unfunded"],
                    f"{e['gpuHoursUsed']:.2f}",
                ]
                for b in report["budgets"]
                for e in b["envelopes"]
            ],
            "    ",
        )
    )
    return "\n".join(out)


def _slots(slots: list[str]) -> str:
    if len(slots) <= 2:
        return ",".join(slots)
    return f"{slots[0]}..{slots[-1].rpartition('#')[2]} ({len(slots)})"


def _cmd_scenario_run(args: argparse.Namespace) -> int:
    status = EXIT_OK
    results = []
    bar = None
    if len(args.files) > 1 and progress_wanted(
        json_output=args.output == "json", force=args.progress
    ):
        bar = ProgressBar(sys.stderr, "scenario run")
    for done, path in enumerate(args.files):
        if bar is not None:
            bar.tick(done, len(args.files))
        try:
            scenario = load_scenario_file(path)
        except FileNotFoundError:
            if bar is not None:
                bar.clear()
            print(f"error: {path}: no such file", file=sys.stderr)
            return EXIT_USAGE
        except ScenarioError as exc:
            if bar is not None:
                bar.clear()
            for line in exc.errors:  # file-level lines already start with the file's name
                where = "" if line.startswith(f"{path}: ") else f"{path}: "
                print(f"error: {where}{line}", file=sys.stderr)
            return EXIT_USAGE
        if args.via_nats:
            # Deferred: only --via-nats needs asyncio, nats and the services; the in-process
            # `scenario run` and `validate` start in about half the time without them.
            import asyncio  # noqa: PLC0415 - deferred, see above

            from gpu_fleet.cli.stack import ApiCallError  # noqa: PLC0415 - deferred
            from gpu_fleet.cli.via_nats import run_via_nats  # noqa: PLC0415 - deferred
            from gpu_fleet.runtime import logs  # noqa: PLC0415 - deferred

            logs.configure("scenario", "error", sys.stderr)
            try:
                report = asyncio.run(run_via_nats(scenario))
            except (ApiCallError, TimeoutError) as exc:
                if bar is not None:
                    bar.clear()
                # Refused steps are reported, not raised: this is the stack itself failing.
                print(f"error: {path}: the fleet services failed: {exc}", file=sys.stderr)
                return EXIT_FAILED
        else:
            report = run_scenario(scenario)
        if bar is not None:
            bar.clear()
        outcomes = check_expectations(report, scenario.expectations) if args.check else []
        failed = [o for o in outcomes if not o.ok]
        if failed:
            status = EXIT_FAILED
        if args.output == "json":
            if args.check:
                report = {
                    **report,
                    "expectations": [
                        {"index": o.index, "ok": o.ok, "message": o.message} for o in outcomes
                    ],
                }
            results.append(report)
            continue
        print(f"Scenario {scenario.name} ({path})")
        for rep in report["reports"]:
            print(render_report(rep))
        if args.check:
            checked = [o for o in outcomes if not o.message.startswith("text:")]
            print(f"  Expectations: {len(checked) - len(failed)} of {len(checked)} met")
            for o in failed:
                print(f"    FAILED #{o.index}: {o.message}")
        print()
    if bar is not None:
        bar.tick(len(args.files), len(args.files))
    if args.output == "json":
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return status


def _cmd_validate(args: argparse.Namespace) -> int:
    """Check files the way ``kubectl runs submit`` and the manager will (the same loader).

    Parent cycles are checked across every valid Budget of the files given, in order, as
    applying them one after the other would.
    """
    status = EXIT_OK
    budgets: list[Budget] = []
    for path in args.files:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            print(f"error: {path}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
        try:
            manifests = parse_documents(load_source(data, path), source=path)
        except ManifestError as exc:
            for e in exc.errors:
                where = f"{path}: " if e.path == path else f"{path}: {e.path}: "
                print(f"error: {where}{e.message}", file=sys.stderr)
            status = EXIT_USAGE
            continue
        for m in manifests:
            print(f"{path}: {type(m).__name__} {m.metadata.namespace}/{m.metadata.name}: valid")
        budgets.extend(m for m in manifests if isinstance(m, Budget))
    cycle = parent_cycle([], budgets)
    if cycle is not None:
        budget, path = cycle
        print(
            f"error: Budget {budget.key}: spec.parents: parents form a cycle: {path}",
            file=sys.stderr,
        )
        status = EXIT_USAGE
    return status


def _cmd_demo(args: argparse.Namespace) -> int:
    from gpu_fleet.cli.demo import demo  # noqa: PLC0415 - deferred: pulls in nats and the stack

    examples = Path(args.examples)
    page = Path(args.page) if args.page else None
    return demo(examples, Path(args.inventory or examples / "inventory.yaml"), args.keep, page)


def _cmd_up(args: argparse.Namespace) -> int:
    from gpu_fleet.cli.up import default_inventory, up  # noqa: PLC0415 - deferred, as for demo
    from gpu_fleet.runtime import logs  # noqa: PLC0415 - deferred, as for demo

    kube = []
    if args.kube_url:
        kube += ["--kube-url", args.kube_url]
    if args.kubeconfig:
        kube += ["--kubeconfig", args.kubeconfig]
    # With a cluster, nodes come from it: the sample inventory is used only when asked for.
    inventory = args.inventory or (None if kube else default_inventory())
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key: give both or neither", file=sys.stderr)
        return 2
    if args.no_auth and args.tls_cert:
        print("error: --no-auth: TLS needs the security profile; drop one", file=sys.stderr)
        return 2
    tls = ServerTls(args.tls_cert, args.tls_key) if args.tls_cert else None
    problem = _up_ports_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure("up", "warning", sys.stderr)  # the live map's lines; services log to files
    return up(
        args.data_dir,
        inventory,
        args.port,
        args.log_level,
        kube_args=kube,
        secure=not args.no_auth,
        tls=tls,
        tls_ca=args.tls_ca,
        metrics_port=args.metrics_port,
        map_port=args.map_port,
        map_refresh=args.map_refresh,
        nats_cluster=args.nats_cluster,
    )


def _cluster_size(text: str) -> int:
    """``--nats-cluster``: 1 (one server) or 3 or 5 (a quorum needs an odd count)."""
    if text not in ("1", "3", "5"):
        raise argparse.ArgumentTypeError(
            f"must be 1, 3 or 5 (an odd number of servers keeps a JetStream quorum; got {text!r})"
        )
    return int(text)


def _up_ports_problem(args: argparse.Namespace) -> str | None:
    """Why ``up``'s port flags cannot work (naming the flag), or None."""
    from gpu_fleet.cli.stack import SERVICES  # noqa: PLC0415 - deferred, as for up

    if not 1 <= args.port <= 65535:
        return f"--port: must be a port in 1..65535, got {args.port}"
    if args.map_port and not 1 <= args.map_port <= 65535:
        return f"--map-port: must be 0 (off) or a port in 1..65535, got {args.map_port}"
    last = args.metrics_port + len(SERVICES) - 1
    if args.metrics_port and not (args.metrics_port >= 1 and last <= 65535):
        return (
            f"--metrics-port: must be 0 (off) or a port in 1..{65536 - len(SERVICES)} "
            f"(the first of {len(SERVICES)}), got {args.metrics_port}"
        )
    taken = {args.port, args.map_port}
    if args.metrics_port and taken & set(range(args.metrics_port, last + 1)):
        return f"--metrics-port: ports {args.metrics_port}..{last} overlap --port or --map-port"
    if args.map_port and args.map_port == args.port:
        return f"--map-port: {args.map_port} is also --port"
    if args.map_refresh < 1:
        return f"--map-refresh: must be >= 1 second, got {args.map_refresh}"
    return None


def _cmd_map(args: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - deferred, as for up

    from gpu_fleet.cli.live_map import LiveMap, serve_until_signalled  # noqa: PLC0415
    from gpu_fleet.runtime import logs  # noqa: PLC0415

    logs.configure("map", args.log_level, sys.stderr)
    if not 1 <= args.port <= 65535:
        print(f"error: --port: must be a port in 1..65535, got {args.port}", file=sys.stderr)
        return EXIT_USAGE
    if args.refresh < 1:
        print(f"error: --refresh: must be >= 1 second, got {args.refresh}", file=sys.stderr)
        return EXIT_USAGE
    try:
        auth = client_auth.from_args(args)
        auth.check()
    except client_auth.ClientAuthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    live = LiveMap(args.nats_url, args.port, host=args.host, refresh=args.refresh, auth=auth)
    try:
        return asyncio.run(serve_until_signalled(live))
    except OSError as exc:
        print(f"error: --port {args.port}: cannot listen: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-fleet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    scenario = sub.add_parser("scenario", help="run scenario files through the core")
    scenario_sub = scenario.add_subparsers(dest="scenario_command", required=True)
    run = scenario_sub.add_parser("run", help="run one or more scenario files")
    run.add_argument("files", nargs="+", metavar="FILE", help="scenario YAML files")
    run.add_argument(
        "-o", "--output", choices=("table", "json"), default="table", help="report format"
    )
    run.add_argument(
        "--check",
        action="store_true",
        help="check the file's machine expectations (exit 1 on failure)",
    )
    run.add_argument(
        "--via-nats",
        action="store_true",
        help="run through the real services on an embedded NATS server (same report)",
    )
    run.add_argument(
        "--progress",
        action="store_true",
        help="draw the progress bar over several files on stderr even when it is not a terminal"
        " (by default: on a terminal, outside CI, not with -o json)",
    )
    run.set_defaults(func=_cmd_scenario_run)
    validate = sub.add_parser("validate", help="validate Budget/Run manifests")
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML or JSON manifest files")
    validate.set_defaults(func=_cmd_validate)
    demo = sub.add_parser("demo", help="start the stack, submit the examples, show the results")
    demo.add_argument(
        "--examples",
        default=str(Path.cwd() / "examples"),
        help="folder with inventory.yaml and manifests/ (default ./examples)",
    )
    demo.add_argument(
        "--inventory", default=None, help="node inventory YAML (default EXAMPLES/inventory.yaml)"
    )
    demo.add_argument("--keep", default=None, help="keep data and logs in this folder")
    demo.add_argument(
        "--page", default=None, help="where to write the fleet map (default var/fleet.html)"
    )
    demo.set_defaults(func=_cmd_demo)
    upp = sub.add_parser("up", help="embedded NATS + all four services until Ctrl-C")
    upp.add_argument(
        "--data-dir",
        default=".gpu-fleet",
        help="JetStream files (the ledger) and service logs; kept across restarts"
        " (default .gpu-fleet)",
    )
    upp.add_argument(
        "--inventory",
        default=None,
        help="node inventory YAML registered by the manager (default ./examples/inventory.yaml"
        " if present)",
    )
    upp.add_argument(
        "--port", type=int, default=4222, help="NATS client port on 127.0.0.1 (default 4222)"
    )
    upp.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="service log level (default info)",
    )
    upp.add_argument(
        "--kube-url", default=None, help="Kubernetes API server: run the bridge (e.g. an emulator)"
    )
    upp.add_argument("--kubeconfig", default=None, help="Kubernetes API server from a kubeconfig")
    upp.add_argument(
        "--no-auth",
        action="store_true",
        help="run NATS without users and the ledger unsigned (development only; security.md)",
    )
    upp.add_argument("--tls-cert", default=None, help="serve NATS over TLS with this certificate")
    upp.add_argument("--tls-key", default=None, help="the certificate's private key")
    upp.add_argument(
        "--tls-ca", default=None, help="CA the services and clients verify the certificate with"
    )
    upp.add_argument(
        "--metrics-port",
        type=int,
        default=9101,
        help="first of four /metrics ports on 127.0.0.1: manager, binder, forecaster, notifier"
        " (default 9101..9104; 0: off)",
    )
    upp.add_argument(
        "--map-port",
        type=int,
        default=9100,
        help="serve the live fleet map on this port of 127.0.0.1 (default 9100; 0: off)",
    )
    upp.add_argument(
        "--map-refresh",
        type=int,
        default=5,
        help="seconds between reloads of an open fleet map page (default 5)",
    )
    upp.add_argument(
        "--nats-cluster",
        type=_cluster_size,
        default=1,
        metavar="N",
        help="run N routed JetStream servers (client ports PORT..PORT+N-1, one store each) with"
        " every stream at N replicas; 3 survives the loss of any one server (default 1)",
    )
    upp.set_defaults(func=_cmd_up)
    team.add_parser(sub)
    live = sub.add_parser(
        "map", help="serve the live fleet map of a running stack over HTTP (what up serves)"
    )
    live.add_argument(
        "--nats-url",
        default=os.environ.get("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"),
        help="the stack's NATS (env GPU_FLEET_NATS_URL)",
    )
    live.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    live.add_argument("--port", type=int, default=9100, help="port to listen on (default 9100)")
    live.add_argument(
        "--refresh", type=int, default=5, help="seconds between reloads of an open page"
    )
    live.add_argument(
        "--log-level",
        default=os.environ.get("GPU_FLEET_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        help="JSON log lines on stderr (env GPU_FLEET_LOG_LEVEL)",
    )
    client_auth.add_flags(live)
    live.set_defaults(func=_cmd_map)
    simulate.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
