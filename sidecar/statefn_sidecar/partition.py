"""One owned partition: pull a batch, run it, commit it once, publish, ack.

The owner is the only writer of its partition's keys (every commit is fenced), so it caches
state, channel watermarks, counters and timers in memory and pays, per batch, one pull, one
etcd transaction (more only when etcd's limits force a split), the publishes, and the acks.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from typing import Any

import aetcd
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from statefn_core import codec, envelope, layout
from statefn_sidecar import (
    acks,
    assembly,
    commit,
    config,
    decisions,
    execution,
    faults,
    intake,
    items,
    keylocks,
    observe,
    outbox,
    pendingindex,
    planner,
    pulling,
    statecache,
    suspension,
    timers,
)

_log = logging.getLogger("statefn.partition")
_RECENT_IDEM = 20_000
_IDEM_LEASE_BUCKET_S = 600
_STOP_GRACE_S = 10.0
_LOST_GRACE_S = 5.0


class PartitionWorker:
    def __init__(
        self,
        *,
        fn: layout.FunctionType,
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
        self.pid = layout.PartitionId(fn, partition)
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
        self._timers = timers.TimerHeap()
        self._recent: collections.OrderedDict[str, envelope.Record] = collections.OrderedDict()
        self._publishers: dict[str, outbox.ChannelPublisher] = {}
        self._published_upto: dict[str, int] = {}
        self._trimmed_upto: dict[str, int] = {}
        self._idem_lease: tuple[int, float] | None = None
        self._psub: Any = None
        self.stats: collections.Counter[str] = collections.Counter()
        self._acks = acks.Acks(nc, faults, self.stats, cfg.ack_wait)
        self._intake = intake.Intake(self.pid, nc, self._chan_in, self._recent, self.stats, cfg.gap_retry_delay,
                                     executor.metrics.duplicates, partition_count=partition_count)
        self.cache = statecache.StateCache(etcd, self.keys, cfg.max_cached_keys // partition_count)
        self.locks = keylocks.KeyLocks(self.keys)
        self._pending = pendingindex.PendingIndex(self.keys.pending)

    def __repr__(self) -> str:
        return f"PartitionWorker({self.pid}, epoch={self.epoch})"

    # ---- lifecycle ----
    async def start(self, epoch: int) -> None:
        """Load the owner's caches, resume publishing the outbox, and start the loop."""
        self.epoch = epoch
        t = self._etcd.transactions
        k = self.keys
        _, (chan_in, chan_out, pending, stored_timers, suspended, queued, prepared, marker, index) = \
            await self._etcd.transaction(
                compare=[],
                success=[t.get(p, layout.prefix_end(p)) for p in
                         (k.chan_in_prefix, k.chan_out_prefix, k.outbox_prefix, k.timers_prefix,
                          k.suspended_prefix, k.inbox_prefix, k.prepared_prefix)]
                + [t.get(k.commit_marker), t.get(k.pending)],
                failure=[],
            )
        self.locks.load([v for v, _ in suspended], [(kv.key, v) for v, kv in queued], [v for v, _ in prepared])
        self._chan_in.update({kv.key[len(k.chan_in_prefix):].decode(): tuple(codec.unpack(v)) for v, kv in chan_in})
        self._chan_out.update({kv.key[len(k.chan_out_prefix):].decode(): codec.unpack(v) for v, kv in chan_out})
        self._trimmed_upto = dict(self._chan_out)
        leftovers: list[outbox.Entry] = []
        for v, kv in pending:
            target, seq = kv.key[len(k.outbox_prefix):].decode().rsplit("/", 1)
            leftovers.append(outbox.Entry.decode(target, int(seq), v))
            self._trimmed_upto[target] = min(self._trimmed_upto.get(target, int(seq)), int(seq) - 1)
        for v, kv in stored_timers:
            self._timers.add(int(kv.key[len(k.timers_prefix):].decode().split("/", 1)[0]), kv.key, v)
        self._pending.loaded(index[0][0] if index else None)
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
        """Stop after the batch in hand; graceful: also flush the outbox, trim, hand the partition back.

        Not graceful (the partition is lost): the batch in hand is not cancelled but runs to its
        commit, which the fence refuses; nothing of it is acked. Cancelling mid-commit would only
        add an outcome nobody reads.
        """
        self._stopping = True
        if self._task is not None:
            try:
                # A batch stuck on an unreachable function server or etcd must not block a
                # shutdown: past the grace period it is abandoned (nothing acked, redelivered).
                await asyncio.wait_for(asyncio.shield(self._task), _STOP_GRACE_S if graceful else _LOST_GRACE_S)
            except TimeoutError:
                _log.warning("%s: batch still running at stop; abandoning it", self.pid)
                graceful = False
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            except (asyncio.CancelledError, commit.Fenced):
                pass
            except Exception:
                _log.exception("%s: loop failed while stopping", self.pid)
        if graceful and not self.lost.is_set():
            await self._hand_back_buffered()
            for pub in self._publishers.values():
                await pub.drain(timeout=5.0)
            try:
                async with asyncio.timeout(_STOP_GRACE_S):
                    await self._commit_bookkeeping()
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

    async def _hand_back_buffered(self) -> None:
        """NAK what the last pull request delivered after the loop stopped, so the next owner gets it first.

        A pull request outlives the fetch that sent it (until its expiry): messages that arrive in
        that window land in this subscription's buffer. Left there, they would come back only after
        ack_wait, behind newer messages for the same keys. NAKed before the owner key is released,
        the server redelivers them ahead of anything newer to whoever pulls next.
        """
        if self._psub is None:
            return
        await asyncio.sleep(self._cfg.fetch_timeout + 0.05)
        handed_back = 0
        for msg in pulling.take_buffered(self._psub):
            if msg.reply and msg.reply.startswith("$JS.ACK."):
                await msg.nak()
                handed_back += 1
        if handed_back:
            _log.info("%s: handed %d buffered message(s) back to the stream", self.pid, handed_back)

    # ---- the loop ----
    async def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = self._cfg.fetch_timeout
                next_due = self._timers.next_due_ms()
                if next_due is not None:
                    timeout = max(0.001, min(timeout, (next_due - timers.now_ms()) / 1000))
                if self.locks.has_ready():  # an unlocked key's inbox waits: take a quick look only
                    timeout = 0.001
                msgs: list[Msg] = []
                try:
                    msgs = await pulling.fetch(self._psub, self._cfg.batch_size, timeout)
                except (nats.errors.Error, OSError) as exc:
                    _log.warning("%s: fetch failed (%s: %s); retrying", self.pid, type(exc).__name__, exc)
                    await asyncio.sleep(0.5)
                    continue
                batch = (await self._intake.decode(msgs) + self._timers.pop_due(self._cfg.batch_size)
                         + self.locks.ready(self._cfg.batch_size))
                if batch:
                    await self._process(batch)
                else:
                    await self._commit_bookkeeping()
        except commit.Fenced as exc:
            _log.warning("%s: partition lost: %s", self.pid, exc)
            self.stats["fenced"] += 1
            self.lost.set()
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("%s: partition loop crashed; giving the partition up", self.pid)
            self.lost.set()

    # ---- execute and commit ----
    async def _process(self, batch: list[items.Item]) -> None:
        with self._acks.in_progress(batch):
            await self._run_batch(batch)

    async def _run_batch(self, batch: list[items.Item]) -> None:
        pending = batch
        try:
            while pending:
                if any(i.idempotency_id for i in pending):
                    await self.ensure_idem_lease()
                await self._load_journals(pending)
                outcomes, later = await self._executor.run(pending, self.cache, self.partition, self.locks)
                plans = self._planner().plan(outcomes, self._pending_trims())
                # What did not commit runs again, in batch order, then what waited for this round's commit;
                # a timer that a commit meanwhile cancelled (a call answered before its timeout) is gone.
                pending = [i for i in await self._commit_plans(plans) + later
                           if i.timer_key is None or self._timers.scheduled(i.timer_key)]
        except commit.Fenced:
            self.locks.release_taken()
            await self._acks.hand_back(batch)  # to the new owner, at once rather than after ack_wait
            raise
        self.locks.release_taken()

    async def _load_journals(self, pending: list[items.Item]) -> None:
        """A dead-letter replay resumes from the journal its failed run left (read here, once; only our own
        fenced commits write it). One that is gone, or is another invocation's, is not resumed."""
        for item in pending:
            if not isinstance(item, items.Invocation) or item.resume is not None or item.journal is not None:
                continue
            ref = item.message.journal_ref
            if not ref:
                continue
            got = await self._etcd.get(ref.encode())
            if got is None:
                continue
            record = suspension.Suspension.decode(got.value)
            if (record.message.key, record.message.handler) == (item.message.key, item.message.handler):
                item.journal = record

    async def _commit_plans(self, plans: list[tuple[commit.Txn, assembly.Effects]]) -> list[items.Item]:
        """Commit in order; on an idempotency conflict return the items to run again."""
        assert self._committer is not None
        for i, (txn, eff) in enumerate(plans):
            started_ns = time.time_ns()
            entry = self._pending.stage(txn, pendingindex.after(self._timers, self.locks.inbox_size(), eff))
            try:
                result = await self._committer.commit(txn)
            except commit.Fenced:
                observe.abandoned((oc for _, later in plans[i:] for oc in later.outcomes), "fenced")
                raise
            if result.ok:
                self._pending.landed(entry)
                self.stats["commits"] += 1
                observe.committed(self._executor.metrics, eff.outcomes, txn.size, txn.op_count, started_ns)
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
                    idem = item.idempotency_id
                    # An item whose own record says PENDING (it was queued or suspended) is not a copy.
                    pending = isinstance(item, items.Invocation) and item.idem_pending
                    stored = existing.get(self.keys.idempotency(idem)) if idem and not pending else None
                    if stored is None:
                        observe.abandoned([oc], "rerun")
                        redo.append(item)
                        continue
                    assert idem is not None
                    record = envelope.Record.decode(stored)
                    self._remember(idem, record)
                    if isinstance(item, items.Invocation) and record.fingerprint != envelope.fingerprint(item.message):
                        # Another request under a used idempotency key: refused, not run.
                        observe.abandoned([oc], "idempotency_mismatch")
                        assert item.message.idempotency_key is not None
                        await self._acks.answer(item, envelope.mismatch_reply(item.message.idempotency_key).encode())
                    else:
                        observe.abandoned([oc], "recorded_already")
                        self._executor.metrics.duplicates.inc()
                        await self._acks.answer(item, record.reply)
                    if item.timer_key is not None:
                        redo.append(items.DropTimer(id=item.id, timer=item.timer_key))
                    else:
                        await self._acks.done(item)
            return redo
        return []

    async def _apply(self, eff: assembly.Effects) -> None:
        self.cache.update(eff.state)
        self._chan_in.update(eff.chan_in)
        self._chan_out.update(eff.chan_out)
        self._trimmed_upto.update(eff.trimmed)
        self.locks.apply(eff.suspended, eff.queued, eff.dequeued, eff.prepared)
        for tkey in eff.timers_removed:
            self._timers.remove(tkey)
        for due, tkey, payload in eff.timers_added:
            self._timers.add(due, tkey, payload)
        for idem, record in eff.idem_records.items():
            self._remember(idem, record)
        for entry in eff.entries:
            self._publisher(entry.target).enqueue(entry)
        for oc in eff.outcomes:
            self.stats["invocations"] += 1
            if isinstance(oc.decision, decisions.Failed):
                self.stats["dead_letters"] += 1
            elif isinstance(oc.decision, decisions.Retrying):
                self.stats["retries"] += 1
            reply = oc.decision.answer()
            if reply is not None:
                await self._acks.answer(oc.item, reply.encode())
            await self._acks.done(oc.item)

    async def _commit_bookkeeping(self) -> None:
        """With no batch in hand: trim what the outbox published, and correct a stale pending-work entry."""
        trims = self._pending_trims()
        if trims or self._pending.stale(pendingindex.current(self._timers, self.locks.inbox_size())):
            await self._commit_plans(self._planner().plan([], trims) or [(commit.Txn(), assembly.Effects())])

    # ---- helpers ----
    def _planner(self) -> planner.Planner:
        return planner.Planner(self.fn, self.keys, self._chan_out, self._idem_lease[0] if self._idem_lease else None,
                               self._nc.max_payload)

    async def ensure_idem_lease(self) -> None:
        """Idempotency records expire with a lease shared by all records of a 10-minute window."""
        now = time.monotonic()
        if self._idem_lease is None or now - self._idem_lease[1] > _IDEM_LEASE_BUCKET_S:
            lease = await self._etcd.lease(self._cfg.idempotency_ttl + _IDEM_LEASE_BUCKET_S)
            self._idem_lease = (lease.id, now)

    def _remember(self, idem: str, record: envelope.Record) -> None:
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
