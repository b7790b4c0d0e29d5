"""Functions for the e2e suite's and bench.k8s's pods (``statefn serve e2e.apps:app`` in the test agent).

``work`` takes a little time per invocation so that a burst builds lag the autoscaler can see; it
counts per key so exactness is checked after scaling, deletions and restarts. Several function
types share the code so each suite (and the bench's floor) has streams and state of its own.
"""

from __future__ import annotations

import asyncio
import time

import statefn
from statefn import Context, StatefulFunction


def slow_function(name: str) -> StatefulFunction:
    fn = StatefulFunction(name)
    count = fn.state("count", int, default=0)

    @fn.handler
    async def work(ctx: Context, ms: int = 20) -> int:
        await asyncio.sleep(ms / 1000)
        ctx[count] += 1
        return ctx[count]

    return fn


def timers_function(name: str) -> StatefulFunction:
    """Every kind of timer, each recording when it fired (``fired``: label -> Unix time) for a lateness check."""
    fn = StatefulFunction(name)
    fired = fn.state("fired", dict[str, float], default={})

    def record(ctx: Context, label: str) -> None:
        ctx[fired] = {**ctx[fired], label: time.time()}

    @fn.handler
    async def nap(ctx: Context, seconds: float) -> None:
        await ctx.sleep(seconds)
        record(ctx, "sleep")

    @fn.handler
    async def later(ctx: Context, seconds: float) -> None:
        ctx.send(ctx.function, ctx.key, "mark", delay=seconds, label="delayed")

    @fn.handler
    async def mark(ctx: Context, label: str) -> None:
        record(ctx, label)

    @fn.handler
    async def flaky(ctx: Context, seconds: float) -> None:
        if ctx.attempt == 1:
            raise statefn.Retry("not yet", after=seconds)
        record(ctx, "retry")

    @fn.handler
    async def abandon(ctx: Context, participant: str, tx_timeout: float) -> None:
        """Prepares ``participant``, then fails without deciding: the participant inquires after the timeout."""
        async with ctx.transaction(timeout=tx_timeout) as tx:
            await tx.call(ctx.function, participant, "mark", label="prepared")
            await tx.call("nowhere/missing", "k", "h")

    return fn


app = statefn.App(*(slow_function(name) for name in ("demo/slow", "bench/slow", "bench/floor")),
                  timers_function("demo/timers"))
