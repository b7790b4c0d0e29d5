"""The record of an invocation suspended at a durable call, as stored in etcd.

It is everything needed to run the invocation again from the start when its reply arrives:
the original message (with its reply address and idempotency key), the replies received so
far, how many sends were committed already, and which call it waits for. The key stays locked
while the record exists, so the state the replay reads is the state the first run read.
"""

from __future__ import annotations

import dataclasses

from statefn_core import codec, envelope, wire


@dataclasses.dataclass(slots=True)
class Suspension:
    invocation_id: str
    message: envelope.Message
    journal: list[bytes] = dataclasses.field(default_factory=list)  # encoded replies, one per call
    sends_done: int = 0
    waiting: str = ""  # the call id whose reply resumes it; "" while a retry timer is due
    # Inside a transaction: the transaction its coordinator runs (it holds this key under wait-die).
    # A call with a timeout: the timer that answers it with a timeout error ("" until its commit arms one).
    tx: wire.TxInfo | None = None
    timer: bytes = b""
    timeout: float = 0.0  # the call it waits for times out after this many seconds (0: never)
    sleeping: bool = False  # ctx.sleep: nothing was sent; the timer's answer is the awaited reply, not an error

    def call_id(self, index: int) -> str:
        return f"{self.invocation_id}#{index}"

    def encode(self) -> bytes:
        return codec.pack([self.invocation_id, self.message.to_plain(), self.journal, self.sends_done,
                            self.waiting, self.tx.to_plain() if self.tx else None, self.timer, self.timeout,
                            self.sleeping])

    @classmethod
    def decode(cls, data: bytes) -> Suspension:
        inv_id, plain, journal, sends_done, waiting, tx, timer, timeout, sleeping = codec.unpack(data)
        return cls(inv_id, envelope.Message.from_plain(plain), list(journal), sends_done, waiting,
                   wire.TxInfo.from_plain(tx), timer, timeout, sleeping)


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
