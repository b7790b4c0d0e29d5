"""Turning pulled NATS messages into items, dropping what was applied already.

Ingress copies are answered from the owner's recent idempotency records (or, within one batch,
from the first copy's outcome); a request under a used idempotency key (for the same key and
handler) with other arguments is refused with ``idempotency_mismatch``; a channel's bundles are
taken densely in order, duplicates dropped and an early bundle held back (NAK with a delay) until
the missing one comes back; an undecodable message becomes a dead item, never an exception.
"""

from __future__ import annotations

import collections
import logging

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter

from statefn_core import constants, envelope, layout
from statefn_sidecar import items

_log = logging.getLogger("statefn.intake")
Watermark = tuple[int, int, int]  # (bundle seq, next message index, bundle size)


class Intake:
    def __init__(self, pid: layout.PartitionId, nc: NatsClient, chan_in: dict[str, Watermark],
                 recent: collections.OrderedDict[str, envelope.Record], stats: collections.Counter[str],
                 gap_retry_delay: float, duplicates: Counter, *, partition_count: int) -> None:
        self._pid = pid
        self._partition_count = partition_count
        self._journals = layout.PartitionKeys(pid.function, pid.partition).dead_journal_prefix
        self._nc = nc
        self._chan_in = chan_in   # the owner's committed watermarks (shared, updated after commits)
        self._recent = recent     # the owner's recent idempotency records (shared)
        self._stats = stats
        self._gap_retry_delay = gap_retry_delay
        self._duplicates = duplicates  # the function's statefn_duplicates_total

    async def decode(self, msgs: list[Msg]) -> list[items.Item]:
        out: list[items.Item] = []
        first_by_idem: dict[str, items.Ingress] = {}
        wm_batch: dict[str, Watermark] = {}
        for msg in msgs:
            headers = msg.headers or {}
            kind = headers.get(constants.HEADER_KIND, constants.KIND_INVOKE)
            seq = msg.metadata.sequence.stream
            # Only decoding is guarded: a NATS error acking or holding back a good bundle is not its fault
            # (dead-lettering it would lose it), and propagates like any other.
            bundle: envelope.Bundle | None = None
            try:
                if kind == constants.KIND_BUNDLE:
                    bundle = envelope.decode_bundle(msg.data)
                    self._check_channel(msg.subject, bundle)
                else:
                    message = envelope.decode_invoke(msg.data, headers)
                    self._check_owner(message.key)
                    if message.journal_ref and not message.journal_ref.encode().startswith(self._journals):
                        raise ValueError(f"a journal reference outside this partition's: {message.journal_ref!r}")
            except Exception as exc:
                recorded = self._recent.get(f"seq:{seq}")
                if recorded is not None:  # dead-lettered already; this is a redelivery
                    self._duplicate()
                    await self._settle(msg, headers.get(constants.HEADER_REPLY_TO), recorded.reply)
                    continue
                out.append(items.Undecodable(id=f"seq:{seq}", source=items.Source(msg, 1), raw=msg.data[:4096],
                                             reason=f"{type(exc).__name__}: {exc}",
                                             reply_to=headers.get(constants.HEADER_REPLY_TO)))
                continue
            if bundle is not None:
                out += await self._bundle_items(msg, bundle, wm_batch)
                continue
            if not message.idempotency_key:
                message.idempotency_key = (headers.get(constants.HEADER_MSG_ID)
                                           or f"{constants.RESERVED_IDEMPOTENCY_PREFIX}seq:{seq}")
            idem = envelope.idempotency_id(message.key, message.handler, message.idempotency_key)
            recent = self._recent.get(idem)
            if recent is not None:
                await self._settle_copy(msg, message, recent)
                continue
            first = first_by_idem.get(idem)
            if first is not None:
                if envelope.fingerprint(first.message) != envelope.fingerprint(message):
                    await self._refuse_mismatch(msg, message)
                    continue
                self._duplicate()
                first.dups.append((msg, message.reply_to))
                continue
            # Its id is unique across functions and keys: transaction ids and the random seed derive from it.
            item = items.Ingress(id=f"{self._pid.function}/{idem}", message=message, source=items.Source(msg, 1))
            first_by_idem[idem] = item
            out.append(item)
        return out

    def _check_owner(self, key: str) -> None:
        """A message for a key of another partition would run here against state this owner does not keep
        (and the key's owner would overwrite what it wrote): refused."""
        owner = layout.partition_of(key, self._partition_count)
        if owner != self._pid.partition:
            raise ValueError(f"key {key!r} belongs to partition {owner}, not {self._pid.partition}")

    def _check_channel(self, subject: str, bundle: envelope.Bundle) -> None:
        """A bundle names its sender, and must come on that sender's channel to this partition, with
        messages for this partition's keys only; anything else is forged or misrouted."""
        expected = self._pid.function.channel_subject(self._pid.partition, layout.PartitionId.from_token(bundle.sender))
        if subject != expected:
            raise ValueError(f"a bundle from {bundle.sender} arrived on {subject}, not on its channel {expected}")
        for message in bundle.messages:
            self._check_owner(message.key)

    async def _settle_copy(self, msg: Msg, message: envelope.Message, record: envelope.Record) -> None:
        """A request under an idempotency key that has a record: a copy, answered from it; or, if its
        arguments differ, another request under a used key, refused with ``idempotency_mismatch``.

        Answering and acking are best effort: a copy whose ack is lost comes back and is found a copy
        again, and its caller asks again. An error here must not end the loop, nor count against it.
        """
        if record.fingerprint != envelope.fingerprint(message):
            await self._refuse_mismatch(msg, message)
            return
        self._duplicate()
        await self._settle(msg, message.reply_to, record.reply)

    async def _refuse_mismatch(self, msg: Msg, message: envelope.Message) -> None:
        assert message.idempotency_key is not None
        self._stats["idempotency_mismatches"] += 1
        await self._settle(msg, message.reply_to, envelope.mismatch_reply(message.idempotency_key).encode())

    async def _settle(self, msg: Msg, reply_to: str | None, reply: bytes | None) -> None:
        try:
            if reply_to and reply is not None:
                await self._nc.publish(reply_to, reply)
            await msg.ack()
        except nats.errors.Error as exc:
            _log.warning("%s: could not settle a duplicate (%s); it will be redelivered", self._pid, exc)

    def _duplicate(self) -> None:
        self._stats["duplicates"] += 1
        self._duplicates.inc()

    async def _bundle_items(self, msg: Msg, bundle: envelope.Bundle,
                            wm_batch: dict[str, Watermark]) -> list[items.Item]:
        n, nxt, total = wm_batch.get(bundle.sender) or self._chan_in.get(bundle.sender, (0, 0, 0))
        size = len(bundle.messages)
        if bundle.seq < n or (bundle.seq == n and nxt >= total):
            self._duplicate()
            await self._settle(msg, None, None)
            return []
        if bundle.seq == n:
            start = nxt
        elif bundle.seq == n + 1 and nxt >= total:
            start = 0
        else:
            _log.info("%s: bundle %d from %s arrived before %d; holding it back", self._pid, bundle.seq,
                      bundle.sender, n + 1 if nxt >= total else n)
            self._stats["gaps"] += 1
            try:
                await msg.nak(delay=self._gap_retry_delay)
            except nats.errors.Error as exc:  # it comes back after ack_wait instead
                _log.warning("%s: could not hold bundle %d back (%s)", self._pid, bundle.seq, exc)
            return []
        wm_batch[bundle.sender] = (bundle.seq, size, size)
        source = items.Source(msg, size - start)
        return [
            items.Delivered(id=f"{bundle.sender}:{bundle.seq}:{i}", message=m, source=source, sender=bundle.sender,
                            bundle_seq=bundle.seq, index=i, bundle_size=size)
            for i, m in enumerate(bundle.messages) if i >= start
        ]
