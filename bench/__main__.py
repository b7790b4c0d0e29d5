"""``python -m bench``: start fresh servers, run the workloads, print the table, write the JSON and plots.

After the data-plane workloads (on fresh nats-server and etcd), the Kubernetes workloads of
``bench.k8s`` run on the e2e harness (a real kube-apiserver; its binaries are built by
``scripts/build-k8s.sh`` the first time, then cached) unless ``--no-k8s``, ``--quick`` or an
``--only`` without ``k8s``. Both end in one table and one JSON (``bench/results/latest.json``),
with ``throughput.png`` and ``latency.png`` next to it.

Exit status: 0 when every selected workload ran or was skipped (a missing piece of the tree),
1 when one failed (an error, or work lost), 2 when the arguments are wrong, the servers could
not start or the results could not be written; 130 when interrupted. Missed targets are a
finding to report, not a failure of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich import progress
from rich.console import Console
from rich.logging import RichHandler

from bench import plots, report, servers, suite
from statefn_sidecar import devservers

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"
K8S = "k8s"  # the Kubernetes workloads, as one name for --only


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the JSON (default {DEFAULT_OUT})")
    parser.add_argument("--only", metavar="NAMES",
                        help=f"comma-separated subset of: {', '.join(suite.NAMES)}, {K8S}")
    parser.add_argument("--no-k8s", action="store_true",
                        help="skip the Kubernetes workloads (bench.k8s: a real kube-apiserver, ~2.5 minutes)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="write a cProfile dump per in-process workload to DIR/<workload>.prof")
    parser.add_argument("--nats-no-fsync", action="store_true",
                        help="run nats-server without 'sync_interval: always' (measures what it costs)")
    args = parser.parse_args(argv)
    if args.only is None:
        args.names = list(suite.NAMES)
        args.k8s = not (args.no_k8s or args.quick)
    else:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in suite.NAMES and n != K8S]
        if unknown or not names:
            parser.error(f"unknown workload {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"known: {', '.join(suite.NAMES)}, {K8S}")
        args.names = [n for n in names if n != K8S]
        args.k8s = K8S in names and not args.no_k8s
    return args


def _run_k8s(console: Console) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """The Kubernetes workloads: (their document, why they were skipped, why they failed)."""
    console.print("[bold]kubernetes:[/] the e2e binaries (scripts/build-k8s.sh: built from Go modules the "
                  "first time, with a pinned Go it fetches if needed, ~12 minutes on 2 cores, then cached)")
    from bench import k8s  # the e2e harness and the operator: imported only when they run
    from e2e import harness

    try:
        harness.k8s_bin_dir()
    except (subprocess.CalledProcessError, OSError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return None, None, f"scripts/build-k8s.sh failed: {exc} {err.strip()[-500:]}"
    bar = progress.Progress(progress.SpinnerColumn(), progress.TextColumn("{task.description:<26}"),
                            progress.BarColumn(), progress.MofNCompleteColumn(),
                            progress.TextColumn("{task.fields[state]}"), progress.TimeElapsedColumn(),
                            console=console)
    with bar:
        task = bar.add_task("kubernetes", total=len(k8s.PHASES), state="")
        seen: list[str] = []

        def phase(name: str) -> None:
            if seen:
                bar.advance(task)
            seen.append(name)
            bar.update(task, state=name)

        try:
            doc = k8s.run(100, 16, 30.0, 3, console, phase)
        except Exception as exc:
            bar.update(task, state="[red]failed")
            return None, None, f"{type(exc).__name__}: {exc}"
        bar.update(task, completed=len(k8s.PHASES), state="[green]done")
    return doc, None, None


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
    try:
        report.write(doc, args.out)  # the data plane's results are kept even if the Kubernetes part fails
    except OSError as exc:
        console.print(f"[red]error:[/] cannot write the results to {args.out}: {exc}")
        return 2
    k8s_doc = None
    if args.k8s:
        try:
            k8s_doc, skipped, failed = _run_k8s(console)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted[/]: only the data plane's results are in {args.out}")
            return 130
        if skipped:
            outcome.skipped[K8S] = skipped
        if failed:
            outcome.failed[K8S] = failed
        if k8s_doc is not None:
            desc += ", kube-apiserver " + str(k8s_doc["machine"]).rsplit("kube-apiserver ", 1)[-1]
    elif args.only is None:
        console.print("[bold]kubernetes:[/] skipped (" + ("--quick" if args.quick else "--no-k8s") + ")")
    doc = report.document(desc, outcome, k8s_doc)
    console.print(f"[bold]machine:[/] {desc}")
    report.render(console, doc, outcome)
    try:
        report.write(doc, args.out)
        pngs = plots.write(doc, args.out.parent)
    except OSError as exc:
        console.print(f"[red]error:[/] cannot write the results to {args.out}: {exc}")
        return 2
    console.print(f"results written to {args.out}" + "".join(f", {p}" for p in pngs))
    if args.profile is not None:
        console.print(f"profiles in {args.profile} (python -m pstats {args.profile}/<workload>.prof)")
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
