"""What a partition works on, one type per kind: invocations from ingress, channels, timers and inboxes.

A NATS message becomes one item (an ingress invocation, an undecodable message) or many (a
channel bundle's messages); it is acked once every item it carried is committed or found to be a
duplicate. Timers and inbox heads become items too, and their commit deletes the timer or the
inbox entry. Each type carries only what its kind has, so code that handles a kind reads its
fields without asking which of them are set.
"""

from __future__ import annotations

import dataclasses

from nats.aio.msg import Msg

from statefn_core import envelope
from statefn_sidecar import suspension


class Source:
    """A NATS message and how many of its items are still uncommitted."""

    __slots__ = ("msg", "pending")

    def __init__(self, msg: Msg, pending: int) -> None:
        self.msg = msg
        self.pending = pending


@dataclasses.dataclass(slots=True, kw_only=True)
class Item:
    """Anything a batch holds: its id (for logs, spans and inbox entries) and the message it came in."""

    id: str
    source: Source | None = None

    @property
    def timer_key(self) -> bytes | None:
        """The timer this item is (deleted by the commit that applies it), if it is one."""
        return None

    @property
    def idempotency_id(self) -> str | None:
        """What makes a redelivered copy of this item a no-op: recorded with its outcome in the commit.

        For an invocation, its idempotency key scoped to its key and handler (``envelope.idempotency_id``).
        """
        return None


@dataclasses.dataclass(slots=True)
class Resumption:
    """Routing found the invocation suspended on the item's key waiting for it: that invocation runs."""

    record: suspension.Suspension
    response: bytes | None  # the call's reply that resumes it (None: a resume timer, run from the journal)
    arrived: envelope.Message  # the item's own message, to route it again if its round does not commit

    @property
    def call_id(self) -> str | None:
        """The call the item answers (None: a resume timer)."""
        return str(self.arrived.args["call"]) if self.response is not None else None

    @property
    def answered_timer(self) -> bytes:
        """The timeout timer of the call it answers, moot now ("" if it has none)."""
        call = self.record.calls.get(self.call_id) if self.call_id is not None else None
        return call.timer if call is not None else b""


@dataclasses.dataclass(slots=True, kw_only=True)
class Invocation(Item):
    """A message that runs a handler (or waits in its key's inbox, or resumes the invocation suspended there).

    ``message`` is the invocation that runs: the item's own, or, once routing attached a
    ``resume``, the suspended invocation's.
    """

    message: envelope.Message
    # Its idempotency record exists and says PENDING (it was queued or suspended): overwrite it.
    idem_pending: bool = False
    resume: Resumption | None = None
    # A dead-letter replay's journal (``message.journal_ref``), loaded before its round: it resumes from it.
    journal: suspension.Suspension | None = None

    @property
    def idempotency_id(self) -> str | None:
        return _scoped(self.message)

    @property
    def response(self) -> bytes | None:
        return self.resume.response if self.resume is not None else None

    def resume_with(self, record: suspension.Suspension, message: envelope.Message) -> None:
        """Route this reply (or resume timer) to the invocation suspended on its key, which runs instead."""
        assert self.resume is None
        response = self.message.args["reply"] if self.message.is_response else None
        self.resume = Resumption(record, response, self.message)
        self.idem_pending = suspension.idem_pending(record.message)
        self.message = message

    def progress(self) -> suspension.Suspension | None:
        """Where it stands once the reply in hand is in its slot (waiting for nothing); None: it starts afresh.

        A resumed invocation: its record's journal and the reply that resumed it. A dead-letter replay:
        the failed run's journal, under this run's id.
        """
        if self.resume is not None:
            progress = self.resume.record.copy(self.message)
            call_id = self.resume.call_id
            if call_id is not None:
                assert self.resume.response is not None
                progress.answered(call_id, self.resume.response)
            return progress
        if self.journal is not None:
            return suspension.Suspension(self.id, self.message, list(self.journal.journal), self.journal.sends_done)
        return None

    def unroute(self) -> None:
        """Undo ``resume_with``: the item is what arrived again (its round was not committed)."""
        if self.resume is not None:
            self.message = self.resume.arrived
            self.resume = None
            self.idem_pending = False


def _scoped(msg: envelope.Message) -> str | None:
    return envelope.idempotency_id(msg.key, msg.handler, msg.idempotency_key) if msg.idempotency_key else None


@dataclasses.dataclass(slots=True, kw_only=True)
class Ingress(Invocation):
    """From outside: carries an idempotency key (the client's, or its message id)."""

    # Copies of the same invocation in the same batch: acked with it and answered with its outcome.
    dups: list[tuple[Msg, str | None]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True, kw_only=True)
class Delivered(Invocation):
    """A message of a channel bundle from another partition's commit, deduplicated by the channel's watermark."""

    sender: str
    bundle_seq: int
    index: int
    bundle_size: int

    @property
    def idempotency_id(self) -> str | None:
        # Its channel's watermark makes a copy a no-op; a reply resuming an invocation carries that one's key.
        return _scoped(self.message) if self.resume is not None else None


@dataclasses.dataclass(slots=True, kw_only=True)
class Retry(Invocation):
    """A timer: run the message again (its attempt already counted up)."""

    timer: bytes

    @property
    def timer_key(self) -> bytes | None:
        return self.timer


@dataclasses.dataclass(slots=True, kw_only=True)
class InboxHead(Invocation):
    """A message that waited in its locked key's inbox, now at its head and the key free."""

    inbox_key: bytes


@dataclasses.dataclass(slots=True, kw_only=True)
class ResumeTimer(Invocation):
    """A timer: run the invocation suspended on ``message.key`` again from its journal, at ``message.attempt``."""

    timer: bytes

    @property
    def timer_key(self) -> bytes | None:
        return self.timer


@dataclasses.dataclass(slots=True, kw_only=True)
class DelayedSend(Item):
    """A timer: put ``message`` on its channel to ``target_function`` now."""

    message: envelope.Message
    target_function: str
    timer: bytes

    @property
    def timer_key(self) -> bytes | None:
        return self.timer


@dataclasses.dataclass(slots=True, kw_only=True)
class InquiryTimer(Item):
    """A timer: ``key`` may still be prepared for transaction ``tx_id``; if so, ask its coordinator."""

    key: str
    tx_id: str
    timer: bytes

    @property
    def timer_key(self) -> bytes | None:
        return self.timer


@dataclasses.dataclass(slots=True, kw_only=True)
class Undecodable(Item):
    """A message that could not be decoded: dead-lettered as it is, known by its stream sequence (its id)."""

    raw: bytes
    reason: str
    reply_to: str | None

    @property
    def idempotency_id(self) -> str | None:
        return self.id  # a redelivery after a lost ack is answered from the record, not dead-lettered twice


@dataclasses.dataclass(slots=True, kw_only=True)
class DropTimer(Item):
    """A retry whose invocation turned out to be recorded already: only its timer is deleted."""

    timer: bytes

    @property
    def timer_key(self) -> bytes | None:
        return self.timer
