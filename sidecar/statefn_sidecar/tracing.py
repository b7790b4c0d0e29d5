"""OpenTelemetry tracing of ingress, invocations, sends and commits, configured by ``OTEL_*``.

Tracing is off unless the environment names an OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or sets ``OTEL_TRACES_EXPORTER=otlp|console``;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off. Off means ``TRACER`` is
None and the hot path pays one ``is None`` test per batch: no no-op spans, no context objects.
That is deliberate: a default OTLP exporter pointed at a collector that is not there would log
export failures forever, and no-op spans still cost microseconds per invocation.

Everything else is the SDK's standard configuration, read by the SDK itself: the sampler
(``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``; default parentbased_always_on, so a
caller's sampling decision in ``traceparent`` is honoured), the exporter's endpoint, headers and
timeout, ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf`` by default, or ``grpc``), the batch
processor's limits, ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``.

The span tree of one request (context carried as W3C ``traceparent``: in the HTTP request, then
in each message's envelope, which survives the outbox, channel bundles and retries)::

    POST /v1/functions/...            gateway, SERVER
      invoke ns/a.handler             sidecar, CONSUMER (function, key, handler, attempt, partition)
        commit                        the etcd transaction that made its effects durable
        send ns/b                     PRODUCER, one per outgoing message
          invoke ns/b.handler         in whichever sidecar owns the target partition
            commit

A commit is one transaction for a whole batch; each sampled invocation in it gets its own
``commit`` child with the batch's timing and size, so every trace shows the commit that holds it.
"""

from __future__ import annotations

import logging
import os

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_log = logging.getLogger("statefn.tracing")
_PROPAGATOR = TraceContextTextMapPropagator()

# The tracer when tracing is on; None when off (the one thing the hot path checks).
TRACER: trace.Tracer | None = None
_PROVIDER: TracerProvider | None = None

# Attribute names (OpenTelemetry semantic conventions where one exists).
FUNCTION = "statefn.function"
KEY = "statefn.key"
HANDLER = "statefn.handler"
ATTEMPT = "statefn.attempt"
PARTITION = "statefn.partition"
OUTCOME = "statefn.outcome"
TARGET_FUNCTION = "statefn.target.function"
TARGET_KEY = "statefn.target.key"
DELAY = "statefn.delay_seconds"
COMMIT_INVOCATIONS = "statefn.commit.invocations"
COMMIT_BYTES = "statefn.commit.bytes"
COMMIT_OPS = "statefn.commit.ops"
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"


def _wanted() -> str | None:
    """The exporter the environment asks for: "otlp", "console", or None (tracing off)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if name == "none":
        return None
    if name in ("otlp", "console"):
        return name
    if name:
        _log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none): tracing stays off", name)
        return None
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return "otlp" if endpoint else None


def _otlp_exporter() -> SpanExporter:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not supported: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


def configure(default_service_name: str, *, install_global: bool = False) -> bool:
    """Turn tracing on if the environment asks for it (once per process); True when on.

    ``install_global``: also make it OpenTelemetry's global provider, so spans that handler code
    starts with ``trace.get_tracer(...)`` are exported the same way. Process entry points that
    run user code ask for it; the global provider can be set only once per process.
    """
    global TRACER, _PROVIDER
    if TRACER is not None:
        return True
    wanted = _wanted()
    if wanted is None:
        return False
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = _otlp_exporter() if wanted == "otlp" else ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _PROVIDER = provider
    TRACER = provider.get_tracer("statefn")
    if install_global:
        trace.set_tracer_provider(provider)
    _log.info("tracing on: %s exporter, service %s", wanted,
              provider.resource.attributes.get(SERVICE_NAME))
    return True


def shutdown() -> None:
    """Export what is buffered and turn tracing off (process exit, or a benchmark's next phase)."""
    global TRACER, _PROVIDER
    if _PROVIDER is not None:
        _PROVIDER.shutdown()
    TRACER = None
    _PROVIDER = None


def extract(traceparent: str | None) -> otel_context.Context | None:
    """The remote parent named by a W3C traceparent, or None for a root span."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def traceparent_of(span: trace.Span) -> str | None:
    """The W3C traceparent that makes ``span`` the parent of whatever receives it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")
