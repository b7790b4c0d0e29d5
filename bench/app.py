"""The functions the platform workloads drive: a keyed counter, a fan-out that sends to counters, and
a relay that makes a durable call to the counter of the same key and returns its reply, and a
booking that runs a two-step saga over counters, and a transfer that runs a transaction over two counters.

It is a module (not built inside a workload) because two kinds of child process import it by
name: the remote function server (``counter_remote``) and the sidecar whose memory is measured
(``memory_100k_keys``). The namespace comes from ``STATEFN_BENCH_NS`` so every workload of a run
gets its own stream and state.
"""

from __future__ import annotations

import asyncio
import os

import statefn
from statefn import Context, StatefulFunction

NS_ENV = "STATEFN_BENCH_NS"
FUNCTION_NAME = "counter"
HANDLER = "increment"
FANOUT_NAME = "fanout"
FANOUT_HANDLER = "fan"
RELAY_NAME = "relay"
RELAY_HANDLER = "forward"
SAGA_NAME = "booking"
SAGA_HANDLER = "book"
TX_NAME = "transfer"
TX_HANDLER = "move"
TX_PARALLEL_HANDLER = "move_both"


def function_type(namespace: str) -> str:
    return f"{namespace}/{FUNCTION_NAME}"


def fanout_type(namespace: str) -> str:
    return f"{namespace}/{FANOUT_NAME}"


def relay_type(namespace: str) -> str:
    return f"{namespace}/{RELAY_NAME}"


def saga_type(namespace: str) -> str:
    return f"{namespace}/{SAGA_NAME}"


def tx_type(namespace: str) -> str:
    return f"{namespace}/{TX_NAME}"


def fanout_keys(prefix: str, n: int) -> list[str]:
    """The counter keys one fan-out sends to; the workload checks exactly these afterwards."""
    return [f"{prefix}-{i}" for i in range(n)]


def make_app(namespace: str) -> statefn.App:
    counter = StatefulFunction(function_type(namespace))
    count = counter.state("count", int, default=0)

    @counter.handler
    async def increment(ctx: Context, by: int = 1) -> int:
        ctx[count] += by
        return ctx[count]

    # One invocation, N one-way messages to N counter keys: delivered exactly once after it commits.
    fanout = StatefulFunction(fanout_type(namespace))
    fanned = fanout.state("fanned", int, default=0)

    @fanout.handler
    async def fan(ctx: Context, prefix: str, n: int) -> int:
        for key in fanout_keys(prefix, n):
            ctx.send(function_type(namespace), key, HANDLER)
        ctx[fanned] += n
        return n

    # One durable call: suspends, the counter runs, the reply resumes it (three commits per call).
    relay = StatefulFunction(relay_type(namespace))

    @relay.handler
    async def forward(ctx: Context) -> int:
        reply: int = await ctx.call(function_type(namespace), ctx.key, HANDLER)
        return reply

    # A saga of two steps (the counter of this key, then of "<key>-b"), each with its compensation:
    # two durable calls, five commits; it returns the first counter's value.
    booking = StatefulFunction(saga_type(namespace))

    @booking.handler
    async def book(ctx: Context) -> int:
        async with ctx.saga() as saga:
            first: int = await saga.call(function_type(namespace), ctx.key, HANDLER, compensate=(HANDLER, {"by": -1}))
            await saga.call(function_type(namespace), f"{ctx.key}-b", HANDLER, compensate=(HANDLER, {"by": -1}))
        return first

    # A transaction over two counters (this key's, then "<key>-b"): two prepares, five commits before the
    # reply, then each participant's commit of the decision; it returns the first counter's value.
    transfer = StatefulFunction(tx_type(namespace))

    @transfer.handler
    async def move(ctx: Context) -> int:
        async with ctx.transaction() as tx:
            first: int = await tx.call(function_type(namespace), ctx.key, HANDLER)
            await tx.call(function_type(namespace), f"{ctx.key}-b", HANDLER)
        return first

    # The same transaction with both prepares in flight at once (parallel calls): four commits before the reply.
    @transfer.handler
    async def move_both(ctx: Context) -> int:
        async with ctx.transaction() as tx:
            first: int
            first, _ = await asyncio.gather(tx.call(function_type(namespace), ctx.key, HANDLER),
                                            tx.call(function_type(namespace), f"{ctx.key}-b", HANDLER))
        return first

    return statefn.App(counter, fanout, relay, booking, transfer)


app = make_app(os.environ.get(NS_ENV, "bench"))
