"""The platform workloads: a real sidecar serving the counter, driven through ``statefn.Client``.

Each workload checks its own work before it reports a number: every reply of a key is one of
1..n exactly once and the committed counters add up to the number of invocations sent. A
benchmark that loses or doubles work would measure the wrong thing, so it fails instead.

Platforms (where the handlers run and how the sidecar is hosted):
- ``embedded``: the sidecar in this process with ``EmbeddedInvoker`` (same event loop as the
  load generator, as in the floor, where the same process publishes and consumes);
- ``remote``: the sidecar in this process with ``RemoteInvoker``, the handlers in a child
  process served by ``statefn._serve``;
- ``sidecar_process``: the sidecar alone in a child process, so its RSS can be read;
- ``fanout``: like ``embedded``, hosting the fan-out function as well as the counter it sends to;
- ``calls``: like ``embedded``, hosting the relay too, and driving the relay: each invocation is a
  durable call to the counter of the same key, whose reply the relay returns (checked the same way);
- ``sagas``: likewise with the booking, a saga of two steps (two counters) returning the first's value;
- ``transactions``: likewise with the transfer, a transaction over two counters returning the first's value.

The other platforms host only the counter (``SidecarConfig.functions``), so an idle fan-out
function's partitions do not cost the counter workloads anything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

import statefn
from bench import app as bench_app
from bench import procs, stats
from statefn_core import layout
from statefn_sidecar import config, devservers, invoker, sidecar, tracing

PARTITIONS = 16
_READY_TIMEOUT_S = 60.0


class LostWork(Exception):
    """Replies or committed counters do not match what was sent."""


@dataclasses.dataclass
class Platform:
    """A running sidecar serving ``function``, and a client to drive it."""

    function: str
    client: statefn.Client
    status: Callable[[], Awaitable[dict[str, Any]]]  # the sidecar's /status document
    child: procs.Child | None = None  # the sidecar's process, when it has its own
    spans_url: str | None = None  # tracing on: the OTLP receiver's count of spans received
    entry: tuple[str, str] | None = None  # the function and handler the load invokes (default: the counter's)

    @property
    def target(self) -> tuple[str, str]:
        return self.entry or (self.function, bench_app.HANDLER)

    async def counters(self) -> collections.Counter[str]:
        """The sidecar's cumulative counters (commits, invocations, duplicates, ...)."""
        return collections.Counter((await self.status())["stats"])


def _namespace() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def _settings(nats_url: str, etcd_endpoint: str, functions: list[str]) -> dict[str, object]:
    """The sidecar's defaults (what users get), except the partition count: 16 for every workload."""
    return {"nats_url": nats_url, "etcd_endpoint": etcd_endpoint, "partitions": PARTITIONS, "functions": functions}


async def _wait_owned(sc: sidecar.Sidecar) -> None:
    """Load starts once every partition has its worker; otherwise the first batch waits for one."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    wanted = PARTITIONS * len(sc.hosts)
    while sum(len(h.workers) for h in sc.hosts.values()) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sidecar took {sc.status()['functions']} partitions in "
                               f"{_READY_TIMEOUT_S}s, not all {wanted}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _in_process(nats_url: str, etcd_endpoint: str, runner: invoker.Invoker, namespace: str,
                      also: tuple[str, ...] = (), entry: tuple[str, str] | None = None) -> AsyncIterator[Platform]:
    functions = [bench_app.function_type(namespace), *also]
    sc = sidecar.Sidecar(config.SidecarConfig.model_validate(_settings(nats_url, etcd_endpoint, functions)),
                         runner)

    async def status() -> dict[str, Any]:
        return sc.status()

    await sc.start()
    try:
        await _wait_owned(sc)
        async with statefn.Client(nats=nats_url, etcd=etcd_endpoint) as client:
            yield Platform(bench_app.function_type(namespace), client, status, entry=entry)
    finally:
        await sc.stop()


@contextlib.asynccontextmanager
async def embedded(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    ns = _namespace()
    async with _in_process(nats_url, etcd_endpoint, invoker.EmbeddedInvoker(bench_app.make_app(ns)), ns) as p:
        yield p


_TRACING_ENV = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_TRACES_SAMPLER": "parentbased_always_on"}


@contextlib.asynccontextmanager
async def embedded_traced(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    """``embedded`` with tracing on, every invocation sampled, exporting over OTLP/HTTP to a receiver process."""
    port = devservers.free_port()
    receiver = procs.otlp_receiver(port)
    env = dict(_TRACING_ENV, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in env}
    try:
        await receiver.wait_http(f"http://127.0.0.1:{port}/")
        os.environ.update(env)
        if not tracing.configure("statefn-bench"):
            raise RuntimeError("tracing did not turn on")
        async with embedded(nats_url, etcd_endpoint) as p:
            yield dataclasses.replace(p, spans_url=f"http://127.0.0.1:{port}/")
    finally:
        tracing.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        receiver.stop()


async def traced_load(p: Platform, *, count: int, key_count: int, concurrency: int,
                      tick: stats.Tick) -> stats.Result:
    """``load`` on a traced platform; the notes say how many spans reached the receiver."""
    assert p.spans_url is not None
    result = await load(p, count=count, key_count=key_count, concurrency=concurrency, tick=tick)
    tracing.shutdown()  # flush: export what the batch processor still holds
    async with aiohttp.ClientSession() as http, http.get(p.spans_url) as resp:
        received = (await resp.json())["spans"]
    # Each invocation is an invoke span and a commit span (the warm-up's included).
    expected = 2 * (count + key_count)
    return dataclasses.replace(result, notes=f"{result.notes}; {received:,} spans exported of {expected:,} "
                                             f"(invoke + commit per invocation, warm-up included)")


@contextlib.asynccontextmanager
async def fanout(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    """The embedded platform hosting the fan-out function too (``Platform.function`` is the counter)."""
    ns = _namespace()
    async with _in_process(nats_url, etcd_endpoint, invoker.EmbeddedInvoker(bench_app.make_app(ns)), ns,
                           also=(bench_app.fanout_type(ns),)) as p:
        yield p


@contextlib.asynccontextmanager
async def _driving(nats_url: str, etcd_endpoint: str, type_of: Callable[[str], str],
                   handler: str) -> AsyncIterator[Platform]:
    """The embedded platform hosting one more function, which the load invokes instead of the counter."""
    ns = _namespace()
    entry = type_of(ns)
    async with _in_process(nats_url, etcd_endpoint, invoker.EmbeddedInvoker(bench_app.make_app(ns)), ns,
                           also=(entry,), entry=(entry, handler)) as p:
        yield p


def calls(nats_url: str, etcd_endpoint: str) -> contextlib.AbstractAsyncContextManager[Platform]:
    """Driving the relay: each invocation a durable call to the counter of the same key, returning its reply."""
    return _driving(nats_url, etcd_endpoint, bench_app.relay_type, bench_app.RELAY_HANDLER)


def transactions(nats_url: str, etcd_endpoint: str) -> contextlib.AbstractAsyncContextManager[Platform]:
    """Driving the transfer: each invocation a transaction over two counters, returning the first's value."""
    return _driving(nats_url, etcd_endpoint, bench_app.tx_type, bench_app.TX_HANDLER)


def transactions_parallel(nats_url: str, etcd_endpoint: str) -> contextlib.AbstractAsyncContextManager[Platform]:
    """Driving the transfer's ``move_both``: the same transaction with its two prepares in flight at once."""
    return _driving(nats_url, etcd_endpoint, bench_app.tx_type, bench_app.TX_PARALLEL_HANDLER)


def sagas(nats_url: str, etcd_endpoint: str) -> contextlib.AbstractAsyncContextManager[Platform]:
    """Driving the booking: each invocation a two-step saga over counters, returning the first's value."""
    return _driving(nats_url, etcd_endpoint, bench_app.saga_type, bench_app.SAGA_HANDLER)


@contextlib.asynccontextmanager
async def remote(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    ns = _namespace()
    port = devservers.free_port()
    server = procs.function_server(ns, "127.0.0.1", port)
    url = f"http://127.0.0.1:{port}"
    try:
        await server.wait_http(f"{url}/discover")
        async with _in_process(nats_url, etcd_endpoint, invoker.RemoteInvoker(url), ns) as p:
            yield p
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def sidecar_process(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    ns = _namespace()
    health = devservers.free_port()
    child = procs.sidecar_process(ns, _settings(nats_url, etcd_endpoint, [bench_app.function_type(ns)]), health)
    try:
        await child.wait_http(f"http://127.0.0.1:{health}/readyz")
        async with aiohttp.ClientSession() as http, statefn.Client(nats=nats_url, etcd=etcd_endpoint) as client:

            async def status() -> dict[str, Any]:
                async with http.get(f"http://127.0.0.1:{health}/status") as resp:
                    resp.raise_for_status()
                    doc: dict[str, Any] = await resp.json()
                    return doc

            await _wait_child_owned(child, status)
            yield Platform(bench_app.function_type(ns), client, status, child)
    finally:
        child.stop()


async def _wait_child_owned(child: procs.Child, status: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        doc = await status()
        if sum(len(f["partitions"]) for f in doc["functions"].values()) == PARTITIONS:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the sidecar process did not take all {PARTITIONS} partitions:\n{child.log_tail()}")


# ---- load generation and checks ----
@dataclasses.dataclass
class _Run:
    latencies: list[float]
    elapsed: float
    replies: dict[str, list[int]]


async def _drive(p: Platform, keys: list[str], concurrency: int, tick: stats.Tick | None) -> _Run:
    """Invoke ``increment`` once per entry of ``keys`` with ``concurrency`` invocations in flight."""
    todo = iter(keys)
    latencies: list[float] = []
    replies: dict[str, list[int]] = collections.defaultdict(list)

    async def worker() -> None:
        for key in todo:  # shared iterator: each key is taken by exactly one worker
            t0 = time.perf_counter()
            function, handler = p.target
            reply = await p.client.invoke(function, key, handler)
            latencies.append(time.perf_counter() - t0)
            replies[key].append(reply)
            if tick is not None:
                tick(1)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(keys))))))
    return _Run(latencies, time.perf_counter() - started, replies)


def _check_replies(replies: dict[str, list[int]], before: collections.Counter[str],
                   sent: collections.Counter[str]) -> None:
    """Each key's replies are exactly before+1 .. before+n: none lost, none applied twice."""
    for key, n in sent.items():
        got = sorted(replies.get(key, []))
        want = list(range(before[key] + 1, before[key] + n + 1))
        if got != want:
            raise LostWork(f"key {key!r}: {n} invocations sent after {before[key]}, replies {got[:10]}... "
                           f"(expected {want[:10]}...)")


async def _check_state(p: Platform, expected: collections.Counter[str]) -> None:
    """The committed counters sum to what was sent, key by key."""
    sem = asyncio.Semaphore(32)

    async def read(key: str) -> int:
        async with sem:
            state = await p.client.get_state(p.function, key)
        return int(state.get("count", 0))

    keys = sorted(expected)
    counts = dict(zip(keys, await asyncio.gather(*(read(k) for k in keys)), strict=True))
    wrong = {k: (counts[k], expected[k]) for k in keys if counts[k] != expected[k]}
    for _ in range(50):  # a transaction's reply comes with its decision; the participants apply it just after
        if not wrong:
            break
        await asyncio.sleep(0.1)
        counts.update(zip(wrong, await asyncio.gather(*(read(k) for k in wrong)), strict=True))
        wrong = {k: (counts[k], expected[k]) for k in keys if counts[k] != expected[k]}
    if wrong:
        raise LostWork(f"committed counters differ from invocations sent for {len(wrong)} keys, "
                       f"e.g. {dict(list(wrong.items())[:5])} (got, sent)")
    if sum(counts.values()) != sum(expected.values()):
        raise LostWork(f"committed total {sum(counts.values())} != {sum(expected.values())} sent")


async def _warm(p: Platform, keys: list[str], concurrency: int) -> None:
    """Touch every key once (not measured): steady state has the keys cached by their owner."""
    run = await _drive(p, keys, concurrency, None)
    _check_replies(run.replies, collections.Counter(), collections.Counter(keys))


async def _measured(p: Platform, keys: list[str], before: collections.Counter[str], count: int, concurrency: int,
                    rng: random.Random, tick: stats.Tick) -> tuple[stats.Result, collections.Counter[str]]:
    """``count`` invocations of ``keys`` (seeded random), replies checked; returns the result and what was sent."""
    plan = [rng.choice(keys) for _ in range(count)]
    sent = collections.Counter(plan)
    c0 = await p.counters()
    run = await _drive(p, plan, concurrency, tick)
    c1 = await p.counters()
    _check_replies(run.replies, before, sent)
    result = stats.summarize(run.latencies, count, run.elapsed, "invocation",
                             notes=f"{concurrency} in flight, {len(keys)} keys, counters verified; "
                                   f"{_sidecar_notes(c0, c1)}")
    return result, sent


async def load(p: Platform, *, count: int, key_count: int, concurrency: int, tick: stats.Tick,
               prefix: str = "c") -> stats.Result:
    """``count`` invocations over ``key_count`` keys (seeded random), ``concurrency`` in flight."""
    keys = [f"{prefix}{i}" for i in range(key_count)]
    await _warm(p, keys, concurrency)
    before = collections.Counter(keys)  # the warm-up invoked each key once
    result, sent = await _measured(p, keys, before, count, concurrency, random.Random(20240611), tick)
    await _check_state(p, before + sent)
    return result


async def sweep(p: Platform, *, levels: tuple[int, ...], counts: tuple[int, ...], key_count: int,
                tick: stats.Tick, prefix: str = "w") -> stats.Sweep:
    """``load`` at each concurrency in ``levels`` on the same warm keys; the counters checked at the end."""
    keys = [f"{prefix}{i}" for i in range(key_count)]
    await _warm(p, keys, max(levels))
    before = collections.Counter(keys)
    rng = random.Random(20240612)
    points: list[tuple[int, stats.Result]] = []
    for level, count in zip(levels, counts, strict=True):
        result, sent = await _measured(p, keys, before, count, level, rng, tick)
        before += sent
        points.append((level, result))
    await _check_state(p, before)
    return stats.Sweep(points)


def _sidecar_notes(before: collections.Counter[str], after: collections.Counter[str]) -> str:
    """What the sidecar did meanwhile: how well it batched, and whether callers had to re-send."""
    d = after - before
    per_commit = d["invocations"] / d["commits"] if d["commits"] else 0.0
    # Retries here are transactions run again after dying under wait-die (the bench's handlers never Retry).
    retried = f", {d['retries']} retried" if d["retries"] else ""
    return f"{per_commit:.1f} invocations per commit, {d['duplicates']} re-sent requests{retried}"


async def single(p: Platform, *, count: int, key_count: int, tick: stats.Tick) -> stats.Result:
    """One invocation in flight: the latency a lone caller sees."""
    return await load(p, count=count, key_count=key_count, concurrency=1, tick=tick, prefix="s")


async def memory(p: Platform, *, key_count: int, concurrency: int, tick: stats.Tick) -> stats.Result:
    """Invoke ``key_count`` distinct keys once each, then read the sidecar process's RSS."""
    assert p.child is not None, "the memory workload needs the sidecar in its own process"
    baseline = p.child.rss_mb()
    keys = [f"m{i}" for i in range(key_count)]
    c0 = await p.counters()
    run = await _drive(p, keys, concurrency, tick)
    c1 = await p.counters()
    _check_replies(run.replies, collections.Counter(), collections.Counter(keys))
    rss = p.child.rss_mb()
    return stats.summarize(run.latencies, key_count, run.elapsed, "invocation", rss_mb=rss,
                           notes=f"sidecar process RSS {baseline:.0f} MB idle -> {rss:.0f} MB; every reply "
                                 f"was 1; {_sidecar_notes(c0, c1)}")


# ---- fan-out ----
class _Commits:
    """Watches the counter's committed state in etcd: resolves once every expected key was written.

    A fan-out's reply only says its own invocation committed (and its N messages with it); the
    N downstream invocations commit later, each in its partition. Watching the state keys gives
    the moment the last one lands without polling etcd.
    """

    def __init__(self, p: Platform) -> None:
        self._p = p
        self._prefix = f"{layout.FunctionType.parse(p.function).etcd_prefix}/state/"
        self._expected: set[bytes] = set()
        self._done: asyncio.Future[None] | None = None
        self._watch: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watch = await self._p.client.etcd.watch_prefix(self._prefix.encode())
        self._task = asyncio.create_task(self._follow(), name="fan-out commit watch")

    async def _follow(self) -> None:
        async for event in self._watch:
            key = event.kv.key
            if key in self._expected:
                self._expected.discard(key)
                if not self._expected and self._done is not None and not self._done.done():
                    self._done.set_result(None)

    def expect(self, keys: list[str]) -> asyncio.Future[None]:
        fn = layout.FunctionType.parse(self._p.function)
        self._expected = {fn.state_key(k, "count").encode() for k in keys}
        self._done = asyncio.get_running_loop().create_future()
        return self._done

    async def stop(self) -> None:
        if self._watch is not None:
            await self._watch.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def fan_out(p: Platform, *, fanout: int, rounds: int, tick: stats.Tick) -> stats.Result:
    """One ``fan`` invocation sends ``increment`` to ``fanout`` fresh counter keys; timed until all N commit.

    Rounds run one at a time (one fan-out in flight). Afterwards every key a round sent to must
    hold exactly 1, and every fan-out must have replied N: lost or doubled messages fail the run.
    """
    ns = p.function.split("/", 1)[0]
    source = bench_app.fanout_type(ns)
    tag = uuid.uuid4().hex[:6]
    watch = _Commits(p)
    await watch.start()
    latencies: list[float] = []
    sent: collections.Counter[str] = collections.Counter()
    try:
        c0 = await p.counters()
        started = time.perf_counter()
        for r in range(-2, rounds):  # two warm-up rounds, not measured
            prefix = f"{tag}x{fanout}r{r}"
            keys = bench_app.fanout_keys(prefix, fanout)
            done = watch.expect(keys)
            if r == 0:
                c0 = await p.counters()
                started = time.perf_counter()
            t0 = time.perf_counter()
            reply = await p.client.invoke(source, f"s{r % 4}", bench_app.FANOUT_HANDLER, prefix=prefix, n=fanout)
            if reply != fanout:
                raise LostWork(f"fan-out round {r} replied {reply!r}, expected {fanout}")
            try:
                await asyncio.wait_for(done, _READY_TIMEOUT_S)
            except TimeoutError:
                raise LostWork(f"fan-out round {r}: downstream invocations not all committed after "
                               f"{_READY_TIMEOUT_S:.0f}s") from None
            sent.update(keys)
            if r >= 0:
                latencies.append(time.perf_counter() - t0)
                tick(fanout)
        elapsed = time.perf_counter() - started
        c1 = await p.counters()
    finally:
        await watch.stop()
    await _check_state(p, sent)  # every key exactly 1: each message delivered exactly once
    return stats.summarize(latencies, fanout * rounds, elapsed, "fan-out",
                           notes=f"{fanout} keys per fan-out, throughput counts downstream invocations, "
                                 f"counters verified; {_sidecar_notes(c0, c1)}")
