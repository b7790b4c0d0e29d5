"""The whole platform as a user gets it: helm install, kubectl apply, invoke, autoscale, lose pods, timers at zero.

The chart is installed into a real control plane (API server, controller-manager, scheduler) whose
node is the test agent: the operator, the gateway and every function pod run as processes of this
checkout, each pod with its own address and its ServiceAccount's token. NATS and etcd are real
servers outside the cluster (``nats.external`` / ``etcd.external``), as with a managed data plane.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import aetcd
import aiohttp
import pytest

import statefn
from e2e import harness, helmcli, objects, operator_proc
from e2e.objects import condition, wait_for
from statefn_core import constants, layout
from statefn_sidecar import tracing
from tests import otlp_receiver

NS = "default"  # where the example's manifests put their functions
RELEASE, RELEASE_NS = "platform", "statefn-platform"
GATEWAY = f"{RELEASE}-statefn-gateway"


@pytest.fixture(scope="module")
def receiver() -> Iterator[otlp_receiver.OtlpReceiver]:
    """Where the platform's traces go: an OTLP receiver outside the cluster, like the data plane."""
    with otlp_receiver.OtlpReceiver(host=operator_proc.DATA_PLANE_HOST) as r:
        yield r


@pytest.fixture(scope="module")
def platform(crds: harness.ControlPlane, node: str, plane: operator_proc.DataPlane,
             helm: helmcli.Helm, receiver: otlp_receiver.OtlpReceiver) -> Iterator[harness.ControlPlane]:
    kube = ("--kubeconfig", str(crds.kubeconfig))
    helm("install", RELEASE, str(helmcli.CHART), "--namespace", RELEASE_NS, "--create-namespace", *kube,
         "--set", "image.repository=statefn", "--set", "image.tag=dev",
         "--set", f"nats.external.url={plane.nats.url}", "--set", f"etcd.external.endpoints={{{plane.etcd.endpoint}}}",
         "--set", "operator.watchNamespaces={default}", "--set", "operator.autoscaleInterval=1",
         "--set", "gateway.replicas=1", "--set", f"tracing.otlpEndpoint={receiver.endpoint}",
         "--wait", "--timeout=100s")
    yield crds
    crds.kubectl("delete", "sfn", "--all", "-n", NS, "--timeout=60s", check=False)
    helm("uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", *kube)


def get(cluster: harness.ControlPlane, *what: str) -> dict[str, Any]:
    return objects.get(cluster, NS, *what)


def gateway_url(cluster: harness.ControlPlane) -> str:
    """A ready pod behind the gateway Service, found by the Service's own selector.

    Not through the EndpointSlice: the API server refuses loopback addresses in endpoints, and the test agent's pod
    addresses are 127.x.y.z (no Service routing here, no kube-proxy either).
    """
    service = objects.get(cluster, RELEASE_NS, "service", GATEWAY)
    selector = ",".join(f"{k}={v}" for k, v in service["spec"]["selector"].items())

    def ready_address() -> str | None:
        for pod in objects.get(cluster, RELEASE_NS, "pods", "-l", selector).get("items", []):
            if condition(pod, "Ready").get("status") == "True" and not pod["metadata"].get("deletionTimestamp"):
                return str(pod["status"]["podIP"])
        return None
    return f"http://{wait_for(ready_address, what='a ready gateway pod')}:8080"


def ready(cluster: harness.ControlPlane, name: str) -> bool:
    return condition(get(cluster, "sfn", name), "Ready").get("status") == "True"


def replicas(cluster: harness.ControlPlane, name: str) -> tuple[int, int]:
    """(spec.replicas, readyReplicas) of the function's Deployment."""
    dep = get(cluster, "deployment", f"sfn-{name}")
    return int(dep["spec"]["replicas"]), int(dep.get("status", {}).get("readyReplicas") or 0)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Idempotency-Key": key} if key else {}
    async with session.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_the_example_runs_on_the_platform(platform: harness.ControlPlane,
                                                receiver: otlp_receiver.OtlpReceiver) -> None:
    cluster = platform
    cluster.kubectl("apply", "-f", str(harness.ROOT / "examples" / "counter" / "k8s"))
    for name in ("counter", "account", "payment"):
        wait_for(lambda n=name: ready(cluster, n), timeout=90, what=f"{name} Ready")
    table = cluster.kubectl("get", "sfn", "-n", NS).stdout
    print(table)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["counter"][1] == rows["account"][1] == rows["payment"][1] == "True", table

    base = f"{gateway_url(cluster)}/v1/functions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
        assert await post(session, f"{base}/demo/counter/k1/increment", {"by": 2}) == (200, {"result": 2})
        # The same Idempotency-Key is the same invocation: the original reply, nothing applied twice.
        for _ in range(2):
            assert await post(session, f"{base}/demo/counter/k1/increment", {"by": 3}, key="once") == (
                200, {"result": 5})
        assert await post(session, f"{base}/bank/account/alice/deposit", {"amount": 100}) == (200, {"result": 100})
        assert await post(session, f"{base}/bank/account/alice/transfer", {"to": "bob", "amount": 30}) == (
            200, {"result": 70})
        status, body = await post(session, f"{base}/bank/account/alice/withdraw", {"amount": 1000})
        assert (status, body["error"]["kind"]) == (500, "handler_error"), body
        assert "insufficient funds: balance 70, withdrawal 1000" in body["error"]["message"]
        deadline = time.monotonic() + 20
        while True:  # the transfer's deposit is a one-way message: it lands shortly after the reply
            async with session.get(f"{base}/bank/account/bob/state") as resp:
                state = await resp.json()
            if state.get("state", {}).get("balance") == 30 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert state["state"]["balance"] == 30, state

        # Traced (the chart's tracing.otlpEndpoint): the transfer, from the gateway pod through alice's pod to the
        # deposit in bob's partition, is one trace; the sidecars report the function as their service.
        def lineage(spans: list[otlp_receiver.ReceivedSpan]) -> list[otlp_receiver.ReceivedSpan] | None:
            """Bob's deposit and its ancestors up to the root, once all of them arrived."""
            by_id = {s.span_id: s for s in spans}
            line = [s for s in spans
                    if s.name == "invoke bank/account.deposit" and s.attributes.get(tracing.KEY) == "bob"]
            while line and line[-1].parent_id:
                if line[-1].parent_id not in by_id:
                    return None
                line.append(by_id[line[-1].parent_id])
            return line or None
        spans = receiver.wait_for(lambda spans: lineage(spans) is not None, timeout=30)
        deposit, send, transfer, ingress = lineage(spans) or []
        trace = {s.span_id: s for s in spans if s.trace_id == deposit.trace_id}
        assert (send.kind, transfer.name, transfer.attributes[tracing.KEY]) == (
            "PRODUCER", "invoke bank/account.transfer", "alice")
        assert (ingress.kind, ingress.service, ingress.parent_id) == ("SERVER", "statefn-gateway", "")
        assert deposit.service == transfer.service == "bank/account"
        for invocation in (transfer, deposit):
            assert [s.name for s in trace.values() if s.parent_id == invocation.span_id].count("commit") == 1

        # Metrics, as the chart's PodMonitor and gateway ServiceMonitor scrape them: the pod's health port, the
        # gateway's port.
        pods = objects.get(cluster, NS, "pods", "-l", f"{constants.LABEL_FUNCTION}={NS}.account")["items"]
        scraped = ""
        for pod in [p for p in pods if p["status"].get("podIP")]:
            async with session.get(f"http://{pod['status']['podIP']}:8081/metrics") as resp:
                scraped += await resp.text()
        assert 'statefn_invocations_total{function="bank/account",outcome="ok"}' in scraped
        async with session.get(f"{gateway_url(cluster)}/metrics") as resp:
            assert 'statefn_gateway_requests_total{code="200",function="bank/account"} 2.0' in await resp.text()

        # Durable calls across pods: the payment's pod calls withdraw (alice) and deposit (carol) in the account's
        # pods and replies once both replies came back; the deposit is committed before the payment's reply.
        assert await post(session, f"{base}/bank/payment/p1/pay", {"source": "alice", "target": "carol",
                                                                   "amount": 5}) == (200, {"result": "paid"})
        for account, balance in (("alice", 65), ("carol", 5)):
            async with session.get(f"{base}/bank/account/{account}/state") as resp:
                assert (await resp.json())["state"]["balance"] == balance, account

        # A transaction across pods: alice coordinates, and takes part with carol; both commit, or neither. The
        # participants apply the decision just after the reply. Too large a move votes no and changes nothing.
        assert await post(session, f"{base}/bank/account/alice/move", {"to": "carol", "amount": 15}) == (
            200, {"result": "moved"})
        status, body = await post(session, f"{base}/bank/account/carol/move", {"to": "alice", "amount": 10**6})
        assert (status, body["result"].split(":")[0]) == (200, "declined"), body
        for _ in range(50):
            balances = []
            for account in ("alice", "carol"):
                async with session.get(f"{base}/bank/account/{account}/state") as resp:
                    balances.append((await resp.json())["state"]["balance"])
            if balances == [50, 20]:
                break
            await asyncio.sleep(0.1)
        assert balances == [50, 20]


SLOW_SCALING = {"minReplicas": 0, "maxReplicas": 3, "targetLagPerReplica": 20,
                "scaleDownStabilizationSeconds": 5, "scaleToZeroAfterSeconds": 8}


async def wake_from_zero(session: aiohttp.ClientSession, url: str, key: str) -> tuple[float, dict[str, Any]]:
    """One synchronous call to a function at zero replicas: its lag brings a pod up, the reply comes from it.

    A 504 (the gateway gave up waiting) is retried with the same Idempotency-Key: the same invocation, applied once.
    """
    started = time.monotonic()
    for _ in range(3):
        status, body = await post(session, url, {"ms": 1}, key=key)
        if status != 504:
            assert status == 200, body
            return time.monotonic() - started, body
    raise AssertionError(f"no reply within three gateway timeouts: {body}")


async def test_autoscaling_from_zero_up_under_lag_and_back_to_zero(platform: harness.ControlPlane,
                                                                   plane: operator_proc.DataPlane) -> None:
    cluster = platform
    cluster.kubectl("apply", "-f", "-", stdin=objects.function(
        "slow", NS, function="demo/slow", app="e2e.apps:app", partitions=4, scaling=SLOW_SCALING))
    wait_for(lambda: condition(get(cluster, "sfn", "slow"), "Provisioned").get("status") == "True",
             what="slow Provisioned")
    assert replicas(cluster, "slow") == (0, 0)  # minReplicas 0 and nothing queued: no pod at all
    url = f"{gateway_url(cluster)}/v1/functions/demo/slow"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:
        # Never run before: the gateway knows the function only by its registration, and the call wakes it.
        first, body = await wake_from_zero(session, f"{url}/w0/work", "wake-1")
        print(f"zero -> first reply (never run): {first:.1f}s")
        assert body == {"result": 1}

        # A burst far above one replica's target lag: straight to maxReplicas (3 <= 4 partitions).
        sends = {f"k{i}": 25 for i in range(12)}
        async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
            burst = time.monotonic()
            await asyncio.gather(*(client.send("demo/slow", key, "work", idempotency_key=f"{key}-{n}", ms=300)
                                   for key, count in sends.items() for n in range(count)))
            wait_for(lambda: replicas(cluster, "slow") == (3, 3), timeout=60, what="3 ready replicas")
            print(f"lag -> 3 replicas ready: {time.monotonic() - burst:.1f}s")
            obj = get(cluster, "sfn", "slow")
            assert "scaling up" in obj["status"]["lastScaleReason"], obj["status"]

            async def all_done() -> bool:
                states = await asyncio.gather(*(client.get_state("demo/slow", key) for key in sends))
                return all(s.get("count") == sends[key] for s, key in zip(states, sends, strict=True))
            deadline = time.monotonic() + 90
            while not await all_done():
                assert time.monotonic() < deadline, "the burst was not processed within 90s"
                await asyncio.sleep(0.5)

            # Idle: nothing goes at once; down after the stabilization window, to zero after scaleToZeroAfterSeconds.
            assert replicas(cluster, "slow")[0] > 0
            wait_for(lambda: replicas(cluster, "slow")[0] == 0, timeout=60, what="scaled to zero")
            assert any(r == "ScaledToZero" for _, r, _ in objects.events(cluster, NS, "slow"))
            assert condition(get(cluster, "sfn", "slow"), "Ready").get("status") == "True"  # 0/0 is what it wants
            states = await asyncio.gather(*(client.get_state("demo/slow", key) for key in sends))
            assert [s.get("count") for s in states] == list(sends.values())  # nothing doubled by rebalancing

        again, body = await wake_from_zero(session, f"{url}/w0/work", "wake-2")
        print(f"zero -> first reply (scaled down before): {again:.1f}s")
        assert body == {"result": 2}


async def test_force_deleted_pods_lose_and_double_nothing(platform: harness.ControlPlane,
                                                          plane: operator_proc.DataPlane) -> None:
    """kill -9 of a whole pod (kubectl delete --force) under load: its partitions move on, every count is exact."""
    cluster = platform
    wait_for(lambda: ready(cluster, "counter"), timeout=90, what="counter Ready")
    selector = f"{constants.LABEL_FUNCTION}=default.counter"
    keys = [f"f{i}" for i in range(40)]
    per_key = 25
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client:
        sent = [client.send("demo/counter", key, "increment", idempotency_key=f"{key}-{n}")
                for n in range(per_key) for key in keys]
        await asyncio.gather(*sent[: len(sent) // 2])
        victims = [p["metadata"]["name"] for p in objects.get(cluster, NS, "pods", "-l", selector)["items"]]
        assert victims
        cluster.kubectl("delete", "pods", "-n", NS, "--grace-period=0", "--force", victims[0])
        await asyncio.gather(*sent[len(sent) // 2:])
        deadline = time.monotonic() + 120
        while True:
            states = await asyncio.gather(*(client.get_state("demo/counter", key) for key in keys))
            counts = [s.get("count", 0) for s in states]
            if all(c >= per_key for c in counts) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert counts == [per_key] * len(keys), counts
        await asyncio.sleep(3)  # redeliveries of the killed pod's in-flight messages must not add anything
        states = await asyncio.gather(*(client.get_state("demo/counter", key) for key in keys))
        assert [s.get("count", 0) for s in states] == [per_key] * len(keys)
    assert victims[0] not in [p["metadata"]["name"] for p in objects.get(cluster, NS, "pods", "-l", selector)["items"]]


TIMERS_FUNCTION, TIMERS_PARTITIONS = "demo/timers", 2
TIMERS_SCALING = {"minReplicas": 0, "maxReplicas": 1, "scaleDownStabilizationSeconds": 5, "scaleToZeroAfterSeconds": 5}
# label -> (key, handler, args, seconds until due)
TIMERS: dict[str, tuple[str, str, dict[str, Any], float]] = {
    "sleep": ("a", "nap", {"seconds": 30}, 30),
    "delayed": ("b", "later", {"seconds": 40}, 40),
    "retry": ("c", "flaky", {"seconds": 55}, 55),
    "inquiry": ("coord", "abandon", {"participant": "p", "tx_timeout": 70}, 70),
}
LATE_S = 3.0


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Like objects.wait_for, without blocking the loop (the sampler below runs meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(check)
        if result:
            return result
        await asyncio.sleep(0.3)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def test_timers_wake_a_function_at_zero_and_fire_on_time(platform: harness.ControlPlane,
                                                               plane: operator_proc.DataPlane) -> None:
    """Scale to zero strands no timer: woken ahead of each from the pending-work index, each fires on time.

    A durable sleep (30 s), a delayed send (40 s), a retry backoff (55 s) and a participant left prepared by a
    coordinator that failed without deciding, which inquires after its timeout (70 s). Between them the function
    goes to zero (``scaleToZeroAfterSeconds: 5``); at the end it is back at zero with nothing pending.
    """
    cluster = platform
    cluster.kubectl("apply", "-f", "-", stdin=objects.function(
        "timers", NS, function=TIMERS_FUNCTION, app="e2e.apps:app", partitions=TIMERS_PARTITIONS,
        scaling=TIMERS_SCALING))
    await until(lambda: condition(get(cluster, "sfn", "timers"), "Provisioned").get("status") == "True",
                60, "timers Provisioned")
    assert replicas(cluster, "timers") == (0, 0)
    fn = layout.FunctionType.parse(TIMERS_FUNCTION)
    prepared_key = layout.PartitionKeys(fn, layout.partition_of("p", TIMERS_PARTITIONS)).prepared("p")
    seen: dict[str, float] = {}  # label -> when the test first saw it done
    host, port = plane.etcd.endpoint.split(":")
    async with statefn.Client(nats=plane.nats.url, etcd=plane.etcd.endpoint) as client, \
            aetcd.Client(host=host, port=int(port)) as etcd:
        started = time.time()
        for key, handler, args, _ in TIMERS.values():
            await client.send(TIMERS_FUNCTION, key, handler, **args)
        due = {label: started + seconds for label, (*_, seconds) in TIMERS.items()}

        async def sample() -> None:
            was_prepared = False
            while len(seen) < len(TIMERS):
                for label, (key, *_) in TIMERS.items():
                    fired = (await client.get_state(TIMERS_FUNCTION, key)).get("fired", {})
                    if label in fired and label not in seen:
                        seen[label] = fired[label]
                prepared = await etcd.get(prepared_key) is not None
                if was_prepared and not prepared and "inquiry" not in seen:
                    seen["inquiry"] = time.time()  # asked its coordinator, was told to abort, is released
                was_prepared = was_prepared or prepared
                await asyncio.sleep(0.2)
        sampler = asyncio.create_task(sample())
        try:
            # The messages wake it; with nothing to do before its first timer is due, it goes back to zero.
            await until(lambda: replicas(cluster, "timers")[1] == 1, 25, "woken by the messages")
            await until(lambda: replicas(cluster, "timers")[0] == 0, 25, "scaled to zero before the first timer")
            assert not seen, seen
            status = get(cluster, "sfn", "timers")["status"]
            assert status["nextWakeUp"] and status["wakeUpSeconds"] > 0, status
            listed = cluster.kubectl("get", "sfn", "timers", "-n", NS).stdout
            print(listed)
            columns = listed.splitlines()[1].split()
            assert columns[4] == status["nextWakeUp"], columns  # NAME READY REPLICAS LAG NEXT-WAKE-UP AGE
            print(f"at zero with the next timer due {status['nextWakeUp']} (wake-up {status['wakeUpSeconds']}s)")
            await asyncio.wait_for(sampler, timeout=max(due.values()) - time.time() + 30)
        finally:
            sampler.cancel()
        lateness = {label: round(seen[label] - due[label], 2) for label in TIMERS}
        # From when the messages went out: an upper bound (it includes the first wake's delay before they ran).
        print(f"lateness (s) of timers at a function scaled to zero: {lateness}")
        assert all(-1.0 <= late <= LATE_S for late in lateness.values()), lateness
        assert "prepared" not in (await client.get_state(TIMERS_FUNCTION, "p")).get("fired", {})  # it was aborted

    woken = [m for _, r, m in objects.events(cluster, NS, "timers") if r == "WokenForTimer"]
    print("woken for timers:", *woken, sep="\n  ")
    assert len(woken) >= 2 and all("waking 0 -> 1" in m for m in woken), woken
    await until(lambda: replicas(cluster, "timers")[0] == 0, 30, "back to zero")
    status = await until(lambda: (s := get(cluster, "sfn", "timers")["status"]) and "nextWakeUp" not in s and s,
                         15, "no timer left")
    assert status["inboxBacklog"] == 0
