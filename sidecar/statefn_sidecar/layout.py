"""The etcd keys a partition's owner writes, besides user state.

Everything here is written only in fenced commits by the partition's current owner, so the
owner may cache all of it in memory between commits.
"""

from __future__ import annotations

from statefn import _naming


class PartitionKeys:
    __slots__ = ("fn", "partition", "prefix")

    def __init__(self, fn: _naming.FunctionType, partition: int) -> None:
        self.fn = fn
        self.partition = partition
        self.prefix = fn.partition_prefix(partition)

    @property
    def owner(self) -> bytes:
        return self.fn.owner_key(self.partition).encode()

    @property
    def commit_marker(self) -> bytes:
        """Rewritten by every commit: reading it back tells whether a commit of unknown outcome landed."""
        return f"{self.prefix}commit".encode()

    # Incoming channels: sender partition token -> [bundle seq, next message index, bundle size].
    @property
    def chan_in_prefix(self) -> bytes:
        return f"{self.prefix}chanin/".encode()

    def chan_in(self, sender: str) -> bytes:
        return f"{self.prefix}chanin/{sender}".encode()

    # Outgoing channels: target token -> last sequence assigned.
    @property
    def chan_out_prefix(self) -> bytes:
        return f"{self.prefix}chanout/".encode()

    def chan_out(self, target: str) -> bytes:
        return f"{self.prefix}chanout/{target}".encode()

    # Outbox: committed messages not yet known to be published.
    @property
    def outbox_prefix(self) -> bytes:
        return f"{self.prefix}outbox/".encode()

    def outbox_channel_prefix(self, target: str) -> bytes:
        return f"{self.prefix}outbox/{target}/".encode()

    def outbox(self, target: str, seq: int) -> bytes:
        return f"{self.prefix}outbox/{target}/{seq:012d}".encode()

    # Timers: retries and delayed sends, ordered by due time.
    @property
    def timers_prefix(self) -> bytes:
        return f"{self.prefix}timers/".encode()

    def timer(self, due_ms: int, timer_id: str) -> bytes:
        return f"{self.prefix}timers/{due_ms:015d}/{timer_id}".encode()

    # Invocations suspended at a durable call (one per key at most: the key is locked meanwhile).
    @property
    def suspended_prefix(self) -> bytes:
        return f"{self.prefix}suspended/".encode()

    def suspended(self, key: str) -> bytes:
        return f"{self.prefix}suspended/{_naming.escape_key(key)}".encode()

    # Each locked key's inbox: messages that arrived while it was locked, in arrival order.
    @property
    def inbox_prefix(self) -> bytes:
        return f"{self.prefix}inbox/".encode()

    def inbox(self, key: str, number: int) -> bytes:
        return f"{self.prefix}inbox/{_naming.escape_key(key)}/{number:012d}".encode()

    # Keys prepared for a transaction: the staged effects, applied or dropped by its decision.
    @property
    def prepared_prefix(self) -> bytes:
        return f"{self.prefix}prepared/".encode()

    def prepared(self, key: str) -> bytes:
        return f"{self.prefix}prepared/{_naming.escape_key(key)}".encode()

    # Idempotency records of ingress invocations (with a TTL lease).
    def idempotency(self, idem_key: str) -> bytes:
        return f"{self.prefix}idem/{_naming.escape_key(idem_key)}".encode()

    def state(self, key: str, name: str) -> bytes:
        return self.fn.state_key(key, name).encode()

    def state_prefix(self, key: str) -> bytes:
        return self.fn.state_prefix(key).encode()


def prefix_end(prefix: bytes) -> bytes:
    """The range end covering every key that starts with ``prefix`` (etcd's convention)."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\0"
