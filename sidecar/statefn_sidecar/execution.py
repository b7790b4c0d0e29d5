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

from statefn import _envelope, _errors, _naming, _wire
from statefn_sidecar import invoker as invoker_mod
from statefn_sidecar import items, metrics, observe, planner, statecache

_log = logging.getLogger("statefn.execution")


class Router(Protocol):
    async def partitions(self, function: str) -> int: ...


@dataclasses.dataclass(frozen=True)
class Policy:
    max_attempts: int
    backoff_initial: float
    backoff_max: float

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> Policy:
        return cls(int(desc["max_attempts"]), float(desc["backoff_initial"]), float(desc["backoff_max"]))

    def backoff(self, attempt: int) -> float:
        return float(min(self.backoff_max, self.backoff_initial * (2 ** (attempt - 1))))


class Executor:
    """One per function type; shared by that function's partitions."""

    def __init__(self, fn: _naming.FunctionType, partition_count: int, invoker: invoker_mod.Invoker,
                 policy: Policy, router: Router, max_state_bytes: int) -> None:
        self.fn = fn
        self._partition_count = partition_count
        self._invoker = invoker
        self.policy = policy
        self._router = router
        self._max_state_bytes = max_state_bytes
        self.metrics = metrics.FunctionMetrics(str(fn))

    async def run(self, batch: list[items.Item], cache: statecache.StateCache,
                  partition: int) -> list[planner.Outcome]:
        outcomes = [planner.Outcome(item=it) for it in batch]
        observe.start_invocations(outcomes, str(self.fn), partition)
        by_key: dict[str, list[planner.Outcome]] = {}
        for oc in outcomes:
            if oc.item.kind in items.RUNNABLE:
                assert oc.item.message is not None
                by_key.setdefault(oc.item.message.key, []).append(oc)
        if by_key:
            await cache.load(list(by_key))
            request = _wire.BatchRequest(
                keys=[
                    _wire.KeyRequest(
                        function=str(self.fn), key=key, state=dict(cache.get(key)),
                        invocations=[self._invocation(oc) for oc in ocs],
                    )
                    for key, ocs in by_key.items()
                ],
                max_state_bytes=self._max_state_bytes,
            )
            response = await self._call(request)
            for (key, ocs), results in zip(by_key.items(), response.results, strict=True):
                for oc, result in zip(ocs, results, strict=True):
                    await self._decide(oc, key, result)
        for oc in outcomes:
            item = oc.item
            if item.kind is items.Kind.DELAYED_SEND:
                assert item.message is not None and item.target_function is not None
                target = await self._target(item.target_function, item.message.key)
                oc.sends.append(planner.Send(target, item.message))
            elif item.kind is items.Kind.DEAD:
                assert item.dead is not None
                err = _wire.ErrorInfo(kind=_errors.KIND_UNDECODABLE,
                                      message=f"cannot decode the message: {item.dead['reason']}")
                oc.fail(err, planner.dead_letter_record(self.fn, -1, item, err))
        return outcomes

    def _invocation(self, oc: planner.Outcome) -> _wire.Invocation:
        msg = oc.item.message
        assert msg is not None
        # The handler runs in its invoke span's context (if traced), so the spans it starts nest under it.
        traceparent = msg.traceparent if oc.span is None else observe.traceparent_of(oc)
        return _wire.Invocation(id=oc.item.id, handler=msg.handler, args=msg.args, attempt=msg.attempt,
                                origin=msg.origin, traceparent=traceparent)

    async def _call(self, request: _wire.BatchRequest) -> _wire.BatchResponse:
        delay = 0.1
        while True:
            try:
                return await self._invoker.execute(request)
            except invoker_mod.InvokerUnavailable as exc:
                _log.warning("%s: %s; retrying in %.1fs (nothing acked)", self.fn, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _target(self, function: str, key: str) -> _naming.PartitionId:
        ftype = _naming.FunctionType.parse(function)
        count = self._partition_count if ftype == self.fn else await self._router.partitions(function)
        return _naming.PartitionId(ftype, _naming.partition_of(key, count))

    async def _decide(self, oc: planner.Outcome, key: str, result: _wire.Result) -> None:
        item = oc.item
        assert item.message is not None
        err = result.error
        if err is None:
            try:
                for s in result.sends:
                    message = _envelope.Message(
                        key=s.key, handler=s.handler, args=s.args, origin=f"{self.fn}:{key}",
                        traceparent=s.traceparent or item.message.traceparent)
                    if not s.traceparent:
                        message.traceparent = observe.send_traceparent(oc, message, s.function, s.delay or 0.0)
                    if s.delay:
                        oc.delayed.append((int((time.time() + s.delay) * 1000), s.function, message))
                    else:
                        oc.sends.append(planner.Send(await self._target(s.function, s.key), message))
            except (_errors.UnknownFunction, _errors.InvalidFunctionType) as exc:
                err = _wire.ErrorInfo(kind=_errors.KIND_UNKNOWN_FUNCTION, message=str(exc))
            else:
                oc.state = {(key, name): value for name, value in result.state.items()}
                oc.reply = _envelope.Reply(ok=True, value=result.reply)
                return
        if err.retry and item.message.attempt < self.policy.max_attempts:
            after = err.retry_after if err.retry_after is not None else self.policy.backoff(item.message.attempt)
            oc.retry_at_ms = int((time.time() + after) * 1000)
            return
        if err.retry:
            err = _wire.ErrorInfo(
                kind=_errors.KIND_RETRIES_EXHAUSTED, type=err.type,
                message=f"gave up after {item.message.attempt} attempts: {err.message}")
        oc.fail(err, planner.dead_letter_record(self.fn, -1, item, err))
