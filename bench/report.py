"""Turns measured results into ratios against the floor, target verdicts, a table and a JSON file.

Absolute numbers depend on the machine; the ratio to the floor measured in the same run is what
carries over between machines, so the targets are stated as ratios (and memory in MB).

``latest.json`` is shaped::

    {"machine": "...", "workloads": {NAME: {"throughput": ops_per_s, "p50_ms": x, "p99_ms": y}},
     "ratios": {NAME: {"throughput": x_of_its_throughput_floor, "p50": x_of_its_p50_floor,
                       "throughput_floor": FLOOR_NAME, "p50_floor": FLOOR_NAME}},
     "targets": {TARGET: {"workload", "metric", "op", "threshold", "value", "met", "note"}},
     "sweeps": {NAME: [{"concurrency": n, "throughput": ops_per_s, "p50_ms": x, "p99_ms": y}, ...]}}

The Kubernetes workloads (``bench.k8s``), when they ran, are merged into ``workloads`` and
``ratios`` with their own metrics (``p50_s``, ``cpu_ms_per_reconcile``, ...) and ``"k8s_notes"``.
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
def ratios(results: dict[str, stats.Result]) -> dict[str, dict[str, Any]]:
    """Each workload over the floors its registry entry names (None when that floor did not run).

    The counter workloads are over ``floor_batched`` (throughput) and ``floor_single`` (p50); a
    fan-out is over its own floor for both. A ``baseline`` (a variant of another workload, e.g.
    tracing on) adds ``vs_baseline``: throughput and p50 over that workload's.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, r in results.items():
        w = suite.BY_NAME[name]
        tf = results.get(w.throughput_floor) if w.throughput_floor else None
        pf = results.get(w.p50_floor) if w.p50_floor else None
        entry: dict[str, Any] = {
            "throughput": round(r.throughput / tf.throughput, 3) if tf else None,
            "p50": round(r.p50_ms / pf.p50_ms, 3) if pf else None,
            "throughput_floor": w.throughput_floor, "p50_floor": w.p50_floor,
        }
        if w.baseline is not None and w.baseline in results:
            b = results[w.baseline]
            entry["vs_baseline"] = {"workload": w.baseline, "throughput": round(r.throughput / b.throughput, 3),
                                    "p50": round(r.p50_ms / b.p50_ms, 3)}
        out[name] = entry
    return out


def sweep_ratio(outcome: suite.Outcome, name: str, level: int) -> float | None:
    """A platform sweep's throughput over the floor sweep's at the same concurrency."""
    floor_sweep = outcome.sweeps.get(f"{suite.SWEEP_PREFIX}floor")
    mine = outcome.sweeps.get(name)
    if floor_sweep is None or mine is None or name == f"{suite.SWEEP_PREFIX}floor":
        return None
    at = dict(floor_sweep.points).get(level)
    here = dict(mine.points).get(level)
    return None if at is None or here is None else here.throughput / at.throughput


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


def document(machine_desc: str, outcome: suite.Outcome, k8s: dict[str, Any] | None = None) -> dict[str, Any]:
    ordered = {n: outcome.results[n] for n in suite.NAMES if n in outcome.results}
    doc: dict[str, Any] = {
        "machine": machine_desc,
        "workloads": {n: r.to_json() for n, r in ordered.items()},
        "ratios": ratios(ordered),
        "targets": targets(ordered, outcome.skipped, outcome.failed),
        "sweeps": {suite.sweep_key(n): outcome.sweeps[n].to_json() for n in suite.NAMES if n in outcome.sweeps},
    }
    if k8s is not None:
        doc["workloads"].update(k8s["workloads"])
        doc["ratios"].update(k8s["ratios"])
        doc["k8s_notes"] = k8s.get("notes", "")
    return doc


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
                         ("per", "left"), ("x floor ops/s", "right"), ("x floor p50", "right"),
                         ("RSS MB", "right"), ("notes", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name in suite.NAMES:
        if suite.BY_NAME[name].is_sweep:
            continue
        r = outcome.results.get(name)
        if r is None:
            if name in outcome.skipped:
                table.add_row(name, *["-"] * 7, "[yellow]skipped (below)")
            elif name in outcome.failed:
                table.add_row(name, *["-"] * 7, "[red]FAILED (below)")
            continue
        ratio = doc["ratios"][name]
        notes = r.notes
        if ratio["throughput_floor"] != suite.FLOOR_BATCHED or ratio["p50_floor"] != suite.FLOOR_SINGLE:
            notes = f"vs {ratio['throughput_floor']}; {notes}"
        if "vs_baseline" in ratio:
            vb = ratio["vs_baseline"]
            notes = f"{vb['throughput']:.2f}x the ops/s and {vb['p50']:.2f}x the p50 of {vb['workload']}; {notes}"
        table.add_row(name, f"{r.throughput:,.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", r.unit,
                      _num(ratio["throughput"], ".2f"), _num(ratio["p50"], ".2f"), _num(r.rss_mb, ".0f"),
                      notes)
    k8s_rows = [n for n in doc["workloads"] if n not in suite.BY_NAME]
    if k8s_rows:
        table.add_section()
        for name in k8s_rows:
            table.add_row(*_k8s_row(name, doc["workloads"][name], doc["ratios"].get(name, {})))
    console.print(table)
    if outcome.sweeps:
        console.print(sweep_table(outcome))
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


def _k8s_row(name: str, m: dict[str, Any], ratio: dict[str, Any]) -> list[str]:
    """A Kubernetes workload in the table's columns: seconds shown as ms, the rest in the notes."""
    p50 = m.get("p50_ms", m["p50_s"] * 1000 if "p50_s" in m else None)
    p99 = m.get("p99_ms")
    shown = {"throughput", "p50_ms", "p99_ms", "p50_s"}
    notes = ", ".join(f"{k} {v}" for k, v in m.items() if k not in shown)
    per = "function" if "throughput" in m else "run"
    return [name, _num(m.get("throughput"), ",.1f"), _num(p50, ".1f"), _num(p99, ".1f"), per,
            _num(ratio.get("throughput"), ".2f"), _num(ratio.get("p50"), ".2f"), "-", notes]


def sweep_table(outcome: suite.Outcome) -> Table:
    """Throughput (and its ratio to the floor at the same concurrency) and p50 / p99, per level."""
    levels = sorted({level for sw in outcome.sweeps.values() for level, _ in sw.points})
    table = Table(title="concurrency sweeps: ops/s (x floor at the same concurrency), p50 / p99 ms",
                  box=box.SIMPLE_HEAD)
    table.add_column("sweep")
    for level in levels:
        table.add_column(f"{level} in flight", justify="right")
    for name in suite.NAMES:
        sw = outcome.sweeps.get(name)
        if sw is None:
            continue
        by_level = dict(sw.points)
        cells = []
        for level in levels:
            r = by_level.get(level)
            if r is None:
                cells.append("-")
                continue
            ratio = sweep_ratio(outcome, name, level)
            x = "" if ratio is None else f" ({ratio:.2f}x)"
            cells.append(f"{r.throughput:,.0f}/s{x}\n{r.p50_ms:.1f} / {r.p99_ms:.1f}")
        table.add_row(suite.sweep_key(name), *cells)
    return table
