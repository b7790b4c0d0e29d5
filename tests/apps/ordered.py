"""A counter that also checks per-key order, for the crash and rebalancing suites.

The namespace comes from ``STATEFN_TEST_NS`` so each test gets its own function and stream.
"""

from __future__ import annotations

import asyncio
import os

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "chaos")

counter = StatefulFunction(f"{NAMESPACE}/counter")
count = counter.state("count", int, default=0)
last_seq = counter.state("last_seq", int, default=0)
violations = counter.state("violations", list[str], default=[])


@counter.handler
async def increment(ctx: Context, by: int = 1) -> int:
    ctx[count] += by
    return ctx[count]


@counter.handler
async def ordered(ctx: Context, seq: int) -> int:
    """Each key gets seq 1, 2, 3, ... in order; anything else is recorded as a violation."""
    if seq != ctx[last_seq] + 1:
        ctx[violations].append(f"got {seq} after {ctx[last_seq]}")
    ctx[last_seq] = max(seq, ctx[last_seq])
    ctx[count] += 1
    return ctx[count]


@counter.handler
async def slow_increment(ctx: Context, seconds: float) -> int:
    """Holds a batch in hand long enough for a test to pause the process mid-invocation."""
    await asyncio.sleep(seconds)
    ctx[count] += 1
    return ctx[count]


@counter.handler
async def increment_later(ctx: Context, target: str, after: float) -> None:
    """A delayed send: a timer in the sender's partition until it fires."""
    ctx.send(ctx.function, target, "increment", delay=after, by=1)


@counter.handler
async def fan_out(ctx: Context, keys: list[str]) -> None:
    """One message to each key: exercises channels and the outbox."""
    ctx[count] += 1
    for k in keys:
        ctx.send(ctx.function, k, "increment", by=1)


app = statefn.App(counter)
