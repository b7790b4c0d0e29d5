"""Which keys are locked by a suspended invocation or a prepared transaction, and the messages waiting for them.

A key is locked while an invocation on it is suspended at a durable call, or while it is
prepared for a transaction, and stays locked while its inbox still holds messages that queued
up meanwhile: every message to a locked key joins the inbox's tail, and the inbox drains one
head per batch once nothing holds the key. So per-key order holds across suspensions, and a
replay reads the state its first run read. A transaction's prepare may instead run at once (its
own transaction holds the key) or die (wait-die: a younger transaction never waits for an older one);
one that waits goes first once the key is free.

Like the state cache, this is the owner's in-memory view of etcd keys that only its fenced
commits write; it is rebuilt from etcd when a partition is taken.

Routing reads that view as it was before the batch, so it is only right for one decision per key
and round: once an item of a round runs on a key, or decides its transaction, the key's records
are about to change, and any later item in the round whose fate depends on them (a reply or resume
timer for the invocation suspended there, a prepare, a decision, an inquiry) is routed ``LATER``:
the round ends before it, commits, and the rest of the batch is routed again against the records
that commit wrote. Without this, two answers to one call in one batch (a vote and its vote
timeout) both resumed the same suspension and ran the rest of the invocation twice.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import logging

from statefn_core import constants, envelope, layout, wire
from statefn_sidecar import items, suspension, twophase

_log = logging.getLogger("statefn.keylocks")


class Route(enum.Enum):
    RUN = "run"        # run the handler now
    QUEUE = "queue"    # its key is locked: put it in the key's inbox
    DROP = "drop"      # a reply nobody waits for any more: only its bookkeeping is committed
    NOTE = "note"      # a reply to a call in flight that the handler does not await: journaled, nothing runs
    DIE = "die"        # a prepare that must not wait for the transaction holding its key: it votes no
    CONTROL = "control"  # a transaction's decision or inquiry: the sidecar handles it, past any lock
    OWN = "own"        # no handler runs: a delayed send, an inquiry timer, a dead letter, a timer to delete
    LATER = "later"    # its key's records change in this round: route it after this round's commit


@dataclasses.dataclass(slots=True)
class Queued:
    number: int
    etcd_key: bytes
    item_id: str
    message: envelope.Message


class KeyLocks:
    def __init__(self, keys: layout.PartitionKeys) -> None:
        self._keys = keys
        self.suspended: dict[str, suspension.Suspension] = {}
        self._inbox: dict[str, collections.deque[Queued]] = {}
        self._next_number: dict[str, int] = {}
        self._taken: set[str] = set()  # keys whose inbox head is in the batch being run
        self.prepared: dict[str, twophase.Prepared] = {}
        self._changing: set[str] = set()  # keys whose records an item routed in this round may change

    def load(self, suspended: list[bytes], queued: list[tuple[bytes, bytes]], prepared: list[bytes]) -> None:
        """Rebuild from etcd: suspension and prepared records, and inbox entries with their keys (in key order)."""
        for value in suspended:
            record = suspension.Suspension.decode(value)
            self.suspended[record.message.key] = record
        for value in prepared:
            staged = twophase.Prepared.decode(value)
            self.prepared[staged.key] = staged
        for etcd_key, value in queued:
            item_id, message = suspension.decode_queued(value)
            number = int(etcd_key.rsplit(b"/", 1)[1])
            self._append(message.key, Queued(number, etcd_key, item_id, message))

    def locked(self, key: str) -> bool:
        return key in self.suspended or key in self.prepared or bool(self._inbox.get(key))

    def holder(self, key: str) -> wire.TxInfo | None:
        """The transaction that holds a key: prepared for it, or its coordinator suspended on it."""
        prepared = self.prepared.get(key)
        if prepared is not None:
            return prepared.tx
        record = self.suspended.get(key)
        return record.tx if record is not None else None

    def start_round(self) -> None:
        """A batch (or what is left of it after a commit) is about to be routed against the committed records."""
        self._changing.clear()

    def route(self, item: items.Item) -> Route:
        """Decide an item's fate in this round; a resuming item gets its suspension attached."""
        if isinstance(item, items.InquiryTimer):  # reads the key's prepared record
            return Route.LATER if item.key in self._changing else Route.OWN
        if not isinstance(item, items.Invocation):
            return Route.OWN
        item.unroute()  # routed in an earlier round whose commit did not land: decide afresh
        msg = item.message
        route = self._route(item, msg)
        if route in (Route.RUN, Route.NOTE):
            self._changing.add(msg.key)
        return route

    def _route(self, item: items.Invocation, msg: envelope.Message) -> Route:
        if isinstance(item, items.Ingress):
            # From outside: never a reply, a prepare or a decision (those travel only on channels). One
            # that names such a handler runs like any message, and fails as an unknown handler.
            return Route.QUEUE if self.locked(msg.key) else Route.RUN
        if isinstance(item, items.InboxHead):  # what queued: a plain message, or a prepare that waited
            return self._prepare(item, msg) if msg.is_prepare else Route.RUN
        reads_records = (isinstance(item, items.ResumeTimer) or msg.is_response or msg.is_prepare
                         or msg.is_tx_control)
        if reads_records and msg.key in self._changing:
            return Route.LATER
        if msg.is_tx_control:
            if msg.handler != constants.INQUIRE_HANDLER:
                self._changing.add(msg.key)  # a decision unlocks the key
            return Route.CONTROL
        if isinstance(item, items.ResumeTimer) or msg.is_response:
            return self._resume(item, self.suspended.get(msg.key))
        if msg.is_prepare:
            return self._prepare(item, msg)
        return Route.QUEUE if self.locked(msg.key) else Route.RUN

    def _prepare(self, item: items.Invocation, msg: envelope.Message) -> Route:
        assert msg.tx is not None
        holder = self.holder(msg.key)
        if holder is not None and holder.id == msg.tx.id:
            return Route.RUN  # its own transaction holds the key (the coordinator's key, or a second prepare)
        # An inbox head is taken only once nothing holds its key.
        if holder is None and (isinstance(item, items.InboxHead) or not self.locked(msg.key)):
            return Route.RUN  # it runs, and holds the key from now on
        if holder is None:
            return Route.QUEUE  # held by an invocation outside any transaction, which ends on its own
        return Route.QUEUE if twophase.wait_die(msg.tx, holder) else Route.DIE

    def _resume(self, item: items.Invocation, record: suspension.Suspension | None) -> Route:
        msg = item.message
        attempt = msg.attempt  # a RESUME timer carries the next attempt; a reply resumes the current one
        if msg.is_response:
            call_id = msg.args.get("call")
            if not isinstance(msg.args.get("reply"), bytes):
                _log.warning("a reply for call %s of key %r carries no reply; dropped", call_id, msg.key)
                return Route.DROP
            if record is None or not isinstance(call_id, str) or call_id not in record.calls:
                _log.warning("a reply for call %s of key %r arrived but nothing waits for it; dropped",
                             call_id, msg.key)
                return Route.DROP
            if call_id != record.waiting:  # one of several in flight, not the one awaited: journal it
                item.resume_with(record, record.message)
                return Route.NOTE
            attempt = record.message.attempt
        elif record is None or record.waiting:
            _log.warning("a resume timer for key %r finds no invocation to resume; dropped", msg.key)
            return Route.DROP
        item.resume_with(record, dataclasses.replace(record.message, attempt=attempt))
        return Route.RUN

    def entry_for(self, item: items.Invocation) -> Queued:
        """The inbox entry an item becomes (written by its commit; numbers lost with a failed one leave gaps)."""
        msg = item.message
        number = self._next_number.get(msg.key, 1)
        self._next_number[msg.key] = number + 1
        return Queued(number, self._keys.inbox(msg.key, number), item.id, msg)

    def ready(self, limit: int) -> list[items.Item]:
        """The next message of each inbox whose key nothing holds any more, one per key."""
        out: list[items.Item] = []
        for key, queue in self._inbox.items():
            if len(out) >= limit:
                break
            if not queue or key in self.suspended or key in self.prepared or key in self._taken:
                continue
            head = _next(queue)
            self._taken.add(key)
            out.append(items.InboxHead(id=head.item_id, message=head.message, inbox_key=head.etcd_key,
                                       idem_pending=suspension.idem_pending(head.message)))
        return out

    def inbox_size(self) -> int:
        """Messages queued in all inboxes (what the pending-work index reports as backlog)."""
        return sum(len(queue) for queue in self._inbox.values())

    def has_ready(self) -> bool:
        return any(q and k not in self.suspended and k not in self.prepared and k not in self._taken
                   for k, q in self._inbox.items())

    def release_taken(self) -> None:
        """The batch is over: heads it did not consume may be taken again."""
        self._taken.clear()

    def apply(self, suspended: dict[str, suspension.Suspension | None], queued: list[Queued],
              dequeued: list[tuple[str, bytes]], prepared: dict[str, twophase.Prepared | None]) -> None:
        """A commit landed: mirror its suspension and prepared records and inbox writes (heads leave in order)."""
        for key, record in suspended.items():
            if record is None:
                self.suspended.pop(key, None)
            else:
                self.suspended[key] = record
        for key, staged in prepared.items():
            if staged is None:
                self.prepared.pop(key, None)
            else:
                self.prepared[key] = staged
        for key, etcd_key in dequeued:
            queue = self._inbox.get(key)
            if queue:
                for i, entry in enumerate(queue):
                    if entry.etcd_key == etcd_key:
                        del queue[i]
                        break
            self._taken.discard(key)
            if queue is not None and not queue:
                del self._inbox[key]
        for entry in queued:
            self._append(entry.message.key, entry)

    def _append(self, key: str, entry: Queued) -> None:
        self._inbox.setdefault(key, collections.deque()).append(entry)
        self._next_number[key] = max(self._next_number.get(key, 1), entry.number + 1)


def _next(queue: collections.deque[Queued]) -> Queued:
    """The head, unless a transaction waits in the queue: then the oldest one goes first.

    Two kinds of entries carry a transaction's age. A prepare that wait-die let wait is an older
    transaction; behind younger work on this key, that work would start transactions of its own
    that die against it, over and over. It never overtakes an earlier message from its own sender
    key, so each sender's order holds. An invocation run again after its transaction died held
    this key when it died, ahead of everything queued since: going first restores that order.
    """
    best: tuple[float, str] | None = None
    chosen = queue[0]
    origins: set[str] = set()
    for entry in queue:
        msg = entry.message
        age: float | None = None
        if msg.is_prepare and msg.tx is not None and msg.origin not in origins:
            age = msg.tx.ts
        elif msg.tx_age is not None:
            age = msg.tx_age
        if age is not None and (best is None or (age, entry.item_id) < best):
            best, chosen = (age, entry.item_id), entry
        origins.add(msg.origin)
    return chosen
