"""Commit outcome unknown, publish acks lost and message acks lost, injected at random under load."""

from __future__ import annotations

import asyncio
import collections

import statefn
from statefn import Context
from statefn_sidecar import config, faults, invoker, sidecar
from tests import helpers, test_smoke


def make_app(ns: str) -> statefn.App:
    app = test_smoke.make_app(ns)
    counter = app.functions[f"{ns}/counter"]
    count = counter.states["count"]

    @counter.handler
    async def fan_out(ctx: Context, keys: list[str]) -> None:
        """Sends on channels, so lost publish acks make the outbox publish twice."""
        ctx[count] += 1
        for k in keys:
            ctx.send(f"{ctx.function}", k, "increment", by=1)

    return app


async def test_unknown_outcomes_never_apply_twice(nats_server, etcd_server, namespace) -> None:
    fn = f"{namespace}/counter"
    injected = faults.Faults("commit_reply_lost=0.3,publish_ack_lost=0.3,ack_lost=0.1,seed=11")
    # A lost ack comes back after ack_wait: redelivered ingress and channel messages, all of them already applied.
    cfg = config.SidecarConfig(nats_url=nats_server.url, etcd_endpoint=etcd_server.endpoint, partitions=4,
                               lease_ttl=3, fetch_timeout=0.2, rebalance_interval=0.1, ack_wait=1.0)
    sc = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(make_app(namespace)), injected)
    await sc.start()
    try:
        async with helpers.client(nats_server, etcd_server, timeout=60) as c:
            keys = [f"k{i}" for i in range(20)]
            expected: collections.Counter[str] = collections.Counter()
            jobs = []
            for i in range(300):
                k = keys[i % len(keys)]
                expected[k] += 1
                jobs.append(c.invoke(fn, k, "increment", idempotency_key=f"inc-{i}"))
            await asyncio.gather(*jobs)
            # One fan-out at a time, so each commits alone and publishes its own bundles: enough publishes
            # for the lost publish acks to happen (run concurrently, they batch into a handful of commits).
            for i in range(30):
                source = f"src{i}"
                expected[source] += 1
                targets = [keys[(i + j) % len(keys)] for j in range(5)]
                expected.update(targets)
                await c.invoke(fn, source, "fan_out", keys=targets, idempotency_key=f"fan-{i}")
            all_keys = sorted(expected)
            got: dict[str, int] = {}
            for _ in range(100):
                got = {k: (await c.get_state(fn, k)).get("count", 0) for k in all_keys}
                if got == dict(expected):
                    break
                await asyncio.sleep(0.1)
            assert got == dict(expected)
            # The faults really happened, and were resolved by reading back / re-publishing.
            assert injected.fired["commit_reply_lost"] >= 3, injected.fired
            assert injected.fired["publish_ack_lost"] >= 3, injected.fired
            assert injected.fired["ack_lost"] >= 3, injected.fired
            # Every lost ack's message came back and was dropped as a duplicate, not applied again (counts above).
            for _ in range(50):
                if sc.status()["stats"].get("duplicates", 0) >= injected.fired["ack_lost"]:
                    break
                await asyncio.sleep(0.1)
            assert sc.status()["stats"].get("duplicates", 0) >= injected.fired["ack_lost"], sc.status()["stats"]
            assert {k: (await c.get_state(fn, k)).get("count", 0) for k in all_keys} == dict(expected)
    finally:
        await sc.stop()
