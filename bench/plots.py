"""PNG plots of the concurrency sweeps, from a results JSON: ``python -m bench.plots bench/results/latest.json``.

- ``throughput.png``: throughput against concurrency (log x), one line per sweep, the floor dashed;
- ``latency.png``: p50 (left) and p99 (right) against concurrency (log x and y), the floor dashed.

They are drawn from the JSON (not from the run's objects) so a result file can be re-plotted,
e.g. after the lead re-measures in a quiet moment, and written next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit
import matplotlib.pyplot as plt  # after choosing the backend
from matplotlib import ticker
from matplotlib.axes import Axes

FLOOR = "floor"


def _style(name: str) -> dict[str, Any]:
    return {"linestyle": "--", "color": "0.35"} if name == FLOOR else {"linestyle": "-"}


def _label(name: str) -> str:
    return "floor (raw NATS + etcd)" if name == FLOOR else name


def _order(sweeps: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The floor first (it is the reference line), then the platform sweeps as the run recorded them."""
    return sorted(sweeps, key=lambda n: n != FLOOR)


def _axes(ax: Axes, levels: list[int], ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(level) for level in levels])
    ax.set_xlabel("in flight (invocations, or messages for the floor)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")


def write(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Both plots into ``out_dir``; returns the paths (none when the run has no sweeps)."""
    sweeps: dict[str, list[dict[str, Any]]] = doc.get("sweeps") or {}
    if not sweeps:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    levels = sorted({p["concurrency"] for pts in sweeps.values() for p in pts})
    title = doc.get("machine", "")
    paths = [out_dir / "throughput.png", out_dir / "latency.png"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in _order(sweeps):
        pts = sweeps[name]
        ax.plot([p["concurrency"] for p in pts], [p["throughput"] for p in pts], marker="o", label=_label(name),
                **_style(name))
    ax.set_ylim(bottom=0)
    _axes(ax, levels, "throughput (ops/s)")
    ax.set_title("throughput against concurrency")
    fig.text(0.5, 0.005, title, ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, metric in zip(axes, ("p50_ms", "p99_ms"), strict=True):
        for name in _order(sweeps):
            pts = sweeps[name]
            ax.plot([p["concurrency"] for p in pts], [p[metric] for p in pts], marker="o", label=_label(name),
                    **_style(name))
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        _axes(ax, levels, f"{metric.removesuffix('_ms')} latency (ms)")
        ax.set_title(f"{metric.removesuffix('_ms')} latency against concurrency")
    fig.text(0.5, 0.005, title, ha="center", va="bottom", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results JSON written by python -m bench")
    parser.add_argument("--out-dir", type=Path, help="where to write the PNGs (default: next to the JSON)")
    args = parser.parse_args(argv)
    try:
        doc = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read {args.results}: {exc}")
    paths = write(doc, args.out_dir or args.results.parent)
    if not paths:
        print(f"{args.results} has no sweeps: nothing to plot", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
