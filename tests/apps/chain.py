"""Two functions for the tracing test: ``front`` sends to ``back`` for each key it is given.

Hosted by two sidecar processes (one function each), so a trace crosses processes.
The namespace comes from ``STATEFN_TEST_NS``.
"""

from __future__ import annotations

import os

from opentelemetry import trace

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "chain")


# Handler code traces as any OpenTelemetry user does: through the global provider, which the
# statefn process running the handlers (`statefn sidecar --app`, `statefn serve`) sets from OTEL_*.
user_tracer = trace.get_tracer("chain")

front = StatefulFunction(f"{NAMESPACE}/front")
calls = front.state("calls", int, default=0)
back = StatefulFunction(f"{NAMESPACE}/back")
received = back.state("received", int, default=0)


@front.handler
async def spread(ctx: Context, keys: list[str]) -> int:
    ctx[calls] += 1
    for k in keys:
        ctx.send(str(back.type), k, "record", origin=ctx.key)
    return len(keys)


@front.handler
async def explode(ctx: Context) -> None:
    raise ValueError("front refuses")


@back.handler
async def record(ctx: Context, origin: str) -> int:
    with user_tracer.start_as_current_span("lookup", attributes={"origin": origin}):
        pass  # the user's own work, traced under the invocation
    ctx[received] += 1
    return ctx[received]


@front.handler
async def trip(ctx: Context, key: str) -> str:
    """A saga of one step that then fails: the step and its compensation show in the trace."""
    try:
        async with ctx.saga() as saga:
            await saga.call(str(back.type), key, "record", origin=ctx.key, compensate=("unrecord", {}))
            raise ValueError("no seat left")
    except ValueError:
        return "compensated"


@front.handler
async def move(ctx: Context, keys: list[str]) -> int:
    """A transaction over the front's own key and the back's keys: its phases show in the trace."""
    async with ctx.transaction() as tx:
        await tx.call(str(front.type), ctx.key, "count")
        for k in keys:
            await tx.call(str(back.type), k, "record", origin=ctx.key)
    return len(keys)


@front.handler
async def count(ctx: Context) -> int:
    ctx[calls] += 1
    return ctx[calls]


@back.handler
async def unrecord(ctx: Context) -> int:
    ctx[received] -= 1
    return ctx[received]


app = statefn.App(front, back)
