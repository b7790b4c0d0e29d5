"""Runs a batch's items through the function code and decides each one's outcome.

Retry decisions live here: a handler that raised ``statefn.Retry`` gets a timer (attempt + 1,
exponential backoff) until the function's ``max_attempts``; then, like any terminal error, the
caller gets the error and the message goes to the dead-letter subject.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Protocol

from statefn_core import backoff, constants, envelope, errors, layout, wire
from statefn_sidecar import (
    assembly,
    deadletters,
    decisions,
    items,
    keylocks,
    metrics,
    observe,
    participants,
    statecache,
    suspension,
)
from statefn_sidecar import invoker as invoker_mod

_log = logging.getLogger("statefn.execution")
# What a batch may take beyond its handlers' timeouts (transport, decoding) before the function server is
# taken for hung.
_INVOKER_GRACE_S = 30.0


class Router(Protocol):
    async def partitions(self, function: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Policy:
    max_attempts: int
    backoff_initial: float
    backoff_max: float
    handler_timeout: float = constants.DEFAULT_HANDLER_TIMEOUT_S

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> Policy:
        return cls(int(desc["max_attempts"]), float(desc["backoff_initial"]), float(desc["backoff_max"]),
                   float(desc.get("handler_timeout", constants.DEFAULT_HANDLER_TIMEOUT_S)))

    def backoff(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_initial * (2 ** (attempt - 1))))


class Executor:
    """One per function type; shared by that function's partitions."""

    def __init__(self, fn: layout.FunctionType, partition_count: int, invoker: invoker_mod.Invoker,
                 policy: Policy, router: Router, max_state_bytes: int) -> None:
        self.fn = fn
        self._partition_count = partition_count
        self._invoker = invoker
        self.policy = policy
        self._router = router
        self._max_state_bytes = max_state_bytes
        self.metrics = metrics.FunctionMetrics(str(fn))
        self._participants = participants.Participants(self)

    async def run(self, batch: list[items.Item], cache: statecache.StateCache, partition: int,
                  locks: keylocks.KeyLocks) -> tuple[list[decisions.Outcome], list[items.Item]]:
        """Run one round: the batch up to its first item routed ``LATER``; returns the outcomes and the rest.

        The rest waits for this round's commit, so that it is routed against what that commit wrote.
        """
        outcomes: list[decisions.Outcome] = []
        by_key: dict[str, list[decisions.Outcome]] = {}
        control: list[decisions.Outcome] = []
        cancelled: set[bytes] = set()  # call timeout timers of invocations resumed in this round
        later: list[items.Item] = []
        locks.start_round()
        for i, item in enumerate(batch):
            route = locks.route(item)
            if route is keylocks.Route.LATER:
                later = batch[i:]
                break
            oc = decisions.Outcome(item=item)
            outcomes.append(oc)
            if not isinstance(item, items.Invocation):  # routed OWN: handled below, after the handlers
                continue
            if item.message.caller is not None and item.resume is None:
                await self._check_caller(item.message)
            if route is keylocks.Route.RUN:
                if item.message.journal_ref and item.resume is None and item.journal is None:
                    err = wire.ErrorInfo(kind=errors.ErrorKind.INVALID_ARGUMENT, message=(
                        "the journal this replay resumes from is gone (expired, or replayed already); "
                        "replay it from the start with --repeat-steps"))
                    oc.decision = decisions.Failed(err, deadletters.record(self.fn, -1, item, err))
                    continue
                by_key.setdefault(item.message.key, []).append(oc)
                if item.resume is not None and item.resume.answered_timer:
                    cancelled.add(item.resume.answered_timer)
            elif route is keylocks.Route.NOTE:
                assert item.resume is not None
                if item.resume.answered_timer:
                    cancelled.add(item.resume.answered_timer)
                progress = item.progress()
                assert progress is not None
                progress.waiting = item.resume.record.waiting  # still waiting for the call it awaits
                oc.decision = decisions.Noted(progress)
            elif route is keylocks.Route.QUEUE:
                oc.decision = decisions.Enqueued(locks.entry_for(item))
            elif route is keylocks.Route.DIE:
                oc.decision = participants.die(item, self.fn)
            elif route is keylocks.Route.CONTROL:
                control.append(oc)
            else:
                oc.decision = await self._participants.release_orphan(item)
        observe.start_invocations([*(oc for ocs in by_key.values() for oc in ocs), *control], str(self.fn), partition)
        for oc in control:
            oc.decision = await self._participants.control(oc.invocation, locks)
        if by_key:
            await cache.load(list(by_key))
            request = wire.BatchRequest(
                keys=[
                    wire.KeyRequest(
                        function=str(self.fn), key=key, state=participants.state_for(key, ocs, cache, locks),
                        invocations=[self._invocation(oc) for oc in ocs],
                    )
                    for key, ocs in by_key.items()
                ],
                max_state_bytes=self._max_state_bytes,
                handler_timeout=self.policy.handler_timeout,
            )
            response = await self._call(request)
            for (key, ocs), results in zip(by_key.items(), response.results, strict=True):
                for oc, result in zip(ocs, results, strict=True):
                    if result.deferred:
                        # Only plain messages share a key within a round (routing sends anything that reads
                        # the key's records LATER), so what waits is the message as it arrived.
                        assert oc.invocation.resume is None, "a resumed invocation was deferred"
                        oc.decision = decisions.Enqueued(locks.entry_for(oc.invocation))
                    else:
                        oc.decision = await self._decide(oc, key, result, partition, locks)
        for oc in outcomes:
            item = oc.item
            if isinstance(item, items.InquiryTimer):
                oc.decision = await self._participants.inquire(item, locks)
            elif isinstance(item, items.DelayedSend):
                if item.timer in cancelled:
                    continue  # a call's timeout whose reply came first: deleting the timer is all
                target = await self.target(item.target_function, item.message.key)
                oc.decision = decisions.Fired(decisions.Changes(sends=[assembly.Send(target, item.message)]))
            elif isinstance(item, items.Undecodable):
                err = wire.ErrorInfo(kind=errors.ErrorKind.UNDECODABLE,
                                     message=f"cannot decode the message: {item.reason}")
                oc.decision = decisions.Failed(err, deadletters.record(self.fn, -1, item, err))
        return outcomes, later

    def _invocation(self, oc: decisions.Outcome) -> wire.Invocation:
        item = oc.invocation
        msg = item.message
        # The handler runs in its invoke span's context (if traced), so the spans it starts nest under it.
        traceparent = msg.traceparent if oc.span is None else observe.traceparent_of(oc)
        progress = item.progress()
        if progress is None:
            return wire.Invocation(id=item.id, handler=msg.handler, args=msg.args, attempt=msg.attempt,
                                    origin=msg.origin, traceparent=traceparent, prepare=msg.is_prepare,
                                    tx_age=msg.tx_age, chain=msg.chain)
        return wire.Invocation(id=progress.invocation_id, handler=msg.handler, args=msg.args, attempt=msg.attempt,
                                origin=msg.origin, traceparent=traceparent, journal=progress.journal,
                                sends_done=progress.sends_done, tx_age=msg.tx_age, chain=msg.chain)

    async def _call(self, request: wire.BatchRequest) -> wire.BatchResponse:
        """The batch's results, waiting for the function server if it is down (nothing is acked meanwhile).

        A batch gets as long as its longest key's handlers may take, one after another, plus a grace:
        past it the function server is taken for hung (the request is dropped, and ``statefn serve``
        cancels its handlers) and the batch is sent again. A server that answers with no results
        (an error status, a malformed answer) fails the batch's invocations instead of stalling it.
        """
        per_key = max(len(k.invocations) for k in request.keys)
        budget = self.policy.handler_timeout * per_key + _INVOKER_GRACE_S

        async def attempt() -> wire.BatchResponse:
            try:
                async with asyncio.timeout(budget):
                    return await self._invoker.execute(request)
            except TimeoutError:
                raise invoker_mod.InvokerUnavailable(f"no answer to a batch within {budget:g}s") from None

        try:
            return await backoff.until_done(attempt, transient=invoker_mod.unavailable, first=0.1, cap=5.0, log=_log,
                                            what=f"{self.fn}: running a batch")
        except invoker_mod.InvokerRefused as exc:
            _log.error("%s: %s; the batch's invocations fail", self.fn, exc)
            error = wire.ErrorInfo(kind=errors.ErrorKind.HANDLER, type="FunctionServerError", message=str(exc),
                                   retry=True)
            return wire.BatchResponse(results=[[wire.Result(id=i.id, error=error) for i in k.invocations]
                                               for k in request.keys])

    async def _check_caller(self, msg: envelope.Message) -> None:
        """A reply goes to its caller's partition on a channel: one that names no partition of a function
        that exists could never be published (its outbox would retry it forever), so it is not sent."""
        caller = msg.caller
        assert caller is not None
        try:
            count = (self._partition_count if caller.function == str(self.fn)
                     else await self._router.partitions(caller.function))
            ok = isinstance(caller.partition, int) and 0 <= caller.partition < count
        except (errors.UnknownFunction, errors.InvalidFunctionType):
            ok = False
        if not ok:
            _log.warning("%s(%r).%s names a caller that does not exist (%s#%s); it runs, its reply is not sent",
                         self.fn, msg.key, msg.handler, caller.function, caller.partition)
            msg.caller = None

    async def target(self, function: str, key: str) -> layout.PartitionId:
        ftype = layout.FunctionType.parse(function)
        count = self._partition_count if ftype == self.fn else await self._router.partitions(function)
        return layout.PartitionId(ftype, layout.partition_of(key, count))

    async def _decide(self, oc: decisions.Outcome, key: str, result: wire.Result, partition: int,
                      locks: keylocks.KeyLocks) -> decisions.Decision:
        item = oc.invocation
        err = result.error
        oc.tx_decisions = [outcome for _, outcome in result.transactions]  # for the coordinator's metrics
        if err is None:
            try:
                changes = decisions.Changes()
                await self._add_sends(oc, changes, key, result.sends)
                if result.waiting >= 0:
                    return await self._suspend(oc, changes, key, result, partition)
            except (errors.UnknownFunction, errors.InvalidFunctionType) as exc:
                err = wire.ErrorInfo(kind=errors.ErrorKind.UNKNOWN_FUNCTION, message=str(exc))
            except errors.InvalidCall as exc:
                err = wire.ErrorInfo(kind=errors.ErrorKind.HANDLER, message=str(exc), type=type(exc).__name__)
            else:
                reply = envelope.Reply(ok=True, value=result.reply)
                if item.message.is_prepare:
                    return participants.stage(item, reply, changes, result.state, locks)
                changes.state = {(key, name): value for name, value in result.state.items()}
                return decisions.Replied(reply, changes)
        restart = err.kind in (errors.ErrorKind.TX_CONFLICT, errors.ErrorKind.TX_TIMEOUT)  # only ever with retry set
        if err.retry and item.message.attempt < self.policy.max_attempts:
            after = err.retry_after if err.retry_after is not None else self.policy.backoff(item.message.attempt)
            at_ms = int((time.time() + after) * 1000)
            if restart:  # from scratch once its key is unlocked (no suspension record), its decisions sent
                return decisions.Retrying(at_ms, restart=True, effects=await self._decisions_made(oc, key, result))
            # From its journal (the reply in hand journaled for the next attempt), or from the start; either
            # way the next attempt makes its decisions again.
            oc.tx_decisions = []
            return decisions.Retrying(at_ms, journal=item.progress())
        if err.retry:  # a timeout stays one (the caller may treat it apart); statefn.Retry's are exhausted retries
            kind = err.kind if err.kind == errors.ErrorKind.HANDLER_TIMEOUT else errors.ErrorKind.RETRIES_EXHAUSTED
            err = wire.ErrorInfo(kind=kind, type=err.type,
                                 message=f"gave up after {item.message.attempt} attempts: {err.message}")
        return decisions.Failed(err, deadletters.record(self.fn, -1, item, err),
                                await self._decisions_made(oc, key, result), resumable=not result.began_tx)

    async def _decisions_made(self, oc: decisions.Outcome, key: str, result: wire.Result) -> decisions.Changes:
        """A failed run's effects are dropped, but not the decisions of transactions it ended.

        Prepared participants wait for them. (A run retried from its journal makes them again instead.)
        """
        changes = decisions.Changes()
        try:
            await self._add_sends(oc, changes, key,
                                  [s for s in result.sends if s.handler in constants.TX_CONTROL_HANDLERS])
        except (errors.UnknownFunction, errors.InvalidFunctionType) as exc:
            _log.error("%s(%r): a transaction decision has no route (%s); its participants will ask", self.fn,
                       key, exc)
        return changes

    async def _add_sends(self, oc: decisions.Outcome, changes: decisions.Changes, key: str,
                         sends: list[wire.Outgoing]) -> None:
        for s in sends:
            message = self._outgoing(oc, key, s, s.purpose or "send")  # tx.commit, tx.abort: decisions
            if s.delay:
                changes.delayed.append(decisions.Delayed(int((time.time() + s.delay) * 1000), s.function, message))
            else:
                changes.sends.append(assembly.Send(await self.target(s.function, s.key), message))

    def _outgoing(self, oc: decisions.Outcome, key: str, out: wire.Outgoing, verb: str) -> envelope.Message:
        message = envelope.Message(key=out.key, handler=out.handler, args=out.args, origin=f"{self.fn}:{key}",
                                    traceparent=out.traceparent or oc.invocation.message.traceparent, tx=out.tx)
        if not out.traceparent:
            message.traceparent = observe.send_traceparent(oc, message, out.function, out.delay or 0.0, verb)
        return message

    async def _suspend(self, oc: decisions.Outcome, changes: decisions.Changes, key: str, result: wire.Result,
                       partition: int) -> decisions.Suspended:
        """The handler waits at a call: send the calls it made (replies addressed to this key), record where it is."""
        item = oc.invocation
        record = item.progress() or suspension.Suspension(item.id, item.message)
        record.sends_done += len(result.sends)
        record.journal.extend(result.journal_added)  # ctx.run/ctx.now results and the calls made, in order
        for call in result.calls:
            call_id = record.call_id(call.index)
            record.journal[_slot_of(record.journal, call)] = wire.outstanding_entry(call.function, call.key,
                                                                                    call.handler)
            sleeping = call.handler == constants.SLEEP_HANDLER  # ctx.sleep: no message; the timer answers it
            record.calls[call_id] = suspension.Outstanding(timeout=call.timeout or 0.0, sleeping=sleeping, tx=call.tx)
            if sleeping:
                continue
            # The span says what the call is for: saga.step, saga.compensate, tx.prepare.
            message = self._outgoing(oc, key, call, call.purpose or "call")
            message.caller = envelope.CallerAddress(str(self.fn), partition, key, call_id)
            message.chain = [*item.message.chain, [str(self.fn), key]]  # who waits on the callee, for cycles
            changes.sends.append(assembly.Send(await self.target(call.function, call.key), message))
        record.waiting = record.call_id(result.waiting)
        if record.waiting not in record.calls:
            raise errors.InvalidCall(f"{self.fn}({key!r}) suspended at step {result.waiting}, which is no call "
                                     "in flight")
        # Inside a transaction, its coordinator holds this key for it (wait-die).
        record.tx = next((call.tx for call in record.calls.values() if call.tx is not None), None)
        return decisions.Suspended(record, changes)


def _slot_of(journal: list[bytes], call: wire.Outgoing) -> int:
    """The journal slot a call made by this run takes: a new one naming it, or a dead journal's redo slot.

    Checked, because a function server answers over HTTP: a call that points anywhere else would
    overwrite a finished step or never be answered.
    """
    index = call.index
    slot = journal[index] if isinstance(index, int) and 0 <= index < len(journal) else None
    if slot is not None and (wire.is_redo(slot) or wire.outstanding_call(slot) == (call.function, call.key,
                                                                                    call.handler)):
        return index
    raise errors.InvalidCall(f"a call to {call.function}({call.key!r}).{call.handler} names journal slot "
                             f"{call.index}, which is not its own")
