"""Turns the outcomes of a batch into fenced etcd commits and what to do after each.

Each outcome's writes are built as a share of its own (``assembly.Share``); a commit takes shares
in batch order while the finished commit still fits etcd's limits (``assembly.Assembly.cost_with``),
so splitting a batch never splits one invocation's effects and never guesses a size. Writes to the
same key within one commit are folded (etcd refuses a transaction that writes a key twice).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from statefn_core import codec, envelope, errors, layout, wire
from statefn_sidecar import assembly, commit, items, keylocks, suspension, timers, twophase


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one item did; produced by execution, consumed by planning."""

    item: items.Item
    state: dict[tuple[str, str], bytes | None] = dataclasses.field(default_factory=dict)
    sends: list[assembly.Send] = dataclasses.field(default_factory=list)
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
    def invocation(self) -> items.Invocation:
        """The invocation this outcome is about; only outcomes of timers and dead letters have none."""
        if not isinstance(self.item, items.Invocation):
            raise TypeError(f"{type(self.item).__name__} {self.item.id} carries no invocation")
        return self.item

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
        if isinstance(self.item, items.Invocation) and self.item.message.is_prepare:
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


def dead_letter_record(fn: layout.FunctionType, partition: int, item: items.Item,
                       error: wire.ErrorInfo) -> dict[str, Any]:
    """What the dead-letter stream keeps of a failed invocation, with what a replay must know about it.

    ``caller`` and ``transaction`` name who was already told of the failure (a durable call's caller,
    or a transaction that aborted on it); ``journaled`` counts the durable steps (call replies,
    ``ctx.run`` results) it had finished. A replay runs the invocation again from the start, alone.
    """
    msg = item.message if isinstance(item, items.Invocation) else None
    resume = item.resume if isinstance(item, items.Invocation) else None
    journaled = len(resume.record.journal) + (resume.response is not None) if resume is not None else 0
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
        "raw": item.raw if isinstance(item, items.Undecodable) else None,
        "failed_at": time.time(),
    }


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
        self._chan_out = dict(chan_out)  # working copy: counters advance across this plan's commits
        self._idem_lease = idem_lease

    def plan(self, outcomes: list[Outcome], trims: dict[str, int]) -> list[tuple[commit.Txn, assembly.Effects]]:
        plans: list[tuple[commit.Txn, assembly.Effects]] = []
        current = self._assembly()
        for target, upto in trims.items():
            current.txn.delete_range(self.keys.outbox(target, 0), self.keys.outbox(target, upto + 1))
            current.eff.trimmed[target] = upto
        for oc in outcomes:
            share = self._share(oc)
            if not commit.fits(*current.cost_with(share)):
                alone = self._assembly().cost_with(share)
                if not commit.fits(*alone):
                    ops, size, _ = alone
                    err = wire.ErrorInfo(
                        kind=errors.ErrorKind.STATE_TOO_LARGE,
                        message=f"the effects of this invocation ({ops} writes, {size} bytes) exceed etcd's "
                                f"transaction limits ({commit.MAX_OPS} writes, {commit.MAX_BYTES} bytes)",
                    )
                    oc.fail(err, dead_letter_record(self.fn, self.keys.partition, oc.item, err))
                    share = self._share(oc)
                if not current.empty and not commit.fits(*current.cost_with(share)):
                    plans.append(current.finish())
                    current = self._assembly()
            current.absorb(share)
        if not current.empty:
            plans.append(current.finish())
        return plans

    # ---- internals ----
    def _assembly(self) -> assembly.Assembly:
        return assembly.Assembly(self.fn, self.keys, self._chan_out)

    def _share(self, oc: Outcome) -> assembly.Share:
        """Everything one outcome writes and sends, built alone."""
        share = assembly.Share()
        txn, eff = share.txn, share.eff
        item = oc.item
        eff.outcomes.append(oc)
        # Source bookkeeping: the thing that makes seeing this item again a no-op.
        if isinstance(item, items.Delivered):
            wm = (item.bundle_seq, item.index + 1, item.bundle_size)
            txn.put(self.keys.chan_in(item.sender), codec.pack(list(wm)))
            eff.chan_in[item.sender] = wm
        elif isinstance(item, items.InboxHead):
            txn.delete(item.inbox_key)
            eff.dequeued.append((item.message.key, item.inbox_key))
        if item.timer_key is not None:
            txn.delete(item.timer_key)
            eff.timers_removed.append(item.timer_key)
        idem = item.idempotency_key
        if idem and (oc.reply is not None or oc.suspend or oc.queued):
            # Final, or PENDING while it waits (a copy arriving meanwhile is then a duplicate).
            pending = isinstance(item, items.Invocation) and item.idem_pending
            record = oc.reply.encode() if oc.reply is not None else envelope.PENDING_RECORD
            if not pending or oc.reply is not None:
                ikey = self.keys.idempotency(idem)
                if not pending:
                    txn.require_absent(ikey)
                txn.put(ikey, record, lease=self._idem_lease)
                eff.idem_records[idem] = record
        if isinstance(item, items.Invocation):
            self._add_suspension(share, oc, item)
        # Effects.
        for (key, name), value in oc.state.items():
            skey = self.keys.state(key, name)
            if value is None:
                txn.delete(skey)
            else:
                txn.put(skey, value)
            eff.state.setdefault(key, {})[name] = value
        for s in oc.sends:
            share.send(s)
        self._add_prepared(share, oc)
        for due_ms, function, message in oc.delayed:
            self._add_timer(share, due_ms, timer_payload_send(function, message))
        if isinstance(item, items.Invocation):
            self._add_reply_and_retry(share, oc, item)
        if oc.dead_letter is not None:
            oc.dead_letter["partition"] = self.keys.partition
            share.dead.append(codec.pack(oc.dead_letter))
        return share

    def _add_reply_and_retry(self, share: assembly.Share, oc: Outcome, item: items.Invocation) -> None:
        """The reply to a waiting caller (a durable call's, or a vote), and the timer of another attempt."""
        msg = item.message
        if oc.reply is not None and msg.caller is not None:
            vote = (str(self.fn), msg.key, msg.tx) if oc.prepare is not None and msg.tx is not None else None
            response = envelope.response_message(msg.caller, oc.reply, origin=f"{self.fn}:{msg.key}",
                                                  traceparent=msg.traceparent, prepared=vote)
            share.send(assembly.Send(
                layout.PartitionId(layout.FunctionType.parse(msg.caller.function), msg.caller.partition), response))
        if oc.retry_at_ms is not None:
            if item.resume is not None and not oc.restart:  # run again from its journal, kept in the record
                payload = timer_payload_resume(msg.key, msg.attempt + 1)
            else:
                retry = dataclasses.replace(msg, attempt=msg.attempt + 1)
                inv_id = item.id
                if oc.restart and item.resume is not None:
                    # A new invocation (votes still on their way to the old one find no call of the new one
                    # waiting), whose transactions keep the age of the one that died.
                    record = item.resume.record
                    inv_id = f"{record.invocation_id.split('/')[0]}/{msg.attempt + 1}"
                    if record.tx is not None:
                        retry.tx_age = record.tx.ts
                payload = timer_payload_retry(inv_id, retry, item.idem_pending)
            self._add_timer(share, oc.retry_at_ms, payload)

    def _add_prepared(self, share: assembly.Share, oc: Outcome) -> None:
        """Write a participant's prepared record (arming its inquiry timer), or drop it once decided."""
        txn, eff = share.txn, share.eff
        staged = oc.prepare
        if staged is not None:
            if not staged.timer:
                payload = twophase.timer_payload_inquire(staged.key, staged.tx.id)
                staged.timer = self._add_timer(share, timers.now_ms() + int(staged.tx.timeout * 1000), payload)
            txn.put(self.keys.prepared(staged.key), staged.encode())
            eff.prepared[staged.key] = staged
        if oc.decided is not None:
            txn.delete(self.keys.prepared(oc.decided.key))
            self._cancel_timer(share, oc.decided.timer)
            eff.prepared[oc.decided.key] = None

    def _add_suspension(self, share: assembly.Share, oc: Outcome, item: items.Invocation) -> None:
        """Write or drop the suspension record, and queue the item in its key's inbox if it must wait."""
        txn, eff = share.txn, share.eff
        if item.resume is not None:  # the call it waited for has its answer: its timeout is moot
            self._cancel_timer(share, item.resume.record.timer)
        if oc.suspend is not None:
            key = oc.suspend.message.key
            if oc.suspend.timeout and oc.suspend.waiting and not oc.suspend.timer:
                oc.suspend.timer = self._arm_call_timeout(share, oc.suspend)
            txn.put(self.keys.suspended(key), oc.suspend.encode())
            eff.suspended[key] = oc.suspend
        elif item.resume is not None:  # it ended (reply or error): the key is unlocked
            key = item.resume.record.message.key
            txn.delete(self.keys.suspended(key))
            eff.suspended[key] = None
        if oc.queued is not None:
            txn.put(oc.queued.etcd_key, suspension.queued_entry(oc.queued.message, oc.queued.item_id))
            eff.queued.append(oc.queued)

    def _arm_call_timeout(self, share: assembly.Share, record: suspension.Suspension) -> bytes:
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
        return self._add_timer(share, due_ms, timer_payload_send(str(self.fn), timeout))

    def _add_timer(self, share: assembly.Share, due_ms: int, payload: bytes) -> bytes:
        tkey = self.keys.timer(due_ms, uuid.uuid4().hex[:16])
        share.txn.put(tkey, payload)
        share.eff.timers_added.append((due_ms, tkey, payload))
        return tkey

    @staticmethod
    def _cancel_timer(share: assembly.Share, tkey: bytes) -> None:
        if tkey:
            share.txn.delete(tkey)
            share.eff.timers_removed.append(tkey)
