"""What a partition works on: invocations from ingress, channels and timers, and their acks.

A NATS message becomes one item (an ingress invocation) or many (a channel bundle); it is
acked once every item it carried is committed or found to be a duplicate.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from nats.aio.msg import Msg

from statefn_core import envelope
from statefn_sidecar import suspension


class Kind(enum.Enum):
    INGRESS = "ingress"      # from outside, carries an idempotency key
    CHANNEL = "channel"      # from another partition's commit, deduplicated by channel sequence
    RETRY = "retry"          # a timer: run the message again (attempt + 1)
    DELAYED_SEND = "send"    # a timer: put the message on its channel now
    DEAD = "dead"            # undecodable input: dead-letter it as it is
    DROP_TIMER = "drop"      # a retry whose invocation turned out to be recorded: delete the timer
    INBOX = "inbox"          # a message that waited in its locked key's inbox, now at its head
    RESUME = "resume"        # a timer: retry a suspended invocation (attempt + 1) from its journal
    INQUIRE = "inquire"      # a timer: a prepared participant has heard no decision; ask its coordinator


RUNNABLE = frozenset({Kind.INGRESS, Kind.CHANNEL, Kind.RETRY, Kind.INBOX, Kind.RESUME})  # run a handler


class Source:
    """A NATS message and how many of its items are still uncommitted."""

    __slots__ = ("msg", "pending")

    def __init__(self, msg: Msg, pending: int) -> None:
        self.msg = msg
        self.pending = pending


@dataclasses.dataclass(slots=True)
class Item:
    kind: Kind
    id: str
    message: envelope.Message | None = None
    source: Source | None = None
    # Channel items: where they came from, for the receiver's dedup watermark.
    sender: str | None = None
    bundle_seq: int = 0
    index: int = 0
    bundle_size: int = 0
    # Timer items: the timer to delete in the same commit.
    timer_key: bytes | None = None
    # Delayed sends: the target function type.
    target_function: str | None = None
    # Dead items: what to put in the dead letter.
    dead: dict[str, Any] | None = None
    # Copies of the same ingress invocation in the same batch, answered with its outcome.
    dups: list[tuple[Msg, str | None]] = dataclasses.field(default_factory=list)
    # Inbox items: the entry to delete in the same commit.
    inbox_key: bytes | None = None
    # Its idempotency record exists and says PENDING (it was queued or suspended): overwrite it.
    idem_pending: bool = False
    # Runs a suspended invocation again (a call's reply arrived, or a RESUME timer is due); ``message``
    # is then the suspended invocation's, ``response`` the reply that resumes it, and ``arrived`` the
    # message as it arrived (the reply, or the timer's), to route it again if its round does not commit.
    resume: suspension.Suspension | None = None
    response: bytes | None = None
    arrived: envelope.Message | None = None

    def resume_with(self, record: suspension.Suspension, message: envelope.Message) -> None:
        """Route this reply (or resume timer) to the invocation suspended on its key, which runs instead."""
        assert self.message is not None and self.arrived is None
        self.arrived = self.message
        if self.message.is_response:
            self.response = self.message.args["reply"]
        self.resume = record
        self.idem_pending = suspension.idem_pending(record.message)
        self.message = message

    def unroute(self) -> None:
        """Undo ``resume_with``: the item is what arrived again (its round was not committed)."""
        if self.arrived is not None:
            self.message, self.arrived = self.arrived, None
            self.resume = self.response = None
            self.idem_pending = False

    @property
    def key(self) -> str | None:
        return self.message.key if self.message else None

    @property
    def idempotency_key(self) -> str | None:
        """What makes a redelivered copy of this item a no-op: recorded with its outcome in the commit.

        Ingress invocations (and their retries) carry one; an undecodable message is known by its
        stream sequence (its id), so a redelivery after a lost ack is not dead-lettered twice.
        Channel items are deduplicated by their channel's watermark instead.
        """
        if self.kind is Kind.DEAD:
            return self.id
        if self.kind in (Kind.CHANNEL, Kind.DELAYED_SEND) and self.resume is None:
            return None
        return self.message.idempotency_key if self.message else None
