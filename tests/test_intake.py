"""How a partition turns pulled NATS messages into batch items (statefn_sidecar.intake), in memory.

Intake is where exactly-once starts: a channel bundle applied twice, or one applied before its
predecessor, double-applies or reorders another partition's effects; an ingress copy that is not
answered from its record runs its handler again; an undecodable message that raises instead of
becoming a dead item wedges the partition. Until now only the integration tests reached it, so a
fake NATS message and client stand in for nats-py here and no server is started.
"""

from __future__ import annotations

import collections
import itertools
from typing import cast

import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter

from statefn_core import codec, constants, envelope, layout
from statefn_sidecar import intake, items

GAP_DELAY = 0.25
REPLY = envelope.Reply(ok=True, value=b"42").encode()
PID = layout.PartitionId(layout.FunctionType.parse("ns/acct"), 0)


class _Sequence:
    def __init__(self, stream: int) -> None:
        self.stream = stream


class _Metadata:
    def __init__(self, stream: int) -> None:
        self.sequence = _Sequence(stream)


class FakeMsg:
    """What intake uses of a pulled JetStream message; records acks and naks."""

    def __init__(self, data: bytes, headers: dict[str, str] | None, stream_seq: int,
                 fail_with: Exception | None = None, subject: str = "") -> None:
        self.data = data
        self.subject = subject
        self.headers = headers
        self.metadata = _Metadata(stream_seq)
        self.reply = f"$JS.ACK.fake.{stream_seq}"
        self.acks = 0
        self.naks: list[float | None] = []
        self._fail_with = fail_with  # raised by ack and nak, as nats-py does when the connection is gone

    async def ack(self) -> None:
        if self._fail_with is not None:
            raise self._fail_with
        self.acks += 1

    async def nak(self, delay: float | None = None) -> None:
        if self._fail_with is not None:
            raise self._fail_with
        self.naks.append(delay)


class FakeNats:
    """Records what is published (replies to callers)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"") -> None:
        self.published.append((subject, payload))


class Rig:
    """An Intake with its shared owner state, and builders for the messages it pulls."""

    def __init__(self) -> None:
        self.nc = FakeNats()
        self.chan_in: dict[str, intake.Watermark] = {}
        self.recent: collections.OrderedDict[str, envelope.Record] = collections.OrderedDict()
        self.stats: collections.Counter[str] = collections.Counter()
        self.registry = CollectorRegistry()
        counter = Counter("statefn_duplicates", "duplicates", registry=self.registry)
        self.intake = intake.Intake(PID, cast(NatsClient, self.nc), self.chan_in, self.recent, self.stats,
                                    GAP_DELAY, counter, partition_count=1)
        self._seqs = itertools.count(100)

    @property
    def duplicates(self) -> float:
        value = self.registry.get_sample_value("statefn_duplicates_total")
        assert value is not None
        return value

    async def decode(self, *msgs: FakeMsg) -> list[items.Item]:
        return await self.intake.decode([_nats(m) for m in msgs])

    def record(self, idem: str, reply: bytes | None = REPLY, args: dict[str, object] | None = None,
               key: str = "k") -> None:
        """What the owner remembers of a committed request (the one ``invoke`` builds, unless ``args`` differ)."""
        message = envelope.Message(key=key, handler="deposit", args={"n": 1} if args is None else args)
        self.recent[envelope.idempotency_id(key, "deposit", idem)] = envelope.Record(envelope.fingerprint(message),
                                                                                     reply)

    def raw(self, data: bytes, headers: dict[str, str] | None, stream_seq: int | None = None,
            fail_with: Exception | None = None, subject: str = "") -> FakeMsg:
        return FakeMsg(data, headers, next(self._seqs) if stream_seq is None else stream_seq, fail_with, subject)

    def bundle(self, sender: str, seq: int, size: int, fail_with: Exception | None = None) -> FakeMsg:
        messages = [envelope.Message(key=f"{sender}-{seq}-k{i}", handler="deposit", args={"i": i},
                                     origin=sender) for i in range(size)]
        data = envelope.encode_bundle(envelope.Bundle(sender=sender, seq=seq, messages=messages))
        subject = PID.function.channel_subject(0, layout.PartitionId.from_token(sender))
        return self.raw(data, {constants.HEADER_KIND: constants.KIND_BUNDLE}, fail_with=fail_with, subject=subject)

    def invoke(self, idem: str | None = None, reply_to: str | None = None, msg_id: str | None = None,
               stream_seq: int | None = None, key: str = "k", n: int = 1) -> FakeMsg:
        data, headers = envelope.encode_invoke(envelope.Message(key=key, handler="deposit", args={"n": n},
                                                                reply_to=reply_to, idempotency_key=idem))
        if msg_id is not None:
            headers[constants.HEADER_MSG_ID] = msg_id
        return self.raw(data, headers, stream_seq)


def _nats(msg: FakeMsg) -> Msg:
    """The fake as what intake's items hold (for identity checks against them)."""
    return cast(Msg, msg)


@pytest.fixture
def rig() -> Rig:
    return Rig()


def _delivered(out: list[items.Item]) -> list[items.Delivered]:
    assert all(isinstance(i, items.Delivered) for i in out), out
    return cast(list[items.Delivered], out)


def _taken(out: list[items.Item], sender: str) -> list[tuple[int, int]]:
    """(bundle seq, index) of the items taken from ``sender``'s bundles, in order."""
    return [(i.bundle_seq, i.index) for i in _delivered(out) if i.sender == sender]


def _untouched(msg: FakeMsg) -> None:
    assert msg.acks == 0 and msg.naks == []


# ---- channel bundles ----------------------------------------------------------------------------


async def test_first_bundle_from_unknown_sender_is_taken_whole(rig: Rig) -> None:
    msg = rig.bundle("ns.a.0", 1, 3)
    out = _delivered(await rig.decode(msg))
    assert [i.index for i in out] == [0, 1, 2]
    assert [i.id for i in out] == ["ns.a.0:1:0", "ns.a.0:1:1", "ns.a.0:1:2"]
    assert [i.message.key for i in out] == ["ns.a.0-1-k0", "ns.a.0-1-k1", "ns.a.0-1-k2"]
    assert all(i.sender == "ns.a.0" and i.bundle_seq == 1 and i.bundle_size == 3 for i in out)
    source = out[0].source
    assert source is not None and all(i.source is source for i in out)
    assert source.msg is _nats(msg) and source.pending == 3
    _untouched(msg)
    assert rig.stats["duplicates"] == 0 and rig.duplicates == 0
    assert rig.chan_in == {}  # decoding takes; only a commit moves the owner's watermark


@pytest.mark.parametrize(("watermark", "seq"), [((3, 2, 2), 2), ((3, 2, 2), 1), ((3, 2, 2), 3), ((3, 5, 5), 3)],
                         ids=["older", "much-older", "current-complete", "current-complete-5"])
async def test_applied_bundle_is_dropped_and_acked(rig: Rig, watermark: intake.Watermark, seq: int) -> None:
    rig.chan_in["ns.a.0"] = watermark
    msg = rig.bundle("ns.a.0", seq, watermark[2])
    assert await rig.decode(msg) == []
    assert msg.acks == 1 and msg.naks == []
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1
    assert rig.stats["gaps"] == 0


async def test_partially_applied_bundle_resumes_at_its_next_message(rig: Rig) -> None:
    rig.chan_in["ns.a.0"] = (2, 1, 3)
    msg = rig.bundle("ns.a.0", 2, 3)
    out = _delivered(await rig.decode(msg))
    assert [i.index for i in out] == [1, 2]
    assert [i.message.key for i in out] == ["ns.a.0-2-k1", "ns.a.0-2-k2"]
    assert all(i.bundle_size == 3 for i in out)
    source = out[0].source
    assert source is not None and source.pending == 2 and all(i.source is source for i in out)
    _untouched(msg)
    assert rig.duplicates == 0


async def test_bundle_after_a_complete_one_starts_at_zero(rig: Rig) -> None:
    rig.chan_in["ns.a.0"] = (2, 3, 3)
    msg = rig.bundle("ns.a.0", 3, 2)
    out = _delivered(await rig.decode(msg))
    assert [(i.bundle_seq, i.index) for i in out] == [(3, 0), (3, 1)]
    source = out[0].source
    assert source is not None and source.pending == 2
    _untouched(msg)


@pytest.mark.parametrize(("watermark", "seq"), [(None, 2), ((2, 3, 3), 4), ((2, 3, 3), 7), ((2, 1, 3), 3)],
                         ids=["unknown-sender-seq-2", "skips-one", "skips-many", "current-incomplete"])
async def test_early_bundle_is_held_back(rig: Rig, watermark: intake.Watermark | None, seq: int) -> None:
    if watermark is not None:
        rig.chan_in["ns.a.0"] = watermark
    msg = rig.bundle("ns.a.0", seq, 2)
    assert await rig.decode(msg) == []
    assert msg.naks == [GAP_DELAY] and msg.acks == 0
    assert rig.stats["gaps"] == 1
    assert rig.stats["duplicates"] == 0 and rig.duplicates == 0


async def test_consecutive_bundles_in_one_batch_are_both_taken(rig: Rig) -> None:
    first, second = rig.bundle("ns.a.0", 1, 2), rig.bundle("ns.a.0", 2, 1)
    out = await rig.decode(first, second)
    assert _taken(out, "ns.a.0") == [(1, 0), (1, 1), (2, 0)]
    _untouched(first)
    _untouched(second)
    assert rig.stats["gaps"] == 0


async def test_batch_watermark_does_not_outlive_the_decode(rig: Rig) -> None:
    """Bundle 1 taken but not committed: bundle 2 in the next batch must wait for it."""
    assert len(await rig.decode(rig.bundle("ns.a.0", 1, 2))) == 2
    later = rig.bundle("ns.a.0", 2, 1)
    assert await rig.decode(later) == []
    assert later.naks == [GAP_DELAY]


async def test_bundles_out_of_order_in_one_batch(rig: Rig) -> None:
    second, first = rig.bundle("ns.a.0", 2, 1), rig.bundle("ns.a.0", 1, 2)
    out = await rig.decode(second, first)
    assert _taken(out, "ns.a.0") == [(1, 0), (1, 1)]
    assert second.naks == [GAP_DELAY] and second.acks == 0
    _untouched(first)
    assert rig.stats["gaps"] == 1


async def test_copy_of_a_bundle_in_the_same_batch_is_dropped(rig: Rig) -> None:
    original, copy = rig.bundle("ns.a.0", 1, 2), rig.bundle("ns.a.0", 1, 2)
    out = await rig.decode(original, copy)
    assert _taken(out, "ns.a.0") == [(1, 0), (1, 1)]
    assert all(i.source is not None and i.source.msg is _nats(original) for i in out)
    _untouched(original)
    assert copy.acks == 1 and copy.naks == []
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1


async def test_copy_of_a_partial_bundle_in_the_same_batch_is_dropped(rig: Rig) -> None:
    rig.chan_in["ns.a.0"] = (4, 1, 3)
    original, copy = rig.bundle("ns.a.0", 4, 3), rig.bundle("ns.a.0", 4, 3)
    out = await rig.decode(original, copy)
    assert _taken(out, "ns.a.0") == [(4, 1), (4, 2)]
    assert copy.acks == 1 and rig.duplicates == 1


async def test_senders_are_independent(rig: Rig) -> None:
    rig.chan_in["ns.a.0"] = (5, 2, 2)
    a6, b1, a1, b6 = (rig.bundle("ns.a.0", 6, 1), rig.bundle("ns.b.3", 1, 2), rig.bundle("ns.a.0", 1, 1),
                      rig.bundle("ns.b.3", 6, 1))
    out = await rig.decode(a6, b1, a1, b6)
    assert _taken(out, "ns.a.0") == [(6, 0)]
    assert _taken(out, "ns.b.3") == [(1, 0), (1, 1)]
    _untouched(a6)
    _untouched(b1)
    assert a1.acks == 1 and a1.naks == []  # a duplicate for a
    assert b6.naks == [GAP_DELAY] and b6.acks == 0  # a gap for b
    assert rig.stats["duplicates"] == 1 and rig.stats["gaps"] == 1
    assert rig.chan_in == {"ns.a.0": (5, 2, 2)}


# ---- ingress --------------------------------------------------------------------------------------


def _id(idem: str, key: str = "k") -> str:
    return f"ns/acct/{envelope.idempotency_id(key, 'deposit', idem)}"


def _ingress(out: list[items.Item]) -> list[items.Ingress]:
    assert all(isinstance(i, items.Ingress) for i in out), out
    return cast(list[items.Ingress], out)


async def test_client_idempotency_key_is_kept(rig: Rig) -> None:
    msg = rig.invoke(idem="order-1", msg_id="mid-1", reply_to="_INBOX.a")
    [item] = _ingress(await rig.decode(msg))
    assert item.id == _id("order-1") and item.message.idempotency_key == "order-1"
    assert item.message.reply_to == "_INBOX.a" and item.message.key == "k"
    assert item.source is not None and item.source.msg is _nats(msg) and item.source.pending == 1
    assert item.dups == []
    _untouched(msg)


async def test_missing_idempotency_key_comes_from_the_message_id(rig: Rig) -> None:
    [item] = _ingress(await rig.decode(rig.invoke(msg_id="mid-7")))
    assert item.id == _id("mid-7") and item.message.idempotency_key == "mid-7"
    assert item.idempotency_id == envelope.idempotency_id("k", "deposit", "mid-7")


async def test_missing_idempotency_key_and_message_id_use_the_stream_sequence(rig: Rig) -> None:
    [item] = _ingress(await rig.decode(rig.invoke(stream_seq=42)))
    assert item.id == _id("~seq:42") and item.message.idempotency_key == "~seq:42"  # reserved: no caller has it


async def test_recorded_copy_is_answered_from_its_record_and_acked(rig: Rig) -> None:
    rig.record("order-1")
    msg = rig.invoke(idem="order-1", reply_to="_INBOX.b")
    assert await rig.decode(msg) == []
    assert rig.nc.published == [("_INBOX.b", REPLY)]
    assert msg.acks == 1 and msg.naks == []
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1


async def test_recorded_copy_found_by_message_id(rig: Rig) -> None:
    rig.record("mid-9")
    msg = rig.invoke(msg_id="mid-9", reply_to="_INBOX.c")
    assert await rig.decode(msg) == []
    assert rig.nc.published == [("_INBOX.c", REPLY)] and msg.acks == 1


async def test_recorded_copy_without_reply_address_is_only_acked(rig: Rig) -> None:
    rig.record("order-1")
    msg = rig.invoke(idem="order-1")
    assert await rig.decode(msg) == []
    assert rig.nc.published == [] and msg.acks == 1 and rig.duplicates == 1


async def test_copy_of_a_pending_invocation_is_acked_but_not_answered(rig: Rig) -> None:
    rig.record("order-1", reply=None)
    msg = rig.invoke(idem="order-1", reply_to="_INBOX.d")
    assert await rig.decode(msg) == []
    assert rig.nc.published == []
    assert msg.acks == 1
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1


async def test_copies_in_one_batch_ride_on_the_first(rig: Rig) -> None:
    first = rig.invoke(idem="order-1", reply_to="_INBOX.1")
    copy = rig.invoke(idem="order-1", reply_to="_INBOX.2")
    other = rig.invoke(idem="order-2")
    out = _ingress(await rig.decode(first, copy, other))
    assert [i.id for i in out] == [_id("order-1"), _id("order-2")]
    assert out[0].source is not None and out[0].source.msg is _nats(first)
    assert out[0].message.reply_to == "_INBOX.1"
    assert out[0].dups == [(_nats(copy), "_INBOX.2")]
    assert out[1].dups == []
    for msg in (first, copy, other):
        _untouched(msg)  # a copy is acked with its first, once that one is committed
    assert rig.nc.published == []
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1


async def test_copies_by_message_id_in_one_batch_ride_on_the_first(rig: Rig) -> None:
    first, copy = rig.invoke(msg_id="mid-3"), rig.invoke(msg_id="mid-3")
    [item] = _ingress(await rig.decode(first, copy))
    assert item.id == _id("mid-3") and item.dups == [(_nats(copy), None)]


# ---- undecodable messages -------------------------------------------------------------------------


def _undecodable(out: list[items.Item]) -> items.Undecodable:
    assert len(out) == 1 and isinstance(out[0], items.Undecodable), out
    return out[0]


async def test_garbage_invoke_becomes_one_dead_item(rig: Rig) -> None:
    data = b"\xc1" * 5000  # 0xc1 is never valid msgpack
    msg = rig.raw(data, {constants.HEADER_KIND: constants.KIND_INVOKE, constants.HEADER_REPLY_TO: "_INBOX.e"},
                  stream_seq=77)
    item = _undecodable(await rig.decode(msg))
    assert item.id == "seq:77" and item.idempotency_id == "seq:77"
    assert item.reason.startswith("CodecError: ")
    assert item.raw == data[:4096] and len(item.raw) == 4096
    assert item.reply_to == "_INBOX.e"
    assert item.source is not None and item.source.msg is _nats(msg) and item.source.pending == 1
    _untouched(msg)
    assert rig.nc.published == [] and rig.duplicates == 0


async def test_malformed_invoke_without_headers_becomes_a_dead_item(rig: Rig) -> None:
    msg = rig.raw(codec.pack({"k": 1, "h": "deposit"}), None, stream_seq=78)
    item = _undecodable(await rig.decode(msg))
    assert item.id == "seq:78"
    assert item.reason.startswith("TypeError: ") and "'k'" in item.reason
    assert item.raw == msg.data and item.reply_to is None


@pytest.mark.parametrize(("data", "error"), [(b"\xc1\xc1", "CodecError"), (codec.pack([1, 2]), "TypeError"),
                                             (codec.pack({"c": "ns.a.0", "n": 1}), "KeyError")],
                         ids=["not-msgpack", "not-a-map", "no-messages"])
async def test_garbage_bundle_becomes_one_dead_item(rig: Rig, data: bytes, error: str) -> None:
    msg = rig.raw(data, {constants.HEADER_KIND: constants.KIND_BUNDLE}, stream_seq=79)
    item = _undecodable(await rig.decode(msg))
    assert item.id == "seq:79" and item.reason.startswith(f"{error}: ")
    assert item.raw == data and item.reply_to is None
    _untouched(msg)
    assert rig.stats["gaps"] == 0 and rig.duplicates == 0


async def test_dead_items_sit_among_good_ones(rig: Rig) -> None:
    good1, bad, good2 = rig.invoke(idem="a"), rig.raw(b"\xc1", None, stream_seq=80), rig.bundle("ns.a.0", 1, 1)
    out = await rig.decode(good1, bad, good2)
    assert [type(i) for i in out] == [items.Ingress, items.Undecodable, items.Delivered]


@pytest.mark.parametrize("kind", [constants.KIND_INVOKE, constants.KIND_BUNDLE])
async def test_redelivered_dead_letter_is_answered_from_its_record(rig: Rig, kind: str) -> None:
    record = envelope.Reply(ok=False).encode()
    rig.recent["seq:81"] = envelope.Record(b"", record)
    msg = rig.raw(b"\xc1", {constants.HEADER_KIND: kind, constants.HEADER_REPLY_TO: "_INBOX.f"}, stream_seq=81)
    assert await rig.decode(msg) == []
    assert msg.acks == 1 and msg.naks == []
    assert rig.nc.published == [("_INBOX.f", record)]
    assert rig.stats["duplicates"] == 1 and rig.duplicates == 1


async def test_redelivered_dead_letter_without_reply_address_is_only_acked(rig: Rig) -> None:
    rig.recent["seq:82"] = envelope.Record(b"", envelope.Reply(ok=False).encode())
    msg = rig.raw(b"\xc1", None, stream_seq=82)
    assert await rig.decode(msg) == []
    assert msg.acks == 1 and rig.nc.published == []


async def test_other_dead_letter_records_do_not_match(rig: Rig) -> None:
    rig.recent["seq:83"] = envelope.Record(b"", envelope.Reply(ok=False).encode())
    item = _undecodable(await rig.decode(rig.raw(b"\xc1", None, stream_seq=84)))
    assert item.id == "seq:84" and rig.duplicates == 0


# ---- transport errors are not decoding errors ------------------------------------------------------


@pytest.mark.parametrize(("watermark", "seq"), [((1, 1, 1), 3), ((1, 1, 1), 1)], ids=["gap-nak", "duplicate-ack"])
async def test_ack_or_nak_failure_does_not_make_a_bundle_undecodable(rig: Rig, watermark: intake.Watermark,
                                                                     seq: int) -> None:
    rig.chan_in["ns.a.0"] = watermark
    msg = rig.bundle("ns.a.0", seq, 1, fail_with=nats.errors.OutboundBufferLimitError())
    # Nothing is taken, nothing is dead-lettered, and the loop goes on: the message comes back after
    # ack_wait. Before, a good bundle became a dead letter, and an early one was lost for good.
    assert await rig.decode(msg) == []


async def test_a_copy_whose_ack_fails_is_still_only_a_copy(rig: Rig) -> None:
    """A recorded invocation's copy whose ack (or answer) NATS refuses: no item, no error; it comes back later."""
    rig.record("order-1")
    data, headers = envelope.encode_invoke(envelope.Message(key="k", handler="deposit", args={"n": 1},
                                                            idempotency_key="order-1"))
    msg = rig.raw(data, headers, fail_with=nats.errors.ConnectionClosedError())
    assert await rig.decode(msg) == [] and rig.duplicates == 1


# ---- idempotency keys name one request to one key's handler -----------------------------------------


async def test_one_idempotency_key_on_other_keys_is_other_requests(rig: Rig) -> None:
    """The issue's k1..k8 with one Idempotency-Key: each key runs; before, all but the first were answered
    with the first one's reply and never ran."""
    rig.record("same-key-1", key="k1")
    out = _ingress(await rig.decode(*(rig.invoke(idem="same-key-1", key=f"k{i}") for i in range(2, 9))))
    assert [i.message.key for i in out] == [f"k{i}" for i in range(2, 9)]
    assert len({i.id for i in out}) == 7 and rig.duplicates == 0


async def test_a_used_key_with_other_arguments_is_refused(rig: Rig) -> None:
    rig.record("order-1")
    msg = rig.invoke(idem="order-1", reply_to="_INBOX.m", n=100)
    assert await rig.decode(msg) == []
    ((subject, payload),) = rig.nc.published
    reply = envelope.Reply.decode(payload)
    assert subject == "_INBOX.m" and reply.error is not None and reply.error.kind == "idempotency_mismatch"
    assert "order-1" in reply.error.message
    assert msg.acks == 1 and rig.duplicates == 0 and rig.stats["idempotency_mismatches"] == 1


async def test_a_pending_request_under_a_used_key_with_other_arguments_is_refused_at_once(rig: Rig) -> None:
    rig.record("order-1", reply=None)
    msg = rig.invoke(idem="order-1", reply_to="_INBOX.p", n=2)
    assert await rig.decode(msg) == []
    assert envelope.Reply.decode(rig.nc.published[0][1]).error.kind == "idempotency_mismatch"  # type: ignore[union-attr]


async def test_other_arguments_in_one_batch_are_refused_not_ridden(rig: Rig) -> None:
    first, other = rig.invoke(idem="order-1", reply_to="_INBOX.1"), rig.invoke(idem="order-1", reply_to="_INBOX.2", n=5)
    [item] = _ingress(await rig.decode(first, other))
    assert item.dups == [] and other.acks == 1
    assert [subject for subject, _ in rig.nc.published] == ["_INBOX.2"]


def test_the_fingerprint_ignores_argument_order() -> None:
    a = envelope.Message(key="k", handler="h", args={"x": 1, "y": {"b": [1, 2], "a": None}})
    b = envelope.Message(key="k", handler="h", args={"y": {"a": None, "b": [1, 2]}, "x": 1})
    c = envelope.Message(key="k", handler="h", args={"x": 1, "y": {"a": None, "b": [2, 1]}})
    assert envelope.fingerprint(a) == envelope.fingerprint(b) != envelope.fingerprint(c)
