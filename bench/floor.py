"""The floor: the hot path's raw NATS and etcd round trips, with the clients the sidecar uses.

Per message the sidecar cannot do less than: publish the input to a WorkQueue stream, pull it
from a durable pull consumer, commit one fenced etcd transaction, publish an output to JetStream
and ack the input. These workloads do exactly that and nothing else (no envelopes, no handler,
no planning), so "platform / floor" says what the platform adds on top of its own I/O.

- ``floor_single``: one message at a time; latency is one message end to end.
- ``floor_batched``: N messages published (256 in flight), then pulled 128 at a time, one etcd
  txn per batch (up to 120 puts), one output message per batch (the sidecar bundles its outputs
  per channel the same way), all inputs acked; throughput is N over both phases, latency is one
  batch, pull to acks.
- ``floor_pipelined`` (the ``floor`` sweep): ``in_flight`` messages outstanding at all times, like
  the platform's concurrent callers; a consumer pulls what is there (up to 128), one txn and one
  output per pull, acks; latency is one message, publish to ack.
- ``floor_fanout``: one input pulled and committed, N messages published to a second consumer's
  subject, those N pulled (up to 128 at a time), committed (one txn per pull) and acked; latency
  is one fan-out, first publish to the last downstream ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

from bench import stats
from statefn_core import codec, connect, constants

BATCH = 128          # the sidecar's default batch size (constants.DEFAULT_BATCH_SIZE)
KEYS_PER_TXN = 120   # etcd allows 128 ops per txn; the sidecar keeps room for its own bookkeeping
_FETCH_TIMEOUT_S = 5.0


class _Rig:
    """A fresh stream, consumer and fence key for one floor workload, removed afterwards."""

    def __init__(self, nc: NatsClient, etcd: aetcd.Client, run_id: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream(timeout=10)
        self.etcd = etcd
        self.stream = f"BENCHFLOOR_{run_id}"
        self.in_subject = f"benchfloor.{run_id}.in"
        self.out_subject = f"benchfloor.{run_id}.out"
        self.prefix = f"/statefn-bench/{run_id}/".encode()
        self.owner_key = self.prefix + b"owner"
        self.epoch = 0
        self.psub: Any = None
        self.down_subject = f"benchfloor.{run_id}.down"
        self.down_sub: Any = None

    async def setup(self) -> None:
        # Same stream and consumer settings as statefn_sidecar.topology uses for a function.
        await self.js.add_stream(api.StreamConfig(
            name=self.stream, subjects=[f"{self.in_subject.rsplit('.', 1)[0]}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
            allow_direct=True, duplicate_window=120.0, discard=api.DiscardPolicy.NEW,
        ))
        await self.js.add_consumer(self.stream, api.ConsumerConfig(
            name="in", durable_name="in", filter_subject=self.in_subject, ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL, ack_wait=30.0, max_ack_pending=max(BATCH * 4, 256),
            max_deliver=-1,
        ))
        self.psub = await self.js.pull_subscribe_bind(durable="in", stream=self.stream)
        t = self.etcd.transactions
        _, resp = await self.etcd.transaction(
            compare=[], success=[t.put(self.owner_key, b"bench"), t.get(self.owner_key)], failure=[])
        self.epoch = resp[1][0][1].create_revision

    async def add_downstream(self) -> None:
        """A second durable pull consumer on its own subject: the fan-out's receiving function."""
        await self.js.add_consumer(self.stream, api.ConsumerConfig(
            name="down", durable_name="down", filter_subject=self.down_subject, ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL, ack_wait=30.0, max_ack_pending=max(BATCH * 4, 256),
            max_deliver=-1,
        ))
        self.down_sub = await self.js.pull_subscribe_bind(durable="down", stream=self.stream)

    async def teardown(self) -> None:
        for sub in (self.psub, self.down_sub):
            if sub is not None:
                await sub.unsubscribe()
        await self.js.delete_stream(self.stream)
        await self.etcd.delete_prefix(self.prefix)

    async def publish_input(self, n: int, body: bytes) -> None:
        await self.js.publish(self.in_subject, body, headers={constants.HEADER_MSG_ID: f"in:{n}"})

    async def pull(self, batch: int) -> list[Msg]:
        msgs: list[Msg] = await self.psub.fetch(batch, timeout=_FETCH_TIMEOUT_S)
        return msgs

    async def commit(self, puts: dict[bytes, bytes]) -> None:
        """One fenced transaction, like statefn_sidecar.commit: compare the owner's create revision."""
        t = self.etcd.transactions
        ok, _ = await self.etcd.transaction(
            compare=[t.create(self.owner_key) == self.epoch],
            success=[t.put(k, v) for k, v in puts.items()], failure=[])
        if not ok:
            raise RuntimeError(f"floor commit refused: fence {self.owner_key!r} moved")

    async def publish_output(self, n: int, body: bytes) -> None:
        await self.js.publish(self.out_subject, body, headers={constants.HEADER_MSG_ID: f"out:{n}"})


@contextlib.asynccontextmanager
async def _rig(nats_url: str, etcd_endpoint: str) -> AsyncIterator[_Rig]:
    nc = await nats.connect(nats_url, name="statefn-bench-floor")
    host, port = connect.parse_etcd_endpoint(etcd_endpoint)
    etcd = aetcd.Client(host=host, port=port, timeout=10)
    await etcd.connect()
    rig = _Rig(nc, etcd, uuid.uuid4().hex[:10])
    try:
        await rig.setup()
        yield rig
        await rig.teardown()
    finally:
        await nc.drain()
        await etcd.close()


def _input(key: str, ident: str | None = None) -> bytes:
    """About the size of a client's invocation envelope."""
    return codec.pack({"k": key, "h": "increment", "a": {"by": 1}, "i": ident or uuid.uuid4().hex})


def _state_key(rig: _Rig, key: str) -> bytes:
    return rig.prefix + b"state/" + key.encode()


async def _one_at_a_time(one: Callable[[int], Awaitable[None]], *, count: int, warmup: int,
                         tick: stats.Tick) -> tuple[list[float], float]:
    """``one(-1)``.. for the warm-up (not timed), then ``one(0..count-1)`` one at a time: latencies, elapsed."""
    for n in range(warmup):
        await one(-1 - n)
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(count):
        t0 = time.perf_counter()
        await one(n)
        latencies.append(time.perf_counter() - t0)
        tick(1)
    return latencies, time.perf_counter() - started


async def floor_single(nats_url: str, etcd_endpoint: str, *, count: int, warmup: int,
                       tick: stats.Tick) -> stats.Result:
    """Publish, pull, fenced txn, publish output, ack: one message at a time."""
    async with _rig(nats_url, etcd_endpoint) as rig:

        async def one(n: int) -> None:
            key = f"k{n % 1000}"
            await rig.publish_input(n, _input(key))
            (msg,) = await rig.pull(1)
            await rig.commit({_state_key(rig, key): codec.pack(n)})
            await rig.publish_output(n, codec.pack([key, n]))
            await msg.ack()

        latencies, elapsed = await _one_at_a_time(one, count=count, warmup=warmup, tick=tick)
    return stats.summarize(latencies, count, elapsed, "message")


async def floor_call(nats_url: str, etcd_endpoint: str, *, count: int, warmup: int, tick: stats.Tick,
                     hops: int = 3) -> stats.Result:
    """Durable calls' raw I/O, one at a time: ``hops`` floor_single hops chained through the stream.

    One call is three hops: the request (publish, pull, fenced txn that records the call, ack), the
    callee (pull the call, txn, ack) and the resumed caller (pull the reply, txn, ack, publish the
    answer); each hop's output is the next hop's input, as the sidecar's call and reply travel on
    channels. A saga of two steps is five (two calls from one request).
    """
    async with _rig(nats_url, etcd_endpoint) as rig:

        async def one(n: int) -> None:
            key = f"k{n % 1000}"
            for hop in range(hops):
                await rig.publish_input(hops * n + hop, _input(key))
                (msg,) = await rig.pull(1)
                await rig.commit({_state_key(rig, f"{key}/{hop}"): codec.pack(n)})
                await msg.ack()
            await rig.publish_output(n, codec.pack([key, n]))

        latencies, elapsed = await _one_at_a_time(one, count=count, warmup=warmup, tick=tick)
    return stats.summarize(latencies, count, elapsed, "call" if hops == 3 else "saga", notes=f"{hops} hops")


async def floor_batched(nats_url: str, etcd_endpoint: str, *, count: int, tick: stats.Tick) -> stats.Result:
    """Publish ``count`` inputs, then drain them 128 at a time: one txn and one output per batch.

    Throughput counts both phases (count / (publish + drain)): the platform's throughput includes
    its clients publishing the inputs, so a floor without that cost would not be a floor of the
    same work. The notes give each phase's own rate; latency is one batch, pull to acks.
    """
    async with _rig(nats_url, etcd_endpoint) as rig:
        started = time.perf_counter()
        window = 256  # publishes in flight, like the platform workloads' concurrent callers
        for start in range(0, count, window):
            acks = [await rig.js.publish_async(rig.in_subject, _input(f"k{n % KEYS_PER_TXN}"),
                                               headers={constants.HEADER_MSG_ID: f"in:{n}"})
                    for n in range(start, min(start + window, count))]
            await asyncio.gather(*acks)
        published = time.perf_counter()
        latencies: list[float] = []
        done = 0
        batches = 0
        while done < count:
            t0 = time.perf_counter()
            msgs = await rig.pull(BATCH)
            await _commit_batch(rig, msgs)
            await rig.publish_output(batches, codec.pack([m.metadata.sequence.stream for m in msgs]))
            for msg in msgs:
                await msg.ack()
            latencies.append(time.perf_counter() - t0)
            batches += 1
            done += len(msgs)
            tick(len(msgs))
        finished = time.perf_counter()
    notes = (f"{batches} batches; publish alone {count / (published - started):,.0f}/s, "
             f"drain alone {done / (finished - published):,.0f}/s")
    return stats.summarize(latencies, done, finished - started, "batch", notes=notes)


async def _commit_batch(rig: _Rig, msgs: list[Msg]) -> None:
    """One fenced txn per pull (more only past etcd's op limit), each message's key set to its sequence."""
    puts: dict[bytes, bytes] = {}
    for msg in msgs:
        body = codec.unpack(msg.data)
        puts[_state_key(rig, body["k"])] = codec.pack(msg.metadata.sequence.stream)
    items = list(puts.items())
    for i in range(0, len(items), KEYS_PER_TXN):
        await rig.commit(dict(items[i:i + KEYS_PER_TXN]))


async def _pipeline(rig: _Rig, first: int, count: int, in_flight: int, tick: stats.Tick | None) -> tuple[
        list[float], float]:
    """``count`` messages with ``in_flight`` outstanding; returns (latencies, elapsed)."""
    waiting: dict[str, asyncio.Future[None]] = {}
    loop = asyncio.get_running_loop()
    batch = min(in_flight, BATCH)

    async def consume() -> None:
        outputs = 0
        while True:
            try:
                msgs = await rig.pull(batch)
            except TimeoutError:  # nats.errors.TimeoutError is one too
                continue
            await _commit_batch(rig, msgs)
            await rig.publish_output(first + outputs, codec.pack([m.metadata.sequence.stream for m in msgs]))
            outputs += 1
            for msg in msgs:
                await msg.ack()
            for msg in msgs:
                fut = waiting.pop(codec.unpack(msg.data)["i"], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    todo = iter(range(first, first + count))
    latencies: list[float] = []

    async def caller() -> None:
        for n in todo:  # shared iterator: each message is sent by exactly one caller
            ident = f"m{n}"
            fut: asyncio.Future[None] = loop.create_future()
            waiting[ident] = fut
            t0 = time.perf_counter()
            await rig.publish_input(n, _input(f"k{n % 1000}", ident))
            await fut
            latencies.append(time.perf_counter() - t0)
            if tick is not None:
                tick(1)

    consumer = asyncio.create_task(consume(), name="floor consumer")
    try:
        started = time.perf_counter()
        callers = asyncio.gather(*(caller() for _ in range(max(1, min(in_flight, count)))))
        either: list[asyncio.Future[Any]] = [consumer, callers]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if consumer.done():  # it only ends by failing: stop the callers waiting for it
            callers.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await callers
            raise consumer.exception() or RuntimeError("the floor consumer stopped")
        await callers  # a failed publish raises here
        elapsed = time.perf_counter() - started
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
    return latencies, elapsed


async def floor_pipelined(nats_url: str, etcd_endpoint: str, *, count: int, in_flight: int,
                          tick: stats.Tick) -> stats.Result:
    """The floor at ``in_flight`` messages outstanding: what the platform's concurrency sweep compares to.

    The platform's callers keep N invocations in flight, each waiting for its reply; here N
    publishers each wait for their message's ack by a consumer that pulls what is there (up to
    128), commits one txn, publishes one output and acks. With one in flight this is
    ``floor_single`` with a consumer loop; with 256 it is ``floor_batched`` without the phases.
    """
    async with _rig(nats_url, etcd_endpoint) as rig:
        await _pipeline(rig, -10 * max(in_flight, 10), max(in_flight, 10), in_flight, None)  # warm-up
        latencies, elapsed = await _pipeline(rig, 0, count, in_flight, tick)
    return stats.summarize(latencies, count, elapsed, "message", notes=f"{in_flight} in flight")


async def floor_fanout(nats_url: str, etcd_endpoint: str, *, fanout: int, rounds: int,
                       tick: stats.Tick) -> stats.Result:
    """One input -> N messages, each pulled, committed and acked: the raw I/O of one fan-out.

    Per round: publish the input, pull it, one fenced txn, publish N messages to the downstream
    subject (all in flight at once, like the sidecar's outbox), ack the input; then pull the N
    (up to 128 per pull), one txn per pull, ack each. Throughput counts downstream messages.
    """
    async with _rig(nats_url, etcd_endpoint) as rig:
        await rig.add_downstream()

        async def one(r: int) -> None:
            await rig.publish_input(r, _input(f"f{r}"))
            (msg,) = await rig.pull(1)
            await rig.commit({_state_key(rig, f"f{r}"): codec.pack(r)})
            acks = [await rig.js.publish_async(rig.down_subject, _input(f"r{r}-{i}"),
                                               headers={constants.HEADER_MSG_ID: f"down:{r}:{i}"})
                    for i in range(fanout)]
            await asyncio.gather(*acks)
            await msg.ack()
            got = 0
            while got < fanout:
                msgs: list[Msg] = await rig.down_sub.fetch(min(BATCH, fanout - got), timeout=_FETCH_TIMEOUT_S)
                await _commit_batch(rig, msgs)
                for m in msgs:
                    await m.ack()
                got += len(msgs)
            if got != fanout:
                raise RuntimeError(f"floor fan-out round {r}: {got} downstream messages, expected {fanout}")

        for r in range(2):
            await one(-1 - r)
        latencies: list[float] = []
        started = time.perf_counter()
        for r in range(rounds):
            t0 = time.perf_counter()
            await one(r)
            latencies.append(time.perf_counter() - t0)
            tick(fanout)
        elapsed = time.perf_counter() - started
    return stats.summarize(latencies, fanout * rounds, elapsed, "fan-out",
                           notes=f"{fanout} downstream messages per fan-out; throughput counts them")
