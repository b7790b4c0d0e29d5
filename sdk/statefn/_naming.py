"""Addresses, subjects, stream names, etcd keys and the partition hash.

The client, the sidecar and the operator all route by these functions, so a function type,
a key and a partition always map to the same subject and the same etcd keys everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import urllib.parse

from statefn import _constants, _errors

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionType:
    """A function type ``namespace/name``; both parts are DNS labels so they are safe subject tokens."""

    namespace: str
    name: str

    @classmethod
    def parse(cls, text: str) -> FunctionType:
        parts = text.split("/")
        if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
            raise _errors.InvalidFunctionType(
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
        return f"{_constants.SUBJECT_ROOT}.{self.namespace}.{self.name}"

    @property
    def stream_subjects(self) -> list[str]:
        return [f"{self.subject_prefix}.*.>"]

    def partition_filter(self, partition: int) -> str:
        return f"{self.subject_prefix}.{partition}.>"

    def ingress_subject(self, partition: int) -> str:
        return f"{self.subject_prefix}.{partition}.{_constants.INGRESS_TOKEN}"

    def channel_subject(self, partition: int, sender: PartitionId) -> str:
        return (
            f"{self.subject_prefix}.{partition}.{_constants.CHANNEL_TOKEN}."
            f"{sender.function.namespace}.{sender.function.name}.{sender.partition}"
        )

    @property
    def dlq_subject(self) -> str:
        return f"{self.subject_prefix}.{_constants.DLQ_TOKEN}"

    @staticmethod
    def consumer_name(partition: int) -> str:
        return f"p{partition}"

    # ---- etcd ----
    @property
    def etcd_prefix(self) -> str:
        return f"{_constants.ETCD_ROOT}/{self.namespace}/{self.name}"

    @property
    def meta_key(self) -> str:
        return f"{self.etcd_prefix}/meta"

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
    return f"{_constants.ETCD_ROOT}/workflows/{namespace}/{name}"


def escape_key(key: str) -> str:
    """Keys are arbitrary strings; escape '/' so one key's prefix never covers another key."""
    return urllib.parse.quote(key, safe="")


def partition_of(key: str, partitions: int) -> int:
    """Stable across processes and Python versions (unlike ``hash()``)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions
