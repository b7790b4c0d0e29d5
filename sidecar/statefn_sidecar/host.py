"""One function type in one sidecar: take the partitions assigned to us, give back the others.

Ownership is an etcd key per partition attached to this sidecar's lease; its create revision
is the epoch every commit is fenced with. A partition is taken only when its key is absent
(the previous owner released it or its lease expired), never stolen.
"""

from __future__ import annotations

import asyncio
import logging

import aetcd
from nats.aio.client import Client as NatsClient
from nats.js.client import JetStreamContext

from statefn_core import layout
from statefn_sidecar import balance, config, execution, faults, partition

_log = logging.getLogger("statefn.host")


class FunctionHost:
    def __init__(self, *, fn: layout.FunctionType, partition_count: int, etcd: aetcd.Client,
                 nc: NatsClient, js: JetStreamContext, executor: execution.Executor,
                 cfg: config.SidecarConfig, faults: faults.Faults) -> None:
        self.fn = fn
        self.partition_count = partition_count
        self._etcd = etcd
        self._nc = nc
        self._js = js
        self._executor = executor
        self._cfg = cfg
        self._faults = faults
        self.workers: dict[int, partition.PartitionWorker] = {}
        self._releasing: set[int] = set()
        self._release_tasks: set[asyncio.Task[None]] = set()

    @property
    def member_key(self) -> bytes:
        return f"{self.fn.members_prefix}{self._cfg.member_id}".encode()

    async def reconcile(self, lease_id: int) -> None:
        """Compare the assignment with what we own; release first, then acquire."""
        t = self._etcd.transactions
        mp, op = self.fn.members_prefix.encode(), self.fn.owners_prefix.encode()
        _, (members_kv, owners_kv) = await self._etcd.transaction(
            compare=[], success=[t.get(mp, layout.prefix_end(mp)), t.get(op, layout.prefix_end(op))], failure=[])
        members = [kv.key[len(mp):].decode() for _, kv in members_kv]
        owners = {int(kv.key[len(op):].decode()): (v.decode(), kv.create_revision) for v, kv in owners_kv}
        for p, worker in list(self.workers.items()):
            owner = owners.get(p)
            if worker.lost.is_set() or owner is None or owner != (self._cfg.member_id, worker.epoch):
                _log.warning("%s: no longer ours (owner %s); dropping it", worker.pid, owner)
                del self.workers[p]
                await worker.stop(graceful=False)
                if owner == (self._cfg.member_id, worker.epoch):
                    # Our loop failed but we still hold the key: free it so the partition is
                    # taken again (by us or another sidecar) instead of staying stuck.
                    await self._etcd.transaction(compare=[t.create(self.fn.owner_key(p).encode()) == worker.epoch],
                                                 success=[t.delete(self.fn.owner_key(p).encode())], failure=[])
        if self._cfg.member_id not in members:
            return  # not registered (yet, or our lease expired): take nothing
        wanted = {p for p, m in balance.assign(members, self.partition_count).items() if m == self._cfg.member_id}
        for p, worker in list(self.workers.items()):
            if p not in wanted and p not in self._releasing:
                self._releasing.add(p)
                task = asyncio.create_task(self._release(p, worker))
                self._release_tasks.add(task)
                task.add_done_callback(self._release_tasks.discard)
        for p in sorted(wanted - set(self.workers) - set(owners)):
            await self._acquire(p, lease_id)
        self.observe()

    def observe(self) -> None:
        """Partitions owned and outbox backlog, sampled on every rebalancing round."""
        m = self._executor.metrics
        m.partitions.set(len(self.workers))
        m.backlog.set(sum(w.outbox_backlog for w in self.workers.values()))

    async def _acquire(self, p: int, lease_id: int) -> None:
        t = self._etcd.transactions
        key = self.fn.owner_key(p).encode()
        ok, resp = await self._etcd.transaction(
            compare=[t.version(key) == 0],
            success=[t.put(key, self._cfg.member_id.encode(), lease=lease_id), t.get(key)],
            failure=[],
        )
        if not ok:
            return
        epoch = resp[1][0][1].create_revision
        worker = partition.PartitionWorker(
            fn=self.fn, partition=p, partition_count=self.partition_count, etcd=self._etcd, nc=self._nc,
            js=self._js, executor=self._executor, cfg=self._cfg, faults=self._faults)
        try:
            await worker.start(epoch)
        except Exception:
            _log.exception("%s: could not start partition %d; releasing it", self.fn, p)
            await self._etcd.transaction(compare=[t.create(key) == epoch], success=[t.delete(key)], failure=[])
            return
        self.workers[p] = worker
        _log.info("%s: took partition %d (epoch %d)", self.fn, p, epoch)

    async def _release(self, p: int, worker: partition.PartitionWorker) -> None:
        try:
            await worker.stop(graceful=True)
            _log.info("%s: released partition %d", self.fn, p)
        finally:
            if self.workers.get(p) is worker:
                del self.workers[p]
            self._releasing.discard(p)

    async def stop(self, *, graceful: bool) -> None:
        if graceful:
            await asyncio.gather(*(self._release(p, w) for p, w in list(self.workers.items())
                                   if p not in self._releasing))
        else:
            await asyncio.gather(*(w.stop(graceful=False) for w in self.workers.values()))
        self.workers.clear()
        self.observe()
