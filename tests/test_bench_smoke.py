"""``python -m bench --quick`` runs end to end and writes results and plots shaped as documented.

Only the shape is checked, never the numbers: this machine is shared, so timings are noise here.
The workloads themselves fail the run when work is lost, which the exit status covers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import plots

ROOT = Path(__file__).resolve().parent.parent

FLOORS = ["floor_single", "floor_batched", "floor_fanout_10", "floor_fanout_100", "floor_call", "floor_saga"]
EMBEDDED = ["counter_embedded_single", "counter_embedded", "counter_traced", "fanout_10", "fanout_100",
            "call_embedded_single", "call_embedded", "saga_embedded_single", "tx_embedded_single", "tx_embedded",
            "tx_parallel_embedded_single"]
TARGETS = {"embedded_throughput", "embedded_single_p50", "remote_throughput", "memory"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _remote() -> bool:
    # counter_remote needs the function server (statefn._serve); until it exists the run skips it.
    return importlib.util.find_spec("statefn._serve") is not None


def _expected_workloads() -> list[str]:
    return [*FLOORS, *EMBEDDED, *(["counter_remote"] if _remote() else []), "memory_100k_keys"]


def _expected_sweeps() -> list[str]:
    return ["floor", "counter_embedded", *(["counter_remote"] if _remote() else [])]


def _own_floors(name: str) -> tuple[str, str]:
    """(throughput floor, p50 floor) of a workload's ratios."""
    if "fanout" in name:
        n = name.rsplit("_", 1)[1]
        return f"floor_fanout_{n}", f"floor_fanout_{n}"
    if name in ("floor_call", "call_embedded_single"):
        return "floor_call", "floor_call"
    if name in ("floor_saga", "saga_embedded_single", "tx_embedded_single", "tx_parallel_embedded_single"):
        return "floor_saga", "floor_saga"
    return "floor_batched", "floor_single"


def test_quick_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280, check=False,
                          env=dict(os.environ, COLUMNS="400"))  # table rows on one line each
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kubernetes: skipped (--quick)" in proc.stdout
    doc = json.loads(out.read_text())

    assert sorted(doc) == ["machine", "ratios", "sweeps", "targets", "workloads"]
    assert isinstance(doc["machine"], str)
    assert "cores" in doc["machine"] and "nats-server v" in doc["machine"] and "etcd 3." in doc["machine"]
    assert "sync_interval" in doc["machine"] and "RAM" in doc["machine"] and "Python 3." in doc["machine"]

    names = _expected_workloads()
    assert list(doc["workloads"]) == names
    for name, numbers in doc["workloads"].items():
        want = {"throughput", "p50_ms", "p99_ms"} | ({"rss_mb"} if name == "memory_100k_keys" else set())
        assert set(numbers) == want, name
        assert all(isinstance(v, float) and v > 0 for v in numbers.values()), (name, numbers)
        assert numbers["p50_ms"] <= numbers["p99_ms"], (name, numbers)

    assert list(doc["ratios"]) == names
    assert doc["ratios"]["floor_single"]["p50"] == 1.0
    assert doc["ratios"]["floor_batched"]["throughput"] == 1.0
    for name, ratio in doc["ratios"].items():
        baseline = {"vs_baseline"} if name == "counter_traced" else set()
        assert set(ratio) == {"throughput", "p50", "throughput_floor", "p50_floor"} | baseline, name
        assert (ratio["throughput_floor"], ratio["p50_floor"]) == _own_floors(name), name
        assert all(isinstance(ratio[k], float) and ratio[k] > 0 for k in ("throughput", "p50")), (name, ratio)
    assert doc["ratios"]["counter_traced"]["vs_baseline"]["workload"] == "counter_embedded"
    assert re.search(r"[1-9][\d,]* spans exported of", proc.stdout), proc.stdout[-3000:]  # spans reached the receiver
    assert doc["ratios"]["floor_fanout_10"] == {"throughput": 1.0, "p50": 1.0, "throughput_floor": "floor_fanout_10",
                                                "p50_floor": "floor_fanout_10"}

    assert set(doc["targets"]) == TARGETS
    for name, target in doc["targets"].items():
        assert set(target) == {"workload", "metric", "op", "threshold", "value", "met", "note"}, name
        assert isinstance(target["met"], bool), name
        if target["workload"] in doc["workloads"]:
            assert isinstance(target["value"], float), name
        else:
            assert target["value"] is None and target["met"] is False, name
    assert doc["targets"]["embedded_throughput"]["value"] == doc["ratios"]["counter_embedded"]["throughput"]
    assert doc["targets"]["memory"]["value"] == doc["workloads"]["memory_100k_keys"]["rss_mb"]

    assert list(doc["sweeps"]) == _expected_sweeps()
    for name, points in doc["sweeps"].items():
        assert [p["concurrency"] for p in points] == [1, 4, 32], name  # suite.QUICK's levels
        for p in points:
            assert set(p) == {"concurrency", "throughput", "p50_ms", "p99_ms"}, (name, p)
            assert p["throughput"] > 0 and 0 < p["p50_ms"] <= p["p99_ms"], (name, p)

    for png in ("throughput.png", "latency.png"):  # next to the JSON
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC, png
    again = tmp_path / "again"
    assert plots.main([str(out), "--out-dir", str(again)]) == 0  # python -m bench.plots re-draws them
    assert sorted(p.name for p in again.iterdir()) == ["latency.png", "throughput.png"]


def test_unknown_workload_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "floor_single,nope", "--out",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "python -m bench: error: unknown workload 'nope'; known: floor_single, floor_batched, floor_fanout_10, "
        "floor_fanout_100, floor_call, floor_saga, sweep_floor, counter_embedded_single, counter_embedded, "
        "sweep_counter_embedded, counter_traced, fanout_10, fanout_100, call_embedded_single, call_embedded, "
        "saga_embedded_single, tx_embedded_single, tx_embedded, tx_parallel_embedded_single, counter_remote, "
        "sweep_counter_remote, memory_100k_keys, k8s"
    )
    assert not (tmp_path / "x.json").exists()
