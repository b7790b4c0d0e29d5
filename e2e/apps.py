"""Functions for the e2e suite's pods (``statefn serve e2e.apps:app`` in the test agent).

``demo/slow`` takes a little time per invocation so that a burst builds lag the autoscaler can
see; it counts per key so exactness is checked after scaling, deletions and restarts.
"""

from __future__ import annotations

import asyncio

import statefn
from statefn import Context, StatefulFunction

slow = StatefulFunction("demo/slow")
count = slow.state("count", int, default=0)


@slow.handler
async def work(ctx: Context, ms: int = 20) -> int:
    await asyncio.sleep(ms / 1000)
    ctx[count] += 1
    return ctx[count]


app = statefn.App(slow)
