"""Where everything lives: addresses, NATS subjects and streams, etcd keys, and the partition hash.

The client, the sidecar and the operator all route by this one module, so a function type, a key
and a partition always map to the same subject and the same etcd keys everywhere. The keys a
partition's owner writes besides user state (``PartitionKeys``) are written only in its fenced
commits, so the owner may cache all of them in memory between commits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse

from statefn_core import constants, errors

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Function registrations, one key each. '_' is not in a DNS label, so no namespace's data
# (``/statefn/<namespace>/...``) can fall under it: listing them is a bounded read.
REGISTRY_PREFIX = f"{constants.ETCD_ROOT}/_registry/"


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionType:
    """A function type ``namespace/name``; both parts are DNS labels so they are safe subject tokens."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> FunctionType:
        parts = text.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
            raise errors.InvalidFunctionType(
                f"invalid function type {text!r}: expected 'namespace/name', each part a lower-case "
                "DNS label (a-z, 0-9, '-', at most 63 characters)"
            )
        return cls(parts[0], parts[1])

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    # ---- NATS ----
    @property
    def stream(self) -> str:
        # '_' cannot appear in either part, so this is unambiguous; '-' is legal in stream names.
        return f"STATEFN_{self.namespace}_{self.name}"

    @property
    def subject_prefix(self) -> str:
        return f"{constants.SUBJECT_ROOT}.{self.namespace}.{self.name}"

    @property
    def stream_subjects(self) -> list[str]:
        return [f"{self.subject_prefix}.*.>"]

    def partition_filter(self, partition: int) -> str:
        return f"{self.subject_prefix}.{partition}.>"

    def ingress_subject(self, partition: int) -> str:
        return f"{self.subject_prefix}.{partition}.{constants.INGRESS_TOKEN}"

    def channel_subject(self, partition: int, sender: PartitionId) -> str:
        return (
            f"{self.subject_prefix}.{partition}.{constants.CHANNEL_TOKEN}."
            f"{sender.function.namespace}.{sender.function.name}.{sender.partition}"
        )

    @property
    def dlq_subject(self) -> str:
        return f"{self.subject_prefix}.{constants.DLQ_TOKEN}"

    @staticmethod
    def consumer_name(partition: int) -> str:
        return f"p{partition}"

    # ---- etcd ----
    @property
    def etcd_prefix(self) -> str:
        return f"{constants.ETCD_ROOT}/{self.namespace}/{self.name}"

    @property
    def meta_key(self) -> str:
        """The function's registration: apart from its data, so listing functions reads only registrations."""
        return f"{REGISTRY_PREFIX}{self.namespace}/{self.name}"

    @property
    def retained_key(self) -> str:
        """The partition count of a function deleted with its data kept: a re-created one must use it."""
        return f"{self.etcd_prefix}/retained"

    @property
    def members_prefix(self) -> str:
        return f"{self.etcd_prefix}/members/"

    @property
    def owners_prefix(self) -> str:
        return f"{self.etcd_prefix}/owners/"

    def owner_key(self, partition: int) -> str:
        return f"{self.owners_prefix}{partition}"

    def state_prefix(self, key: str) -> str:
        return f"{self.etcd_prefix}/state/{escape_key(key)}/"

    def state_key(self, key: str, name: str) -> str:
        return f"{self.state_prefix(key)}{name}"

    @property
    def pending_prefix(self) -> str:
        """One entry per partition: its earliest due timer and its inbox size (``PartitionKeys.pending``)."""
        return f"{self.etcd_prefix}/pending/"

    def partition_prefix(self, partition: int) -> str:
        """Everything a partition's owner writes besides user state lives under here."""
        return f"{self.etcd_prefix}/p/{partition}/"


@dataclasses.dataclass(frozen=True, slots=True)
class PartitionId:
    function: FunctionType
    partition: int

    def __str__(self) -> str:
        return f"{self.function}#{self.partition}"

    @property
    def token(self) -> str:
        """The sender identity used in channel subjects and channel ids."""
        return f"{self.function.namespace}.{self.function.name}.{self.partition}"

    @classmethod
    def from_token(cls, token: str) -> PartitionId:
        ns, name, p = token.split(".")
        return cls(FunctionType(ns, name), int(p))


def workflow_key(namespace: str, name: str) -> str:
    """Where the operator publishes a Workflow's definition for the orchestrator."""
    return f"{constants.ETCD_ROOT}/_workflows/{namespace}/{name}"


def escape_key(key: str) -> str:
    """Keys are arbitrary strings; escape '/' so one key's prefix never covers another key."""
    return urllib.parse.quote(key, safe="")


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


class PartitionKeys:
    __slots__ = ("fn", "partition", "prefix")

    def __init__(self, fn: FunctionType, partition: int) -> None:
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

    @property
    def pending(self) -> bytes:
        """This partition's entry in the function's pending-work index, which the autoscaler reads in one range."""
        return f"{self.fn.pending_prefix}{self.partition}".encode()

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
        return f"{self.prefix}suspended/{escape_key(key)}".encode()

    # The journal of a dead-lettered invocation that had finished durable steps: a replay resumes from it.
    @property
    def dead_journal_prefix(self) -> bytes:
        return f"{self.prefix}deadjournal/".encode()

    def dead_journal(self, journal_id: str) -> bytes:
        return f"{self.prefix}deadjournal/{journal_id}".encode()

    # Each locked key's inbox: messages that arrived while it was locked, in arrival order.
    @property
    def inbox_prefix(self) -> bytes:
        return f"{self.prefix}inbox/".encode()

    def inbox(self, key: str, number: int) -> bytes:
        return f"{self.prefix}inbox/{escape_key(key)}/{number:012d}".encode()

    # Keys prepared for a transaction: the staged effects, applied or dropped by its decision.
    @property
    def prepared_prefix(self) -> bytes:
        return f"{self.prefix}prepared/".encode()

    def prepared(self, key: str) -> bytes:
        return f"{self.prefix}prepared/{escape_key(key)}".encode()

    # Idempotency records of ingress invocations (with a TTL lease).
    def idempotency(self, idem_key: str) -> bytes:
        return f"{self.prefix}idem/{escape_key(idem_key)}".encode()

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
