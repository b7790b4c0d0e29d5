"""A commit under construction: the shares of the outcomes it holds, and the outbox entries its end adds.

Each outcome's writes are built alone first (a ``Share``); ``Assembly.cost_with`` then says exactly
what the commit would cost with it (the same arithmetic ``commit.Txn`` counts with, and the outbox
entries chunked as ``finish`` will chunk them), so a commit is split before it would exceed etcd's
limits, never estimated apart from what is written. Outgoing messages become one bundle per target
channel (more only past ``MAX_BUNDLE_BYTES``), numbered densely per channel when the commit is
finished; dead letters one outbox entry each.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

from statefn_core import codec, constants, envelope, layout
from statefn_sidecar import commit, keylocks, outbox, suspension, twophase

if TYPE_CHECKING:
    from statefn_sidecar import decisions

DLQ_TARGET = "~dlq"
# Bundles are split so a NATS message stays well under the default max_payload (1 MiB).
MAX_BUNDLE_BYTES = 768 * 1024
# What a bundle, a dead letter or a published reply adds around one message, with room to spare.
MESSAGE_MARGIN = 4096
# msgpack headers that grow with a bundle's length (an array of up to 2**32 messages; a bin of up to 4 GiB).
_GROWTH = 8


@dataclasses.dataclass(slots=True)
class Send:
    target: layout.PartitionId
    message: envelope.Message


@dataclasses.dataclass(slots=True)
class Effects:
    """Applied to the owner's caches and the outside world once its commit landed."""

    outcomes: list[decisions.Outcome] = dataclasses.field(default_factory=list)
    state: dict[str, dict[str, bytes | None]] = dataclasses.field(default_factory=dict)
    chan_in: dict[str, tuple[int, int, int]] = dataclasses.field(default_factory=dict)
    chan_out: dict[str, int] = dataclasses.field(default_factory=dict)
    entries: list[outbox.Entry] = dataclasses.field(default_factory=list)
    timers_added: list[tuple[int, bytes, bytes]] = dataclasses.field(default_factory=list)
    timers_removed: list[bytes] = dataclasses.field(default_factory=list)
    idem_records: dict[str, envelope.Record] = dataclasses.field(default_factory=dict)
    trimmed: dict[str, int] = dataclasses.field(default_factory=dict)
    suspended: dict[str, suspension.Suspension | None] = dataclasses.field(default_factory=dict)
    queued: list[keylocks.Queued] = dataclasses.field(default_factory=list)
    dequeued: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    prepared: dict[str, twophase.Prepared | None] = dataclasses.field(default_factory=dict)

    def absorb(self, other: Effects) -> None:
        """Add a later share's effects (its writes to the same record win, as in the commit)."""
        self.outcomes += other.outcomes
        for key, changes in other.state.items():
            self.state.setdefault(key, {}).update(changes)
        # Most shares touch few of these: skip the empty ones (this runs once per invocation).
        if other.chan_in:
            self.chan_in.update(other.chan_in)
        if other.chan_out:
            self.chan_out.update(other.chan_out)
        if other.entries:
            self.entries += other.entries
        if other.timers_added:
            self.timers_added += other.timers_added
        if other.timers_removed:
            self.timers_removed += other.timers_removed
        if other.idem_records:
            self.idem_records.update(other.idem_records)
        if other.trimmed:
            self.trimmed.update(other.trimmed)
        if other.suspended:
            self.suspended.update(other.suspended)
        if other.queued:
            self.queued += other.queued
        if other.dequeued:
            self.dequeued += other.dequeued
        if other.prepared:
            self.prepared.update(other.prepared)


@dataclasses.dataclass
class Share:
    """One outcome's part of a commit, built alone: its writes, effects, messages and dead letter."""

    txn: commit.Txn = dataclasses.field(default_factory=commit.Txn)
    eff: Effects = dataclasses.field(default_factory=Effects)
    sends: list[tuple[Send, bytes]] = dataclasses.field(default_factory=list)  # with each message packed
    dead: list[bytes] = dataclasses.field(default_factory=list)  # packed dead-letter records
    largest: int = 0  # the largest message it puts on NATS (now, or when a timer or a decision sends it)

    def send(self, send: Send) -> None:
        packed = codec.pack(send.message.to_plain())
        self.sends.append((send, packed))
        self.carries(len(packed))

    def carries(self, size: int) -> None:
        """A message of ``size`` bytes will go over NATS because of this share."""
        if size > self.largest:
            self.largest = size


@dataclasses.dataclass
class _Channel:
    """A target channel's messages in this commit, chunked as ``finish`` will bundle them."""

    target: layout.PartitionId
    chunks: list[list[tuple[Send, bytes]]] = dataclasses.field(default_factory=lambda: [[]])
    fill: int = 0  # bytes in the last chunk

    def add(self, sends: list[tuple[Send, bytes]], entry_bytes: int, *, apply: bool) -> tuple[int, int]:
        """(new entries, bytes) these messages add, chunked as finish() bundles them; ``apply``: add them."""
        fill, new_ops, new_bytes = self.fill, 0, 0
        for send, packed in sends:
            if fill and fill + len(packed) > MAX_BUNDLE_BYTES:  # the bundle is full: the next one starts
                fill, new_ops, new_bytes = 0, new_ops + 1, new_bytes + entry_bytes
                if apply:
                    self.chunks.append([])
            fill += len(packed)
            new_bytes += len(packed)
            if apply:
                self.chunks[-1].append((send, packed))
        if apply:
            self.fill = fill
        return new_ops, new_bytes


class Assembly:
    """The commit being built: what it writes so far and what its end will add (bundles, dead letters)."""

    def __init__(self, fn: layout.FunctionType, keys: layout.PartitionKeys, chan_out: dict[str, int]) -> None:
        self._fn = fn
        self._keys = keys
        self._pid = layout.PartitionId(fn, keys.partition)
        self._chan_out = chan_out  # the planner's working counters, advanced as commits are finished
        self.txn = commit.Txn()
        self.eff = Effects()
        self._channels: dict[str, _Channel] = {}
        self._dead: list[bytes] = []
        # What finish() will add for the messages and dead letters absorbed so far (kept as they join).
        self._out_ops = 0
        self._out_bytes = 0

    def cost_with(self, share: Share) -> tuple[int, int, int]:
        """(writes, bytes, compares) of the finished commit if ``share`` joined it."""
        ops, size, compares = self.txn.cost_with(share.txn)
        out_ops, out_bytes = self._outbox_delta(share, apply=False)
        return ops + self._out_ops + out_ops, size + self._out_bytes + out_bytes, compares

    def absorb(self, share: Share) -> None:
        self.txn.absorb(share.txn)
        self.eff.absorb(share.eff)
        out_ops, out_bytes = self._outbox_delta(share, apply=True)
        self._out_ops += out_ops
        self._out_bytes += out_bytes

    def _outbox_delta(self, share: Share, *, apply: bool) -> tuple[int, int]:
        """The writes and bytes ``share``'s messages and dead letter add to what finish() writes."""
        ops = size = 0
        if share.sends:
            by_token: dict[str, list[tuple[Send, bytes]]] = {}
            for send, packed in share.sends:
                by_token.setdefault(send.target.token, []).append((send, packed))
            for token, sends in by_token.items():
                channel = self._channels.get(token)
                entry = self._bundle_entry_bytes(token, sends[0][0].target)
                if channel is None:  # a new channel: its first entry and its sequence counter
                    channel = _Channel(sends[0][0].target)
                    if apply:
                        self._channels[token] = channel
                    ops, size = ops + 2, size + entry + self._counter_bytes(token)
                new_ops, new_bytes = channel.add(sends, entry, apply=apply)
                ops, size = ops + new_ops, size + new_bytes
        if share.dead:
            if not self._dead:
                ops, size = ops + 1, size + self._counter_bytes(DLQ_TARGET)
            ops += len(share.dead)
            size += sum(len(d) + self._dead_entry_bytes() for d in share.dead)
            if apply:
                self._dead += share.dead
        return ops, size

    @property
    def empty(self) -> bool:
        return not self.eff.outcomes and not self.eff.trimmed

    def finish(self) -> tuple[commit.Txn, Effects]:
        """Number the bundles and dead letters, write them and their channels' counters."""
        txn, eff = self.txn, self.eff
        for token, channel in self._channels.items():
            for chunk in channel.chunks:
                seq = self._next_seq(token)
                entry = _bundle_entry(self._pid, channel.target, seq, [s.message for s, _ in chunk])
                txn.put(self._keys.outbox(token, seq), entry.encode())
                eff.entries.append(entry)
            txn.put(self._keys.chan_out(token), codec.pack(self._chan_out[token]))
            eff.chan_out[token] = self._chan_out[token]
        for record in self._dead:
            seq = self._next_seq(DLQ_TARGET)
            entry = self._dead_entry(seq, record)
            txn.put(self._keys.outbox(DLQ_TARGET, seq), entry.encode())
            eff.entries.append(entry)
        if self._dead:
            txn.put(self._keys.chan_out(DLQ_TARGET), codec.pack(self._chan_out[DLQ_TARGET]))
            eff.chan_out[DLQ_TARGET] = self._chan_out[DLQ_TARGET]
        return txn, eff

    # ---- sizes: measured on the entries' own encoding, with the longest sequence numbers ----
    def _bundle_entry_bytes(self, token: str, target: layout.PartitionId) -> int:
        """An outbox entry's bytes besides its messages' own: key, subject, id, headers, framing."""
        return _entry_overhead(self._fn, self._keys.partition, target)

    def _dead_entry_bytes(self) -> int:
        return _entry_overhead(self._fn, self._keys.partition, None)

    def _counter_bytes(self, token: str) -> int:
        return len(self._keys.chan_out(token)) + len(codec.pack(10**12)) + commit.OP_OVERHEAD

    def _dead_entry(self, seq: int, record: bytes) -> outbox.Entry:
        return _dead_letter_entry(self._pid, seq, record)

    def _next_seq(self, target: str) -> int:
        seq = self._chan_out.get(target, 0) + 1
        self._chan_out[target] = seq
        return seq


def _bundle_entry(sender: layout.PartitionId, target: layout.PartitionId, seq: int,
                  messages: list[envelope.Message]) -> outbox.Entry:
    body = envelope.encode_bundle(envelope.Bundle(sender=sender.token, seq=seq, messages=messages))
    return outbox.Entry(
        target=target.token, seq=seq, subject=target.function.channel_subject(target.partition, sender),
        msg_id=f"ch:{sender.token}>{target.partition}:{seq}",
        headers={constants.HEADER_KIND: constants.KIND_BUNDLE, constants.HEADER_ORIGIN: sender.token}, body=body)


def _dead_letter_entry(sender: layout.PartitionId, seq: int, record: bytes) -> outbox.Entry:
    return outbox.Entry(
        target=DLQ_TARGET, seq=seq, subject=sender.function.dlq_subject, msg_id=f"dlq:{sender.token}:{seq}",
        headers={constants.HEADER_KIND: constants.KIND_DEAD_LETTER, constants.HEADER_ORIGIN: sender.token},
        body=record)


@functools.lru_cache(maxsize=4096)
def _entry_overhead(fn: layout.FunctionType, partition: int, target: layout.PartitionId | None) -> int:
    """The bytes an outbox entry (a bundle to ``target``, or a dead letter) writes besides its messages' own.

    Measured on the entry's own encoding with the longest sequence number and no messages, plus
    the growth of msgpack's length headers, its etcd key and the per-write overhead.
    """
    sender, seq = layout.PartitionId(fn, partition), 10**12 - 1
    keys = layout.PartitionKeys(fn, partition)
    if target is None:
        entry, key = _dead_letter_entry(sender, seq, b""), keys.outbox(DLQ_TARGET, seq)
    else:
        entry, key = _bundle_entry(sender, target, seq, []), keys.outbox(target.token, seq)
    return len(entry.encode()) + _GROWTH + len(key) + commit.OP_OVERHEAD
