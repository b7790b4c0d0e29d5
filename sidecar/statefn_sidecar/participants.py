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
from statefn_sidecar import assembly, items, keylocks, planner, statecache, twophase

_log = logging.getLogger("statefn.participants")


class Targets(Protocol):
    fn: layout.FunctionType

    async def target(self, function: str, key: str) -> layout.PartitionId: ...


def die(oc: planner.Outcome, fn: layout.FunctionType) -> None:
    """Wait-die: a younger transaction's prepare does not wait for an older one's lock; it votes no."""
    msg = oc.invocation.message
    assert msg.tx is not None  # routed DIE: a prepare
    oc.reply = envelope.Reply(ok=False, error=wire.ErrorInfo(
        kind=errors.ErrorKind.TX_CONFLICT,
        message=f"{fn}({msg.key!r}) is held by an older transaction; the younger one gives way (wait-die)"))
    oc.tx_event = "died"


def state_for(key: str, ocs: list[planner.Outcome], cache: statecache.StateCache,
              locks: keylocks.KeyLocks) -> dict[str, bytes]:
    """The state a key's invocations read: committed, plus what its transaction staged for its own further prepares."""
    stored = cache.get(key)
    staged = locks.prepared.get(key)
    if staged is not None and all(
            oc.invocation.message.is_prepare and oc.invocation.message.tx is not None
            and oc.invocation.message.tx.id == staged.tx.id for oc in ocs):
        return staged.view(stored)
    return dict(stored)


def stage(oc: planner.Outcome, key: str, state: dict[str, bytes | None], locks: keylocks.KeyLocks) -> None:
    """A prepare succeeded: its state changes and messages wait in the prepared record, not in etcd's state."""
    msg = oc.invocation.message
    assert msg.tx is not None  # a prepare
    sends = [twophase.StagedSend(str(s.target.function), s.target.partition, s.message) for s in oc.sends]
    sends += [twophase.StagedSend(function, -1, message, due_ms) for due_ms, function, message in oc.delayed]
    oc.sends.clear()
    oc.delayed.clear()
    earlier = locks.prepared.get(key)
    if earlier is not None and earlier.tx.id == msg.tx.id:
        oc.prepare = earlier.merged(state, sends)
    else:
        oc.prepare = twophase.Prepared(key, msg.tx, dict(state), sends)
    oc.tx_event = "prepared"


class Participants:
    def __init__(self, targets: Targets) -> None:
        self._targets = targets

    async def control(self, oc: planner.Outcome, locks: keylocks.KeyLocks) -> None:
        """A decision for a prepared key of this partition, or an inquiry to a coordinator's key."""
        msg = oc.invocation.message
        assert msg.tx is not None  # routed CONTROL: a decision or inquiry, which carries its transaction
        if msg.handler == constants.INQUIRE_HANDLER:
            await self._answer_inquiry(oc, locks)
            return
        staged = locks.prepared.get(msg.key)
        if staged is None or staged.tx.id != msg.tx.id:
            oc.tx_event = "stale"  # decided already, or it never prepared (it voted no, or died)
            return
        oc.decided = staged
        if msg.handler == constants.ABORT_HANDLER:
            oc.tx_event = "aborted"
            return
        oc.tx_event = "committed"
        oc.state = {(msg.key, name): value for name, value in staged.state.items()}
        for s in staged.sends:
            if s.due_ms:
                oc.delayed.append((s.due_ms, s.function, s.message))
            else:
                oc.sends.append(assembly.Send(layout.PartitionId(layout.FunctionType.parse(s.function), s.partition),
                                             s.message))

    async def _answer_inquiry(self, oc: planner.Outcome, locks: keylocks.KeyLocks) -> None:
        """Presumed abort: a coordinator that is not running the transaction any more answers abort.

        If it decided commit, that decision went out on the same ordered channel before this
        answer, so the participant has applied it and ignores the abort.
        """
        msg = oc.invocation.message
        assert msg.tx is not None  # an inquiry
        record = locks.suspended.get(msg.key)
        if record is not None and record.tx is not None and record.tx.id == msg.tx.id:
            oc.tx_event = "inquiry_pending"  # still undecided: the participant asks again later
            return
        oc.tx_event = "inquiry_abort"
        await self._send_abort(oc, msg.args["function"], msg.args["key"], msg.tx)

    async def release_orphan(self, oc: planner.Outcome) -> None:
        """A yes vote its coordinator no longer waits for (it timed out, or ended): release that participant."""
        msg = oc.invocation.message
        prepared = msg.args.get("prepared") if msg.is_response else None
        if not prepared or not isinstance(msg.args.get("reply"), bytes):
            return
        try:
            voted_yes = envelope.Reply.decode(msg.args["reply"]).ok
            function, key, plain = prepared
            tx = wire.TxInfo.from_plain(plain)
        except (errors.CodecError, TypeError, ValueError) as exc:
            _log.warning("a malformed vote for %r (%s); nothing to release", msg.key, exc)
            return
        if not voted_yes or tx is None:
            return
        oc.tx_event = "orphan_abort"
        await self._send_abort(oc, function, key, tx)

    async def inquire(self, oc: planner.Outcome, timer: items.InquiryTimer, locks: keylocks.KeyLocks) -> None:
        """A prepared key's timer: still no decision, so ask the coordinator and wait another timeout."""
        staged = locks.prepared.get(timer.key)
        if staged is None or staged.tx.id != timer.tx_id:
            return  # decided meanwhile: deleting the timer is all
        tx = staged.tx
        oc.prepare = dataclasses.replace(staged, timer=b"")  # re-armed by this commit
        oc.tx_event = "inquired"
        fn = self._targets.fn
        inquiry = envelope.tx_control_message(constants.INQUIRE_HANDLER, tx, tx.key, origin=f"{fn}:{timer.key}",
                                               traceparent=None, args={"function": str(fn), "key": timer.key})
        try:
            oc.sends.append(assembly.Send(await self._targets.target(tx.function, tx.key), inquiry))
        except (errors.UnknownFunction, errors.InvalidFunctionType) as exc:
            _log.error("%s(%r) is prepared for %s, whose coordinator cannot be reached (%s); it stays locked",
                       fn, timer.key, tx.id, exc)

    async def _send_abort(self, oc: planner.Outcome, function: str, key: str, tx: wire.TxInfo) -> None:
        msg = oc.invocation.message
        abort = envelope.tx_control_message(constants.ABORT_HANDLER, tx, key, origin=f"{self._targets.fn}:{msg.key}",
                                             traceparent=msg.traceparent)
        oc.sends.append(assembly.Send(await self._targets.target(function, key), abort))
