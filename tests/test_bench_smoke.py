"""``python -m bench --quick`` runs end to end and writes results shaped as documented.

Only the shape is checked, never the numbers: this machine is shared, so timings are noise here.
The workloads themselves fail the run when work is lost, which the exit status covers.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ALWAYS = ["floor_single", "floor_batched", "counter_embedded_single", "counter_embedded", "memory_100k_keys"]
TARGETS = {"embedded_throughput", "embedded_single_p50", "remote_throughput", "memory"}


def _expected_workloads() -> list[str]:
    # counter_remote needs the function server (statefn._serve); until it exists the run skips it.
    if importlib.util.find_spec("statefn._serve") is None:
        return ALWAYS
    return [*ALWAYS[:4], "counter_remote", ALWAYS[4]]


def test_quick_bench_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=280, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert sorted(doc) == ["machine", "ratios", "targets", "workloads"]
    assert isinstance(doc["machine"], str)
    assert "cores" in doc["machine"] and "nats-server v" in doc["machine"] and "etcd 3." in doc["machine"]

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
        assert set(ratio) == {"throughput", "p50"}, name
        assert all(isinstance(v, float) and v > 0 for v in ratio.values()), (name, ratio)

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


def test_unknown_workload_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench", "--only", "floor_single,nope", "--out",
                           str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == (
        "python -m bench: error: unknown workload 'nope'; known: floor_single, floor_batched, "
        "counter_embedded_single, counter_embedded, counter_remote, memory_100k_keys"
    )
    assert not (tmp_path / "x.json").exists()
