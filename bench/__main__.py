"""``python -m bench``: start fresh servers, run the workloads, print the table, write the JSON.

Exit status: 0 when every selected workload ran or was skipped (a missing piece of the tree),
1 when one failed (an error, or work lost), 2 when the arguments are wrong, the servers could
not start or the results could not be written; 130 when interrupted. Missed targets are a
finding to report, not a failure of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from bench import report, servers, suite
from statefn_sidecar import devservers

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON (default {DEFAULT_OUT})")
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of: {', '.join(suite.NAMES)}")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write a cProfile dump per in-process workload to DIR/<workload>.prof")
    parser.add_argument("--nats-no-fsync", action="store_true",
                        help="run nats-server without 'sync_interval: always' (measures what it costs)")
    args = parser.parse_args(argv)
    if args.only is None:
        args.names = list(suite.NAMES)
    else:
        args.names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in args.names if n not in suite.NAMES]
        if unknown or not args.names:
            parser.error(f"unknown workload {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known: {', '.join(suite.NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that the table stays readable
        console = Console(width=160)
    logging.basicConfig(level=logging.WARNING, handlers=[RichHandler(console=console, show_path=False)],
                        format="%(name)s: %(message)s")
    nats, etcd = servers.NatsServer(no_fsync=args.nats_no_fsync), devservers.EtcdServer()
    try:
        try:
            nats.start()
            etcd.start()
        except (OSError, RuntimeError, TimeoutError) as exc:
            console.print(f"[red]error:[/] cannot start the servers the benchmarks need: {exc}")
            return 2
        desc = report.machine(devservers.find_binary("nats-server"), devservers.find_binary("etcd"),
                              servers.sync_setting(args.nats_no_fsync))
        console.print(f"[bold]machine:[/] {desc}")
        sizes = suite.QUICK if args.quick else suite.FULL
        runner = suite.Suite(args.names, sizes, nats.url, etcd.endpoint, console, args.profile)
        outcome = asyncio.run(runner.run())
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: no results written")
        return 130
    finally:
        nats.cleanup()
        etcd.cleanup()
    doc = report.document(desc, outcome)
    report.render(console, doc, outcome)
    try:
        report.write(doc, args.out)
    except OSError as exc:
        console.print(f"[red]error:[/] cannot write the results to {args.out}: {exc}")
        return 2
    console.print(f"results written to {args.out}")
    if args.profile is not None:
        console.print(f"profiles in {args.profile} (python -m pstats {args.profile}/<workload>.prof)")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
