"""The record of an invocation suspended at a durable call, as stored in etcd.

It is everything needed to run the invocation again from the start when its reply arrives:
the original message (with its reply address and idempotency key), the replies received so
far (in journal slots: calls made in parallel are answered in any order), the calls still
outstanding with their timeout timers, how many sends were committed already, and which call
it waits for: only that one's answer runs it again; another's is journaled in its slot. The key stays locked
while the record exists, so the state the replay reads is the state the first run read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from statefn_core import codec, envelope, wire


@dataclasses.dataclass(slots=True)
class Outstanding:
    """A call made and not answered yet: its answer (the reply, or its timer's) fills its journal slot."""

    timeout: float = 0.0  # it times out after this many seconds (0: never)
    sleeping: bool = False  # ctx.sleep: nothing was sent; the timer's answer is the awaited reply, not an error
    tx: wire.TxInfo | None = None  # a transaction's prepare: its coordinator holds this key for it (wait-die)
    timer: bytes = b""  # the timer that answers it when the timeout passes ("" until its commit arms one)

    def to_plain(self) -> list[Any]:
        return [self.timeout, self.sleeping, self.tx.to_plain() if self.tx else None, self.timer]

    @classmethod
    def from_plain(cls, raw: list[Any]) -> Outstanding:
        timeout, sleeping, tx, timer = raw
        return cls(timeout, sleeping, wire.TxInfo.from_plain(tx), timer)


@dataclasses.dataclass(slots=True)
class Suspension:
    invocation_id: str
    message: envelope.Message
    # One slot per journaled step, in order: a call's reply, a run's result, or a call still outstanding.
    journal: list[bytes] = dataclasses.field(default_factory=list)
    sends_done: int = 0
    waiting: str = ""  # the call whose answer resumes it (the one it awaits); "" while a retry timer is due
    # Inside a transaction: the transaction its coordinator runs (it holds this key under wait-die).
    tx: wire.TxInfo | None = None
    calls: dict[str, Outstanding] = dataclasses.field(default_factory=dict)  # by call id: made, not answered

    def call_id(self, index: int) -> str:
        return f"{self.invocation_id}#{index}"

    @staticmethod
    def index_of(call_id: str) -> int:
        return int(call_id.rsplit("#", 1)[1])

    def answered(self, call_id: str, reply: bytes) -> None:
        """A call's answer takes its slot; it is outstanding no more."""
        index = self.index_of(call_id)
        if index < len(self.journal):
            self.journal[index] = reply
        else:  # a record written before journals had slots for outstanding calls
            self.journal.append(reply)
        self.calls.pop(call_id, None)

    def copy(self, message: envelope.Message) -> Suspension:
        """The same progress, for a run of ``message`` (waiting for nothing until it suspends again)."""
        calls = {cid: dataclasses.replace(call) for cid, call in self.calls.items()}
        return Suspension(self.invocation_id, message, list(self.journal), self.sends_done, tx=self.tx, calls=calls)

    def encode(self) -> bytes:
        return codec.pack([self.invocation_id, self.message.to_plain(), self.journal, self.sends_done,
                            self.waiting, self.tx.to_plain() if self.tx else None,
                            {cid: call.to_plain() for cid, call in self.calls.items()}])

    @classmethod
    def decode(cls, data: bytes) -> Suspension:
        raw = codec.unpack(data)
        if len(raw) == 9:  # one call at a time: [.., waiting, tx, timer, timeout, sleeping]
            inv_id, plain, journal, sends_done, waiting, tx, timer, timeout, sleeping = raw
            info = wire.TxInfo.from_plain(tx)
            calls = {waiting: Outstanding(timeout, sleeping, info, timer)} if waiting else {}
            return cls(inv_id, envelope.Message.from_plain(plain), list(journal), sends_done, waiting, info, calls)
        inv_id, plain, journal, sends_done, waiting, tx, calls_plain = raw
        return cls(inv_id, envelope.Message.from_plain(plain), list(journal), sends_done, waiting,
                   wire.TxInfo.from_plain(tx), {cid: Outstanding.from_plain(c) for cid, c in calls_plain.items()})


def queued_entry(message: envelope.Message, item_id: str) -> bytes:
    """An inbox entry: a message that waits for its key to be unlocked."""
    return codec.pack([item_id, message.to_plain()])


def decode_queued(data: bytes) -> tuple[str, envelope.Message]:
    item_id, plain = codec.unpack(data)
    return item_id, envelope.Message.from_plain(plain)


def idem_pending(message: envelope.Message) -> bool:
    """Whether a suspended or queued message's idempotency record says PENDING.

    Every message that carries an idempotency key had its PENDING record written (or found)
    when it was first suspended or queued; channel messages carry none.
    """
    return bool(message.idempotency_key)
