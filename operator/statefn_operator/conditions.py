"""``status.conditions`` as Kubernetes API conventions describe them.

A condition's lastTransitionTime changes only when its status does; observedGeneration says
which spec it describes, so a reader can tell a stale Ready from a current one.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None: Unknown
    reason: str
    message: str = ""

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else str(self.status)


def merge(existing: list[dict[str, Any]] | None, updates: list[Condition], generation: int) -> list[dict[str, Any]]:
    """The new conditions list: ``updates`` replace their types, others are kept as they were."""
    by_type = {c["type"]: dict(c) for c in existing or []}
    for cond in updates:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status_text
        by_type[cond.type] = {
            "type": cond.type,
            "status": cond.status_text,
            "reason": cond.reason,
            "message": cond.message,
            "observedGeneration": generation,
            "lastTransitionTime": now() if changed or old is None else old.get("lastTransitionTime", now()),
        }
    return sorted(by_type.values(), key=lambda c: str(c["type"]))


def find(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
