"""The operator's one connection to NATS and etcd, shared by every handler.

The operator provisions streams, consumers and registrations ahead of any pod (so messages can
queue while a function is scaled to zero, and lag can be read before the first pod starts), and
removes them on deletion. It uses the sidecar's own topology code: one definition of a stream's
shape, not two that could drift.
"""

from __future__ import annotations

import dataclasses
import logging

import aetcd
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext

from statefn_core import connect, constants, layout, pendingwork
from statefn_sidecar import deadletters, topology

_log = logging.getLogger("statefn.operator.dataplane")


@dataclasses.dataclass
class DataPlane:
    nc: NatsClient
    js: JetStreamContext
    etcd: aetcd.Client

    @classmethod
    async def connect(cls, nats_url: str, etcd_endpoint: str) -> DataPlane:
        nc = await connect.nats_connection(nats_url, "statefn-operator")
        etcd = await connect.etcd_connection(etcd_endpoint)
        return cls(nc, nc.jetstream(timeout=10), etcd)

    async def close(self) -> None:
        await self.nc.close()
        await self.etcd.close()

    async def provision(self, fn: layout.FunctionType, partitions: int, *, stream_replicas: int = 1) -> None:
        """Stream, dead-letter stream, one consumer per partition, then the registration."""
        await topology.ensure_stream(self.js, fn, replicas=stream_replicas)
        await topology.ensure_dlq_stream(self.js, replicas=stream_replicas)
        await topology.ensure_consumers(self.js, fn, partitions, ack_wait=constants.DEFAULT_ACK_WAIT_S,
                                        max_ack_pending=topology.max_ack_pending(constants.DEFAULT_BATCH_SIZE))
        await topology.reserve(self.etcd, fn, partitions)

    async def remove(self, fn: layout.FunctionType, *, delete_data: bool) -> None:
        await topology.remove(self.js, self.etcd, fn, delete_data=delete_data)

    async def trim_dead_letters(self, fn: layout.FunctionType, *, max_age: float | None,
                                max_messages: int | None) -> int:
        """Enforce a function's own dead-letter retention (its spec's ``deadLetters``); returns how many went.

        The stream's limits are the same for every function; a function may keep its letters shorter.
        """
        gone = 0
        if max_age is not None:
            gone += await deadletters.purge(self.js, function=str(fn), older_than=max_age)
        if max_messages is not None:
            gone += await deadletters.purge(self.js, function=str(fn), keep=max_messages)
        return gone

    async def lag(self, fn: layout.FunctionType) -> int | None:
        """None when the stream does not exist (yet, or any more)."""
        try:
            return await topology.lag(self.js, fn)
        except nats.js.errors.NotFoundError:
            return None

    async def pending_work(self, fn: layout.FunctionType) -> pendingwork.PendingWork:
        """Timers and inbox backlog the function's partitions keep in etcd (one range request)."""
        return await topology.pending_work(self.etcd, fn)
