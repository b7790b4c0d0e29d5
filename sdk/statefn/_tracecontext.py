"""The caller's trace context, so a traced service calling statefn continues its own trace.

Only the OpenTelemetry API is touched (no SDK): when the caller has no active span, or no
tracing at all, this is one context lookup and nothing is added to the message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def current_traceparent() -> str | None:
    """The W3C traceparent of the active span, or None when there is none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


@contextlib.contextmanager
def activated(traceparent: str | None) -> Iterator[None]:
    """Run a handler inside its invocation's trace context, so spans the handler starts are its children.

    The context is the sidecar's ``invoke`` span (or the caller's, when the sidecar does not
    trace). Without a traceparent nothing is attached.
    """
    if not traceparent:
        yield
        return
    token = context.attach(_PROPAGATOR.extract({"traceparent": traceparent}))
    try:
        yield
    finally:
        context.detach(token)
