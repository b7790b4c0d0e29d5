"""A handler slower than ack_wait is neither redelivered nor run twice: the sidecar reports progress (+WPI).

Without the reports JetStream redelivers the message once ack_wait passes, into whatever pull
request is open (the long poll that delivered it, or the owner's next one, racing its late ack).
Exactly-once would still drop the copy (answered from its record), but only after a wasted
delivery. The sidecar sends "in progress" every half ack_wait while a batch runs.
"""

from __future__ import annotations

import asyncio

import nats

import statefn
from statefn import Context, StatefulFunction
from statefn_core import layout
from statefn_sidecar import devservers
from tests import helpers


async def test_a_batch_longer_than_ack_wait_is_not_redelivered(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    fn = StatefulFunction(f"{namespace}/slow")
    runs = fn.state("runs", int, default=0)

    @fn.handler
    async def crawl(ctx: Context, seconds: float) -> int:
        await asyncio.sleep(seconds)
        ctx[runs] += 1
        return ctx[runs]

    # fetch_timeout 3 s: the long poll that delivered the message stays open on the server while the batch runs,
    # so JetStream has somewhere to redeliver it the moment ack_wait passes without word from the sidecar.
    async with helpers.running_sidecar(statefn.App(fn), nats_server, etcd_server, ack_wait=1.0, partitions=1,
                                       fetch_timeout=3.0) as sc, \
            helpers.client(nats_server, etcd_server, retry_interval=30.0) as client:
        # 2.5 ack_waits: without progress reports JetStream would redeliver it twice meanwhile.
        assert await client.invoke(f"{namespace}/slow", "k", "crawl", seconds=2.5) == 1
        assert await client.invoke(f"{namespace}/slow", "k", "crawl", seconds=0.0) == 2
        stats = sc.status()["stats"]
        assert stats.get("duplicates", 0) == 0, stats
        assert stats["in_progress_reports"] >= 2, stats  # at 0.5 s, 1.0 s, ... of the 2.5 s batch
    nc = await nats.connect(nats_server.url)
    try:
        ftype = layout.FunctionType.parse(f"{namespace}/slow")
        info = await nc.jetstream().consumer_info(ftype.stream, ftype.consumer_name(0))
        assert info.num_redelivered == 0 and info.num_ack_pending == 0, info
    finally:
        await nc.close()


async def test_waiting_for_a_slow_reply_stores_one_request(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    """The client re-sent its request every retry_interval while waiting, each a new stored message (answered
    as a duplicate). A stored request runs anyway: now it is stored once, and the client reads its record."""
    fn = StatefulFunction(f"{namespace}/slow")

    @fn.handler
    async def crawl(ctx: Context, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    async with helpers.running_sidecar(statefn.App(fn), nats_server, etcd_server, ack_wait=5.0, partitions=1), \
            helpers.client(nats_server, etcd_server, retry_interval=0.1) as client:
        assert await client.invoke(f"{namespace}/slow", "k", "crawl", seconds=2.0) == "done"
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().stream_info(layout.FunctionType.parse(f"{namespace}/slow").stream)
        assert info.state.last_seq == 1, info.state  # 2 s at 0.1 s re-sends stored about 20 before
    finally:
        await nc.close()


async def test_a_lost_reply_is_found_in_the_record(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    """The reply is published once, to the caller's inbox; if the caller's connection drops then, it is gone.
    The request ran and its record holds the reply: the waiting client finds it there."""
    fn = StatefulFunction(f"{namespace}/lossy")
    runs = fn.state("runs", int, default=0)

    @fn.handler
    async def bump(ctx: Context) -> int:
        ctx[runs] += 1
        return ctx[runs]

    async with helpers.running_sidecar(statefn.App(fn), nats_server, etcd_server, partitions=1), \
            helpers.client(nats_server, etcd_server, retry_interval=0.2, timeout=10) as client:
        class Deaf(dict[str, object]):
            def get(self, key: str, default: object = None) -> object:
                return None  # the reply handler finds nobody waiting: every reply is lost on the way

        client._waiters = Deaf()  # type: ignore[assignment]
        assert await client.invoke(f"{namespace}/lossy", "k", "bump") == 1
        assert await client.invoke(f"{namespace}/lossy", "k", "bump") == 2
