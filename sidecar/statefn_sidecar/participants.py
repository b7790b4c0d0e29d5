"""What a partition does with two-phase commit's messages: prepares, decisions, inquiries, refusals.

The data structures and the wait-die rule are in ``twophase``; this is the behaviour, kept out
of the executor so that reads as running handlers. Every effect here is an ordinary outcome
(state writes, channel sends, a record) committed by the same fenced commit as the batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

from statefn_core import constants, envelope, errors, layout, wire
from statefn_sidecar import assembly, decisions, items, keylocks, statecache, twophase

_log = logging.getLogger("statefn.participants")


class Targets(Protocol):
    fn: layout.FunctionType

    async def target(self, function: str, key: str) -> layout.PartitionId: ...


def die(item: items.Invocation, fn: layout.FunctionType) -> decisions.Refused:
    """Wait-die: a younger transaction's prepare does not wait for an older one's lock; it votes no."""
    msg = item.message
    return decisions.Refused(envelope.Reply(ok=False, error=wire.ErrorInfo(
        kind=errors.ErrorKind.TX_CONFLICT,
        message=f"{fn}({msg.key!r}) is held by an older transaction; the younger one gives way (wait-die)")))


def state_for(key: str, ocs: list[decisions.Outcome], cache: statecache.StateCache,
              locks: keylocks.KeyLocks) -> dict[str, bytes]:
    """The state a key's invocations read: committed, plus what its transaction staged for its own further prepares."""
    stored = cache.get(key)
    staged = locks.prepared.get(key)
    if staged is not None and all(
            oc.invocation.message.is_prepare and oc.invocation.message.tx is not None
            and oc.invocation.message.tx.id == staged.tx.id for oc in ocs):
        return staged.view(stored)
    return dict(stored)


def stage(item: items.Invocation, reply: envelope.Reply, changes: decisions.Changes,
          state: dict[str, bytes | None], locks: keylocks.KeyLocks) -> decisions.Voted:
    """A prepare succeeded: its state changes and messages wait in the prepared record, not in etcd's state."""
    msg = item.message
    assert msg.tx is not None  # a prepare
    sends = [twophase.StagedSend(str(s.target.function), s.target.partition, s.message) for s in changes.sends]
    sends += [twophase.StagedSend(d.function, -1, d.message, d.due_ms) for d in changes.delayed]
    earlier = locks.prepared.get(msg.key)
    if earlier is not None and earlier.tx.id == msg.tx.id:
        return decisions.Voted(reply, earlier.merged(state, sends))
    return decisions.Voted(reply, twophase.Prepared(msg.key, msg.tx, dict(state), sends))


class Participants:
    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    async def control(self, item: items.Invocation, locks: keylocks.KeyLocks) -> decisions.Decision:
        """A decision for a prepared key of this partition, or an inquiry to a coordinator's key."""
        msg = item.message
        assert msg.tx is not None  # routed CONTROL: a decision or inquiry, which carries its transaction
        if msg.handler == constants.INQUIRE_HANDLER:
            return await self._answer_inquiry(item, locks)
        staged = locks.prepared.get(msg.key)
        if staged is None or staged.tx.id != msg.tx.id:
            return decisions.Answered("stale")  # decided already, or it never prepared (it voted no, or died)
        if msg.handler == constants.ABORT_HANDLER:
            return decisions.Decided(staged, "aborted")
        changes = decisions.Changes(state={(msg.key, name): value for name, value in staged.state.items()})
        for s in staged.sends:
            if s.due_ms:
                changes.delayed.append(decisions.Delayed(s.due_ms, s.function, s.message))
            else:
                changes.sends.append(assembly.Send(
                    layout.PartitionId(layout.FunctionType.parse(s.function), s.partition), s.message))
        return decisions.Decided(staged, "committed", changes)

    async def _answer_inquiry(self, item: items.Invocation, locks: keylocks.KeyLocks) -> decisions.Answered:
        """Presumed abort: a coordinator that is not running the transaction any more answers abort.

        If it decided commit, that decision went out on the same ordered channel before this
        answer, so the participant has applied it and ignores the abort.
        """
        msg = item.message
        assert msg.tx is not None  # an inquiry
        record = locks.suspended.get(msg.key)
        if record is not None and record.tx is not None and record.tx.id == msg.tx.id:
            return decisions.Answered("inquiry_pending")  # still undecided: the participant asks again later
        function, key = msg.args.get("function"), msg.args.get("key")
        if not isinstance(function, str) or not isinstance(key, str):
            _log.warning("an inquiry for %s without the participant to answer (%r); dropped", msg.tx.id, msg.args)
            return decisions.Answered("malformed")
        abort = await self._abort(item, function, key, msg.tx)
        return decisions.Answered("inquiry_abort", decisions.Changes(sends=[abort] if abort else []))

    async def release_orphan(self, item: items.Invocation) -> decisions.Dropped:
        """A yes vote its coordinator no longer waits for (it timed out, or ended): release that participant."""
        msg = item.message
        prepared = msg.args.get("prepared") if msg.is_response else None
        if not prepared or not isinstance(msg.args.get("reply"), bytes):
            return decisions.Dropped()
        try:
            voted_yes = envelope.Reply.decode(msg.args["reply"]).ok
            function, key, plain = prepared
            tx = wire.TxInfo.from_plain(plain)
        except (errors.CodecError, TypeError, ValueError) as exc:
            _log.warning("a malformed vote for %r (%s); nothing to release", msg.key, exc)
            return decisions.Dropped()
        if not voted_yes or tx is None or not isinstance(function, str) or not isinstance(key, str):
            return decisions.Dropped()
        abort = await self._abort(item, function, key, tx)
        return decisions.Dropped(decisions.Changes(sends=[abort] if abort else []), "orphan_abort")

    async def inquire(self, timer: items.InquiryTimer, locks: keylocks.KeyLocks) -> decisions.Decision:
        """A prepared key's timer: still no decision, so ask the coordinator and wait another timeout."""
        staged = locks.prepared.get(timer.key)
        if staged is None or staged.tx.id != timer.tx_id:
            return decisions.Consumed()  # decided meanwhile: deleting the timer is all
        tx = staged.tx
        fn = self._targets.fn
        inquiry = envelope.tx_control_message(constants.INQUIRE_HANDLER, tx, tx.key, origin=f"{fn}:{timer.key}",
                                               traceparent=None, args={"function": str(fn), "key": timer.key})
        changes = decisions.Changes()
        try:
            changes.sends.append(assembly.Send(await self._targets.target(tx.function, tx.key), inquiry))
        except (errors.UnknownFunction, errors.InvalidFunctionType) as exc:
            _log.error("%s(%r) is prepared for %s, whose coordinator cannot be reached (%s); it stays locked",
                       fn, timer.key, tx.id, exc)
        return decisions.Reinquired(dataclasses.replace(staged, timer=b""), changes)  # re-armed by this commit

    async def _abort(self, item: items.Invocation, function: str, key: str, tx: wire.TxInfo) -> assembly.Send | None:
        """The abort for a participant, or None when it names no function that exists (a forged message)."""
        msg = item.message
        abort = envelope.tx_control_message(constants.ABORT_HANDLER, tx, key, origin=f"{self._targets.fn}:{msg.key}",
                                             traceparent=msg.traceparent)
        try:
            return assembly.Send(await self._targets.target(function, key), abort)
        except (errors.UnknownFunction, errors.InvalidFunctionType) as exc:
            _log.warning("no abort for %s(%r) of %s: %s", function, key, tx.id, exc)
            return None
