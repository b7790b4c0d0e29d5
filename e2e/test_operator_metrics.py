"""The operator's GET /metrics against a real API server: values are the ones the operator acts on.

``statefn operator --metrics-port`` as a process on a namespace of its own, a real nats-server and etcd,
and no pods (NO_PODS_IMAGE): nobody consumes, so messages sent to a function are its lag, exactly.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import aetcd
import prometheus_client.parser
import pytest

import statefn
from e2e import harness, objects, operator_proc
from e2e.objects import condition, wait_for
from statefn_core import layout
from statefn_sidecar import devservers, topology

NS = "metrics-e2e"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Running:
    def __init__(self, op: operator_proc.Operator, port: int) -> None:
        self.op, self.port = op, port

    def scrape(self) -> tuple[str, Samples]:
        """The Content-Type and every sample, keyed by (sample name, labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            content_type, text = resp.headers["Content-Type"], resp.read().decode()
        samples: Samples = {}
        for family in prometheus_client.parser.text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return content_type, samples

    def value(self, name: str, **labels: str) -> float | None:
        return self.scrape()[1].get((name, frozenset(labels.items())))

    def wait_value(self, name: str, expected: float | None, **labels: str) -> None:
        wait_for(lambda: self.value(name, **labels) == expected, timeout=30,
                 what=f"{name}{labels} == {expected} (last: {self.value(name, **labels)})")


@pytest.fixture(scope="module")
def operator(crds: harness.ControlPlane, plane: operator_proc.DataPlane) -> Iterator[Running]:
    crds.kubectl("create", "namespace", NS)
    port = devservers.free_port("127.0.0.1")
    op = operator_proc.Operator(crds, plane, "--standalone", "--namespace", NS, "--autoscale-interval", "1",
                                "--metrics-host", "127.0.0.1", "--metrics-port", str(port), name="operator-metrics")
    op.wait_for_log("statefn operator:")
    yield Running(op, port)
    op.stop()


def apply_function(cluster: harness.ControlPlane, name: str, **spec: object) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=objects.function(name, NS, image=objects.NO_PODS_IMAGE, **spec))


async def test_lag_replicas_and_reconciles_are_served(operator: Running, plane: operator_proc.DataPlane) -> None:
    cluster = operator.op.cluster
    function = {"function": "demo/metered", "resource": f"{NS}/metered"}
    content_type, _ = operator.scrape()
    assert content_type.startswith("text/plain; version=")  # the text exposition format

    apply_function(cluster, "metered", function="demo/metered", partitions=4,
                   scaling={"minReplicas": 1, "maxReplicas": 3, "targetLagPerReplica": 10})
    wait_for(lambda: objects.get(cluster, NS, "deployment", "sfn-metered"), what="Deployment")
    operator.wait_value("statefn_function_lag", 0, **function)
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        for i in range(25):
            await client.send("demo/metered", f"k{i}", "increment", idempotency_key=f"m{i}")
    # Nobody consumes: lag 25 at 10 per replica wants ceil(2.5) = 3 (maxReplicas 3), and no pod is ready.
    operator.wait_value("statefn_function_lag", 25, **function)
    operator.wait_value("statefn_function_desired_replicas", 3, **function)
    assert operator.value("statefn_function_ready_replicas", **function) == 0
    assert operator.value("statefn_operator_scale_decisions_total", function="demo/metered", direction="up") == 1
    # The same numbers the operator wrote in the status (one source, two views).
    status = objects.get(cluster, NS, "sfn", "metered")["status"]
    assert (status["lag"], status["desiredReplicas"], status["readyReplicas"]) == (25, 3, 0)

    _, samples = operator.scrape()
    ok = samples[("statefn_operator_reconciles_total", frozenset({("kind", "StatefulFunction"), ("outcome", "ok")}))]
    assert ok >= 1
    timed = samples[("statefn_operator_reconcile_duration_seconds_count", frozenset({("kind", "StatefulFunction")}))]
    assert timed >= ok  # every reconcile is timed, whatever its outcome
    assert ("statefn_operator_reconciles_total", frozenset({("kind", "Workflow"), ("outcome", "error")})) in samples


async def test_from_zero_and_a_refused_spec_are_counted(operator: Running, plane: operator_proc.DataPlane) -> None:
    cluster = operator.op.cluster
    apply_function(cluster, "idle", function="demo/idle", partitions=2,
                   scaling={"minReplicas": 0, "maxReplicas": 2, "scaleToZeroAfterSeconds": 600})
    operator.wait_value("statefn_function_desired_replicas", 0, function="demo/idle", resource=f"{NS}/idle")
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        await client.send("demo/idle", "k", "increment")
    operator.wait_value("statefn_operator_scale_decisions_total", 1, function="demo/idle", direction="from_zero")
    operator.wait_value("statefn_function_lag", 1, function="demo/idle", resource=f"{NS}/idle")

    # A spec the operator refuses (someone created demo/fixed with another partition count) is an error.
    errors_before = operator.value("statefn_operator_reconciles_total", kind="StatefulFunction", outcome="error")
    assert errors_before is not None
    host, port = plane.etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as etcd:
        await topology.reserve(etcd, layout.FunctionType("demo", "fixed"), 4)
    apply_function(cluster, "fixed", function="demo/fixed", partitions=8)
    wait_for(lambda: condition(objects.get(cluster, NS, "sfn", "fixed"), "Provisioned").get("status") == "False",
             what="Provisioned=False")
    operator.wait_value("statefn_operator_reconciles_total", errors_before + 1,
                        kind="StatefulFunction", outcome="error")


async def test_a_deleted_function_leaves_no_series(operator: Running, plane: operator_proc.DataPlane) -> None:
    cluster = operator.op.cluster
    labels = {"function": "demo/gone", "resource": f"{NS}/gone"}
    apply_function(cluster, "gone", function="demo/gone", partitions=2, deletionPolicy="Delete",
                   scaling={"minReplicas": 1, "maxReplicas": 2, "targetLagPerReplica": 1})
    apply_function(cluster, "stays", function="demo/stays", partitions=2, scaling={"minReplicas": 1, "maxReplicas": 2})
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        wait_for(lambda: objects.get(cluster, NS, "sfn", "gone").get("status", {}).get("function"), what="provisioned")
        await client.send("demo/gone", "a", "increment")
        await client.send("demo/gone", "b", "increment")
    operator.wait_value("statefn_operator_scale_decisions_total", 1, function="demo/gone", direction="up")
    operator.wait_value("statefn_function_lag", 2, **labels)
    operator.wait_value("statefn_function_lag", 0, function="demo/stays", resource=f"{NS}/stays")

    cluster.kubectl("delete", "sfn", "gone", "-n", NS, "--timeout=60s")
    _, samples = operator.scrape()
    left = [key for key in samples if ("function", "demo/gone") in key[1]]
    assert left == [], left
    # Other functions keep theirs.
    assert operator.value("statefn_function_lag", function="demo/stays", resource=f"{NS}/stays") == 0
