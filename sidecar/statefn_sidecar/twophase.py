"""A transaction participant's prepared record, and the rules that route 2PC messages.

A prepare runs the participant's handler like any invocation, but its state changes and
messages are staged in the record (``prepared/<key>`` in etcd) instead of applied, and the key
stays locked until the coordinator's decision arrives: ``~commit`` applies the staged effects,
``~abort`` drops them. Both travel on the ordered channel from the coordinator's partition, so
an inquiry's answer (an abort, when the coordinator no longer runs the transaction) can never
overtake a commit decided before it: presumed abort needs no log of decisions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from statefn_core import codec, envelope, wire


@dataclasses.dataclass(slots=True)
class StagedSend:
    function: str
    partition: int
    message: envelope.Message
    due_ms: int = 0  # a delayed send: due then, as a timer, once committed

    def to_plain(self) -> list[Any]:
        return [self.function, self.partition, self.message.to_plain(), self.due_ms]

    @classmethod
    def from_plain(cls, raw: list[Any]) -> StagedSend:
        function, partition, plain, due_ms = raw
        return cls(function, partition, envelope.Message.from_plain(plain), due_ms)


@dataclasses.dataclass(slots=True)
class Prepared:
    """What a participant staged for its transaction; the key is locked while it exists."""

    key: str
    tx: wire.TxInfo
    state: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    sends: list[StagedSend] = dataclasses.field(default_factory=list)
    timer: bytes = b""  # the inquiry timer armed for it ("" until its commit arms one)

    def merged(self, state: dict[str, bytes | None], sends: list[StagedSend]) -> Prepared:
        """The same transaction prepared this key again: its effects add to the staged ones."""
        return Prepared(self.key, self.tx, {**self.state, **state}, [*self.sends, *sends], self.timer)

    def view(self, stored: dict[str, bytes]) -> dict[str, bytes]:
        """The state a further prepare of the same transaction reads: committed state plus what is staged."""
        out = dict(stored)
        for name, value in self.state.items():
            if value is None:
                out.pop(name, None)
            else:
                out[name] = value
        return out

    def encode(self) -> bytes:
        return codec.pack([self.key, self.tx.to_plain(), self.state, [s.to_plain() for s in self.sends],
                            self.timer])

    @classmethod
    def decode(cls, data: bytes) -> Prepared:
        key, tx, state, sends, timer = codec.unpack(data)
        info = wire.TxInfo.from_plain(tx)
        assert info is not None
        return cls(key, info, dict(state), [StagedSend.from_plain(s) for s in sends], timer)


def timer_payload_inquire(key: str, tx_id: str) -> bytes:
    """Fires while the key is still prepared for ``tx_id``: ask the coordinator, then wait again."""
    return codec.pack(["inquire", key, tx_id])


def wait_die(requester: wire.TxInfo, holder: wire.TxInfo) -> bool:
    """Whether the requester may wait for the holder's lock: only an older transaction waits, a younger one dies.

    Waits then only ever go from older to younger, so no cycle of waits (a deadlock) can form.
    """
    return requester.older_than(holder)
