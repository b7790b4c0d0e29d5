"""The platform workloads: a real sidecar serving the counter, driven through ``statefn.Client``.

Each workload checks its own work before it reports a number: every reply of a key is one of
1..n exactly once and the committed counters add up to the number of invocations sent. A
benchmark that loses or doubles work would measure the wrong thing, so it fails instead.

Platforms (where the handlers run and how the sidecar is hosted):
- ``embedded``: the sidecar in this process with ``EmbeddedInvoker`` (same event loop as the
  load generator, as in the floor, where the same process publishes and consumes);
- ``remote``: the sidecar in this process with ``RemoteInvoker``, the handlers in a child
  process served by ``statefn._serve``;
- ``sidecar_process``: the sidecar alone in a child process, so its RSS can be read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp

import statefn
from bench import app as bench_app
from bench import procs, stats
from statefn_sidecar import config, devservers, invoker, sidecar

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

    async def counters(self) -> collections.Counter[str]:
        """The sidecar's cumulative counters (commits, invocations, duplicates, ...)."""
        return collections.Counter((await self.status())["stats"])


def _namespace() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


def _settings(nats_url: str, etcd_endpoint: str) -> dict[str, object]:
    """The sidecar's defaults (what users get), except the partition count: 16 for every workload."""
    return {"nats_url": nats_url, "etcd_endpoint": etcd_endpoint, "partitions": PARTITIONS}


async def _wait_owned(sc: sidecar.Sidecar) -> None:
    """Load starts once every partition has its worker; otherwise the first batch waits for one."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while sum(len(h.workers) for h in sc.hosts.values()) < PARTITIONS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the sidecar took {sc.status()['functions']} partitions in "
                               f"{_READY_TIMEOUT_S}s, not all {PARTITIONS}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _in_process(nats_url: str, etcd_endpoint: str, runner: invoker.Invoker,
                      namespace: str) -> AsyncIterator[Platform]:
    sc = sidecar.Sidecar(config.SidecarConfig.model_validate(_settings(nats_url, etcd_endpoint)), runner)

    async def status() -> dict[str, Any]:
        return sc.status()

    await sc.start()
    try:
        await _wait_owned(sc)
        async with statefn.Client(nats=nats_url, etcd=etcd_endpoint) as client:
            yield Platform(bench_app.function_type(namespace), client, status)
    finally:
        await sc.stop()


@contextlib.asynccontextmanager
async def embedded(nats_url: str, etcd_endpoint: str) -> AsyncIterator[Platform]:
    ns = _namespace()
    async with _in_process(nats_url, etcd_endpoint, invoker.EmbeddedInvoker(bench_app.make_app(ns)), ns) as p:
        yield p


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
    child = procs.sidecar_process(ns, _settings(nats_url, etcd_endpoint), health)
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
            reply = await p.client.invoke(p.function, key, bench_app.HANDLER)
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
    if wrong:
        raise LostWork(f"committed counters differ from invocations sent for {len(wrong)} keys, "
                       f"e.g. {dict(list(wrong.items())[:5])} (got, sent)")
    if sum(counts.values()) != sum(expected.values()):
        raise LostWork(f"committed total {sum(counts.values())} != {sum(expected.values())} sent")


async def _warm(p: Platform, keys: list[str], concurrency: int) -> None:
    """Touch every key once (not measured): steady state has the keys cached by their owner."""
    run = await _drive(p, keys, concurrency, None)
    _check_replies(run.replies, collections.Counter(), collections.Counter(keys))


async def load(p: Platform, *, count: int, key_count: int, concurrency: int, tick: stats.Tick,
               prefix: str = "c") -> stats.Result:
    """``count`` invocations over ``key_count`` keys (seeded random), ``concurrency`` in flight."""
    keys = [f"{prefix}{i}" for i in range(key_count)]
    await _warm(p, keys, concurrency)
    rng = random.Random(20240611)
    plan = [rng.choice(keys) for _ in range(count)]
    sent = collections.Counter(plan)
    before = collections.Counter(keys)  # the warm-up invoked each key once
    c0 = await p.counters()
    run = await _drive(p, plan, concurrency, tick)
    c1 = await p.counters()
    _check_replies(run.replies, before, sent)
    await _check_state(p, before + sent)
    return stats.summarize(run.latencies, count, run.elapsed, "invocation",
                           notes=f"{concurrency} in flight, {key_count} keys, counters verified; "
                                 f"{_sidecar_notes(c0, c1)}")


def _sidecar_notes(before: collections.Counter[str], after: collections.Counter[str]) -> str:
    """What the sidecar did meanwhile: how well it batched, and whether callers had to re-send."""
    d = after - before
    per_commit = d["invocations"] / d["commits"] if d["commits"] else 0.0
    return f"{per_commit:.1f} invocations per commit, {d['duplicates']} re-sent requests"


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
