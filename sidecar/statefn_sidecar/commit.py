"""Fenced, at-most-once etcd commits, split under etcd's limits.

Every commit compares the owner key's create revision (the fence: a sidecar that lost the
partition cannot write) and the partition's commit marker (each commit names its predecessor,
so a commit applies at most once and in order). Because of the marker, a commit whose outcome
is unknown (timeout, lost reply) is simply sent again: if the first attempt landed, the second
one fails its compare and its failure branch reads the marker back, which says so. Nothing is
re-applied blindly.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import aetcd

from statefn_core import backoff, connect, constants, layout
from statefn_sidecar import faults as faults_mod

_log = logging.getLogger("statefn.commit")

# What it costs to add an op to a request, beyond its key and value (protobuf framing; generous).
OP_OVERHEAD = 32
# Leave room under etcd's limits for the fence, the marker, the pending-work entry and framing.
MAX_OPS = constants.ETCD_MAX_TXN_OPS - 3
MAX_BYTES = constants.ETCD_MAX_REQUEST_BYTES - 64 * 1024


class Fenced(Exception):
    """The partition is owned by someone else now: stop, drop caches, ack nothing."""


@dataclasses.dataclass
class Txn:
    """The writes of one commit: folded puts/deletes plus guarded idempotency records.

    Its size is counted as it is written, by one rule (``_put_delta``, ``_delete_delta``), and
    ``cost_with`` applies the same rule to tell what absorbing another one would make it: the planner
    never estimates.
    """

    puts: dict[bytes, tuple[bytes, int | None]] = dataclasses.field(default_factory=dict)  # key -> (value, lease)
    deletes: set[bytes] = dataclasses.field(default_factory=set)
    range_deletes: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    absent: list[bytes] = dataclasses.field(default_factory=list)  # keys that must not exist (idempotency)
    size: int = 0

    @property
    def op_count(self) -> int:
        return len(self.puts) + len(self.deletes) + len(self.range_deletes)

    def put(self, key: bytes, value: bytes, lease: int | None = None) -> None:
        self.size += self._put_delta(key, value)[1]
        if self.deletes:
            self.deletes.discard(key)
        self.puts[key] = (value, lease)

    def delete(self, key: bytes) -> None:
        self.size += self._delete_delta(key)[1]
        self.puts.pop(key, None)
        self.deletes.add(key)

    def delete_range(self, start: bytes, end: bytes) -> None:
        self.range_deletes.append((start, end))
        self.size += len(start) + len(end) + OP_OVERHEAD

    def require_absent(self, key: bytes) -> None:
        self.absent.append(key)
        self.size += len(key) + OP_OVERHEAD

    def absorb(self, other: Txn) -> None:
        """Add another commit's writes after this one's (a later write to the same key wins)."""
        for key, (value, lease) in other.puts.items():
            self.put(key, value, lease)
        for key in other.deletes:
            self.delete(key)
        for start, end in other.range_deletes:
            self.delete_range(start, end)
        for key in other.absent:
            self.require_absent(key)

    def cost_with(self, other: Txn) -> tuple[int, int, int]:
        """(writes, bytes, compares) after ``absorb(other)``, without absorbing it."""
        ops, size = self.op_count, self.size
        for key, (value, _) in other.puts.items():
            d_ops, d_size = self._put_delta(key, value)
            ops, size = ops + d_ops, size + d_size
        for key in other.deletes:
            d_ops, d_size = self._delete_delta(key)
            ops, size = ops + d_ops, size + d_size
        for start, end in other.range_deletes:
            ops, size = ops + 1, size + len(start) + len(end) + OP_OVERHEAD
        for key in other.absent:
            size += len(key) + OP_OVERHEAD
        return ops, size, len(self.absent) + len(other.absent)

    # One rule for what a write costs: its key, its value, and OP_OVERHEAD of framing.
    def _put_delta(self, key: bytes, value: bytes) -> tuple[int, int]:
        old = self.puts.get(key)
        if old is not None:
            return 0, len(value) - len(old[0])
        if key in self.deletes:
            return 0, len(value)
        return 1, len(key) + len(value) + OP_OVERHEAD

    def _delete_delta(self, key: bytes) -> tuple[int, int]:
        old = self.puts.get(key)
        if old is not None:
            return 0, -len(old[0])
        if key in self.deletes:
            return 0, 0
        return 1, len(key) + OP_OVERHEAD


def fits(ops: int, size: int, compares: int) -> bool:
    """Whether a commit of this cost stays under etcd's limits (with room for the fence and the marker)."""
    return ops <= MAX_OPS and compares <= MAX_OPS and size <= MAX_BYTES


@dataclasses.dataclass
class Landed:
    """Whether a commit landed (a fenced one raises instead); refused, which idempotency records stood in its way."""

    ok: bool
    # When not ok and not fenced: the idempotency keys that already exist, with their records.
    existing: dict[bytes, bytes] = dataclasses.field(default_factory=dict)


class Committer:
    """Commits Txns for one owned partition, in order, each at most once."""

    def __init__(
        self,
        etcd: aetcd.Client,
        keys: layout.PartitionKeys,
        *,
        epoch: int,
        marker: bytes | None,
        member_id: str,
        faults: faults_mod.Faults,
    ) -> None:
        self._etcd = etcd
        self._keys = keys
        self.epoch = epoch
        self._marker = marker  # the last committed marker value (None: no commit yet)
        self._member = member_id
        self._counter = 0
        self._faults = faults
        self.commits = 0
        self.resolved_unknown = 0

    async def commit(self, txn: Txn) -> Landed:
        self._counter += 1
        marker = f"{self._member}/{self.epoch}/{self._counter}".encode()
        t = self._etcd.transactions
        marker_key = self._keys.commit_marker
        compares: list[Any] = [t.create(self._keys.owner) == self.epoch]
        if self._marker is None:
            compares.append(t.version(marker_key) == 0)
        else:
            compares.append(t.value(marker_key) == self._marker)
        compares += [t.version(k) == 0 for k in txn.absent]
        success: list[Any] = [t.put(k, v, lease=lease) for k, (v, lease) in txn.puts.items()]
        success += [t.delete(k) for k in txn.deletes]
        success += [t.delete(s, range_end=e) for s, e in txn.range_deletes]
        success.append(t.put(marker_key, marker))
        failure: list[Any] = [t.get(self._keys.owner), t.get(marker_key)] + [t.get(k) for k in txn.absent]

        attempts = 0

        async def send() -> tuple[bool, list[Any]]:
            nonlocal attempts
            attempts += 1
            ok, responses = await self._etcd.transaction(compares, success, failure)
            if self._faults.enabled:
                self._faults.maybe(faults_mod.COMMIT_REPLY_LOST)
            return ok, responses

        def unknown() -> None:
            self.resolved_unknown += 1

        # Outcome unknown (a timeout, a broken connection): send the same commit again. The marker
        # compare makes a second application impossible, and the failure branch reads back what happened.
        ok, responses = await backoff.until_done(
            send, transient=connect.etcd_transient, first=0.05, cap=2.0, log=_log, on_retry=unknown,
            what=f"{self._keys.prefix}: commit (outcome unknown; re-sent with the same marker)")
        if ok:
            self._marker = marker
            self.commits += 1
            return Landed(ok=True)
        owner, current, *idem = responses
        if not owner or owner[0][1].create_revision != self.epoch:
            raise Fenced(f"{self._keys.prefix}: owner changed (epoch {self.epoch} is stale)")
        current_value = current[0][0] if current else None
        if current_value == marker:
            # An earlier attempt of this very commit landed: success, learnt by reading back.
            _log.info("%s: commit of unknown outcome had landed (attempt %d)", self._keys.prefix, attempts)
            self._marker = marker
            self.commits += 1
            return Landed(ok=True)
        if current_value != self._marker:
            raise Fenced(f"{self._keys.prefix}: commit marker moved under us ({current_value!r})")
        existing = {k: r[0][0] for k, r in zip(txn.absent, idem, strict=True) if r}
        if not existing:
            raise RuntimeError(f"{self._keys.prefix}: commit refused for no visible reason")
        return Landed(ok=False, existing=existing)
