"""Fuzzing the messages a partition pulls ("no single message can stall the platform").

Anyone who can publish to a function's JetStream subjects reaches its partition loops directly, past
the client's and the gateway's checks. Whatever arrives there (garbage bytes, truncated or bit-flipped
invocations, msgpack of the wrong shape, wrong-typed fields, unknown or reserved handlers, bundles with
garbage, wrong sequence numbers or a wrong sender, headers with garbage values) must end refused
(an error reply and a dead letter), dropped as a duplicate, or held back as a gap; it must never end a
partition loop, nor touch what well-formed traffic does. So a concurrent workload of counter increments
(each with its own idempotency key, some relayed over the function's own channels) runs through
``statefn.Client`` while a seeded random mix of bad messages is published straight to the ingress and
channel subjects; afterwards every key's counter must be exactly the number of increments sent to it,
every call must have been answered, every bad invocation that asked for a reply must have got the reply
intake owes it (undecodable, unknown handler, ...), no key may be left locked, and the partition loops
that started must still be the ones running, none of them having logged an error.

Inputs that crashed a partition loop, and a misrouted invocation that lost an update, found by this
fuzzing and fixed, are tested one by one at the end of this file (``KNOWN_POISON``).

The mix is seeded (``STATEFN_FUZZ_SEED`` overrides the seed; it is printed) and bounded in count and
time, so it fits the normal suite.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient

import statefn
from statefn import Context, StatefulFunction
from statefn_core import codec, constants, envelope, layout, wire
from statefn_sidecar import devservers, partition, sidecar
from tests import helpers

SEED = int(os.environ.get("STATEFN_FUZZ_SEED", "20260611"))
PARTITIONS = 2
KEYS = 20
INCREMENTS = 200
RELAYS = 40
FUZZ_MESSAGES = 500
HOPS = 5
# Fuzz keys are upper-case letters and symbols, the workload's ("work-07", "src-3", "hop-3") lower-case
# words: a key of one is at least four flipped bits from a key of the other, and a fuzzed invocation
# flips at most three.
FUZZ_KEY_CHARS = "XYZQ#@!"
HANDLERS = {"incr", "relay", "boom"}


def make_app(ns: str) -> statefn.App:
    counter = StatefulFunction(f"{ns}/counter", max_attempts=2, backoff_initial=0.05)
    value = counter.state("value", int, default=0)

    @counter.handler
    async def incr(ctx: Context, by: int = 1) -> int:
        ctx[value] += by
        return ctx[value]

    @counter.handler
    async def relay(ctx: Context, to: str, by: int = 1) -> None:
        ctx.send(f"{ns}/counter", to, "incr", by=by)  # over a channel bundle, to to's partition

    @counter.handler
    async def boom(ctx: Context) -> None:
        raise ValueError("boom")

    return statefn.App(counter)


# ---- the mix ---------------------------------------------------------------------------------------------

ANY = frozenset({"*"})  # a reply of any kind (ok included): the message is a good one after all


@dataclasses.dataclass
class Fuzz:
    """One bad message: where it goes, and (if it asks for a reply) its reply token and the kinds it may get."""

    category: str
    subject: str
    body: bytes
    headers: dict[str, str] | None
    token: str | None = None
    expect: frozenset[str] | None = None


def expected_reply(body: bytes, headers: dict[str, str] | None, partition: int) -> frozenset[str] | None:
    """What the sidecar must answer an ingress message with, decided as intake decides; None: no reply.

    Undecodable, or for a key of another partition: refused as undecodable. Decodable but naming no handler
    of the app (reserved ones included: from ingress they carry no transaction): an unknown handler.
    Anything else runs, or is refused by validation.
    """
    stripped = {k: v.strip() for k, v in (headers or {}).items()}
    if stripped.get(constants.HEADER_KIND, constants.KIND_INVOKE) == constants.KIND_BUNDLE:
        try:
            envelope.decode_bundle(body)
        except Exception:
            return frozenset({"undecodable"})
        return None
    try:
        message = envelope.decode_invoke(body, stripped)
    except Exception:
        return frozenset({"undecodable"})
    if layout.partition_of(message.key, PARTITIONS) != partition:  # a flipped key of another partition
        return frozenset({"undecodable"})
    return ANY if message.handler in HANDLERS else frozenset({"unknown_handler"})


class Mixer:
    """The seeded mix of bad messages for one function.

    It leaves out the inputs that ``KNOWN_POISON`` (below) shows to crash a partition loop, and what would
    only be a forgery of the workload itself: a bundle numbered next on a real channel is that channel's
    next bundle to the receiver (the real one would then be dropped as a copy), so a real sender's bundles
    here are numbered behind or far ahead of anything it sends.
    """

    def __init__(self, rng: random.Random, ns: str, inbox: str) -> None:
        self.rng = rng
        self.fn = layout.FunctionType.parse(f"{ns}/counter")
        self.inbox = inbox
        self.real_senders = [layout.PartitionId(self.fn, p).token for p in range(PARTITIONS)]
        # Senders no partition is: one past the count, another function's, and tokens that are none at all.
        self.fake_senders = [layout.PartitionId(self.fn, 7).token, "zz.other.0", "garbage", "", "a.b",
                             f"{ns}.counter.-1"] + [f"zz.f{i}.{i % 3}" for i in range(40)]
        self._n = 0
        # Each message goes to the partition of the keys it names (misrouted ones are tested on their own, below).
        self.partition = 0

    # ---- building blocks ----
    def key(self) -> str:
        """A fuzz key of the partition the message in the making goes to."""
        while True:
            key = "".join(self.rng.choice(FUZZ_KEY_CHARS) for _ in range(self.rng.randint(1, 6))) + str(
                self.rng.randint(0, 99))
            if layout.partition_of(key, PARTITIONS) == self.partition:
                return key

    def garbage(self, depth: int = 0) -> Any:
        """A msgpack-able value of any shape."""
        r = self.rng
        choice = r.randrange(11 if depth < 3 else 7)
        if choice == 0:
            return None
        if choice == 1:
            return r.choice([True, False])
        if choice == 2:
            return r.choice([0, -1, 1, 2**32, r.randint(-2**63, 2**64 - 1)])
        if choice == 3:
            return r.random() * 1e6
        if choice == 4:
            return "x" * r.randint(0, 40)
        if choice == 5:
            return bytes(r.randrange(256) for _ in range(r.randint(0, 16)))
        if choice == 6:
            return r.choice(["k", "h", "a", "i", "c", "n", "m", "incr", "~commit"])
        if choice == 7:
            return [self.garbage(depth + 1) for _ in range(r.randint(0, 4))]
        if choice == 8:  # a map whose keys are not all strings
            keys: list[Any] = [f"f{i}" for i in range(r.randint(0, 3))]
            keys += [r.randint(0, 9), b"bin", None, 1.5][:r.randint(0, 4)]
            return {k: self.garbage(depth + 1) for k in keys}
        if choice == 9:
            return {"k": self.garbage(depth + 1), "h": self.garbage(depth + 1), "a": self.garbage(depth + 1)}
        return [self.key(), "nope", {"by": 1}]

    def invoke_body(self, key: str | None = None, handler: str = "incr", args: Any = None) -> bytes:
        msg = envelope.Message(key=key or self.key(), handler=handler,
                               args={"by": self.rng.randint(1, 5)} if args is None else args,
                               idempotency_key=f"fz-{self.rng.getrandbits(48):x}")
        return envelope.encode_invoke(msg)[0]

    def ingress(self, category: str, body: bytes, headers: dict[str, str] | None = None) -> Fuzz:
        """An ingress message that asks for its reply on the fuzz inbox."""
        self._n += 1
        token = f"{self._n}"
        headers = {**(headers or {}), constants.HEADER_REPLY_TO: f"{self.inbox}.{token}"}
        return Fuzz(category, self.fn.ingress_subject(self.partition), body, headers, token,
                     expected_reply(body, headers, self.partition))

    def bundle(self, category: str, body: bytes, subject_sender: str | None = None) -> Fuzz:
        sender = layout.PartitionId.from_token(subject_sender or self.rng.choice(self.real_senders))
        return Fuzz(category, self.fn.channel_subject(self.partition, sender), body,
                    {constants.HEADER_KIND: constants.KIND_BUNDLE})

    def safe_sender_and_seq(self) -> tuple[Any, Any]:
        """A sender and sequence number that can never be taken for a real channel's next bundle."""
        r = self.rng
        if r.random() < 0.5:
            return r.choice(self.real_senders), r.choice([0, -1, -2**31, 10**9 + r.randrange(1000), 2**62])
        return r.choice(self.fake_senders), r.choice([1, 1, 1, 2, 5])

    # ---- categories ----
    def raw_bytes(self) -> Fuzz:
        headers = {}
        if self.rng.random() < 0.3:
            headers[constants.HEADER_KIND] = self.rng.choice([constants.KIND_INVOKE, constants.KIND_BUNDLE])
        body = bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 64)))
        if self.rng.random() < 0.5:  # starts as a map, so it is not refused at its first byte
            body = b"\x84" + body
        return self.ingress("raw", body, headers)

    def truncated(self) -> Fuzz:
        body = self.invoke_body()
        return self.ingress("truncated", body[:self.rng.randrange(len(body))])

    def bit_flipped(self) -> Fuzz:
        """Flipped bits may leave it valid (then it runs, on a fuzz key), or break it (then it is refused)."""
        body = bytearray(self.invoke_body(handler=self.rng.choice(["incr", "boom", "nope"])))
        for _ in range(self.rng.randint(1, 3)):
            i = self.rng.randrange(len(body))
            body[i] ^= 1 << self.rng.randrange(8)
        return self.ingress("flipped", bytes(body))

    def wrong_shape(self) -> Fuzz:
        value = self.rng.choice([self.garbage(), [self.key(), "incr", {"by": 1}], "incr", 42, None, b"\x00",
                                 {"key": self.key(), "handler": "incr"}, {"k": self.key()}, {"h": "incr"}, {}])
        return self.ingress("shape", codec.pack(value))

    def wrong_types(self) -> Fuzz:
        r = self.rng
        body: dict[str, Any] = {"k": self.key(), "h": "incr", "a": {"by": 1}, "i": f"fz-{r.getrandbits(48):x}"}
        field = r.choice(["k", "h", "a", "i", "a-keys", "a-values", "a-deep"])
        if field == "a-keys":  # argument names that are not strings
            body["a"] = r.choice([{1: 2}, {None: 1}, {b"by": 1}, {1.5: 1}, {"by": 1, 2: 3}])
        elif field == "a-values":
            body["a"] = {"by": r.choice(["1", None, [1], {"n": 1}, 2**63 - 1, -2**63, 1.5, b"\x01", True])}
        elif field == "a-deep":  # (nested 500 deep it is a known poison message)
            nested: Any = 1
            for _ in range(r.choice([50, 200, 400])):
                nested = [nested]
            body["a"] = {"by": nested}
        else:
            body[field] = r.choice([1, None, b"bytes", [self.key()], {"x": 1}, 1.5, True, 2**64 - 1, [], ""])
        return self.ingress(f"types:{field}", codec.pack(body))

    def unknown_handler(self) -> Fuzz:
        handler = self.rng.choice(["nope", "", " ", "incr ", "Incr", "__init__", "ctx", "incr.x", "~sleep", "~",
                                   "x" * 300, "relay\x00", "\u00fcn\u00efcode"])
        return self.ingress("unknown", self.invoke_body(handler=handler))

    def reserved_handler(self) -> Fuzz:
        """Reserved handlers from outside: ingress carries no transaction, so they are unknown handlers."""
        handler = self.rng.choice(sorted(constants.TX_CONTROL_HANDLERS | {constants.RESPONSE_HANDLER}))
        args = self.rng.choice([{}, {"call": "c1", "reply": envelope.Reply(ok=True, value=b"\x01").encode()},
                                {"call": 5, "reply": "not bytes"}, {"prepared": ["zz/other", "k", [1, 2]]},
                                {"function": "zz/other", "key": "k"}])
        return self.ingress("reserved", self.invoke_body(handler=handler, args=args))

    def bad_headers(self) -> Fuzz:
        """Garbage headers: an attempt that is no integer (or no sane one), an unknown kind, odd origins."""
        r = self.rng
        which = r.choice(["attempt", "attempt-int", "kind", "origin", "traceparent", "msg-id"])
        headers: dict[str, str] = {}
        if which == "attempt":
            headers[constants.HEADER_ATTEMPT] = r.choice(["x", "", "1.5", "0x10", "one", "-", "1_0", "\u0661"])
        elif which == "attempt-int":  # (one past 64 bits is a known poison message)
            headers[constants.HEADER_ATTEMPT] = r.choice(["0", "-5", "99", str(2**63 - 1), str(-2**63)])
        elif which == "kind":
            headers[constants.HEADER_KIND] = r.choice(["bogus", "dead-letter", "", "BUNDLE", "bundle ", "invoke2"])
        elif which == "origin":
            headers[constants.HEADER_ORIGIN] = r.choice(["", "zz/other:k", "x" * 500, "\u00e9"])
        elif which == "traceparent":
            headers[constants.HEADER_TRACEPARENT] = r.choice(
                ["garbage", "00-zz-zz-01", f"00-{'0' * 32}-{'0' * 16}-01", "ff-" + "f" * 52, "\u00e9" * 10])
        else:  # a message id (JetStream drops a repeated one as a copy: then no reply is due)
            headers[constants.HEADER_MSG_ID] = r.choice(["~seq:1", "x" * 200, f"fz-{r.getrandbits(8)}"])
        body = self.invoke_body(handler=r.choice(["incr", "nope", "boom"]))
        return self.ingress(f"headers:{which}", body, headers)

    def bundle_garbage(self) -> Fuzz:
        """A body that is no bundle, or a bundle whose messages are not messages."""
        r = self.rng
        sender, seq = self.safe_sender_and_seq()
        messages = [self.garbage() for _ in range(r.randint(0, 3))]
        # (a message whose key is not a string is a known poison message)
        messages = [m for m in messages if not (isinstance(m, list) and len(m) >= 3 and not isinstance(m[0], str))]
        value: Any = r.choice([
            self.garbage(), {"c": sender, "n": seq}, {"c": sender, "m": []}, {"n": seq, "m": []},
            {"c": sender, "n": seq, "m": "not a list"}, {"c": sender, "n": seq, "m": messages},
            {"c": sender, "n": seq, "m": [[self.key()]]},
            {"c": sender, "n": seq, "m": [[self.key(), "incr", {}, "o", None, None, None, 1, [1, 2]]]},
            {"c": sender, "n": seq, "m": [[self.key(), "~commit", {}, "o", None, None, None, 1, None, ["tx", 1.0]]]},
            {"c": sender, "n": seq, "m": [[self.key(), "incr", {}, "o", None, None, None, 1, None, None, None, [[1]]]]},
        ])
        body = codec.pack(value) if r.random() < 0.85 else bytes(r.randrange(256) for _ in range(r.randint(0, 40)))
        return self.bundle("bundle:garbage", body)

    def bundle_seq(self) -> Fuzz:
        """A real channel's bundle numbered behind it (0: dropped as a copy), far ahead (held back as a gap), or
        below any (refused as malformed)."""
        r = self.rng
        sender = r.choice(self.real_senders)
        seq = r.choice([0, 0, 0, -1, -2**31, 10**9 + r.randrange(1000), 2**62])
        body = envelope.encode_bundle(envelope.Bundle(sender, seq, [self.forged() for _ in range(r.randint(0, 3))]))
        return self.bundle("bundle:seq", body, sender)

    def bundle_sender(self) -> Fuzz:
        """A bundle from a sender that is no partition of ours, on a real channel's subject (a first one is
        taken: its messages run, on fuzz keys)."""
        r = self.rng
        sender = r.choice(self.fake_senders)
        body = envelope.encode_bundle(envelope.Bundle(sender, r.choice([1, 1, 1, 2, 5]),
                                                      [self.forged() for _ in range(r.randint(1, 3))]))
        return self.bundle("bundle:sender", body)

    def forged(self) -> envelope.Message:
        """A message inside a forged bundle, on a fuzz key: an unknown, failing or reserved handler, a reply
        nobody waits for, a decision or inquiry for a transaction nobody runs, or a prepare of one."""
        r = self.rng
        handler = r.choice(["nope", "boom", "incr", constants.COMMIT_HANDLER, constants.ABORT_HANDLER,
                            constants.INQUIRE_HANDLER, constants.RESPONSE_HANDLER])
        msg = envelope.Message(key=self.key(), handler=handler, args={"by": 1}, origin="zz/other:k",
                               attempt=r.choice([1, 1, 2, 0, -3]))
        # Transactions coordinated by this function (a prepare for a coordinator that does not exist stays
        # locked for good: its participant logs an error, by design).
        tx = wire.TxInfo(f"tx-{r.getrandbits(32):x}", time.time() - r.random(), str(self.fn), self.key(), 0.5)
        if handler in constants.TX_CONTROL_HANDLERS or (handler == "incr" and r.random() < 0.3):
            msg.tx = tx if r.random() < 0.8 else None
        if handler == constants.INQUIRE_HANDLER:  # (without these arguments it is a known poison message)
            msg.args = {"function": str(self.fn), "key": self.key()}
        if handler == constants.RESPONSE_HANDLER:
            msg.args = r.choice([
                {"call": f"c{r.randrange(5)}", "reply": envelope.Reply(ok=True, value=codec.pack(1)).encode()},
                {"call": "c1", "reply": b"\xc1"}, {},
                {"call": "c1", "reply": envelope.Reply(ok=True).encode(), "prepared": [str(self.fn), self.key(),
                                                                                       tx.to_plain()]},
                {"call": "c1", "reply": envelope.Reply(ok=True).encode(), "prepared": ["bad"]}])
        if r.random() < 0.2:
            # A call's reply address. On another function it would be published, and retried, for good: a
            # partition's outbox does not give up on a target without a stream (reported, not tested here).
            msg.caller = envelope.CallerAddress(str(self.fn), r.choice([0, 1, 5]), self.key(), "c1")
        return msg

    def next(self) -> Fuzz:
        makers: list[tuple[float, Callable[[], Fuzz]]] = [
            (1.0, self.raw_bytes), (1.0, self.truncated), (1.0, self.bit_flipped), (1.0, self.wrong_shape),
            (1.5, self.wrong_types), (0.7, self.unknown_handler), (0.7, self.reserved_handler),
            (1.3, self.bad_headers), (0.8, self.bundle_garbage), (0.6, self.bundle_seq), (1.0, self.bundle_sender),
        ]
        self.partition = self.rng.randrange(PARTITIONS)
        return self.rng.choices([m for _, m in makers], weights=[w for w, _ in makers])[0]()


# ---- the test --------------------------------------------------------------------------------------------

def _workers(sc: sidecar.Sidecar) -> dict[int, partition.PartitionWorker]:
    return {p: w for h in sc.hosts.values() for p, w in h.workers.items()}


def _crashes(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the partition loops logged as errors (a crash is "partition loop crashed; giving the partition up")."""
    return [f"{r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records
            if r.name == "statefn.partition" and r.levelno >= logging.ERROR]


async def test_fuzzed_envelopes_neither_stall_nor_corrupt(nats_server: devservers.NatsServer,
                                                         etcd_server: devservers.EtcdServer, namespace: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="statefn")
    print(f"STATEFN_FUZZ_SEED={SEED}")
    rng = random.Random(SEED)
    fn = f"{namespace}/counter"
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server, partitions=PARTITIONS,
                                       gap_retry_delay=0.5, max_state_bytes=4096) as sc, \
            helpers.client(nats_server, etcd_server, timeout=30) as c:
        await helpers.eventually(lambda: _owned(sc, PARTITIONS))
        workers = _workers(sc)
        fuzz_nc = await nats.connect(nats_server.url)
        try:
            inbox = fuzz_nc.new_inbox()
            replies: dict[str, list[str]] = collections.defaultdict(list)

            async def on_reply(msg: Any) -> None:
                replies[msg.subject[len(inbox) + 1:]].append(_kind(msg.data))

            await fuzz_nc.subscribe(f"{inbox}.>", cb=on_reply)
            mixer = Mixer(rng, namespace, inbox)
            fuzz = [mixer.next() for _ in range(FUZZ_MESSAGES)]
            work_rng = random.Random(rng.getrandbits(64))
            increments = [(f"work-{work_rng.randrange(KEYS):02d}", work_rng.randint(1, 3)) for _ in range(INCREMENTS)]
            relays = [(f"src-{i % 7}", f"hop-{work_rng.randrange(HOPS)}") for i in range(RELAYS)]
            expected: collections.Counter[str] = collections.Counter()
            for key, by in increments:
                expected[key] += by
            for _, hop in relays:
                expected[hop] += 1

            started = time.monotonic()
            answered, stored = await asyncio.gather(_workload(c, fn, increments, relays), _publish(fuzz_nc, fuzz))
            elapsed = time.monotonic() - started
            # Every call was answered; each increment ran exactly once (the relayed ones arrive after their
            # calls' replies: wait for them, but only as long as the counts are still short).
            assert len(answered) == INCREMENTS + RELAYS
            await helpers.eventually(lambda: _counts_reached(c, fn, expected), timeout=20)
            counts = {key: (await c.get_state(fn, key)).get("value", 0) for key in expected}
            assert counts == dict(expected), {k: (counts[k], n) for k, n in expected.items() if counts[k] != n}
            # Every bad invocation that asked for a reply got one, of the kind it must get.
            awaited = {f.token: f for f, ok in zip(fuzz, stored, strict=True) if ok and f.token and f.expect}
            await helpers.eventually(lambda: _all_answered(replies, awaited), timeout=20)
            wrong = {t: (f.category, f.body[:80], f.headers, replies[t]) for t, f in awaited.items()
                     if f.expect is not None and f.expect is not ANY and not set(replies[t]) <= f.expect}
            assert not wrong, wrong
            # Nothing a bad message did holds a key: prepares of transactions nobody runs were aborted (their
            # participants asked the coordinator), and no inbox waits. Bundles held back as gaps came back
            # (held back again) meanwhile.
            gaps = int(sc.status()["stats"].get("gaps", 0))
            await helpers.eventually(lambda: _no_locks(etcd_server, fn), timeout=20)
            await helpers.eventually(lambda: _more_gaps(sc, gaps), timeout=10)
            # Still serving, by the partition loops that started.
            assert await c.invoke(fn, "work-final", "incr", by=1) == 1
            status = sc.status()
            assert status["functions"][fn]["partitions"] == list(range(PARTITIONS))
            assert _workers(sc) == workers and not any(w.lost.is_set() for w in workers.values())
            stats = status["stats"]
            kinds = collections.Counter(k for t in awaited for k in replies[t])
            categories = collections.Counter(f.category.split(":")[0] for f in fuzz)
            print(f"{len(fuzz)} fuzz messages and {len(answered)} calls in {elapsed:.1f}s; fuzz replies "
                  f"{dict(sorted(kinds.items()))}; categories {dict(sorted(categories.items()))}; stats {stats}")
            # The mix reached every way out: refused (dead letters), held back (gaps), dropped (duplicates).
            assert all(stats.get(what, 0) > 0 for what in ("dead_letters", "gaps", "duplicates")), stats
        finally:
            await fuzz_nc.close()
    assert not _crashes(caplog), "\n".join(_crashes(caplog))
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("statefn")
              and r.levelno >= logging.ERROR]
    assert not errors, errors


async def _owned(sc: sidecar.Sidecar, partitions: int) -> bool:
    return len(_workers(sc)) == partitions


async def _workload(c: statefn.Client, fn: str, increments: list[tuple[str, int]],
                    relays: list[tuple[str, str]]) -> list[Any]:
    """The well-formed traffic: every call with its own idempotency key, at most 16 at a time."""
    gate = asyncio.Semaphore(16)

    async def call(i: int, key: str, handler: str, **args: Any) -> Any:
        async with gate:
            return await c.invoke(fn, key, handler, idempotency_key=f"work-{i}", **args)

    calls = [call(i, key, "incr", by=by) for i, (key, by) in enumerate(increments)]
    calls += [call(INCREMENTS + i, src, "relay", to=hop) for i, (src, hop) in enumerate(relays)]
    random.Random(len(calls)).shuffle(calls)
    return list(await asyncio.gather(*calls))


async def _publish(nc: NatsClient, fuzz: list[Fuzz]) -> list[bool]:
    """Publish the mix, interleaved with the workload; for each, whether JetStream stored it (not a copy)."""
    js = nc.jetstream()
    stored = []
    for i, f in enumerate(fuzz):
        ack = await js.publish(f.subject, f.body, headers=f.headers)
        stored.append(not ack.duplicate)
        if i % 8 == 0:
            await asyncio.sleep(0.01)
    return stored


async def _no_locks(etcd_server: devservers.EtcdServer, fn: str) -> bool:
    return not await helpers.locks_left(etcd_server, fn, PARTITIONS)


async def _more_gaps(sc: sidecar.Sidecar, than: int) -> bool:
    return int(sc.status()["stats"].get("gaps", 0)) > than


async def _counts_reached(c: statefn.Client, fn: str, expected: collections.Counter[str]) -> bool:
    for key, n in expected.items():
        if (await c.get_state(fn, key)).get("value", 0) < n:
            return False
    return True


async def _all_answered(replies: dict[str, list[str]], awaited: dict[str, Fuzz]) -> bool:
    return all(replies.get(t) for t in awaited)


def _kind(data: bytes) -> str:
    try:
        reply = envelope.Reply.decode(data)
    except Exception:
        return "not-a-reply"
    return "ok" if reply.ok else (reply.error.kind if reply.error else "?")


# ---- poison messages the fuzzing found -------------------------------------------------------------------
# Inputs that crashed a partition loop ("partition loop crashed; giving the partition up") until their fixes
# in the sidecar's decoding and 2PC handling (envelope, intake, participants, acks). Each was a poison
# message: unacked, it came back after ack_wait and crashed the loop again, and the well-formed messages of
# every batch it landed in waited for ack_wait with it. Now each is refused or dropped, and the loop goes on.

def _invoke(key: str = "k1", handler: str = "incr", args: Any = None) -> bytes:
    return envelope.encode_invoke(envelope.Message(key=key, handler=handler, args={"by": 1} if args is None else args,
                                                   idempotency_key=f"poison-{key}-{handler}"))[0]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def _bundle(*messages: list[Any]) -> bytes:
    return codec.pack({"c": "zz.poison.0", "n": 1, "m": list(messages)})


def _tx(fn: layout.FunctionType) -> list[Any]:
    return wire.TxInfo("tx-poison", time.time(), str(fn), "coordinator", 0.5).to_plain()


def _control(handler: str, args: dict[str, Any], tx: list[Any] | None) -> list[Any]:
    """A message as a bundle carries it: key, handler, args, origin, traceparent, reply_to, idempotency key,
    attempt, caller, transaction."""
    return ["k1", handler, args, "zz/other:k", None, None, None, 1, None, tx]


Poison = Callable[[layout.FunctionType], tuple[str, bytes, dict[str, str]]]
BUNDLE = {constants.HEADER_KIND: constants.KIND_BUNDLE}


def _ingress(body: bytes, **headers: str) -> Poison:
    return lambda fn: (fn.ingress_subject(0), body, headers)


def _channel(body: Callable[[layout.FunctionType], bytes]) -> Poison:
    return lambda fn: (fn.channel_subject(0, layout.PartitionId.from_token("zz.poison.0")), body(fn), BUNDLE)


def _poison(id_: str, build: Poison, reason: str) -> Any:
    """``reason``: what crashed the loop before its fix."""
    return pytest.param(build, id=id_)


KNOWN_POISON = [
    _poison("attempt-header-past-64-bits", _ingress(_invoke(handler="nope"), **{constants.HEADER_ATTEMPT: str(2**64)}),
            "decode_invoke takes any integer; the dead letter's 'attempts' then cannot be msgpack-encoded "
            "(CodecError in planner._share)"),
    _poison("arguments-nested-500-deep", _ingress(_invoke(args={"by": _nested(500)})),
            "envelope.fingerprint recurses (_canonical) past Python's recursion limit "
            "(RecursionError in planner._add_idempotency)"),
    _poison("reply-address-with-a-space", _ingress(_invoke(), **{constants.HEADER_REPLY_TO: "a b"}),
            "acks.answer publishes to the reply address unguarded (nats BadSubjectError after the commit)"),
    _poison("bundle-seq-not-an-integer", _channel(lambda fn: codec.pack({"c": "zz.poison.0", "n": "1", "m": []})),
            "decode_bundle does not check types; intake compares the seq with an int outside its guard (TypeError)"),
    _poison("bundle-message-key-not-a-string", _channel(lambda fn: _bundle([5, "nope", {}, "o"])),
            "Message.from_plain does not check types; layout.escape_key(5) raises TypeError in the batch"),
    _poison("inquiry-without-its-arguments", _channel(lambda fn: _bundle(_control("~inquire", {}, _tx(fn)))),
            "participants._answer_inquiry reads args['function'] unchecked (KeyError)"),
    _poison("inquiry-naming-an-unknown-function",
            _channel(lambda fn: _bundle(_control("~inquire", {"function": "zz/other", "key": "k"}, _tx(fn)))),
            "participants._abort routes to the named function unguarded (UnknownFunction)"),
    _poison("orphan-vote-naming-an-unknown-function", _channel(lambda fn: _bundle(_control(
        "~response", {"call": "c1", "reply": envelope.Reply(ok=True).encode(), "prepared": ["zz/other", "k", _tx(fn)]},
        None))),
            "participants.release_orphan -> _abort routes to the named function unguarded (UnknownFunction)"),
]


@pytest.mark.parametrize("build", KNOWN_POISON)
async def test_a_poison_message_does_not_crash_its_partition_loop(nats_server: devservers.NatsServer,
                                                                  etcd_server: devservers.EtcdServer, namespace: str,
                                                                  caplog: pytest.LogCaptureFixture,
                                                                  build: Poison) -> None:
    caplog.set_level(logging.INFO, logger="statefn")
    fn = f"{namespace}/counter"
    ftype = layout.FunctionType.parse(fn)
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server, partitions=1) as sc, \
            helpers.client(nats_server, etcd_server, timeout=10) as c:
        await helpers.eventually(lambda: _owned(sc, 1))
        workers = _workers(sc)
        subject, body, headers = build(ftype)
        await c.nats.jetstream().publish(subject, body, headers=headers)

        async def settled() -> bool:  # acked (refused, or dropped), or it crashed the loop
            info = await c.nats.jetstream().consumer_info(ftype.stream, ftype.consumer_name(0))
            return bool(_crashes(caplog)) or (info.num_pending == 0 and info.num_ack_pending == 0)

        await helpers.eventually(settled, timeout=10)
        assert not _crashes(caplog), "\n".join(_crashes(caplog))
        assert _workers(sc) == workers and not workers[0].lost.is_set()
        assert await c.invoke(fn, "after", "incr", by=1) == 1


async def test_a_misrouted_invocation_does_not_lose_an_update(nats_server: devservers.NatsServer,
                                                              etcd_server: devservers.EtcdServer,
                                                              namespace: str) -> None:
    """An invocation published on a partition that does not own its key ran there, against state it read from
    etcd, while the owner kept its own cached copy: the owner's next commit overwrote the misrouted one's.
    Now intake refuses it (undecodable: the key belongs to another partition)."""
    fn = f"{namespace}/counter"
    ftype = layout.FunctionType.parse(fn)
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server, partitions=PARTITIONS), \
            helpers.client(nats_server, etcd_server, timeout=10) as c:
        owner = layout.partition_of("k1", PARTITIONS)
        assert await c.invoke(fn, "k1", "incr", by=1) == 1  # the owner caches k1
        inbox = c.nats.new_inbox()
        sub = await c.nats.subscribe(inbox)
        body, headers = envelope.encode_invoke(envelope.Message(key="k1", handler="incr", args={"by": 10},
                                                                idempotency_key="misrouted", reply_to=inbox))
        await c.nats.jetstream().publish(ftype.ingress_subject((owner + 1) % PARTITIONS), body, headers=headers)
        misrouted = envelope.Reply.decode((await sub.next_msg(timeout=10)).data)
        await c.invoke(fn, "k1", "incr", by=1)
        # Refused, or run (or forwarded) where k1 lives: either way no update is lost.
        expected = 12 if misrouted.ok else 2
        assert (await c.get_state(fn, "k1"))["value"] == expected
