"""The owner's cache of its keys' state (LRU), filled from etcd on first use.

Valid because the owner is the only writer: every write goes through its fenced commits,
which update the cache only after they land.
"""

from __future__ import annotations

import collections

import aetcd

from statefn_core import layout

_READS_PER_TXN = 120


class StateCache:
    def __init__(self, etcd: aetcd.Client, keys: layout.PartitionKeys, capacity: int) -> None:
        self._etcd = etcd
        self._keys = keys
        self._capacity = max(capacity, 1024)
        self._data: collections.OrderedDict[str, dict[str, bytes]] = collections.OrderedDict()
        self.loads = 0

    def __len__(self) -> int:
        return len(self._data)

    async def load(self, keys: list[str]) -> None:
        """Read the keys not cached yet: one etcd round trip per 120 cold keys."""
        cold = [k for k in dict.fromkeys(keys) if k not in self._data]
        t = self._etcd.transactions
        for i in range(0, len(cold), _READS_PER_TXN):
            chunk = cold[i:i + _READS_PER_TXN]
            prefixes = [self._keys.state_prefix(k) for k in chunk]
            _, responses = await self._etcd.transaction(
                compare=[], success=[t.get(p, layout.prefix_end(p)) for p in prefixes], failure=[])
            for key, prefix, kvs in zip(chunk, prefixes, responses, strict=True):
                self._data[key] = {kv.key[len(prefix):].decode(): value for value, kv in kvs}
            self.loads += 1
        for k in keys:
            if k in self._data:
                self._data.move_to_end(k)
        while len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def get(self, key: str) -> dict[str, bytes]:
        return self._data[key]

    def update(self, changes: dict[str, dict[str, bytes | None]]) -> None:
        for key, names in changes.items():
            current = self._data.get(key)
            if current is None:
                continue  # evicted meanwhile; the next use reads the committed value
            for name, value in names.items():
                if value is None:
                    current.pop(name, None)
                else:
                    current[name] = value
