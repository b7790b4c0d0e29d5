"""The operator against a real API server: provisioning, status, events, autoscaling up, deletion.

Runs ``statefn operator`` as a process (as a user would outside the cluster) on a namespace of
its own, with a real nats-server and etcd. No pods run here (an image the test agent will not run):
test_platform covers functions that actually serve.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aetcd
import nats
import pytest

import statefn
from e2e import harness, objects, operator_proc
from e2e.objects import condition, wait_for
from statefn_core import layout
from statefn_sidecar import topology

NS = "op-e2e"


@pytest.fixture(scope="module")
def operator(crds: harness.ControlPlane, plane: operator_proc.DataPlane) -> Iterator[operator_proc.Operator]:
    crds.kubectl("create", "namespace", NS)
    op = operator_proc.Operator(crds, plane, "--standalone", "--namespace", NS, "--autoscale-interval", "1")
    op.wait_for_log("statefn operator:")
    yield op
    op.stop()


@pytest.fixture
async def etcd(plane: operator_proc.DataPlane) -> AsyncIterator[aetcd.Client]:
    host, port = plane.etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        yield client


def get(cluster: harness.ControlPlane, *what: str) -> dict[str, Any]:
    return objects.get(cluster, NS, *what)


def apply_function(cluster: harness.ControlPlane, name: str, **spec: Any) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=objects.function(name, NS, image=objects.NO_PODS_IMAGE, **spec))


def events(cluster: harness.ControlPlane, name: str) -> list[tuple[str, str, str]]:
    return objects.events(cluster, NS, name)


async def test_function_becomes_deployment_stream_and_registration(
        operator: operator_proc.Operator, plane: operator_proc.DataPlane, etcd: aetcd.Client) -> None:
    cluster = operator.cluster
    apply_function(cluster, "counter", function="demo/counter", partitions=8)
    obj = wait_for(lambda: (o := get(cluster, "sfn", "counter")) and condition(o, "Provisioned").get("status") == "True"
                   and o, what="Provisioned=True")
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert condition(obj, "Provisioned")["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["function"] == "demo/counter"
    assert "statefn.dev/finalizer" in obj["metadata"]["finalizers"]

    dep = get(cluster, "deployment", "sfn-counter")
    assert dep["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    assert dep["spec"]["replicas"] == 1
    sidecar = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["command"][sidecar["command"].index("--function") + 1] == "demo/counter"
    assert get(cluster, "serviceaccount", "sfn-counter")["automountServiceAccountToken"] is False

    nc = await nats.connect(plane.nats.url)
    try:
        consumers = await nc.jetstream().consumers_info("STATEFN_demo_counter")
        assert sorted(c.name for c in consumers) == sorted(f"p{p}" for p in range(8))
    finally:
        await nc.close()
    meta = await etcd.get(layout.FunctionType("demo", "counter").meta_key.encode())
    assert meta is not None and json.loads(meta.value)["partitions"] == 8

    # No pods run in this suite: Ready says so, with the reason.
    obj = wait_for(lambda: (o := get(cluster, "sfn", "counter")) and condition(o, "Ready") and o, what="Ready")
    assert condition(obj, "Ready")["status"] == "False" and condition(obj, "Ready")["reason"] == "Progressing"
    reasons = {r for _, r, _ in events(cluster, "counter")}
    assert {"Created", "Provisioned"} <= reasons, reasons


async def test_update_rolls_out_and_lag_scales_up(operator: operator_proc.Operator,
                                                  plane: operator_proc.DataPlane) -> None:
    cluster = operator.cluster
    apply_function(cluster, "scaler", function="demo/scaler", partitions=4,
                   scaling={"minReplicas": 1, "maxReplicas": 3, "targetLagPerReplica": 10})
    wait_for(lambda: get(cluster, "deployment", "sfn-scaler"), what="Deployment")
    # Nobody consumes here: 25 queued messages are lag 25, ceil(25/10) = 3 replicas (maxReplicas 3).
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        for i in range(25):
            await client.send("demo/scaler", f"k{i}", "increment", idempotency_key=f"m{i}")
    dep = wait_for(lambda: (d := get(cluster, "deployment", "sfn-scaler")) and d["spec"]["replicas"] == 3 and d,
                   what="3 replicas")
    obj = get(cluster, "sfn", "scaler")
    assert obj["status"]["lag"] == 25 and obj["status"]["desiredReplicas"] == 3
    assert "scaling up 1 -> 3" in obj["status"]["lastScaleReason"]
    assert any(r == "Scaled" and "scaling up 1 -> 3" in m for _, r, m in events(cluster, "scaler"))
    columns = cluster.kubectl("get", "sfn", "scaler", "-n", NS, "--no-headers").stdout.split()
    assert (columns[0], columns[1], columns[3]) == ("scaler", "False", "25"), columns  # NAME READY REPLICAS LAG AGE

    # An update rolls out a new template and keeps the autoscaler's replicas.
    apply_function(cluster, "scaler", function="demo/scaler", partitions=4, env=[{"name": "MODE", "value": "x"}],
                   scaling={"minReplicas": 1, "maxReplicas": 3, "targetLagPerReplica": 10})
    generation = get(cluster, "sfn", "scaler")["metadata"]["generation"]
    wait_for(lambda: get(cluster, "sfn", "scaler")["status"]["observedGeneration"] == generation,
             what="observedGeneration")
    dep = get(cluster, "deployment", "sfn-scaler")
    assert dep["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "MODE", "value": "x"}]
    assert dep["spec"]["replicas"] == 3


async def test_partition_count_conflict_is_refused_with_a_reason(
        operator: operator_proc.Operator, etcd: aetcd.Client) -> None:
    """Someone (a `statefn dev` run, an older resource) created demo/fixed with 4 partitions."""
    cluster = operator.cluster
    await topology.reserve(etcd, layout.FunctionType("demo", "fixed"), 4)
    apply_function(cluster, "fixed", function="demo/fixed", partitions=8)
    obj = wait_for(lambda: (o := get(cluster, "sfn", "fixed")) and condition(o, "Provisioned") and o,
                   what="Provisioned condition")
    cond = condition(obj, "Provisioned")
    assert (cond["status"], cond["reason"]) == ("False", "ProvisionFailed")
    assert "was created with 4 partitions" in cond["message"] and "asked for 8" in cond["message"]
    assert condition(obj, "Ready")["status"] == "False"
    assert any(t == "Warning" and "was created with 4 partitions" in m for t, _, m in events(cluster, "fixed"))
    assert not get(cluster, "deployment", "sfn-fixed")


async def test_workflow_waits_for_its_functions_then_publishes(
        operator: operator_proc.Operator, etcd: aetcd.Client) -> None:
    cluster = operator.cluster
    workflow = {"apiVersion": "statefn.dev/v1alpha1", "kind": "Workflow",
                "metadata": {"name": "order", "namespace": NS},
                "spec": {"steps": [
                    {"name": "reserve", "function": "shop/inventory", "key": "input.sku", "handler": "reserve"},
                    {"name": "pay", "function": "bank/account", "key": "input.account", "handler": "withdraw"}]}}
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(workflow))
    obj = wait_for(lambda: (o := get(cluster, "workflow", "order")) and condition(o, "Ready") and o, what="Ready")
    cond = condition(obj, "Ready")
    assert (cond["status"], cond["reason"]) == ("False", "MissingFunction")
    assert "no StatefulFunction runs bank/account, shop/inventory" in cond["message"]
    assert await etcd.get(layout.workflow_key(NS, "order").encode()) is None

    apply_function(cluster, "inventory", function="shop/inventory", partitions=2,
                   scaling={"minReplicas": 1, "maxReplicas": 2})
    apply_function(cluster, "account", function="bank/account", partitions=2,
                   scaling={"minReplicas": 1, "maxReplicas": 2})
    obj = wait_for(lambda: (o := get(cluster, "workflow", "order"))
                   and condition(o, "Ready").get("status") == "True" and o, timeout=30, what="Ready=True")
    assert obj["status"]["stepCount"] == 2
    published = await etcd.get(layout.workflow_key(NS, "order").encode())
    assert published is not None
    assert [s["name"] for s in json.loads(published.value)["spec"]["steps"]] == ["reserve", "pay"]


async def test_deletion_removes_what_it_made(operator: operator_proc.Operator, plane: operator_proc.DataPlane,
                                             etcd: aetcd.Client) -> None:
    cluster = operator.cluster
    for name, policy in (("keep", "Retain"), ("drop", "Delete")):
        apply_function(cluster, name, function=f"demo/{name}", partitions=2, deletionPolicy=policy,
                       scaling={"minReplicas": 1, "maxReplicas": 2})
    for name in ("keep", "drop"):
        wait_for(lambda n=name: get(cluster, "deployment", f"sfn-{n}"), what=f"Deployment sfn-{name}")
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        await client.send("demo/keep", "k", "increment")
        await client.send("demo/drop", "k", "increment")
    cluster.kubectl("delete", "sfn", "keep", "drop", "-n", NS, "--timeout=60s")
    assert not get(cluster, "deployment", "sfn-keep") and not get(cluster, "serviceaccount", "sfn-keep")
    assert not get(cluster, "deployment", "sfn-drop")
    for name in ("keep", "drop"):
        assert await etcd.get(layout.FunctionType("demo", name).meta_key.encode()) is None
    nc = await nats.connect(plane.nats.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info("STATEFN_demo_keep")).state.messages == 1  # Retain: queued work kept
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info("STATEFN_demo_drop")
    finally:
        await nc.close()

    # The kept data is laid out in 2 partitions: the function comes back with 2, not with another count.
    scaling = {"minReplicas": 1, "maxReplicas": 2}
    apply_function(cluster, "keep", function="demo/keep", partitions=4, scaling=scaling)
    obj = wait_for(lambda: (o := get(cluster, "sfn", "keep")) and condition(o, "Provisioned") and o,
                   what="Provisioned condition")
    cond = condition(obj, "Provisioned")
    assert (cond["status"], cond["reason"]) == ("False", "ProvisionFailed"), cond
    assert "kept its data (deleted with Retain) from 2 partitions" in cond["message"], cond
    cluster.kubectl("delete", "sfn", "keep", "-n", NS, "--timeout=60s")  # partitions is immutable: re-create
    apply_function(cluster, "keep", function="demo/keep", partitions=2, scaling=scaling)
    wait_for(lambda: condition(get(cluster, "sfn", "keep"), "Provisioned").get("status") == "True",
             what="Provisioned with the kept partition count")
    cluster.kubectl("delete", "sfn", "keep", "-n", NS, "--timeout=60s")
