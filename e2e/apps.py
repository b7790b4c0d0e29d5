"""Functions for the e2e suite's and bench.k8s's pods (``statefn serve e2e.apps:app`` in the test agent).

``work`` takes a little time per invocation so that a burst builds lag the autoscaler can see; it
counts per key so exactness is checked after scaling, deletions and restarts. Several function
types share the code so each suite (and the bench's floor) has streams and state of its own.
"""

from __future__ import annotations

import asyncio

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


app = statefn.App(*(slow_function(name) for name in ("demo/slow", "bench/slow", "bench/floor")))
