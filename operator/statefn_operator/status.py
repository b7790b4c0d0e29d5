"""One writer of a resource's status, shared by its handlers and its daemon through kopf's memo.

The operator is the only writer of these statuses (leader election makes it one process), so
after the first read the in-memory copy is the truth: a write sends only what changed, and
concurrent handlers cannot interleave a read-modify-write of the conditions list.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from statefn_operator import conditions, kube


class StatusWriter:
    def __init__(self, api: kube.Kube, plural: str, namespace: str, name: str, current: dict[str, Any] | None) -> None:
        self._api = api
        self._where = (plural, namespace, name)
        self._status: dict[str, Any] = copy.deepcopy(dict(current or {}))
        self._lock = asyncio.Lock()

    def condition(self, type_: str) -> dict[str, Any] | None:
        return conditions.find(self._status.get("conditions"), type_)

    async def update(self, generation: int, updates: list[conditions.Condition] | None = None,
                     **fields: Any) -> list[conditions.Condition]:
        """Write the changed fields; returns the conditions whose status or reason changed (for Events)."""
        async with self._lock:
            before = self._status.get("conditions") or []
            new = dict(self._status, **fields)
            changed: list[conditions.Condition] = []
            if updates:
                new["conditions"] = conditions.merge(before, updates, generation)
                for cond in updates:
                    old = conditions.find(before, cond.type)
                    if old is None or (old.get("status"), old.get("reason")) != (cond.status_text, cond.reason):
                        changed.append(cond)
            diff = {k: v for k, v in new.items() if self._status.get(k) != v}
            if not diff:
                return []
            try:
                await self._api.patch_status(*self._where, diff)
            except ApiException as exc:
                if exc.status == 404:  # deleted meanwhile: nothing left to describe
                    return []
                raise
            self._status = new
            return changed
