"""Two functions for the tracing test: ``front`` sends to ``back`` for each key it is given.

Hosted by two sidecar processes (one function each), so a trace crosses processes.
The namespace comes from ``STATEFN_TEST_NS``.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "chain")


def _user_tracer() -> trace.Tracer:
    """The handlers' own tracing, as a user would set it up (a provider of their own, OTLP from OTEL_*)."""
    if not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return trace.get_tracer("chain")  # no-op
    provider = TracerProvider(resource=Resource.create({"service.name": "user-code"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("chain")


user_tracer = _user_tracer()

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


app = statefn.App(front, back)
