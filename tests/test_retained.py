"""A function deleted with its data kept (Retain) keeps its partition count: its data is laid out by it."""

from __future__ import annotations

import aetcd
import nats
import pytest

from statefn_core import layout
from statefn_sidecar import devservers, topology


async def test_a_retained_function_comes_back_only_with_its_partition_count(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    fn = layout.FunctionType(namespace, "orders")
    host, port = etcd_server.endpoint.rsplit(":", 1)
    nc = await nats.connect(nats_server.url)
    async with aetcd.Client(host=host, port=int(port)) as etcd:
        js = nc.jetstream()
        try:
            await topology.reserve(etcd, fn, 2)
            await topology.remove(js, etcd, fn, delete_data=False)
            assert await etcd.get(fn.meta_key.encode()) is None  # deregistered
            with pytest.raises(topology.PartitionMismatch,
                               match=r"kept its data \(deleted with Retain\) from 2 partitions.*asked for 4"):
                await topology.reserve(etcd, fn, 4)
            with pytest.raises(topology.PartitionMismatch, match="asked for 4"):  # a sidecar asking for 4
                await topology.register(etcd, fn, {"type": str(fn)}, 4)
            # A sidecar that does not ask adopts the count; so does the operator asking for the same.
            assert await topology.provision(js, etcd, fn, {"type": str(fn)}, None, ack_wait=30, batch_size=16) == 2
            await topology.reserve(etcd, fn, 2)
            # Deleted with its data, the name is free again.
            await topology.remove(js, etcd, fn, delete_data=True)
            assert await topology.fixed_partitions(etcd, fn) is None
            await topology.reserve(etcd, fn, 4)
            assert await topology.fixed_partitions(etcd, fn) == (4, "was created with")
        finally:
            await topology.remove(js, etcd, fn, delete_data=True)
            await nc.close()
