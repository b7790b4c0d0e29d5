"""Scaling reaction on the e2e harness with an agent node: lag -> replicas ready, zero -> first reply.

Both are measured twice in the same run: driven by the operator's autoscaler (what a user gets),
and as the floor, the same pod template scaled directly (``kubectl scale``) with no operator in the
loop, so the ratio is the autoscaler's own delay on top of starting pods on this machine.

The load is a burst that lasts until the replicas are ready. A burst alone does not: one replica
takes all of it into its batches at once and runs every key's messages in parallel (each key's in
order), so 200 x 300 ms over 20 keys is gone in ~3 s however many replicas there are; the
autoscaler reads its lag (~200) at every tick and scales 1 -> 3 at the first, then, with the lag
gone, to 0 after ``scaleToZeroAfterSeconds``, ~6 s after the burst. Pods that take longer than
that to be ready (4.5-6 s on a 2-core VM) are never all ready, and the measurement waited for
them in vain. So after the burst, until the replicas are ready, the stream is kept holding
``WAITING`` messages not yet delivered: the lag never falls below what ``MAX_REPLICAS`` replicas
are wanted for, on any machine, and the autoscaler has no reason to scale down before it is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any

from rich.console import Console

import statefn
from e2e import harness, operator_proc
from statefn_core import constants, errors, layout
from statefn_operator import dataplane, manifests, settings

NS = "bench-scale"
PARTITIONS, MAX_REPLICAS, TARGET_LAG = 4, 3, 20
SCALING = {"minReplicas": 0, "maxReplicas": MAX_REPLICAS, "targetLagPerReplica": TARGET_LAG,
           "scaleDownStabilizationSeconds": 3, "scaleToZeroAfterSeconds": 3}
KEYS, WORK_MS = 20, 300
BURST = 200  # messages of 300 ms over 20 keys: ~3 s of work per key, lag far above one replica's target
# Then, until MAX_REPLICAS are ready: at least this many messages stored and not yet delivered to any replica,
# so the lag (which counts them) wants MAX_REPLICAS at every tick. Topped up to twice as many when below it.
WAITING = MAX_REPLICAS * TARGET_LAG
READY_TIMEOUT = 120.0


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


class Load:
    """One function's load: messages sent in waves of one per key (so every key is owed the same count)."""

    def __init__(self, client: statefn.Client, fn: str) -> None:
        self.client, self.fn = client, fn
        self.per_key = 0  # messages sent to each key, over every round
        self.stream = layout.FunctionType.parse(fn).stream

    async def send(self, per_key: int) -> int:
        first = self.per_key
        self.per_key += per_key
        await asyncio.gather(*(self.client.send(self.fn, f"k{k}", "work", idempotency_key=f"m{n}-k{k}", ms=WORK_MS)
                               for n in range(first, self.per_key) for k in range(KEYS)))
        return per_key * KEYS

    async def waiting(self) -> int:
        """Messages stored and not yet delivered to any replica, over the function's partitions."""
        consumers = await self.client.nats.jetstream().consumers_info(self.stream)
        return sum(int(c.num_pending or 0) for c in consumers)

    async def keep_waiting(self, stop: asyncio.Event) -> int:
        """Tops the undelivered messages up to 2 x WAITING whenever they are fewer than WAITING, until ``stop``.

        What a replica has taken into a batch stays in the lag (unacked) until that batch commits, which takes
        at least one message's work; this looks again every 0.1 s, so the lag stays above WAITING throughout.
        A wave in flight is finished before stopping: every key is owed exactly ``per_key`` messages.
        """
        sent = 0
        while not stop.is_set():
            waiting = await self.waiting()
            if waiting < WAITING:
                sent += await self.send(math.ceil((2 * WAITING - waiting) / KEYS))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        return sent


def ready_replicas(cluster: harness.ControlPlane, name: str) -> int:
    out = cluster.kubectl("get", "deployment", f"sfn-{name}", "-n", NS, "-o", "jsonpath={.status.readyReplicas}",
                          check=False)
    return int(out.stdout or 0) if out.returncode == 0 else 0


async def burst_until_ready(cluster: harness.ControlPlane, name: str, load: Load,
                            scale: tuple[str, ...] | None = None) -> tuple[float, int]:
    """The burst, then the stream kept holding WAITING undelivered messages until MAX_REPLICAS are ready.

    Returns the time from the burst's first publish until they are, and the messages sent. ``scale``:
    a kubectl command run right after the burst (the floor scales directly).
    """
    started = time.perf_counter()
    sent = await load.send(BURST // KEYS)
    if scale is not None:
        await asyncio.to_thread(cluster.kubectl, *scale)
    stop = asyncio.Event()
    keeper = asyncio.create_task(load.keep_waiting(stop))
    try:
        while await asyncio.to_thread(ready_replicas, cluster, name) < MAX_REPLICAS:
            if time.perf_counter() - started > READY_TIMEOUT:
                raise TimeoutError(f"{MAX_REPLICAS} ready not reached within {READY_TIMEOUT:.0f} s")
            if keeper.done():
                keeper.result()  # it failed: its error, rather than a wait with no load
            await asyncio.sleep(0.1)
        took = time.perf_counter() - started
    finally:
        stop.set()
        sent += await keeper
    return took, sent


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
        load = Load(client, fn)
        for r in range(rounds):
            started = time.perf_counter()
            await first_reply(client, fn, f"wake-{r}")
            wakes.append(time.perf_counter() - started)
            took, sent = await burst_until_ready(cluster, name, load)
            ups.append(took)
            console.print(f"  autoscaled round {r}: zero -> reply {wakes[-1]:.2f} s, lag -> {MAX_REPLICAS} ready "
                          f"{ups[-1]:.2f} s ({sent} messages)")
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
        load = Load(client, fn)
        for r in range(rounds):
            started = time.perf_counter()
            reply = asyncio.create_task(first_reply(client, fn, f"wake-{r}"))
            await asyncio.to_thread(cluster.kubectl, *scale, "--replicas=1")
            await reply
            wakes.append(time.perf_counter() - started)
            took, sent = await burst_until_ready(cluster, name, load, (*scale, f"--replicas={MAX_REPLICAS}"))
            ups.append(took)
            console.print(f"  direct round {r}: zero -> reply {wakes[-1]:.2f} s, lag -> {MAX_REPLICAS} ready "
                          f"{ups[-1]:.2f} s ({sent} messages)")
            await wait_drained(load)
            cluster.kubectl(*scale, "--replicas=0")
            wait(lambda: idle(cluster, name), 120, "no pod left")
    return wakes, ups


async def wait_drained(load: Load) -> None:
    """Every message sent so far processed (each key's count), so no round leaves work for the next."""
    while True:
        states = await asyncio.gather(*(load.client.get_state(load.fn, f"k{k}") for k in range(KEYS)))
        if all(s.get("count", 0) >= load.per_key for s in states):
            return
        await asyncio.sleep(0.3)
