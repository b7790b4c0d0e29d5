"""Tracing and metrics, observed from outside: spans as an OTLP receiver gets them, metrics as Prometheus scrapes.

One chain crosses three processes: the gateway, a sidecar hosting ``front`` and a sidecar hosting
``back``. Each is configured only by standard ``OTEL_*`` variables and exports over OTLP/HTTP to
a receiver that decodes the protobuf, as a collector would.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

import statefn
from statefn_sidecar import devservers, tracing
from tests import otlp_receiver, procs

APP = "tests.apps.chain:app"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAGA_TRACE = "5a6a0000000000000000000000005a6a"
TX_TRACE = "2bc00000000000000000000000002bc0"


def _otel_env(receiver: otlp_receiver.OtlpReceiver, service: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": service,
            "OTEL_BSP_SCHEDULE_DELAY": "100"}


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class Chain:
    def __init__(self, receiver: otlp_receiver.OtlpReceiver, namespace: str, gateway_port: int,
                 front: procs.SidecarProcess, back: procs.SidecarProcess) -> None:
        self.receiver = receiver
        self.namespace = namespace
        self.gateway_port = gateway_port
        self.front = front
        self.back = back

    def url(self, function: str, key: str, handler: str) -> str:
        return f"http://127.0.0.1:{self.gateway_port}/v1/functions/{self.namespace}/{function}/{key}/{handler}"


@pytest.fixture(scope="module")
def chain(nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> Iterator[Chain]:
    namespace = f"obs{os.getpid()}"
    with otlp_receiver.OtlpReceiver() as receiver:
        front = procs.SidecarProcess(APP, namespace, nats_server, etcd_server, partitions=2, max_attempts=1,
                                     functions=[f"{namespace}/front"], env=_otel_env(receiver, "sidecar-front"))
        back = procs.SidecarProcess(APP, namespace, nats_server, etcd_server, partitions=2,
                                    functions=[f"{namespace}/back"], env=_otel_env(receiver, "sidecar-back"))
        port = devservers.free_port()
        log = Path(tempfile.mkstemp(prefix="gateway-", suffix=".log")[1])
        gateway = None
        try:
            front.start()
            back.start()
            front.wait_ready()
            back.wait_ready()
            with open(log, "wb") as out:
                gateway = subprocess.Popen(
                    [str(Path(sys.executable).parent / "statefn"), "gateway", "--nats", nats_server.url,
                     "--etcd", etcd_server.endpoint, "--port", str(port)],
                    stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, **_otel_env(receiver, "gateway")))
            procs.wait_ready(gateway, port, log=log.read_text)
            yield Chain(receiver, namespace, port, front, back)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(10)
            for p in (front, back):
                p.terminate()
                p.cleanup()
            log.unlink(missing_ok=True)


def test_a_call_chain_is_one_trace_across_processes(chain: Chain) -> None:
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    status, body = _post(chain.url("front", "f1", "spread"), {"keys": ["b1", "b2"]}, {"traceparent": caller})
    assert (status, body) == (200, {"result": 2})

    def complete(spans: list[otlp_receiver.ReceivedSpan]) -> bool:
        """Every process exported its part: 1 ingress + front (invoke, commit, 2 sends) + 2 x back (invoke, lookup,
        commit). Each process exports on its own schedule, so the tree is read only once all of it arrived."""
        return sum(s.trace_id == CALLER_TRACE for s in spans) >= 1 + 4 + 6

    spans = [s for s in chain.receiver.wait_for(complete) if s.trace_id == CALLER_TRACE]
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[otlp_receiver.ReceivedSpan]] = {}
    for s in spans:
        children.setdefault(s.parent_id, []).append(s)

    # The gateway continues the caller's trace.
    (ingress,) = children[CALLER_SPAN]
    assert (ingress.service, ingress.kind) == ("gateway", "SERVER")
    assert ingress.name == "POST /v1/functions/{namespace}/{name}/{key}/{handler}"
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes[tracing.FUNCTION] == f"{chain.namespace}/front"

    # The invocation in the front sidecar, its commit, and one send per key.
    (invoke_front,) = children[ingress.span_id]
    assert (invoke_front.service, invoke_front.kind) == ("sidecar-front", "CONSUMER")
    assert invoke_front.name == f"invoke {chain.namespace}/front.spread"
    attrs = invoke_front.attributes
    assert (attrs[tracing.FUNCTION], attrs[tracing.KEY], attrs[tracing.HANDLER], attrs[tracing.ATTEMPT]) == \
        (f"{chain.namespace}/front", "f1", "spread", 1)
    assert attrs[tracing.PARTITION] in (0, 1)
    assert attrs[tracing.OUTCOME] == "ok"
    under_front = children[invoke_front.span_id]
    (commit_front,) = [s for s in under_front if s.name == "commit"]
    assert commit_front.attributes[tracing.COMMIT_INVOCATIONS] >= 1
    assert commit_front.attributes[tracing.COMMIT_BYTES] > 0
    assert commit_front.attributes[tracing.COMMIT_OPS] >= 3  # state, idempotency record, outbox entry
    sends = [s for s in under_front if s.kind == "PRODUCER"]
    assert sorted(s.attributes[tracing.TARGET_KEY] for s in sends) == ["b1", "b2"]
    assert {s.name for s in sends} == {f"send {chain.namespace}/back"}

    # Each send is the parent of the invocation it caused, in the other sidecar, with its own commit.
    for send in sends:
        (invoke_back,) = children[send.span_id]
        assert (invoke_back.service, invoke_back.kind) == ("sidecar-back", "CONSUMER")
        assert invoke_back.attributes[tracing.KEY] == send.attributes[tracing.TARGET_KEY]
        assert invoke_back.attributes[tracing.HANDLER] == "record"
        assert invoke_back.start_ns >= send.end_ns
        # The handler's own span (trace.get_tracer, the global provider) nests under the invocation, before the commit.
        (commit_back, lookup) = sorted(children[invoke_back.span_id], key=lambda s: s.name)
        assert (commit_back.name, lookup.name, lookup.service) == ("commit", "lookup", "sidecar-back")
        assert lookup.attributes["origin"] == "f1"
        assert invoke_back.start_ns <= lookup.start_ns <= lookup.end_ns <= commit_back.start_ns
        assert commit_back.end_ns <= invoke_back.end_ns

    # The whole tree and nothing else: 1 ingress + front (invoke, commit, 2 sends) + 2 x back (invoke, lookup, commit).
    assert len(spans) == 1 + 4 + 6, [f"{s.service} {s.name}" for s in spans]
    assert all(s.parent_id in by_id or s is ingress for s in spans)


def test_a_failing_invocation_is_an_error_span_and_counted(chain: Chain) -> None:
    status, body = _post(chain.url("front", "f2", "explode"), {})
    assert status == 500 and body["error"]["kind"] == "handler_error"

    def arrived(spans: list[otlp_receiver.ReceivedSpan]) -> bool:  # the invocation's span and its parent's
        explode = [s for s in spans if s.name.endswith("front.explode")]
        return bool(explode) and any(s.span_id == explode[0].parent_id for s in spans)

    spans = chain.receiver.wait_for(arrived)
    (span,) = [s for s in spans if s.name.endswith("front.explode")]
    assert span.attributes[tracing.OUTCOME] == "error"
    assert span.status_code == 2  # STATUS_CODE_ERROR
    # No traceparent from the caller: the gateway starts the trace.
    (ingress,) = [s for s in spans if s.span_id == span.parent_id]
    assert ingress.service == "gateway" and ingress.parent_id == ""


def test_metrics_count_what_happened(chain: Chain) -> None:
    front, back = f"{chain.namespace}/front", f"{chain.namespace}/back"
    for i in range(5):
        assert _post(chain.url("front", f"m{i}", "spread"), {"keys": [f"m{i}-a"]})[0] == 200
    assert _post(chain.url("nosuch", "k", "h"), {})[0] == 404
    # A re-sent request (same Idempotency-Key) is answered from its record, not run again.
    again = {"Idempotency-Key": "same-request"}
    assert _post(chain.url("front", "dup", "spread"), {"keys": []}, again) == (200, {"result": 0})
    assert _post(chain.url("front", "dup", "spread"), {"keys": []}, again) == (200, {"result": 0})

    deadline = time.monotonic() + 20
    while True:
        m_front, m_back = _scrape(chain.front.health_port), _scrape(chain.back.health_port)
        back_ok = m_back.get(("statefn_invocations_total", (("function", back), ("outcome", "ok"))), 0)
        if back_ok >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    fn = (("function", front),)
    # Earlier tests of this module: spread f1 (ok), explode f2 (error); here 5 + 1 spreads.
    assert m_front[("statefn_invocations_total", (("function", front), ("outcome", "ok")))] == 7
    assert m_front[("statefn_invocations_total", (("function", front), ("outcome", "error")))] == 1
    assert m_front[("statefn_dead_letters_total", fn)] == 1
    assert m_front[("statefn_invocation_duration_seconds_count", fn)] == 8
    assert m_front[("statefn_commit_batch_size_sum", fn)] == 8
    assert m_front[("statefn_duplicates_total", fn)] >= 1
    assert m_front[("statefn_partitions_owned", fn)] == 2
    assert back_ok == 2 + 5
    assert m_back[("statefn_partitions_owned", (("function", back),))] == 2

    gw = _scrape(chain.gateway_port)
    assert gw[("statefn_gateway_requests_total", (("code", "200"), ("function", front)))] == 1 + 5 + 2
    assert gw[("statefn_gateway_requests_total", (("code", "500"), ("function", front)))] == 1
    assert gw[("statefn_gateway_requests_total", (("code", "404"), ("function", "unknown")))] == 1
    assert gw[("statefn_gateway_request_duration_seconds_count", (("function", front),))] == 1 + 5 + 2 + 1


def test_saga_steps_and_compensations_are_spans(chain: Chain) -> None:
    """A saga across the two sidecars: its step and its compensation are PRODUCER spans of the caller's
    invocation runs, each the parent of the invocation it caused in the other process."""
    ns = chain.namespace
    caller = f"00-{SAGA_TRACE}-{CALLER_SPAN}-01"
    status, body = _post(chain.url("front", "f2", "trip"), {"key": "s1"}, {"traceparent": caller})
    assert (status, body) == (200, {"result": "compensated"})

    def named(spans: list[otlp_receiver.ReceivedSpan], name: str) -> list[otlp_receiver.ReceivedSpan]:
        return [s for s in spans if s.trace_id == SAGA_TRACE and s.name == name]

    def complete(spans: list[otlp_receiver.ReceivedSpan]) -> bool:
        runs = named(spans, f"invoke {ns}/front.trip")
        return bool(named(spans, f"invoke {ns}/back.unrecord")) and any(
            r.attributes.get(tracing.OUTCOME) == "ok" for r in runs)

    spans = chain.receiver.wait_for(complete)
    by_id = {s.span_id: s for s in spans}
    runs = named(spans, f"invoke {ns}/front.trip")
    # Suspended at the step, then at the compensation, then the run that returns.
    assert sorted(r.attributes[tracing.OUTCOME] for r in runs) == ["ok", "suspended", "suspended"]
    (step,) = named(spans, f"saga.step {ns}/back")
    (compensate,) = named(spans, f"saga.compensate {ns}/back")
    for producer, caused in ((step, f"invoke {ns}/back.record"), (compensate, f"invoke {ns}/back.unrecord")):
        assert producer.kind == "PRODUCER" and producer.service == "sidecar-front"
        assert by_id[producer.parent_id].name == f"invoke {ns}/front.trip"
        assert by_id[producer.parent_id].attributes[tracing.OUTCOME] == "suspended"
        (invoke,) = named(spans, caused)
        assert (invoke.parent_id, invoke.service) == (producer.span_id, "sidecar-back")


def test_transaction_phases_are_spans(chain: Chain) -> None:
    """A transaction across the two sidecars: prepares, decisions and their application are spans in one trace."""
    ns = chain.namespace
    status, body = _post(chain.url("front", "f3", "move"), {"keys": ["t1"]},
                         {"traceparent": f"00-{TX_TRACE}-{CALLER_SPAN}-01"})
    assert (status, body) == (200, {"result": 1})

    def named(spans: list[otlp_receiver.ReceivedSpan], name: str) -> list[otlp_receiver.ReceivedSpan]:
        return [s for s in spans if s.trace_id == TX_TRACE and s.name == name]

    def complete(spans: list[otlp_receiver.ReceivedSpan]) -> bool:
        return len(named(spans, f"tx.commit {ns}/front")) == 2 and len(named(spans, f"tx.commit {ns}/back")) == 2

    spans = chain.receiver.wait_for(complete)
    by_id = {s.span_id: s for s in spans}
    runs = named(spans, f"invoke {ns}/front.move")
    # Suspended at each prepare, then the run that decides and returns.
    assert sorted(r.attributes[tracing.OUTCOME] for r in runs) == ["ok", "suspended", "suspended"]
    (decider,) = [r for r in runs if r.attributes[tracing.OUTCOME] == "ok"]
    for participant, handler, service in ((f"{ns}/front", "count", "sidecar-front"),
                                          (f"{ns}/back", "record", "sidecar-back")):
        (prepare,) = named(spans, f"tx.prepare {participant}")
        assert prepare.kind == "PRODUCER" and by_id[prepare.parent_id].name == f"invoke {ns}/front.move"
        (invoke,) = named(spans, f"invoke {participant}.{handler}")
        assert invoke.parent_id == prepare.span_id and invoke.service == service
        assert invoke.attributes[tracing.OUTCOME] == "prepared"
        producer, consumer = sorted(named(spans, f"tx.commit {participant}"), key=lambda s: s.kind != "PRODUCER")
        assert (producer.kind, producer.parent_id) == ("PRODUCER", decider.span_id)
        assert (consumer.kind, consumer.parent_id, consumer.service) == ("CONSUMER", producer.span_id, service)


async def test_a_traced_caller_of_the_client_continues_its_trace(
        chain: Chain, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    """A service with its own OpenTelemetry tracing calls statefn.Client: the invocation joins its trace."""
    provider = TracerProvider()  # the caller's own tracing; nothing exported, only the context matters
    with provider.get_tracer("caller").start_as_current_span("caller work") as span:
        async with statefn.Client(nats=nats_server.url, etcd=etcd_server.endpoint) as client:
            assert await client.invoke(f"{chain.namespace}/front", "c1", "spread", keys=[]) == 0
        caller = span.get_span_context()
    spans = chain.receiver.wait_for(
        lambda spans: any(s.attributes.get(tracing.KEY) == "c1" and s.kind == "CONSUMER" for s in spans))
    (invoke,) = [s for s in spans if s.attributes.get(tracing.KEY) == "c1" and s.kind == "CONSUMER"]
    assert (invoke.trace_id, invoke.parent_id) == (f"{caller.trace_id:032x}", f"{caller.span_id:016x}")
    provider.shutdown()


@contextlib.contextmanager
def pod_processes(namespace: str, receiver: otlp_receiver.OtlpReceiver, nats_server: devservers.NatsServer,
                  etcd_server: devservers.EtcdServer) -> Iterator[None]:
    """What a function pod runs: `statefn serve` (the handlers) and `statefn sidecar --remote` calling it."""
    statefn_cli = str(Path(sys.executable).parent / "statefn")
    port, health = devservers.free_port(), devservers.free_port()
    logs = [Path(tempfile.mkstemp(prefix=f"{what}-", suffix=".log")[1]) for what in ("serve", "sidecar")]
    running: list[subprocess.Popen[bytes]] = []
    try:
        for log, argv, service in (
                (logs[0], [statefn_cli, "serve", APP, "--port", str(port)], "function-container"),
                (logs[1], [statefn_cli, "sidecar", "--remote", f"http://127.0.0.1:{port}", "--nats", nats_server.url,
                           "--etcd", etcd_server.endpoint, "--health-port", str(health), "--partitions", "2"],
                 "sidecar-remote")):
            with open(log, "wb") as out:
                running.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=procs.ROOT, env=dict(
                    os.environ, STATEFN_TEST_NS=namespace, **_otel_env(receiver, service))))
        procs.wait_ready(running[1], health, log=lambda: "\n".join(p.read_text() for p in logs))
        yield
    finally:
        for proc in reversed(running):
            proc.terminate()
            proc.wait(15)
        for log in logs:
            log.unlink(missing_ok=True)


async def test_handlers_in_a_function_container_trace_under_their_invocation(
        chain: Chain, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    """Pod mode, both processes traced by OTEL_* alone: the handler's span nests under the sidecar's invocation."""
    namespace = f"{chain.namespace}r"
    with pod_processes(namespace, chain.receiver, nats_server, etcd_server):
        provider = TracerProvider()
        with provider.get_tracer("caller").start_as_current_span("caller work") as span:
            async with statefn.Client(nats=nats_server.url, etcd=etcd_server.endpoint) as client:
                assert await client.invoke(f"{namespace}/front", "r1", "spread", keys=["r2"]) == 1
            trace_id = f"{span.get_span_context().trace_id:032x}"
        provider.shutdown()

        def arrived(spans: list[otlp_receiver.ReceivedSpan]) -> bool:
            ids = {s.span_id for s in spans}
            return any(s.trace_id == trace_id and s.name == "lookup" and s.parent_id in ids for s in spans)

        spans = chain.receiver.wait_for(arrived)
    by_id = {s.span_id: s for s in spans}
    (lookup,) = [s for s in spans if s.trace_id == trace_id and s.name == "lookup"]
    invoke = by_id[lookup.parent_id]
    assert (lookup.service, lookup.attributes["origin"]) == ("function-container", "r1")
    assert (invoke.service, invoke.name, invoke.attributes[tracing.KEY]) == (
        "sidecar-remote", f"invoke {namespace}/back.record", "r2")


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_tracing_is_on_only_when_the_environment_asks(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                       on: bool) -> None:
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        assert tracing.configure("test") is on
        assert (tracing.TRACER is not None) is on
    finally:
        tracing.shutdown()
    assert tracing.TRACER is None


def test_an_unsupported_protocol_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json is not supported"):
        tracing.configure("test")
    assert tracing.TRACER is None
