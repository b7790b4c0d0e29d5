"""A real OTLP/HTTP trace receiver for tests and benchmarks: decodes what exporters send.

It speaks the protocol a collector speaks (POST /v1/traces, ``application/x-protobuf``,
optionally gzip) and decodes each request with the official ``opentelemetry-proto`` messages, so
a test sees exactly what a tracing backend would receive, resource attributes included.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

KINDS = {trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL", trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
         trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT", trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
         trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER"}


def _value(v: common_pb2.AnyValue) -> Any:
    field = v.WhichOneof("value")
    return None if field is None else getattr(v, field)


@dataclasses.dataclass
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int


class OtlpReceiver:
    """``with OtlpReceiver() as r:`` then point ``OTEL_EXPORTER_OTLP_ENDPOINT`` at ``r.endpoint``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:
                """What arrived so far, for a receiver in another process (``python -m tests.otlp_receiver``)."""
                with receiver._lock:
                    out = json.dumps({"spans": len(receiver.spans), "requests": receiver.requests}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(ReceivedSpan(
                        service=str(resource.get("service.name")), name=s.name, kind=KINDS.get(s.kind, "UNSPECIFIED"),
                        trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                        start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes}, status_code=s.status.code))
        with self._lock:
            self.requests += 1
            self.spans.extend(spans)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 20.0) -> list[ReceivedSpan]:
        """The spans received once ``predicate`` holds for them; TimeoutError with what arrived otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                listing = "\n".join(f"  {s.service} {s.kind} {s.name} {s.span_id}<-{s.parent_id}" for s in spans)
                raise TimeoutError(f"spans received after {timeout}s do not match:\n{listing}")
            time.sleep(0.05)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def main() -> None:
    """``python -m tests.otlp_receiver PORT``: a receiver in its own process, as a collector would be."""
    receiver = OtlpReceiver(port=int(sys.argv[1]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with receiver:
        signal.pause()


if __name__ == "__main__":
    main()
