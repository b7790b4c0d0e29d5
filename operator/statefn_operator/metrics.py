"""The operator's Prometheus metrics, and the ``/metrics`` server it runs next to kopf.

Names and labels are the contract with the chart's Grafana dashboard
(``charts/statefn/dashboards/statefn.json``), like the sidecar's (``statefn_sidecar.metrics``).
Per-function series carry ``function`` (the function type ``namespace/name``, the value the
sidecar's series carry, so the two join) and ``resource`` (the StatefulFunction ``namespace/name``
in Kubernetes, which can differ from the function type).

Only the active replica (the kopf peering leader) runs the autoscaling daemons, so only it has
per-function series; a standby serves process metrics and zero reconciles. Series of a function
disappear when its daemon stops (deletion, or this replica standing down): a gauge nobody
updates any more would otherwise report its last lag forever.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import prometheus_client
from aiohttp import web

from statefn_sidecar import metrics as sidecar_metrics

_log = logging.getLogger("statefn.operator.metrics")

KIND_FUNCTION = "StatefulFunction"
KIND_WORKFLOW = "Workflow"
KINDS = (KIND_FUNCTION, KIND_WORKFLOW)
OUTCOMES = ("ok", "error")
DIRECTIONS = ("up", "down", "to_zero", "from_zero")
# Reconciles are API round trips (status patch, server-side apply): milliseconds to seconds.
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

FUNCTION_LAG = prometheus_client.Gauge(
    "statefn_function_lag", "Messages of a function not yet acknowledged (its stream's consumers' pending count).",
    ["function", "resource"])
INBOX_BACKLOG = prometheus_client.Gauge(
    "statefn_function_inbox_backlog", "Messages queued in the inboxes of a function's locked keys (counted as lag).",
    ["function", "resource"])
NEXT_TIMER = prometheus_client.Gauge(
    "statefn_function_next_timer_timestamp_seconds",
    "When a function's earliest timer is due (Unix time; absent while it has none).", ["function", "resource"])
DESIRED_REPLICAS = prometheus_client.Gauge(
    "statefn_function_desired_replicas", "Replicas the autoscaler decided for a function.",
    ["function", "resource"])
READY_REPLICAS = prometheus_client.Gauge(
    "statefn_function_ready_replicas", "Ready pods of a function's Deployment.", ["function", "resource"])
SCALE_DECISIONS = prometheus_client.Counter(
    "statefn_operator_scale_decisions", "Replica changes the autoscaler made (up, down, to_zero, from_zero).",
    ["function", "direction"])
RECONCILES = prometheus_client.Counter(
    "statefn_operator_reconciles", "Reconciles of StatefulFunctions and Workflows, by outcome (ok, error).",
    ["kind", "outcome"])
RECONCILE_SECONDS = prometheus_client.Histogram(
    "statefn_operator_reconcile_duration_seconds", "Duration of one reconcile, whatever its outcome.",
    ["kind"], buckets=_RECONCILE_BUCKETS)

# Zero from the start, so rate() and alerts see the first error instead of a series appearing.
for _kind in KINDS:
    RECONCILE_SECONDS.labels(_kind)
    for _outcome in OUTCOMES:
        RECONCILES.labels(_kind, _outcome)


@contextlib.contextmanager
def reconciling(kind: str) -> Iterator[None]:
    """Time and count one reconcile; any exception (kopf's Temporary/Permanent errors too) is an error."""
    start = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - start)
        RECONCILES.labels(kind, outcome).inc()


def direction(current: int, target: int) -> str | None:
    """What kind of scaling ``current -> target`` is; None when it is no change."""
    if target == current:
        return None
    if target == 0:
        return "to_zero"
    if current == 0:
        return "from_zero"
    return "up" if target > current else "down"


def observe_function(function: str, resource: str, *, lag: int, desired: int, ready: int, inbox: int = 0,
                     next_due_ms: int | None = None) -> None:
    FUNCTION_LAG.labels(function, resource).set(lag)
    INBOX_BACKLOG.labels(function, resource).set(inbox)
    if next_due_ms is None:
        with contextlib.suppress(KeyError):
            NEXT_TIMER.remove(function, resource)
    else:
        NEXT_TIMER.labels(function, resource).set(next_due_ms / 1000)
    DESIRED_REPLICAS.labels(function, resource).set(desired)
    READY_REPLICAS.labels(function, resource).set(ready)


def scaled(function: str, current: int, target: int) -> None:
    way = direction(current, target)
    if way is not None:
        SCALE_DECISIONS.labels(function, way).inc()


def forget_function(function: str, resource: str) -> None:
    """Drop every series of a function (idempotent: the daemon and the delete handler both call it)."""
    for gauge in (FUNCTION_LAG, INBOX_BACKLOG, NEXT_TIMER, DESIRED_REPLICAS, READY_REPLICAS):
        with contextlib.suppress(KeyError):
            gauge.remove(function, resource)
    for way in DIRECTIONS:
        with contextlib.suppress(KeyError):
            SCALE_DECISIONS.remove(function, way)


async def serve(host: str, port: int) -> web.AppRunner:
    """GET /metrics on ``host:port``, until the returned runner is cleaned up.

    A server of its own: kopf's liveness endpoint is kopf's server, with no room for other routes.
    """
    app = web.Application()
    app.router.add_get("/metrics", sidecar_metrics.handle_metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    _log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
