"""Scaling reaction on the e2e harness with an agent node: lag -> replicas ready, zero -> first reply.

Both are measured twice in the same run: driven by the operator's autoscaler (what a user gets),
and as the floor, the same pod template scaled directly (``kubectl scale``) with no operator in the
loop, so the ratio is the autoscaler's own delay on top of starting pods on this machine.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from rich.console import Console

import statefn
from e2e import harness, operator_proc
from statefn_core import constants, errors
from statefn_operator import dataplane, manifests, settings

NS = "bench-scale"
PARTITIONS, MAX_REPLICAS, TARGET_LAG = 4, 3, 20
SCALING = {"minReplicas": 0, "maxReplicas": MAX_REPLICAS, "targetLagPerReplica": TARGET_LAG,
           "scaleDownStabilizationSeconds": 3, "scaleToZeroAfterSeconds": 3}
BURST = 200  # messages of 300 ms over 20 keys: ~3 s of work per key, lag far above one replica's target


def function(name: str) -> dict[str, Any]:
    return {"apiVersion": "statefn.dev/v1alpha1", "kind": "StatefulFunction",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"function": f"bench/{name}", "image": "statefn:dev", "app": "e2e.apps:app",
                     "partitions": PARTITIONS, "scaling": SCALING}}


def deployment_replicas(cluster: harness.ControlPlane, name: str) -> tuple[int, int, int]:
    """(spec.replicas, ready replicas, pods that exist at all) of sfn-<name>; -1s before the Deployment exists."""
    out = cluster.kubectl("get", "deployment", f"sfn-{name}", "-n", NS, "-o", "json", check=False)
    if out.returncode != 0:
        return -1, -1, -1
    dep = json.loads(out.stdout)
    pods = json.loads(cluster.kubectl("get", "pods", "-n", NS, "-l", f"{constants.LABEL_FUNCTION}={NS}.{name}",
                                      "-o", "json").stdout)["items"]
    return int(dep["spec"]["replicas"]), int(dep.get("status", {}).get("readyReplicas") or 0), len(pods)


def wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout:.0f} s")
        time.sleep(0.1)


async def first_reply(client: statefn.Client, fn: str, key: str) -> None:
    """One synchronous invocation; a timeout is re-sent with the same key (the same invocation)."""
    for _ in range(5):
        try:
            await client.invoke(fn, "w0", "work", idempotency_key=key, ms=1)
            return
        except errors.InvocationTimeout:
            continue
    raise TimeoutError(f"no reply from {fn} after five timeouts")


async def burst(client: statefn.Client, fn: str, round_: int) -> None:
    await asyncio.gather(*(client.send(fn, f"k{i % 20}", "work", idempotency_key=f"r{round_}-{i}", ms=300)
                           for i in range(BURST)))


def idle(cluster: harness.ControlPlane, name: str) -> bool:
    return deployment_replicas(cluster, name) == (0, 0, 0)


async def autoscaled(cluster: harness.ControlPlane, plane: operator_proc.DataPlane, rounds: int,
                     console: Console) -> tuple[list[float], list[float]]:
    """The operator decides: zero -> first reply, then a burst -> max replicas ready, then back to zero."""
    name, fn = "slow", "bench/slow"
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(function(name)))
    wait(lambda: idle(cluster, name), 60, "Deployment at zero")
    wakes, ups = [], []
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint, timeout=20) as client:
        for r in range(rounds):
            started = time.perf_counter()
            await first_reply(client, fn, f"wake-{r}")
            wakes.append(time.perf_counter() - started)
            started = time.perf_counter()
            await burst(client, fn, r)
            wait(lambda: deployment_replicas(cluster, name)[1] >= MAX_REPLICAS, 120, f"{MAX_REPLICAS} ready")
            ups.append(time.perf_counter() - started)
            console.print(f"  autoscaled round {r}: zero -> reply {wakes[-1]:.2f} s, lag -> {MAX_REPLICAS} ready "
                          f"{ups[-1]:.2f} s")
            wait(lambda: idle(cluster, name), 180, "back to zero with no pod left")
    return wakes, ups


async def direct(cluster: harness.ControlPlane, plane: operator_proc.DataPlane, rounds: int,
                 console: Console) -> tuple[list[float], list[float]]:
    """The floor: the same pod template, provisioned directly, scaled with kubectl at the moment of need."""
    name, fn = "floor", "bench/floor"
    body = function(name) | {"metadata": {"name": name, "namespace": NS, "uid": ""}}
    cfg = settings.Settings(nats_url=plane.nats.url, etcd_endpoint=plane.etcd.endpoint)
    dp = await dataplane.DataPlane.connect(cfg.nats_url, cfg.etcd_endpoint)
    try:
        await dp.provision(manifests.function_type(body), PARTITIONS)
    finally:
        await dp.close()
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifests.service_account(body)))
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(manifests.deployment(body, cfg, 0)))
    scale = ("scale", "deployment", f"sfn-{name}", "-n", NS)
    wakes, ups = [], []
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint, timeout=20) as client:
        for r in range(rounds):
            started = time.perf_counter()
            reply = asyncio.create_task(first_reply(client, fn, f"wake-{r}"))
            await asyncio.to_thread(cluster.kubectl, *scale, "--replicas=1")
            await reply
            wakes.append(time.perf_counter() - started)
            started = time.perf_counter()
            await burst(client, fn, r)
            await asyncio.to_thread(cluster.kubectl, *scale, f"--replicas={MAX_REPLICAS}")
            wait(lambda: deployment_replicas(cluster, name)[1] >= MAX_REPLICAS, 120, f"{MAX_REPLICAS} ready")
            ups.append(time.perf_counter() - started)
            console.print(f"  direct round {r}: zero -> reply {wakes[-1]:.2f} s, lag -> {MAX_REPLICAS} ready "
                          f"{ups[-1]:.2f} s")
            await wait_drained(client, fn, r)
            cluster.kubectl(*scale, "--replicas=0")
            wait(lambda: idle(cluster, name), 120, "no pod left")
    return wakes, ups


async def wait_drained(client: statefn.Client, fn: str, round_: int) -> None:
    """Every message of the burst processed (each key's count), so no round leaves work for the next."""
    expected = BURST // 20 * (round_ + 1)
    while True:
        states = await asyncio.gather(*(client.get_state(fn, f"k{i}") for i in range(20)))
        if all(s.get("count", 0) >= expected for s in states):
            return
        await asyncio.sleep(0.3)
