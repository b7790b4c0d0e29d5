"""What a partition tells metrics and traces about its invocations: started, sent, committed, abandoned.

Kept apart from the partition loop so the loop reads as the protocol (pull, run, commit, publish,
ack) and this module holds every observation of it. An invocation is counted and its span ended
only when its commit landed: an outcome that was never committed did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from opentelemetry import trace

from statefn_core import envelope
from statefn_sidecar import decisions, items, metrics, tracing


def start_invocations(outcomes: Iterable[decisions.Outcome], function: str, partition: int) -> None:
    """One CONSUMER span per invocation, child of the traceparent its message carried."""
    tracer = tracing.TRACER
    if tracer is None:
        return
    for oc in outcomes:
        if not isinstance(oc.item, items.Invocation):
            continue
        msg = oc.item.message
        # A 2PC decision or inquiry runs no handler: its span is named for the phase ("tx.commit bank/account").
        name = f"tx.{msg.handler[1:]} {function}" if msg.is_tx_control else f"invoke {function}.{msg.handler}"
        oc.span = tracer.start_span(
            name, context=tracing.extract(msg.traceparent),
            kind=trace.SpanKind.CONSUMER,
            attributes={tracing.FUNCTION: function, tracing.KEY: msg.key, tracing.HANDLER: msg.handler,
                        tracing.ATTEMPT: msg.attempt, tracing.PARTITION: partition,
                        tracing.MESSAGING_SYSTEM: "nats"})


def traceparent_of(oc: decisions.Outcome) -> str | None:
    return None if oc.span is None else tracing.traceparent_of(oc.span)


def send_traceparent(oc: decisions.Outcome, message: envelope.Message, function: str, delay: float,
                     verb: str = "send") -> str | None:
    """The traceparent an outgoing message carries: a PRODUCER span's (``send`` or ``call``) when tracing."""
    if oc.span is None or tracing.TRACER is None:
        return message.traceparent
    span = tracing.TRACER.start_span(
        f"{verb} {function}", context=trace.set_span_in_context(oc.span), kind=trace.SpanKind.PRODUCER,
        attributes={tracing.TARGET_FUNCTION: function, tracing.TARGET_KEY: message.key,
                    tracing.HANDLER: message.handler, tracing.DELAY: delay,
                    tracing.MESSAGING_SYSTEM: "nats", tracing.MESSAGING_DESTINATION: function})
    span.end()
    return tracing.traceparent_of(span)


def committed(m: metrics.FunctionMetrics, outcomes: list[decisions.Outcome], txn_bytes: int, txn_ops: int,
              started_ns: int) -> None:
    """A commit landed: count it and its invocations; end their spans with a ``commit`` child each."""
    m.commits.inc()
    if not outcomes:
        return
    now = time.monotonic()
    ran = 0
    for oc in outcomes:
        for decision in oc.tx_decisions:
            m.transactions[decision].inc()
        event = oc.decision.tx_event()
        if event is not None:
            m.tx_event(event).inc()
        if not isinstance(oc.item, items.Invocation):
            if isinstance(oc.decision, decisions.Failed):
                m.dead_letters.inc()  # an undecodable message
            continue
        label = oc.label
        if label in ("dropped", "control"):
            continue
        ran += 1
        m.outcome(label).inc()
        if label == "error":
            m.dead_letters.inc()
        if label in ("ok", "error"):
            m.latency.observe(now - oc.started)
    if ran:
        m.batch.observe(ran)
    m.bytes.observe(txn_bytes)
    if tracing.TRACER is not None:
        _end_spans(outcomes, ran, txn_bytes, txn_ops, started_ns)


def _end_spans(outcomes: list[decisions.Outcome], ran: int, txn_bytes: int, txn_ops: int, started_ns: int) -> None:
    assert tracing.TRACER is not None
    ended_ns = time.time_ns()
    attributes = {tracing.COMMIT_INVOCATIONS: ran, tracing.COMMIT_BYTES: txn_bytes, tracing.COMMIT_OPS: txn_ops}
    for oc in outcomes:
        span = oc.span
        if span is None:
            continue
        child = tracing.TRACER.start_span("commit", context=trace.set_span_in_context(span),
                                          kind=trace.SpanKind.INTERNAL, start_time=started_ns,
                                          attributes=attributes)
        child.end(end_time=ended_ns)
        span.set_attribute(tracing.OUTCOME, oc.label)
        if isinstance(oc.decision, decisions.Failed):
            error = oc.decision.error
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{error.kind}: {error.message}"))
        span.end(end_time=ended_ns)
        oc.span = None


def abandoned(outcomes: Iterable[decisions.Outcome], reason: str) -> None:
    """Outcomes that will not be committed by us (fenced, or to be run again): end their spans so."""
    for oc in outcomes:
        span = oc.span
        if span is None:
            continue
        span.set_attribute(tracing.OUTCOME, reason)
        span.end()
        oc.span = None
