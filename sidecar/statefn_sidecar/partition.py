"""One owned partition: pull a batch, run it, commit it once, publish, ack.

The owner is the only writer of its partition's keys (every commit is fenced), so it caches
state, channel watermarks, counters and timers in memory and pays, per batch, one pull, one
etcd transaction (more only when etcd's limits force a split), the publishes, and the acks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from typing import Any, Protocol

import aetcd
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from statefn import _codec, _constants, _envelope, _naming
from statefn_sidecar import commit, config, execution, faults, items, layout, outbox, planner, statecache

_log = logging.getLogger("statefn.partition")
_RECENT_IDEM = 20_000
_IDEM_LEASE_BUCKET_S = 600
_STOP_GRACE_S = 10.0


class Router(Protocol):
    async def partitions(self, function: str) -> int: ...


class PartitionWorker:
    def __init__(
        self,
        *,
        fn: _naming.FunctionType,
        partition: int,
        partition_count: int,
        etcd: aetcd.Client,
        nc: NatsClient,
        js: JetStreamContext,
        executor: execution.Executor,
        cfg: config.SidecarConfig,
        faults: faults.Faults,
    ) -> None:
        self.fn = fn
        self.partition = partition
        self.pid = _naming.PartitionId(fn, partition)
        self.keys = layout.PartitionKeys(fn, partition)
        self._etcd = etcd
        self._nc = nc
        self._js = js
        self._executor = executor
        self._cfg = cfg
        self._faults = faults
        self.epoch = 0
        self._committer: commit.Committer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.lost = asyncio.Event()
        # Owner caches, valid while we hold the partition.
        self._chan_in: dict[str, tuple[int, int, int]] = {}
        self._chan_out: dict[str, int] = {}
        self._timers: list[tuple[int, bytes]] = []
        self._timer_payloads: dict[bytes, bytes] = {}
        self._recent: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._publishers: dict[str, outbox.ChannelPublisher] = {}
        self._published_upto: dict[str, int] = {}
        self._trimmed_upto: dict[str, int] = {}
        self._idem_lease: tuple[int, float] | None = None
        self._psub: Any = None
        self.cache = statecache.StateCache(etcd, self.keys, cfg.max_cached_keys // partition_count)
        self.stats: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"PartitionWorker({self.pid}, epoch={self.epoch})"

    # ---- lifecycle ----
    async def start(self, epoch: int) -> None:
        """Load the owner's caches, resume publishing the outbox, and start the loop."""
        self.epoch = epoch
        t = self._etcd.transactions
        k = self.keys
        _, (chan_in, chan_out, pending, timers, marker) = await self._etcd.transaction(
            compare=[],
            success=[t.get(p, layout.prefix_end(p)) for p in
                     (k.chan_in_prefix, k.chan_out_prefix, k.outbox_prefix, k.timers_prefix)]
            + [t.get(k.commit_marker)],
            failure=[],
        )
        self._chan_in = {kv.key[len(k.chan_in_prefix):].decode(): tuple(_codec.unpack(v)) for v, kv in chan_in}
        self._chan_out = {kv.key[len(k.chan_out_prefix):].decode(): _codec.unpack(v) for v, kv in chan_out}
        self._trimmed_upto = dict(self._chan_out)
        leftovers: list[outbox.Entry] = []
        for v, kv in pending:
            target, seq = kv.key[len(k.outbox_prefix):].decode().rsplit("/", 1)
            leftovers.append(outbox.Entry.decode(target, int(seq), v))
            self._trimmed_upto[target] = min(self._trimmed_upto.get(target, int(seq)), int(seq) - 1)
        for v, kv in timers:
            due = int(kv.key[len(k.timers_prefix):].decode().split("/", 1)[0])
            self._timers.append((due, kv.key))
            self._timer_payloads[kv.key] = v
        heapq.heapify(self._timers)
        self._committer = commit.Committer(
            self._etcd, self.keys, epoch=epoch, marker=marker[0][0] if marker else None,
            member_id=self._cfg.member_id, faults=self._faults,
        )
        for entry in sorted(leftovers, key=lambda e: (e.target, e.seq)):
            self._publisher(entry.target).enqueue(entry)
        if leftovers:
            _log.info("%s: resuming %d unpublished outbox entries", self.pid, len(leftovers))
        self._psub = await self._js.pull_subscribe_bind(
            durable=self.fn.consumer_name(self.partition), stream=self.fn.stream)
        self._task = asyncio.create_task(self._run(), name=f"partition {self.pid}")

    async def stop(self, *, graceful: bool) -> None:
        """Graceful: finish the batch, flush the outbox, trim, then hand the partition back."""
        self._stopping = True
        if self._task is not None:
            if not graceful:
                self._task.cancel()
            try:
                # A batch stuck on an unreachable function server or etcd must not block a
                # shutdown: past the grace period it is abandoned (nothing acked, redelivered).
                await asyncio.wait_for(asyncio.shield(self._task), _STOP_GRACE_S)
            except TimeoutError:
                _log.warning("%s: batch still running after %ss; abandoning it", self.pid, _STOP_GRACE_S)
                graceful = False
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except (asyncio.CancelledError, commit.Fenced):
                pass
            except Exception:
                _log.exception("%s: loop failed while stopping", self.pid)
        if graceful and not self.lost.is_set():
            for pub in self._publishers.values():
                await pub.drain(timeout=5.0)
            try:
                async with asyncio.timeout(_STOP_GRACE_S):
                    if self._pending_trims():
                        await self._commit_plans(self._planner().plan([], self._pending_trims()))
                    await self._etcd.transaction(
                        compare=[self._etcd.transactions.create(self.keys.owner) == self.epoch],
                        success=[self._etcd.transactions.delete(self.keys.owner)], failure=[])
            except commit.Fenced:
                pass
            except Exception as exc:
                _log.warning("%s: clean release failed (%s); the lease will expire instead", self.pid, exc)
        for pub in self._publishers.values():
            await pub.close()
        if self._psub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._psub.unsubscribe()

    # ---- the loop ----
    async def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = self._cfg.fetch_timeout
                if self._timers:
                    timeout = max(0.001, min(timeout, (self._timers[0][0] - _now_ms()) / 1000))
                msgs: list[Msg] = []
                try:
                    msgs = await self._psub.fetch(self._cfg.batch_size, timeout=timeout)
                except (nats.errors.TimeoutError, TimeoutError):
                    pass  # nothing to do within the fetch timeout
                except (nats.errors.Error, OSError) as exc:
                    _log.warning("%s: fetch failed (%s: %s); retrying", self.pid, type(exc).__name__, exc)
                    await asyncio.sleep(0.5)
                    continue
                batch = await self._decode(msgs) + self._due_timers()
                if batch:
                    await self._process(batch)
                elif self._pending_trims():
                    await self._commit_plans(self._planner().plan([], self._pending_trims()))
        except commit.Fenced as exc:
            _log.warning("%s: partition lost: %s", self.pid, exc)
            self.stats["fenced"] += 1
            self.lost.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("%s: partition loop crashed; giving the partition up", self.pid)
            self.lost.set()

    async def _decode(self, msgs: list[Msg]) -> list[items.Item]:
        out: list[items.Item] = []
        first_by_idem: dict[str, items.Item] = {}
        wm_batch: dict[str, tuple[int, int, int]] = {}
        for msg in msgs:
            headers = msg.headers or {}
            kind = headers.get(_constants.HEADER_KIND, _constants.KIND_INVOKE)
            seq = msg.metadata.sequence.stream
            try:
                if kind == _constants.KIND_BUNDLE:
                    bundle = _envelope.decode_bundle(msg.data)
                    out += await self._bundle_items(msg, bundle, wm_batch)
                    continue
                message = _envelope.decode_invoke(msg.data, headers)
            except Exception as exc:
                dead = items.Item(kind=items.Kind.DEAD, id=f"seq:{seq}", source=items.Source(msg, 1),
                                  dead={"raw": msg.data[:4096], "reason": f"{type(exc).__name__}: {exc}",
                                        "reply_to": headers.get(_constants.HEADER_REPLY_TO)})
                out.append(dead)
                continue
            if not message.idempotency_key:
                message.idempotency_key = headers.get(_constants.HEADER_MSG_ID) or f"seq:{seq}"
            idem = message.idempotency_key
            recent = self._recent.get(idem)
            if recent is not None:
                self.stats["duplicates"] += 1
                if message.reply_to:
                    await self._nc.publish(message.reply_to, recent)
                await msg.ack()
                continue
            first = first_by_idem.get(idem)
            if first is not None:
                self.stats["duplicates"] += 1
                first.dups.append((msg, message.reply_to))
                continue
            item = items.Item(kind=items.Kind.INGRESS, id=idem, message=message, source=items.Source(msg, 1))
            first_by_idem[idem] = item
            out.append(item)
        return out

    async def _bundle_items(self, msg: Msg, bundle: _envelope.Bundle,
                            wm_batch: dict[str, tuple[int, int, int]]) -> list[items.Item]:
        """Apply a channel's bundles densely in order; drop what was applied; hold back a gap."""
        n, nxt, total = wm_batch.get(bundle.sender) or self._chan_in.get(bundle.sender, (0, 0, 0))
        size = len(bundle.messages)
        if bundle.seq < n or (bundle.seq == n and nxt >= total):
            self.stats["duplicates"] += 1
            await msg.ack()
            return []
        if bundle.seq == n:
            start = nxt
        elif bundle.seq == n + 1 and nxt >= total:
            start = 0
        else:
            _log.info("%s: bundle %d from %s arrived before %d; holding it back", self.pid, bundle.seq,
                      bundle.sender, n + 1 if nxt >= total else n)
            self.stats["gaps"] += 1
            await msg.nak(delay=self._cfg.gap_retry_delay)
            return []
        wm_batch[bundle.sender] = (bundle.seq, size, size)
        source = items.Source(msg, size - start)
        return [
            items.Item(kind=items.Kind.CHANNEL, id=f"{bundle.sender}:{bundle.seq}:{i}", message=m,
                       source=source, sender=bundle.sender, bundle_seq=bundle.seq, index=i, bundle_size=size)
            for i, m in enumerate(bundle.messages) if i >= start
        ]

    def _due_timers(self) -> list[items.Item]:
        now = _now_ms()
        out: list[items.Item] = []
        while self._timers and self._timers[0][0] <= now and len(out) < self._cfg.batch_size:
            _, tkey = heapq.heappop(self._timers)
            payload = self._timer_payloads.get(tkey)
            if payload is None:
                continue
            raw = _codec.unpack(payload)
            if raw[0] == "retry":
                _, inv_id, plain = raw
                out.append(items.Item(kind=items.Kind.RETRY, id=inv_id,
                                      message=_envelope.Message.from_plain(plain), timer_key=tkey))
            else:
                _, function, plain = raw
                out.append(items.Item(kind=items.Kind.DELAYED_SEND, id=tkey.decode(),
                                      message=_envelope.Message.from_plain(plain), timer_key=tkey,
                                      target_function=function))
        return out

    # ---- execute and commit ----
    async def _process(self, batch: list[items.Item]) -> None:
        pending = batch
        try:
            while pending:
                if any(i.kind in (items.Kind.INGRESS, items.Kind.RETRY) for i in pending):
                    await self.ensure_idem_lease()
                outcomes = await self._executor.run(pending, self.cache)
                plans = self._planner().plan(outcomes, self._pending_trims())
                pending = await self._commit_plans(plans)
        except commit.Fenced:
            # Hand what we pulled straight back to the new owner instead of waiting for ack_wait.
            sources = {id(i.source): i.source for i in batch if i.source is not None and i.source.pending > 0}
            for source in sources.values():
                await source.msg.nak()
            raise

    async def _commit_plans(self, plans: list[tuple[commit.Txn, planner.Effects]]) -> list[items.Item]:
        """Commit in order; on an idempotency conflict return the items to run again."""
        assert self._committer is not None
        for i, (txn, eff) in enumerate(plans):
            result = await self._committer.commit(txn)
            if result.ok:
                self.stats["commits"] += 1
                await self._apply(eff)
                continue
            # Some ingress invocations were already recorded (a retry or redelivery that reached
            # us before its record did): answer them from the record, run the rest again.
            self.stats["idempotency_conflicts"] += 1
            existing = {k: v for k, v in result.existing.items()}
            redo: list[items.Item] = []
            for _, later in plans[i:]:
                for oc in later.outcomes:
                    item = oc.item
                    idem = item.message.idempotency_key if item.message else None
                    record = existing.get(self.keys.idempotency(idem)) if idem else None
                    if record is None:
                        redo.append(item)
                        continue
                    self._remember(idem, record)  # type: ignore[arg-type]
                    await self._answer(item, record)
                    if item.timer_key is not None:
                        redo.append(items.Item(kind=items.Kind.DROP_TIMER, id=item.id, timer_key=item.timer_key))
                    else:
                        await self._done(item)
            return redo
        return []

    async def _apply(self, eff: planner.Effects) -> None:
        self.cache.update(eff.state)
        self._chan_in.update(eff.chan_in)
        self._chan_out.update(eff.chan_out)
        self._trimmed_upto.update(eff.trimmed)
        for tkey in eff.timers_removed:
            self._timer_payloads.pop(tkey, None)
        for due, tkey, payload in eff.timers_added:
            self._timer_payloads[tkey] = payload
            heapq.heappush(self._timers, (due, tkey))
        for idem, record in eff.idem_records.items():
            self._remember(idem, record)
        for entry in eff.entries:
            self._publisher(entry.target).enqueue(entry)
        for oc in eff.outcomes:
            self.stats["invocations"] += 1
            if oc.dead_letter is not None:
                self.stats["dead_letters"] += 1
            if oc.retry_at_ms is not None:
                self.stats["retries"] += 1
            if oc.reply is not None:
                await self._answer(oc.item, oc.reply.encode())
            await self._done(oc.item)

    async def _answer(self, item: items.Item, record: bytes) -> None:
        reply_to = item.message.reply_to if item.message else (item.dead or {}).get("reply_to")
        if reply_to:
            await self._nc.publish(reply_to, record)
        for _, dup_reply_to in item.dups:
            if dup_reply_to:
                await self._nc.publish(dup_reply_to, record)

    async def _done(self, item: items.Item) -> None:
        if item.source is not None:
            item.source.pending -= 1
            if item.source.pending == 0:
                await item.source.msg.ack()
        for msg, _ in item.dups:
            await msg.ack()
        item.dups.clear()

    # ---- helpers ----
    def _planner(self) -> planner.Planner:
        return planner.Planner(self.fn, self.keys, self._chan_out, self._idem_lease[0] if self._idem_lease else None)

    async def ensure_idem_lease(self) -> None:
        """Idempotency records expire with a lease shared by all records of a 10-minute window."""
        now = time.monotonic()
        if self._idem_lease is None or now - self._idem_lease[1] > _IDEM_LEASE_BUCKET_S:
            lease = await self._etcd.lease(self._cfg.idempotency_ttl + _IDEM_LEASE_BUCKET_S)
            self._idem_lease = (lease.id, now)

    def _remember(self, idem: str, record: bytes) -> None:
        self._recent[idem] = record
        self._recent.move_to_end(idem)
        while len(self._recent) > _RECENT_IDEM:
            self._recent.popitem(last=False)

    def _publisher(self, target: str) -> outbox.ChannelPublisher:
        pub = self._publishers.get(target)
        if pub is None:
            pub = outbox.ChannelPublisher(self._js, target, self._on_published, self._faults)
            self._publishers[target] = pub
        return pub

    def _on_published(self, target: str, seq: int) -> None:
        self._published_upto[target] = max(seq, self._published_upto.get(target, 0))

    def _pending_trims(self) -> dict[str, int]:
        return {t: up for t, up in self._published_upto.items() if up > self._trimmed_upto.get(t, 0)}

    @property
    def outbox_backlog(self) -> int:
        return sum(p.backlog for p in self._publishers.values())


def _now_ms() -> int:
    return int(time.time() * 1000)
