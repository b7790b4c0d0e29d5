"""A handler slower than ack_wait is neither redelivered nor run twice.

A partition's owner has no pull request outstanding while it runs a batch (it fetches, runs,
commits, acks, then fetches again, and each pull request expires after fetch_timeout), so
JetStream has nowhere to redeliver the message when ack_wait passes, and the ack that follows
the commit is accepted late. No +WPI (in-progress) reports are needed; this test guards that
property against a loop that would prefetch while a batch runs.
"""

from __future__ import annotations

import asyncio

import nats

import statefn
from statefn import Context, StatefulFunction, _naming
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

    async with helpers.running_sidecar(statefn.App(fn), nats_server, etcd_server, ack_wait=1.0, partitions=1) as sc, \
            helpers.client(nats_server, etcd_server, retry_interval=30.0) as client:
        # 2.5 ack_waits: without progress reports JetStream would redeliver it twice meanwhile.
        assert await client.invoke(f"{namespace}/slow", "k", "crawl", seconds=2.5) == 1
        assert await client.invoke(f"{namespace}/slow", "k", "crawl", seconds=0.0) == 2
        assert sc.status()["stats"].get("duplicates", 0) == 0
    nc = await nats.connect(nats_server.url)
    try:
        ftype = _naming.FunctionType.parse(f"{namespace}/slow")
        info = await nc.jetstream().consumer_info(ftype.stream, ftype.consumer_name(0))
        assert info.num_redelivered == 0 and info.num_ack_pending == 0, info
    finally:
        await nc.close()
