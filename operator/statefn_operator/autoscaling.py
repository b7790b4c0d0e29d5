"""Replicas from queue depth: the decision only, pure, so every rule is unit-tested.

Like the HorizontalPodAutoscaler: scale up at once, scale down to the highest recommendation
seen within the stabilization window (so a burst's tail does not flap the Deployment), and
never past the partition count (a partition has one owner; extra pods would sit idle).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any


@dataclasses.dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    partitions: int
    target_lag: int
    scale_down_window: float
    # With min_replicas 0: how long without lag before going to zero.
    idle_before_zero: float

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Policy:
        scaling = spec.get("scaling") or {}
        window = float(scaling.get("scaleDownStabilizationSeconds", 300))
        return cls(
            min_replicas=int(scaling.get("minReplicas", 1)),
            max_replicas=int(scaling.get("maxReplicas", 4)),
            partitions=int(spec.get("partitions", 16)),
            target_lag=max(1, int(scaling.get("targetLagPerReplica", 100))),
            scale_down_window=window,
            idle_before_zero=float(scaling.get("scaleToZeroAfterSeconds", window)),
        )

    @property
    def ceiling(self) -> int:
        return max(1, min(self.max_replicas, self.partitions))


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


class History:
    """Recent recommendations and the last time the function had work (per function, in memory).

    Seeded with the current replicas when first seen: after an operator restart nothing is
    scaled down before a full window has passed.
    """

    def __init__(self, now: float, current: int) -> None:
        self.recommendations: collections.deque[tuple[float, int]] = collections.deque([(now, current)])
        self.last_busy = now

    def record(self, now: float, recommendation: int, window: float) -> int:
        """Add a recommendation; returns the highest one within the window."""
        self.recommendations.append((now, recommendation))
        while self.recommendations and self.recommendations[0][0] < now - window:
            self.recommendations.popleft()
        return max(r for _, r in self.recommendations)


def decide(policy: Policy, lag: int, current: int, history: History, now: float) -> Decision:
    if lag > 0:
        history.last_busy = now
    idle_for = now - history.last_busy
    wanted = math.ceil(lag / policy.target_lag)
    floor = policy.min_replicas
    if floor == 0 and lag > 0:
        floor = 1  # the first message brings a replica back
    if policy.min_replicas == 0 and lag == 0 and current > 0 and idle_for < policy.idle_before_zero:
        floor = 1  # not idle long enough to go to zero
    recommendation = min(max(wanted, floor), policy.ceiling)
    stabilized = history.record(now, recommendation, policy.scale_down_window)
    if recommendation >= current:
        target = recommendation
    elif recommendation == 0:
        target = 0  # the idle period is zero's own stabilization
    else:
        target = min(current, stabilized)
    return Decision(target, _reason(policy, lag, current, target, wanted, idle_for))


def _reason(policy: Policy, lag: int, current: int, target: int, wanted: int, idle_for: float) -> str:
    head = f"lag {lag} at target {policy.target_lag}/replica wants {wanted}"
    if target == current:
        return f"{head}; staying at {current}"
    if target == 0:
        return f"no lag for {idle_for:.0f}s: scaling {current} -> 0; the next message brings one back"
    if target > current:
        capped = " (capped by maxReplicas and partitions)" if wanted > target else ""
        return f"{head}: scaling up {current} -> {target}{capped}"
    return f"{head}: scaling down {current} -> {target} after the {policy.scale_down_window:.0f}s window"
