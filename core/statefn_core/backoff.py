"""The one way statefn waits and tries again: exponential backoff, capped, logged, forever.

Every loop that outlasts an outage (connecting, committing an outcome of unknown fate,
publishing an outbox entry, reaching the function server) retries only what is transient and
says so in the log, built on tenacity rather than written again at each place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")


def retrying(*, transient: Callable[[BaseException], bool], first: float, cap: float, log: logging.Logger,
             what: str, level: int = logging.WARNING,
             on_retry: Callable[[], None] | None = None) -> tenacity.AsyncRetrying:
    """Retry ``transient`` failures without end, waiting ``first`` seconds, doubling up to ``cap``.

    Anything else is raised at once. Each wait is logged as ``<what> failed (<error>); retrying in
    <n>s``; ``on_retry`` counts them where a metric or a test wants to.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        _report(log, level, what, exc, state.next_action.sleep if state.next_action is not None else 0.0, on_retry)

    return tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(transient),
        wait=tenacity.wait_exponential(multiplier=first, min=first, max=cap),
        before_sleep=before_sleep,
        sleep=asyncio.sleep,
        reraise=True,
    )


async def until_done(call: Callable[[], Awaitable[T]], *, transient: Callable[[BaseException], bool], first: float,
                     cap: float, log: logging.Logger, what: str, level: int = logging.WARNING,
                     on_retry: Callable[[], None] | None = None) -> T:
    """``await call()`` under ``retrying(...)``: its first result that is not a transient failure.

    The first attempt is a plain await (this sits on the hot path, once per batch, commit and
    publish); tenacity takes over from the first transient failure, with the same waits.
    """
    try:
        return await call()
    except Exception as exc:
        if not transient(exc):
            raise
        _report(log, level, what, exc, first, on_retry)
    await asyncio.sleep(first)
    attempts = retrying(transient=transient, first=min(first * 2, cap), cap=cap, log=log, what=what, level=level,
                        on_retry=on_retry)

    async def attempt() -> T:  # a coroutine function, whatever ``call`` is (tenacity calls others synchronously)
        return await call()

    result: T = await attempts(attempt)
    return result


def _report(log: logging.Logger, level: int, what: str, exc: BaseException | None, wait: float,
            on_retry: Callable[[], None] | None) -> None:
    log.log(level, "%s failed (%s: %s); retrying in %.2fs", what, type(exc).__name__, exc, wait)
    if on_retry is not None:
        on_retry()
