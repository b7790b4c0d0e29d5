"""Turns the outcomes of a batch into fenced etcd commits and what to do after each.

Commits cover whole items, in batch order, so splitting a batch under etcd's limits never
splits one invocation's effects. Writes to the same key within one commit are folded (etcd
refuses a transaction that writes a key twice).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from statefn_core import codec, constants, envelope, errors, layout, wire
from statefn_sidecar import commit, items, keylocks, outbox, suspension, timers, twophase

DLQ_TARGET = "~dlq"
# Bundles are split so a NATS message stays well under the default max_payload (1 MiB).
MAX_BUNDLE_BYTES = 768 * 1024


@dataclasses.dataclass(slots=True)
class Send:
    target: layout.PartitionId
    message: envelope.Message


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one item did; produced by execution, consumed by planning."""

    item: items.Item
    state: dict[tuple[str, str], bytes | None] = dataclasses.field(default_factory=dict)
    sends: list[Send] = dataclasses.field(default_factory=list)
    delayed: list[tuple[int, str, envelope.Message]] = dataclasses.field(default_factory=list)
    reply: envelope.Reply | None = None       # the final reply (and idempotency record)
    retry_at_ms: int | None = None             # schedule another attempt
    restart: bool = False                      # ...from scratch, not from its journal (an aborted transaction)
    dead_letter: dict[str, Any] | None = None
    suspend: suspension.Suspension | None = None  # waits for a call's reply (or a resume timer)
    queued: keylocks.Queued | None = None         # its key is locked: it joins the key's inbox
    dropped: bool = False                         # a reply nobody waits for: bookkeeping only
    prepare: twophase.Prepared | None = None      # staged for a transaction: write the record, lock the key
    decided: twophase.Prepared | None = None      # its transaction decided: drop the record, unlock the key
    tx_event: str | None = None                   # what a 2PC message did, for the metrics (participants)
    tx_decisions: list[str] = dataclasses.field(default_factory=list)  # "committed"/"aborted" (coordinators)
    started: float = dataclasses.field(default_factory=time.monotonic)  # for the latency histogram
    span: Any = None                           # the invocation's span while tracing is on

    @property
    def label(self) -> str:
        """ok, retry, error (terminal: answered with the error and dead-lettered), suspended, queued, prepared;
        dropped or control when no handler ran (a reply nobody waits for; a 2PC decision, inquiry or refusal)."""
        if self.retry_at_ms is not None:
            return "retry"
        if self.dead_letter is not None:
            return "error"
        if self.suspend is not None:
            return "suspended"
        if self.queued is not None:
            return "queued"
        if self.dropped:
            return "dropped"
        if self.item.kind in items.RUNNABLE and self.item.message is not None and self.item.message.is_prepare:
            return "prepared" if self.prepare is not None else "control"  # staged, or died under wait-die
        return "control" if self.tx_event is not None else "ok"

    def fail(self, error: wire.ErrorInfo, dead_letter: dict[str, Any]) -> None:
        self.state.clear()
        # Decisions of transactions it ended still go out: prepared participants wait for them.
        self.sends[:] = [s for s in self.sends if s.message.is_tx_control]
        self.delayed.clear()
        self.retry_at_ms = None
        self.suspend = None
        self.queued = None
        self.prepare = None
        self.reply = envelope.Reply(ok=False, error=error)
        self.dead_letter = dead_letter


@dataclasses.dataclass
class Effects:
    """Applied to the owner's caches and the outside world once its commit landed."""

    outcomes: list[Outcome] = dataclasses.field(default_factory=list)
    state: dict[str, dict[str, bytes | None]] = dataclasses.field(default_factory=dict)
    chan_in: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    chan_out: dict[str, int] = dataclasses.field(default_factory=dict)
    entries: list[outbox.Entry] = dataclasses.field(default_factory=list)
    timers_added: list[tuple[int, bytes, bytes]] = dataclasses.field(default_factory=list)
    timers_removed: list[bytes] = dataclasses.field(default_factory=list)
    idem_records: dict[str, bytes] = dataclasses.field(default_factory=dict)
    trimmed: dict[str, int] = dataclasses.field(default_factory=dict)
    suspended: dict[str, suspension.Suspension | None] = dataclasses.field(default_factory=dict)
    queued: list[keylocks.Queued] = dataclasses.field(default_factory=list)
    dequeued: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    prepared: dict[str, twophase.Prepared | None] = dataclasses.field(default_factory=dict)


def dead_letter_record(fn: layout.FunctionType, partition: int, item: items.Item,
                       error: wire.ErrorInfo) -> dict[str, Any]:
    """What the dead-letter stream keeps of a failed invocation, with what a replay must know about it.

    ``caller`` and ``transaction`` name who was already told of the failure (a durable call's caller,
    or a transaction that aborted on it); ``journaled`` counts the durable steps (call replies,
    ``ctx.run`` results) it had finished. A replay runs the invocation again from the start, alone.
    """
    msg = item.message
    journaled = len(item.resume.journal) + (item.response is not None) if item.resume is not None else 0
    return {
        "function": str(fn),
        "partition": partition,
        "key": msg.key if msg else None,
        "handler": msg.handler if msg else None,
        "args": msg.args if msg else None,
        "attempts": msg.attempt if msg else 0,
        "origin": msg.origin if msg else None,
        "idempotency_key": msg.idempotency_key if msg else None,
        "invocation_id": item.id,
        "caller": f"{msg.caller.function}({msg.caller.key!r})" if msg and msg.caller else None,
        "transaction": msg.tx.id if msg and msg.tx else None,
        "journaled": journaled,
        "error": {"kind": error.kind, "message": error.message, "type": error.type},
        "raw": item.dead.get("raw") if item.dead else None,
        "failed_at": time.time(),
    }


def _bundle_cost(pending: dict[str, list[tuple[Send, bytes]]]) -> tuple[int, int]:
    """Writes the commit owes for bundles it will build at the end: the entries and the counters."""
    ops = size = 0
    for sends in pending.values():
        body = sum(len(packed) for _, packed in sends)
        ops += 1 + max(1, -(-body // MAX_BUNDLE_BYTES))
        size += body + 512
    return ops, size


def timer_payload_retry(invocation_id: str, message: envelope.Message, idem_pending: bool) -> bytes:
    return codec.pack(["retry", invocation_id, message.to_plain(), idem_pending])


def timer_payload_resume(key: str, attempt: int) -> bytes:
    return codec.pack(["resume", key, attempt])


def timer_payload_send(function: str, message: envelope.Message) -> bytes:
    return codec.pack(["send", function, message.to_plain()])


class Planner:
    """Stateless over batches except for the channel counters it reads from the owner."""

    def __init__(self, fn: layout.FunctionType, keys: layout.PartitionKeys,
                 chan_out: dict[str, int], idem_lease: int | None) -> None:
        self.fn = fn
        self.keys = keys
        self.pid = layout.PartitionId(fn, keys.partition)
        self._chan_out = dict(chan_out)  # working copy: counters advance across this plan's commits
        self._idem_lease = idem_lease

    def plan(self, outcomes: list[Outcome], trims: dict[str, int]) -> list[tuple[commit.Txn, Effects]]:
        plans: list[tuple[commit.Txn, Effects]] = []
        txn, eff = commit.Txn(), Effects()
        pending_sends: dict[str, list[tuple[Send, bytes]]] = {}
        for target, upto in trims.items():
            txn.delete_range(self.keys.outbox(target, 0), self.keys.outbox(target, upto + 1))
            eff.trimmed[target] = upto
        for oc in outcomes:
            ops, size, compares = self._estimate(oc, pending_sends)
            reserved_ops, reserved_bytes = _bundle_cost(pending_sends)
            ops, size = ops + reserved_ops, size + reserved_bytes
            if eff.outcomes and not txn.fits(ops, size, compares):
                self._finish(txn, eff, pending_sends)
                plans.append((txn, eff))
                txn, eff, pending_sends = commit.Txn(), Effects(), {}
            if not txn.fits(ops - reserved_ops, size - reserved_bytes, compares):
                err = wire.ErrorInfo(
                    kind=errors.ErrorKind.STATE_TOO_LARGE,
                    message=f"the effects of this invocation ({ops} writes, {size} bytes) exceed etcd's "
                            f"transaction limits ({commit.MAX_OPS} writes, {commit.MAX_BYTES} bytes)",
                )
                oc.fail(err, dead_letter_record(self.fn, self.keys.partition, oc.item, err))
            self._add(txn, eff, oc, pending_sends)
        if eff.outcomes or eff.trimmed:
            self._finish(txn, eff, pending_sends)
            plans.append((txn, eff))
        return plans

    # ---- internals ----
    def _estimate(self, oc: Outcome, pending: dict[str, list[tuple[Send, bytes]]]) -> tuple[int, int, int]:
        ops, size, compares = 2, 256, 0  # the source bookkeeping (watermark / timer / record)
        for (key, name), value in oc.state.items():
            ops += 1
            size += len(key) + len(name) + 64 + (len(value) if value else 0)
        channels = set(pending)
        for s in oc.sends:
            token = s.target.token
            if token not in channels:  # a new channel: its outbox entry and its sequence counter
                channels.add(token)
                ops += 2
            size += 256 + len(codec.pack(s.message.to_plain()))
        ops += len(oc.delayed) + (1 if oc.retry_at_ms is not None else 0) + (2 if oc.dead_letter else 0)
        size += 512 * (len(oc.delayed) + (1 if oc.retry_at_ms is not None else 0))
        if oc.dead_letter:
            size += len(codec.pack(oc.dead_letter)) + 256
        if oc.item.idempotency_key and (oc.reply is not None or oc.suspend or oc.queued):
            compares += 1
            size += (len(oc.reply.value or b"") if oc.reply else 0) + 256
        msg = oc.item.message
        if oc.reply is not None and msg is not None and msg.caller is not None:  # the reply to a waiting caller
            ops += 2
            size += len(oc.reply.value or b"") + 768
        if oc.suspend is not None or oc.item.resume is not None:
            ops += 1
            size += (oc.suspend.size if oc.suspend else 0) + 256
        if oc.queued is not None:
            ops += 1
            size += len(codec.pack(oc.queued.message.to_plain())) + 256
        if oc.item.inbox_key is not None:
            ops += 1
            size += len(oc.item.inbox_key) + 64
        if oc.prepare is not None or oc.decided is not None:  # the record, and its inquiry timer
            ops += 4
            size += (oc.prepare.size if oc.prepare else 0) + 512
        if oc.suspend is not None and oc.suspend.timeout:  # the call's timeout timer
            ops += 2
            size += 1024
        return ops, size, compares

    def _add(self, txn: commit.Txn, eff: Effects, oc: Outcome,
             pending: dict[str, list[tuple[Send, bytes]]]) -> None:
        item = oc.item
        eff.outcomes.append(oc)
        # Source bookkeeping: the thing that makes seeing this item again a no-op.
        if item.kind is items.Kind.CHANNEL:
            assert item.sender is not None
            wm = (item.bundle_seq, item.index + 1, item.bundle_size)
            txn.put(self.keys.chan_in(item.sender), codec.pack(list(wm)))
            eff.chan_in[item.sender] = wm
        if item.timer_key is not None:
            txn.delete(item.timer_key)
            eff.timers_removed.append(item.timer_key)
        if item.inbox_key is not None:
            assert item.message is not None
            txn.delete(item.inbox_key)
            eff.dequeued.append((item.message.key, item.inbox_key))
        idem = item.idempotency_key
        if idem and (oc.reply is not None or oc.suspend or oc.queued):
            # Final, or PENDING while it waits (a copy arriving meanwhile is then a duplicate).
            record = oc.reply.encode() if oc.reply is not None else envelope.PENDING_RECORD
            if not item.idem_pending or oc.reply is not None:
                ikey = self.keys.idempotency(idem)
                if not item.idem_pending:
                    txn.require_absent(ikey)
                txn.put(ikey, record, lease=self._idem_lease)
                eff.idem_records[idem] = record
        self._add_suspension(txn, eff, oc)
        # Effects.
        for (key, name), value in oc.state.items():
            skey = self.keys.state(key, name)
            if value is None:
                txn.delete(skey)
            else:
                txn.put(skey, value)
            eff.state.setdefault(key, {})[name] = value
        for s in oc.sends:
            pending.setdefault(s.target.token, []).append((s, codec.pack(s.message.to_plain())))
        self._add_prepared(txn, eff, oc)
        msg = item.message
        if oc.reply is not None and msg is not None and msg.caller is not None:
            vote = (str(self.fn), msg.key, msg.tx) if oc.prepare is not None and msg.tx is not None else None
            response = envelope.response_message(msg.caller, oc.reply, origin=f"{self.fn}:{msg.key}",
                                                  traceparent=msg.traceparent, prepared=vote)
            back = Send(layout.PartitionId(layout.FunctionType.parse(msg.caller.function), msg.caller.partition),
                        response)
            pending.setdefault(back.target.token, []).append((back, codec.pack(response.to_plain())))
        for due_ms, function, message in oc.delayed:
            self._add_timer(txn, eff, due_ms, timer_payload_send(function, message))
        if oc.retry_at_ms is not None:
            assert msg is not None
            if item.resume is not None and not oc.restart:  # run again from its journal, kept in the record
                payload = timer_payload_resume(msg.key, msg.attempt + 1)
            else:
                retry = dataclasses.replace(msg, attempt=msg.attempt + 1)
                inv_id = item.id
                if oc.restart and item.resume is not None:
                    # A new invocation (votes still on their way to the old one find no call of the new one
                    # waiting), whose transactions keep the age of the one that died.
                    inv_id = f"{item.resume.invocation_id.split('/')[0]}/{msg.attempt + 1}"
                    if item.resume.tx is not None:
                        retry.tx_age = item.resume.tx.ts
                payload = timer_payload_retry(inv_id, retry, item.idem_pending)
            self._add_timer(txn, eff, oc.retry_at_ms, payload)
        if oc.dead_letter is not None:
            oc.dead_letter["partition"] = self.keys.partition
            seq = self._next_seq(DLQ_TARGET)
            entry = outbox.Entry(
                target=DLQ_TARGET, seq=seq, subject=self.fn.dlq_subject,
                msg_id=f"dlq:{self.pid.token}:{seq}",
                headers={constants.HEADER_KIND: constants.KIND_DEAD_LETTER,
                         constants.HEADER_ORIGIN: self.pid.token},
                body=codec.pack(oc.dead_letter),
            )
            txn.put(self.keys.outbox(DLQ_TARGET, seq), entry.encode())
            txn.put(self.keys.chan_out(DLQ_TARGET), codec.pack(seq))
            eff.entries.append(entry)
            eff.chan_out[DLQ_TARGET] = seq

    def _add_prepared(self, txn: commit.Txn, eff: Effects, oc: Outcome) -> None:
        """Write a participant's prepared record (arming its inquiry timer), or drop it once decided."""
        staged = oc.prepare
        if staged is not None:
            if not staged.timer:
                payload = twophase.timer_payload_inquire(staged.key, staged.tx.id)
                staged.timer = self._add_timer(txn, eff, timers.now_ms() + int(staged.tx.timeout * 1000), payload)
            txn.put(self.keys.prepared(staged.key), staged.encode())
            eff.prepared[staged.key] = staged
        if oc.decided is not None:
            txn.delete(self.keys.prepared(oc.decided.key))
            self._cancel_timer(txn, eff, oc.decided.timer)
            eff.prepared[oc.decided.key] = None

    def _add_suspension(self, txn: commit.Txn, eff: Effects, oc: Outcome) -> None:
        """Write or drop the suspension record, and queue the item in its key's inbox if it must wait."""
        item = oc.item
        if item.resume is not None:  # the prepare it waited for has its vote: its timeout is moot
            self._cancel_timer(txn, eff, item.resume.timer)
        if oc.suspend is not None:
            key = oc.suspend.message.key
            if oc.suspend.timeout and oc.suspend.waiting and not oc.suspend.timer:
                oc.suspend.timer = self._arm_call_timeout(txn, eff, oc.suspend)
            txn.put(self.keys.suspended(key), oc.suspend.encode())
            eff.suspended[key] = oc.suspend
        elif item.resume is not None:  # it ended (reply or error): the key is unlocked
            key = item.resume.message.key
            txn.delete(self.keys.suspended(key))
            eff.suspended[key] = None
        if oc.queued is not None:
            txn.put(oc.queued.etcd_key, suspension.queued_entry(oc.queued.message, oc.queued.item_id))
            eff.queued.append(oc.queued)

    def _arm_call_timeout(self, txn: commit.Txn, eff: Effects, record: suspension.Suspension) -> bytes:
        """A caller waits for a reply at most its call's timeout: then a timeout error resumes it (a sleep: its end).

        The error is a delayed send to the caller's own key, answering the call it waits for. If the
        reply came first, the caller no longer waits for that call and the late timeout is dropped
        like any stale reply (and the timer is cancelled when the reply resumes it). A transaction's
        prepare waits at most the transaction's timeout (kind ``tx_timeout``, which aborts it).
        """
        msg = record.message
        caller = envelope.CallerAddress(str(self.fn), self.keys.partition, msg.key, record.waiting)
        if record.sleeping:  # ctx.sleep: the timer's answer is what it waits for
            reply = envelope.Reply(ok=True, value=None)
        else:
            kind = errors.ErrorKind.TX_TIMEOUT if record.tx is not None else errors.ErrorKind.CALL_TIMEOUT
            what = "vote" if record.tx is not None else "reply"
            reply = envelope.Reply(ok=False, error=wire.ErrorInfo(
                kind=kind, message=f"no {what} within the timeout of {record.timeout:g}s"))
        timeout = envelope.response_message(caller, reply, origin=f"{self.fn}:{msg.key}",
                                             traceparent=msg.traceparent)
        due_ms = timers.now_ms() + int(record.timeout * 1000)
        return self._add_timer(txn, eff, due_ms, timer_payload_send(str(self.fn), timeout))

    def _add_timer(self, txn: commit.Txn, eff: Effects, due_ms: int, payload: bytes) -> bytes:
        tkey = self.keys.timer(due_ms, uuid.uuid4().hex[:16])
        txn.put(tkey, payload)
        eff.timers_added.append((due_ms, tkey, payload))
        return tkey

    @staticmethod
    def _cancel_timer(txn: commit.Txn, eff: Effects, tkey: bytes) -> None:
        if tkey:
            txn.delete(tkey)
            eff.timers_removed.append(tkey)

    def _next_seq(self, target: str) -> int:
        seq = self._chan_out.get(target, 0) + 1
        self._chan_out[target] = seq
        return seq

    def _finish(self, txn: commit.Txn, eff: Effects, pending: dict[str, list[tuple[Send, bytes]]]) -> None:
        """Pack each target's messages into bundles (one per channel unless too large)."""
        for token, sends in pending.items():
            target = sends[0][0].target
            chunks: list[list[envelope.Message]] = [[]]
            size = 0
            for send, packed in sends:
                if chunks[-1] and size + len(packed) > MAX_BUNDLE_BYTES:
                    chunks.append([])
                    size = 0
                chunks[-1].append(send.message)
                size += len(packed)
            for chunk in chunks:
                seq = self._next_seq(token)
                body = envelope.encode_bundle(envelope.Bundle(sender=self.pid.token, seq=seq, messages=chunk))
                entry = outbox.Entry(
                    target=token, seq=seq,
                    subject=target.function.channel_subject(target.partition, self.pid),
                    msg_id=f"ch:{self.pid.token}>{target.partition}:{seq}",
                    headers={constants.HEADER_KIND: constants.KIND_BUNDLE,
                             constants.HEADER_ORIGIN: self.pid.token},
                    body=body,
                )
                txn.put(self.keys.outbox(token, seq), entry.encode())
                eff.entries.append(entry)
            txn.put(self.keys.chan_out(token), codec.pack(self._chan_out[token]))
            eff.chan_out[token] = self._chan_out[token]
