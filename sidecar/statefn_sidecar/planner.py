"""Turns the outcomes of a batch into fenced etcd commits and what to do after each.

Each outcome's writes are built as a share of its own (``assembly.Share``); a commit takes shares
in batch order while the finished commit still fits etcd's limits (``assembly.Assembly.cost_with``),
so splitting a batch never splits one invocation's effects and never guesses a size. Writes to the
same key within one commit are folded (etcd refuses a transaction that writes a key twice).
"""

from __future__ import annotations

import dataclasses
import uuid

from statefn_core import codec, constants, envelope, errors, layout, wire
from statefn_sidecar import assembly, commit, deadletters, decisions, items, suspension, timers, twophase


def _failed_reply(entry: bytes) -> bool:
    """A journal entry that is a call's error reply (``[False, value, error]``; a ``ctx.run`` result is not)."""
    try:
        raw = codec.unpack(entry)
    except errors.CodecError:
        return False
    return isinstance(raw, list) and len(raw) == 3 and raw[0] is False


def timer_payload_retry(invocation_id: str, message: envelope.Message, idem_pending: bool) -> bytes:
    return codec.pack(["retry", invocation_id, message.to_plain(), idem_pending])


def timer_payload_resume(key: str, attempt: int) -> bytes:
    return codec.pack(["resume", key, attempt])


def timer_payload_send(function: str, message: envelope.Message) -> bytes:
    return codec.pack(["send", function, message.to_plain()])


class Planner:
    """Stateless over batches except for the channel counters it reads from the owner."""

    def __init__(self, fn: layout.FunctionType, keys: layout.PartitionKeys,
                 chan_out: dict[str, int], idem_lease: int | None,
                 max_payload: int = constants.DEFAULT_NATS_MAX_PAYLOAD) -> None:
        self.fn = fn
        self.keys = keys
        self._chan_out = dict(chan_out)  # working copy: counters advance across this plan's commits
        self._idem_lease = idem_lease
        self._max_payload = max_payload

    def plan(self, outcomes: list[decisions.Outcome],
             trims: dict[str, int]) -> list[tuple[commit.Txn, assembly.Effects]]:
        plans: list[tuple[commit.Txn, assembly.Effects]] = []
        current = self._assembly()
        for target, upto in trims.items():
            current.txn.delete_range(self.keys.outbox(target, 0), self.keys.outbox(target, upto + 1))
            current.eff.trimmed[target] = upto
        for oc in outcomes:
            share = self._share(oc)
            if share.largest + assembly.MESSAGE_MARGIN > self._max_payload:
                # Committed, it could never be published: its channel would be blocked behind it for good.
                err = wire.ErrorInfo(
                    kind=errors.ErrorKind.PAYLOAD_TOO_LARGE,
                    message=f"this invocation sends a message or reply of {share.largest} bytes; NATS carries at "
                            f"most {self._max_payload - assembly.MESSAGE_MARGIN} bytes in one (max_payload "
                            f"{self._max_payload}, less {assembly.MESSAGE_MARGIN} for the envelope)",
                )
                oc.decision = decisions.failed(
                    oc.decision, err, deadletters.record(self.fn, self.keys.partition, oc.item, err))
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
                    oc.decision = decisions.failed(
                        oc.decision, err, deadletters.record(self.fn, self.keys.partition, oc.item, err))
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

    def _share(self, oc: decisions.Outcome) -> assembly.Share:
        """Everything one outcome writes and sends, built alone: its item's bookkeeping, then its decision's."""
        share = assembly.Share()
        share.eff.outcomes.append(oc)
        self._add_bookkeeping(share, oc.item)
        decision = oc.decision
        self._add_idempotency(share, oc.item, decision)
        if isinstance(oc.item, items.Invocation):
            self._add_suspension(share, oc.item, decision)
        changes = decision.changes()
        if changes is not None:
            self._add_changes(share, changes)
        match decision:
            case decisions.Voted(prepared=staged) | decisions.Reinquired(prepared=staged):
                self._add_prepared(share, staged)
            case decisions.Decided(prepared=staged):
                self._drop_prepared(share, staged)
            case decisions.Retrying():
                self._add_retry(share, oc.invocation, decision)
            case decisions.Failed(dead_letter=dead_letter, released=released):
                if released is not None:
                    self._drop_prepared(share, released)
                dead_letter["partition"] = self.keys.partition
                # A replay may resume from here (only one that replay would run: no caller, no transaction).
                msg = oc.item.message if isinstance(oc.item, items.Invocation) else None
                progress = oc.item.progress() if isinstance(oc.item, items.Invocation) else None
                if decision.resumable and msg is not None and msg.caller is None and msg.tx is None \
                        and progress is not None:
                    # Calls that failed (the one whose error ended the run among them) or were still in flight
                    # are made again; every finished step is answered from the journal.
                    progress.journal = [wire.redo_entry() if wire.outstanding_call(e) or _failed_reply(e) else e
                                        for e in progress.journal]
                    progress.calls = {}
                    while progress.journal and wire.is_redo(progress.journal[-1]):
                        progress.journal.pop()
                    if progress.journal:
                        ref = self.keys.dead_journal(uuid.uuid4().hex)
                        share.txn.put(ref, progress.encode(), lease=self._idem_lease)
                        dead_letter["journal_ref"] = ref.decode()
                share.dead.append(codec.pack(dead_letter))
        reply = decision.answer()
        if isinstance(decision, (decisions.Replied, decisions.Failed)) and isinstance(oc.item, items.Invocation) \
                and oc.item.message.journal_ref:  # a replay that ended: the journal it resumed from is done with
            share.txn.delete(oc.item.message.journal_ref.encode())
        if reply is not None and isinstance(oc.item, items.Invocation):
            if oc.item.message.caller is not None:
                self._add_reply(share, oc.item, reply, decision)
            else:
                share.carries(len(reply.encode()))  # published to the caller's reply address after the commit
        return share

    def _add_bookkeeping(self, share: assembly.Share, item: items.Item) -> None:
        """What makes seeing this item again a no-op: its channel watermark, inbox entry or timer goes."""
        txn, eff = share.txn, share.eff
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

    def _add_idempotency(self, share: assembly.Share, item: items.Item, decision: decisions.Decision) -> None:
        """The final reply under the request's idempotency id, or PENDING while it waits (a copy: a duplicate)."""
        idem = item.idempotency_id
        if not idem:
            return
        reply = decision.answer()
        waits = isinstance(decision, (decisions.Suspended, decisions.Enqueued, decisions.Noted)) or (
            isinstance(decision, decisions.Retrying) and decision.journal is not None)
        if reply is None and not waits:
            return
        pending = isinstance(item, items.Invocation) and item.idem_pending
        if pending and reply is None:
            return  # PENDING already
        ikey = self.keys.idempotency(idem)
        if not pending:
            share.txn.require_absent(ikey)
        fingerprint = envelope.fingerprint(item.message) if isinstance(item, items.Invocation) else b""
        record = envelope.Record(fingerprint, reply.encode() if reply is not None else None)
        share.txn.put(ikey, record.encode(), lease=self._idem_lease)
        share.eff.idem_records[idem] = record

    def _add_changes(self, share: assembly.Share, changes: decisions.Changes) -> None:
        txn, eff = share.txn, share.eff
        for (key, name), value in changes.state.items():
            skey = self.keys.state(key, name)
            if value is None:
                txn.delete(skey)
            else:
                txn.put(skey, value)
            eff.state.setdefault(key, {})[name] = value
        for s in changes.sends:
            share.send(s)
        for d in changes.delayed:
            payload = timer_payload_send(d.function, d.message)
            share.carries(len(payload))  # sent when the timer fires
            self._add_timer(share, d.due_ms, payload)

    def _add_reply(self, share: assembly.Share, item: items.Invocation, reply: envelope.Reply,
                   decision: decisions.Decision) -> None:
        """The reply to a waiting caller: a durable call's, or a vote (which names the prepared key)."""
        msg = item.message
        assert msg.caller is not None
        vote = (str(self.fn), msg.key, msg.tx) if isinstance(decision, decisions.Voted) and msg.tx else None
        response = envelope.response_message(msg.caller, reply, origin=f"{self.fn}:{msg.key}",
                                              traceparent=msg.traceparent, prepared=vote)
        share.send(assembly.Send(
            layout.PartitionId(layout.FunctionType.parse(msg.caller.function), msg.caller.partition), response))

    def _add_retry(self, share: assembly.Share, item: items.Invocation, retry: decisions.Retrying) -> None:
        """The timer of another attempt: from the journal kept in the suspension record, or from scratch."""
        msg = item.message
        if retry.journal is not None:
            payload = timer_payload_resume(msg.key, msg.attempt + 1)
        else:
            again = dataclasses.replace(msg, attempt=msg.attempt + 1)
            inv_id = item.id
            if retry.restart and item.resume is not None:
                # A new invocation (votes still on their way to the old one find no call of the new one
                # waiting), whose transactions keep the age of the one that died.
                record = item.resume.record
                # ('@' cannot occur in an id otherwise: its parts are escaped.)
                inv_id = f"{record.invocation_id.split('@')[0]}@{msg.attempt + 1}"
                if record.tx is not None:
                    again.tx_age = record.tx.ts
            payload = timer_payload_retry(inv_id, again, item.idem_pending)
        self._add_timer(share, retry.at_ms, payload)

    def _add_prepared(self, share: assembly.Share, staged: twophase.Prepared) -> None:
        """Write a participant's prepared record, arming its inquiry timer if it has none."""
        if not staged.timer:
            payload = twophase.timer_payload_inquire(staged.key, staged.tx.id)
            staged.timer = self._add_timer(share, timers.now_ms() + int(staged.tx.timeout * 1000), payload)
        record = staged.encode()
        share.carries(max((len(codec.pack(s.message.to_plain())) for s in staged.sends), default=0))  # on commit
        share.txn.put(self.keys.prepared(staged.key), record)
        share.eff.prepared[staged.key] = staged

    def _drop_prepared(self, share: assembly.Share, staged: twophase.Prepared) -> None:
        """Its transaction decided: the record and its inquiry timer go, the key is unlocked."""
        share.txn.delete(self.keys.prepared(staged.key))
        self._cancel_timer(share, staged.timer)
        share.eff.prepared[staged.key] = None

    def _add_suspension(self, share: assembly.Share, item: items.Invocation, decision: decisions.Decision) -> None:
        """Write or drop the key's suspension record, or queue the item in its key's inbox."""
        txn, eff = share.txn, share.eff
        if item.resume is not None:  # the call it answers has its answer: its timeout is moot
            self._cancel_timer(share, item.resume.answered_timer)
        match decision:
            case decisions.Suspended(record=record) | decisions.Retrying(journal=suspension.Suspension() as record) \
                    | decisions.Noted(record=record):
                for call_id, call in record.calls.items():
                    if call.timeout and not call.timer:
                        call.timer = self._arm_call_timeout(share, record, call_id, call)
                txn.put(self.keys.suspended(record.message.key), record.encode())
                eff.suspended[record.message.key] = record
            case decisions.Enqueued(entry=entry):
                txn.put(entry.etcd_key, suspension.queued_entry(entry.message, entry.item_id))
                eff.queued.append(entry)
            case _ if item.resume is not None:  # it ended (reply, error, or a restart): the key is unlocked
                key = item.resume.record.message.key
                txn.delete(self.keys.suspended(key))
                eff.suspended[key] = None
                for call_id, call in item.resume.record.calls.items():  # calls in flight it no longer awaits
                    if call_id != item.resume.call_id:
                        self._cancel_timer(share, call.timer)

    def _arm_call_timeout(self, share: assembly.Share, record: suspension.Suspension, call_id: str,
                          call: suspension.Outstanding) -> bytes:
        """A caller waits for a reply at most its call's timeout: then a timeout error resumes it (a sleep: its end).

        The error is a delayed send to the caller's own key, answering the call it waits for. If the
        reply came first, the caller no longer waits for that call and the late timeout is dropped
        like any stale reply (and the timer is cancelled when the reply resumes it). A transaction's
        prepare waits at most the transaction's timeout (kind ``tx_timeout``, which aborts it).
        """
        msg = record.message
        caller = envelope.CallerAddress(str(self.fn), self.keys.partition, msg.key, call_id)
        if call.sleeping:  # ctx.sleep: the timer's answer is what it waits for
            reply = envelope.Reply(ok=True, value=None)
        else:
            kind = errors.ErrorKind.TX_TIMEOUT if call.tx is not None else errors.ErrorKind.CALL_TIMEOUT
            what = "vote" if call.tx is not None else "reply"
            reply = envelope.Reply(ok=False, error=wire.ErrorInfo(
                kind=kind, message=f"no {what} within the timeout of {call.timeout:g}s"))
        timeout = envelope.response_message(caller, reply, origin=f"{self.fn}:{msg.key}",
                                             traceparent=msg.traceparent)
        due_ms = timers.now_ms() + int(call.timeout * 1000)
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
