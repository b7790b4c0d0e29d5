"""Replicas from queue depth: the decision only, pure, so every rule is unit-tested.

Like the HorizontalPodAutoscaler: scale up at once, scale down to the highest recommendation
seen within the stabilization window (so a burst's tail does not flap the Deployment), and
never past the partition count (a partition has one owner; extra pods would sit idle).

Work is what JetStream holds (lag) plus what the platform keeps in etcd: messages queued in
locked keys' inboxes count as lag, and a timer counts as work from the moment the function must
be woken for it to fire on time (its due time less the measured wake-up time). So a function
is never at zero while a timer is due sooner than it could be woken for, and one at zero is
woken ahead of its next timer, like KEDA's scaler would be by a cron trigger.
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
class Pending:
    """What the function's partitions keep in etcd (the pending-work index), as the autoscaler weighs it."""

    inbox: int = 0
    due_in: float | None = None  # seconds until its earliest timer (negative: overdue); None: no timer
    wake_lead: float = 0.0       # how long before a timer a function at zero must be woken (wake-up + a tick)

    @property
    def timer_soon(self) -> bool:
        return self.due_in is not None and self.due_in <= self.wake_lead


@dataclasses.dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    woken_for_timer: bool = False  # from zero, for a timer alone (no message waits): an Event says so


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


class WakeClock:
    """How long waking the function from zero takes here: from scaling 0 -> n to its first ready pod.

    Measured on every wake (by a message or a timer), at the daemon's tick; the estimate is the
    slowest of the last few, so a timer is not late because one wake happened to be quick.
    Before any wake was seen, the last estimate the status recorded, else a default.
    """

    def __init__(self, initial: float) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=5)
        self._initial = initial
        self._since: float | None = None

    def scaled_from_zero(self, now: float) -> None:
        self._since = now

    def observe(self, now: float, ready: int) -> float | None:
        """The daemon saw ``ready`` pods: returns the wake-up time if this ends one."""
        if self._since is None or ready <= 0:
            return None
        took, self._since = now - self._since, None
        self._samples.append(took)
        return took

    @property
    def estimate(self) -> float:
        return max(self._samples) if self._samples else self._initial


def decide(policy: Policy, lag: int, current: int, history: History, now: float,
           pending: Pending = Pending()) -> Decision:
    work = lag + pending.inbox
    busy = work > 0 or pending.timer_soon
    if busy:
        history.last_busy = now
    idle_for = now - history.last_busy
    wanted = math.ceil(work / policy.target_lag)
    floor = policy.min_replicas
    if floor == 0 and busy:
        floor = 1  # the first message, or a timer about to be due, brings a replica back
    if policy.min_replicas == 0 and not busy and current > 0 and idle_for < policy.idle_before_zero:
        floor = 1  # not idle long enough to go to zero
    recommendation = min(max(wanted, floor), policy.ceiling)
    stabilized = history.record(now, recommendation, policy.scale_down_window)
    if recommendation >= current:
        target = recommendation
    elif recommendation == 0:
        target = 0  # the idle period is zero's own stabilization
    else:
        target = min(current, stabilized)
    for_timer = current == 0 and target > 0 and work == 0
    return Decision(target, _reason(policy, lag, pending, current, target, wanted, idle_for), for_timer)


def _reason(policy: Policy, lag: int, pending: Pending, current: int, target: int, wanted: int,
            idle_for: float) -> str:
    inbox = f" + {pending.inbox} in inboxes" if pending.inbox else ""
    head = f"lag {lag}{inbox} at target {policy.target_lag}/replica wants {wanted}"
    timer = ""
    if pending.timer_soon:
        assert pending.due_in is not None
        due = f"due in {pending.due_in:.0f}s" if pending.due_in >= 0 else f"overdue by {-pending.due_in:.0f}s"
        timer = f"a timer is {due} (waking takes up to {pending.wake_lead:.0f}s)"
    if current == 0 and target > 0 and timer and wanted == 0:
        return f"{timer}: waking 0 -> {target}"
    if target == current:
        return f"{head}; staying at {current}" + (f": {timer}" if timer and target > 0 else "")
    if target == 0:
        after = ""
        if pending.due_in is not None:
            after = f"; its next timer, due in {pending.due_in:.0f}s, wakes it {pending.wake_lead:.0f}s ahead"
        return f"no work for {idle_for:.0f}s: scaling {current} -> 0; the next message brings one back{after}"
    if target > current:
        capped = " (capped by maxReplicas and partitions)" if wanted > target else ""
        return f"{head}: scaling up {current} -> {target}{capped}"
    return f"{head}: scaling down {current} -> {target} after the {policy.scale_down_window:.0f}s window"
