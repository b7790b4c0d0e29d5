"""Runs a batch of invocations against an App: the same code in embedded and remote mode.

Keys run concurrently; each key's invocations run strictly in order, each seeing the state the
previous successful one left. A failed invocation leaves no trace in state or messages.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import pydantic

from statefn import _context, _function, _tracecontext, _transaction
from statefn_core import codec, errors, wire

_log = logging.getLogger("statefn.runtime")
_CONFLICT_BACKOFF_S = 0.005


def _error(kind: str, exc: BaseException | str, *, retry: bool = False, after: float | None = None) -> wire.ErrorInfo:
    if isinstance(exc, BaseException):
        return wire.ErrorInfo(kind=kind, message=str(exc) or type(exc).__name__, type=type(exc).__name__,
                               retry=retry, retry_after=after)
    return wire.ErrorInfo(kind=kind, message=exc, retry=retry, retry_after=after)


def _validation_message(exc: pydantic.ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(body)"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


async def _invoke_one(
    fn: _function.StatefulFunction,
    key: str,
    stored: dict[str, bytes],
    inv: wire.Invocation,
    max_state_bytes: int,
    handler_timeout: float | None = None,
) -> wire.Result:
    spec = fn.handlers.get(inv.handler)
    if spec is None:
        return wire.Result(id=inv.id, error=_error(
            errors.ErrorKind.UNKNOWN_HANDLER,
            f"{fn.type} has no handler {inv.handler!r}; known handlers: {', '.join(sorted(fn.handlers))}",
        ))
    try:
        args = spec.args_model.model_validate(inv.args)
    except pydantic.ValidationError as exc:
        return wire.Result(id=inv.id, error=_error(
            errors.ErrorKind.INVALID_ARGUMENT, f"{fn.type}.{inv.handler}: {_validation_message(exc)}"))
    ctx = _context.Context(function=str(fn.type), key=key, specs=fn.states, stored=stored,
                           invocation_id=inv.id, attempt=inv.attempt, journal=inv.journal, participant=inv.prepare,
                           tx_age=inv.tx_age, chain=inv.chain, call_timeout=fn.call_timeout)
    kwargs = {name: getattr(args, name) for name in type(args).model_fields}
    limit = handler_timeout or fn.handler_timeout
    deadline = asyncio.timeout(limit)
    try:
        with _tracecontext.activated(inv.traceparent):
            async with deadline:
                if spec.is_async:
                    out = await spec.fn(ctx, **kwargs)
                else:  # off the event loop: a blocking handler must not stall every other key
                    out = await asyncio.to_thread(spec.fn, ctx, **kwargs)
        reply = codec.pack(codec.to_plain(out))
        changes = ctx._changes(max_state_bytes)
    except TimeoutError as exc:
        if not deadline.expired():
            _log.warning("%s(%r).%s failed (attempt %d)", fn.type, key, inv.handler, inv.attempt, exc_info=exc)
            return _failed(ctx, inv, _error(errors.ErrorKind.HANDLER, exc))
        _log.warning("%s(%r).%s ran past its timeout of %gs (attempt %d); abandoned", fn.type, key, inv.handler,
                     limit, inv.attempt)
        return _failed(ctx, inv, _error(
            errors.ErrorKind.HANDLER_TIMEOUT,
            f"{fn.type}.{inv.handler} ran past its timeout of {limit:g}s and was abandoned", retry=True))
    except errors.Suspended:
        if ctx._waiting is None:  # raised by hand, not by awaiting a call: nothing would ever resume it
            return _failed(ctx, inv, _error(errors.ErrorKind.HANDLER, "Suspended raised outside an awaited call"))
        return wire.Result(id=inv.id, calls=ctx._calls, waiting=ctx._waiting,
                            sends=ctx._sends_before_wait(inv.sends_done), journal_added=ctx._recorded,
                            transactions=ctx._decided)
    except errors.Retry as exc:
        return _failed(ctx, inv, _error(errors.ErrorKind.HANDLER, exc, retry=True, after=exc.after))
    except errors.StateTooLarge as exc:
        return _failed(ctx, inv, _error(errors.ErrorKind.STATE_TOO_LARGE, exc))
    except errors.TransactionAborted as exc:
        # Restartable: run again from scratch by the sidecar once the key is unlocked; else terminal. The
        # transaction it gave way to is usually decided already, its decision on the way: try again soon.
        after = _CONFLICT_BACKOFF_S * 2 ** min(inv.attempt - 1, 8) * random.uniform(0.5, 1.0)
        return _failed(ctx, inv, wire.ErrorInfo(kind=exc.kind, message=str(exc), type=type(exc).__name__,
                                                 retry=ctx._restartable(exc), retry_after=after))
    except Exception as exc:
        _log.warning("%s(%r).%s failed (attempt %d)", fn.type, key, inv.handler, inv.attempt, exc_info=exc)
        return _failed(ctx, inv, _error(errors.ErrorKind.HANDLER, exc))
    if ctx._waiting is not None:  # it caught the unwinding at an unanswered call: it is suspended all the same
        return wire.Result(id=inv.id, calls=ctx._calls, waiting=ctx._waiting,
                            sends=ctx._sends_before_wait(inv.sends_done), journal_added=ctx._recorded,
                            transactions=ctx._decided)
    if ctx._calls:
        _log.warning("%s(%r).%s returned without awaiting %d call(s); they are not made", fn.type, key,
                     inv.handler, len(ctx._calls))
    return wire.Result(id=inv.id, reply=reply, state=changes, sends=ctx._sends[inv.sends_done:],
                        transactions=ctx._decided)


def _failed(ctx: _context.Context, inv: wire.Invocation, error: wire.ErrorInfo) -> wire.Result:
    """A failed invocation drops its effects, but not the decisions of transactions it ended.

    Prepared participants wait for them; the sidecar keeps them when the failure is terminal
    (a retried attempt makes the same decision again, from the same journal).
    """
    decisions = [s for s in ctx._sends[inv.sends_done:] if s.tx is not None and s.purpose != _transaction.PREPARE]
    return wire.Result(id=inv.id, error=error, sends=decisions, transactions=ctx._decided,
                       began_tx=ctx._tx_count > 0)


async def _run_key(app: _function.App, req: wire.KeyRequest, max_state_bytes: int,
                   handler_timeout: float | None) -> list[wire.Result]:
    fn = app.functions.get(req.function)
    if fn is None:
        msg = f"this app does not serve {req.function}; it serves: {', '.join(sorted(app.functions))}"
        return [wire.Result(id=i.id, error=_error(errors.ErrorKind.UNKNOWN_FUNCTION, msg)) for i in req.invocations]
    stored = dict(req.state)
    results: list[wire.Result] = []
    locked = False
    for inv in req.invocations:
        if locked:
            # The key is locked by the invocation that suspended (or prepared): the rest wait for it, in order.
            results.append(wire.Result(id=inv.id, deferred=True))
            continue
        result = await _invoke_one(fn, req.key, stored, inv, max_state_bytes, handler_timeout)
        locked = result.waiting >= 0 or (inv.prepare and result.error is None)
        if result.error is None and not inv.prepare:  # a prepare's changes are staged until the decision
            for name, value in result.state.items():
                if value is None:
                    stored.pop(name, None)
                else:
                    stored[name] = value
        results.append(result)
    return results


async def execute(app: _function.App, request: wire.BatchRequest) -> wire.BatchResponse:
    """Run one batch; never raises for handler errors (they are results)."""
    results: list[Any] = await asyncio.gather(
        *(_run_key(app, k, request.max_state_bytes, request.handler_timeout) for k in request.keys)
    )
    return wire.BatchResponse(results=results)
