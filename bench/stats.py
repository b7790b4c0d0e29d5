"""What a workload measured, reduced to the three numbers every workload reports.

Floors and platform workloads share this so their numbers are computed the same way: the
ratio between two of them is only meaningful if both are.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

# Called with the number of operations just measured (drives the progress bar).
Tick = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class Result:
    """Throughput in operations per second; latencies in milliseconds."""

    throughput: float
    p50_ms: float
    p99_ms: float
    operations: int
    unit: str  # what one latency sample is ("message", "batch", "invocation")
    rss_mb: float | None = None
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"throughput": round(self.throughput, 1), "p50_ms": round(self.p50_ms, 3),
                               "p99_ms": round(self.p99_ms, 3)}
        if self.rss_mb is not None:
            out["rss_mb"] = round(self.rss_mb, 1)
        return out


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); the sample that q% of samples are at or below."""
    if not samples:
        raise ValueError("no latency samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(latencies_s: list[float], operations: int, elapsed_s: float, unit: str, *,
              rss_mb: float | None = None, notes: str = "") -> Result:
    """Latencies in seconds in, a Result in milliseconds out."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed time must be positive, got {elapsed_s}")
    return Result(
        throughput=operations / elapsed_s,
        p50_ms=percentile(latencies_s, 50) * 1000,
        p99_ms=percentile(latencies_s, 99) * 1000,
        operations=operations,
        unit=unit,
        rss_mb=rss_mb,
        notes=notes,
    )


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One workload measured at several concurrencies: (messages or invocations in flight, result)."""

    points: list[tuple[int, Result]]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"concurrency": level, **r.to_json()} for level, r in self.points]
