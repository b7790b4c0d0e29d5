"""Turns measured results into ratios against the floor, target verdicts, a table and a JSON file.

Absolute numbers depend on the machine; the ratio to the floor measured in the same run is what
carries over between machines, so the targets are stated as ratios (and memory in MB).

``latest.json`` is shaped::

    {"machine": "...", "workloads": {NAME: {"throughput": ops_per_s, "p50_ms": x, "p99_ms": y}},
     "ratios": {NAME: {"throughput": x_of_batched_floor, "p50": x_of_single_floor}},
     "targets": {TARGET: {"workload", "metric", "op", "threshold", "value", "met", "note"}}}
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from bench import stats, suite

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, "<": operator.lt}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    workload: str
    metric: str  # "throughput_ratio", "p50_ratio" or "rss_mb"
    op: str
    threshold: float
    description: str


TARGETS = (
    Target("embedded_throughput", suite.EMBEDDED, "throughput_ratio", ">=", 0.60,
           "embedded throughput >= 60% of the batched floor"),
    Target("embedded_single_p50", suite.EMBEDDED_SINGLE, "p50_ratio", "<=", 1.5,
           "embedded single p50 <= 1.5x the unbatched floor p50"),
    Target("remote_throughput", suite.REMOTE, "throughput_ratio", ">=", 0.40,
           "remote throughput >= 40% of the batched floor"),
    Target("memory", suite.MEMORY, "rss_mb", "<", 300.0, "sidecar RSS after 100k keys < 300 MB"),
)


# ---- the machine ----
def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False).stdout
    except OSError as exc:
        return f"unknown ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def _proc_field(path: str, field: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine(nats_server: str, etcd: str, nats_sync: str) -> str:
    cpu = _proc_field("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU"
    mem_kb = _proc_field("/proc/meminfo", "MemTotal")
    ram = f"{int(mem_kb.split()[0]) / 1024 / 1024:.1f} GiB RAM" if mem_kb else "RAM unknown"
    nats_version = _first_line([nats_server, "--version"]).replace("nats-server:", "nats-server")
    etcd_version = _first_line([etcd, "--version"]).replace("etcd Version:", "etcd").strip()
    return (f"{cpu}, {os.cpu_count()} cores, {ram}, Python {platform.python_version()}, "
            f"{nats_version} ({nats_sync}), {etcd_version}")


# ---- ratios and targets ----
def ratios(results: dict[str, stats.Result]) -> dict[str, dict[str, float | None]]:
    """Throughput over the batched floor's, p50 over the single floor's (None without that floor)."""
    batched = results.get(suite.FLOOR_BATCHED)
    single = results.get(suite.FLOOR_SINGLE)
    return {
        name: {
            "throughput": round(r.throughput / batched.throughput, 3) if batched else None,
            "p50": round(r.p50_ms / single.p50_ms, 3) if single else None,
        }
        for name, r in results.items()
    }


def targets(results: dict[str, stats.Result], skipped: dict[str, str],
            failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    rs = ratios(results)
    out: dict[str, dict[str, Any]] = {}
    for t in TARGETS:
        value: float | None = None
        note = ""
        if t.workload in results:
            if t.metric == "rss_mb":
                rss = results[t.workload].rss_mb
                value = None if rss is None else round(rss, 1)
            else:
                value = rs[t.workload]["throughput" if t.metric == "throughput_ratio" else "p50"]
                if value is None:
                    note = "its floor was not measured in this run"
        elif t.workload in skipped:
            note = f"skipped: {skipped[t.workload]}"
        elif t.workload in failed:
            note = f"failed: {failed[t.workload]}"
        else:
            note = "not run"
        met = value is not None and _OPS[t.op](value, t.threshold)
        out[t.name] = {"workload": t.workload, "metric": t.metric, "op": t.op, "threshold": t.threshold,
                       "value": value, "met": met, "note": note or t.description}
    return out


def document(machine_desc: str, outcome: suite.Outcome) -> dict[str, Any]:
    ordered = {n: outcome.results[n] for n in suite.NAMES if n in outcome.results}
    return {
        "machine": machine_desc,
        "workloads": {n: r.to_json() for n, r in ordered.items()},
        "ratios": ratios(ordered),
        "targets": targets(ordered, outcome.skipped, outcome.failed),
    }


def write(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)


# ---- the table ----
def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def render(console: Console, doc: dict[str, Any], outcome: suite.Outcome) -> None:
    table = Table(title="statefn benchmarks (ratios against the floor measured in this run)",
                  box=box.SIMPLE_HEAD)
    for col, justify in (("workload", "left"), ("ops/s", "right"), ("p50 ms", "right"), ("p99 ms", "right"),
                         ("per", "left"), ("x batched floor", "right"), ("x single floor p50", "right"),
                         ("RSS MB", "right"), ("notes", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name in suite.NAMES:
        r = outcome.results.get(name)
        if r is None:
            if name in outcome.skipped:
                table.add_row(name, *["-"] * 7, "[yellow]skipped (below)")
            elif name in outcome.failed:
                table.add_row(name, *["-"] * 7, "[red]FAILED (below)")
            continue
        ratio = doc["ratios"][name]
        table.add_row(name, f"{r.throughput:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", r.unit,
                      _num(ratio["throughput"], ".2f"), _num(ratio["p50"], ".2f"), _num(r.rss_mb, ".0f"),
                      r.notes)
    console.print(table)
    for name, why in outcome.skipped.items():
        console.print(f"[yellow]{name} skipped:[/] {why}")
    for name, why in outcome.failed.items():
        console.print(f"[red]{name} FAILED:[/] {why}")

    verdicts = Table(title="targets", box=box.SIMPLE_HEAD)
    for col in ("target", "value", "wanted", "met"):
        verdicts.add_column(col)
    for t in TARGETS:
        v = doc["targets"][t.name]
        value = _num(v["value"], ".0f" if t.metric == "rss_mb" else ".2f")
        if t.metric == "rss_mb" and v["value"] is not None:
            value += " MB"
        met = "[green]yes" if v["met"] else "[red]no"
        if v["value"] is None:
            met = "[yellow]not measured"
        verdicts.add_row(t.description, value, f"{t.op} {t.threshold:g}", met)
    console.print(verdicts)
