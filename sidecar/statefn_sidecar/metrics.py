"""The sidecar's Prometheus metrics, and the ``/metrics`` handler every statefn process serves.

Names and labels are the contract with the chart's Grafana dashboard
(``charts/statefn/dashboards/statefn.json``): rename one and the dashboard must follow. Every
series is labelled with ``function``, the function type (``namespace/name``), never with a key:
keys are unbounded and would explode the series count.
"""

from __future__ import annotations

import prometheus_client
from aiohttp import web

# ``*_created`` series double the page for no dashboard's benefit.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)

INVOCATIONS = prometheus_client.Counter(
    "statefn_invocations",
    "Invocations committed, by outcome: ok; retry (statefn.Retry, runs again later); error (terminal: the "
    "caller got the error and the message was dead-lettered); suspended (waits for a durable call's reply); "
    "queued (its key was locked by a suspended invocation; it waits in the key's inbox); prepared (a "
    "transaction participant's effects staged, its key locked until the decision).",
    ["function", "outcome"])
TRANSACTIONS = prometheus_client.Counter(
    "statefn_transactions",
    "Transactions decided by coordinators of this function, by outcome: committed or aborted.",
    ["function", "outcome"])
TRANSACTION_PARTICIPANTS = prometheus_client.Counter(
    "statefn_transaction_participant_events",
    "What two-phase commit did on this function's keys as a participant: prepared, died (wait-die refused "
    "a younger transaction), committed, aborted, stale (a decision for a key not prepared), inquired (asked "
    "a silent coordinator); and as a coordinator: inquiry_pending, inquiry_abort, orphan_abort (released a "
    "participant whose vote came after the coordinator gave up on it).",
    ["function", "event"])
INVOCATION_SECONDS = prometheus_client.Histogram(
    "statefn_invocation_duration_seconds",
    "From the start of the batch that ran an invocation to its commit (handler + state + commit).",
    ["function"], buckets=_LATENCY_BUCKETS)
COMMITS = prometheus_client.Counter("statefn_commits", "etcd commit transactions.", ["function"])
COMMIT_BATCH = prometheus_client.Histogram(
    "statefn_commit_batch_size", "Invocations per etcd commit transaction.", ["function"], buckets=_BATCH_BUCKETS)
COMMIT_BYTES = prometheus_client.Histogram(
    "statefn_commit_bytes", "Bytes written per etcd commit transaction.", ["function"], buckets=_BYTES_BUCKETS)
DEAD_LETTERS = prometheus_client.Counter(
    "statefn_dead_letters", "Messages sent to the dead-letter subject.", ["function"])
DUPLICATES = prometheus_client.Counter(
    "statefn_duplicates",
    "Copies dropped by exactly-once: redelivered or re-sent messages answered from their idempotency record "
    "or below their channel's watermark.", ["function"])
PARTITIONS_OWNED = prometheus_client.Gauge(
    "statefn_partitions_owned", "Partitions this sidecar owns.", ["function"])
OUTBOX_BACKLOG = prometheus_client.Gauge(
    "statefn_outbox_backlog", "Committed messages not yet published.", ["function"])
GATEWAY_REQUESTS = prometheus_client.Counter(
    "statefn_gateway_requests", "Gateway invocation requests, by HTTP status.", ["function", "code"])
GATEWAY_SECONDS = prometheus_client.Histogram(
    "statefn_gateway_request_duration_seconds", "Gateway invocation requests, until the response.",
    ["function"], buckets=_LATENCY_BUCKETS)


class FunctionMetrics:
    """One function type's series, bound once: a labelled child costs a dict lookup per use."""

    __slots__ = (
        "_function",
        "backlog",
        "batch",
        "bytes",
        "commits",
        "dead_letters",
        "duplicates",
        "latency",
        "outcomes",
        "partitions",
        "transactions",
        "tx_events",
    )

    def __init__(self, function: str) -> None:
        self.outcomes = {o: INVOCATIONS.labels(function, o)
                         for o in ("ok", "retry", "error", "suspended", "queued", "prepared")}
        self.transactions = {o: TRANSACTIONS.labels(function, o) for o in ("committed", "aborted")}
        self.tx_events: dict[str, prometheus_client.Counter] = {}
        self._function = function
        self.latency = INVOCATION_SECONDS.labels(function)
        self.commits = COMMITS.labels(function)
        self.batch = COMMIT_BATCH.labels(function)
        self.bytes = COMMIT_BYTES.labels(function)
        self.dead_letters = DEAD_LETTERS.labels(function)
        self.duplicates = DUPLICATES.labels(function)
        self.partitions = PARTITIONS_OWNED.labels(function)
        self.backlog = OUTBOX_BACKLOG.labels(function)

    def outcome(self, label: str) -> prometheus_client.Counter:
        return self.outcomes[label]

    def tx_event(self, event: str) -> prometheus_client.Counter:
        counter = self.tx_events.get(event)
        if counter is None:
            counter = self.tx_events[event] = TRANSACTION_PARTICIPANTS.labels(self._function, event)
        return counter


async def handle_metrics(_: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format (the default registry: process, GC, ours)."""
    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})
