"""Shared test helpers: an in-process sidecar with an App built per test."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions

import statefn
from statefn_core import layout, pendingwork
from statefn_sidecar import config, devservers, invoker, sidecar, timers

T = TypeVar("T")


@contextlib.asynccontextmanager
async def running_sidecar(
    app: statefn.App, nats: devservers.NatsServer, etcd: devservers.EtcdServer, **overrides: Any
) -> AsyncIterator[sidecar.Sidecar]:
    settings: dict[str, Any] = {"nats_url": nats.url, "etcd_endpoint": etcd.endpoint, "partitions": 4,
                                "lease_ttl": 3, "fetch_timeout": 0.2, "rebalance_interval": 0.1}
    settings.update(overrides)
    sc = sidecar.Sidecar(config.SidecarConfig(**settings), invoker.EmbeddedInvoker(app))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


@contextlib.asynccontextmanager
async def client(nats: devservers.NatsServer, etcd: devservers.EtcdServer, **kw: Any) -> AsyncIterator[statefn.Client]:
    async with statefn.Client(nats=nats.url, etcd=etcd.endpoint, **kw) as c:
        yield c


@contextlib.asynccontextmanager
async def etcd(server: devservers.EtcdServer) -> AsyncIterator[aetcd.Client]:
    """A raw etcd client, to look at what the platform stored."""
    host, port = server.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail the test if it does not within ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def eventually_value(get: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    """Poll ``get`` until ``done`` holds for its value, or the timeout passes; return the last value."""
    deadline = asyncio.get_running_loop().time() + timeout
    value = await get()
    while not done(value) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
        value = await get()
    return value


async def locks_left(server: devservers.EtcdServer, function: str, partitions: int, *,
                     timers: bool = False) -> list[bytes]:
    """The keys of a function that are still prepared, suspended, or have messages waiting in an inbox
    (and, with ``timers``, the timers still scheduled)."""
    fn = layout.FunctionType.parse(function)
    found: list[bytes] = []
    async with etcd(server) as raw:
        for p in range(partitions):
            keys = layout.PartitionKeys(fn, p)
            prefixes = [keys.prepared_prefix, keys.suspended_prefix, keys.inbox_prefix]
            for prefix in prefixes + ([keys.timers_prefix] if timers else []):
                found += [kv.key for kv in await raw.get_prefix(prefix)]
    return found


@dataclasses.dataclass(frozen=True)
class PendingTruth:
    """A partition's pending-work entry beside what etcd holds for it in the same snapshot."""

    function: str
    partition: int
    entry: pendingwork.Entry  # what the index says (Entry(None, 0) when the partition has no entry)
    due_ms: int | None        # its earliest stored timer, floored to the second (None: no timer)
    inbox: int                # the messages stored in its inboxes
    read_ms: int              # when (epoch ms): tells a timer overdue (in flight) from one the index missed

    @property
    def unsafe(self) -> bool:
        """The entry says the next timer is later than it is: a function at zero would wake too late, or never."""
        return self.due_ms is not None and (self.entry.due_ms is None or self.entry.due_ms > self.due_ms)

    @property
    def exact(self) -> bool:
        return self.entry == pendingwork.Entry(self.due_ms, self.inbox)


async def pending_index(raw: aetcd.Client, function: str, partitions: int) -> list[PendingTruth]:
    """Every partition's pending-work entry, timers and inbox, read in one transaction.

    One transaction is one consistent snapshot: read apart, an owner's commit landing between two
    reads would pair an entry with timers it never coexisted with (a false alarm, or a miss).
    """
    fn = layout.FunctionType.parse(function)
    read_ms = timers.now_ms()
    keys = [layout.PartitionKeys(fn, p) for p in range(partitions)]
    ranges = [fn.pending_prefix.encode()] + [r for k in keys for r in (k.timers_prefix, k.inbox_prefix)]
    t = raw.transactions
    _, (index, *found) = await raw.transaction(
        compare=[], success=[t.get(r, layout.prefix_end(r)) for r in ranges], failure=[])
    entries = {kv.key: pendingwork.Entry.decode(value) for value, kv in index}
    out = []
    for k, stored, inbox in zip(keys, found[::2], found[1::2], strict=True):
        dues = [int(kv.key[len(k.timers_prefix):].split(b"/", 1)[0]) for _, kv in stored]
        out.append(PendingTruth(function, k.partition, entries.get(k.pending, pendingwork.Entry(None, 0)),
                                pendingwork.floor_second(min(dues, default=None)), len(inbox), read_ms))
    return out


async def pending_violations(server: devservers.EtcdServer, function: str, partitions: int, *,
                             exact: bool = False) -> list[PendingTruth]:
    """Partitions whose entry says a timer is later than it is (with ``exact``: whose entry differs at all).

    The first must hold in every snapshot, whatever crashes; the second once owners are idle.
    """
    async with etcd(server) as raw:
        return [t for t in await pending_index(raw, function, partitions) if t.unsafe or (exact and not t.exact)]


@dataclasses.dataclass
class PendingWatch:
    """What sampling the pending-work index during a run saw."""

    samples: int = 0
    with_timers: int = 0  # function snapshots with a timer in some partition: the safety check had work
    unavailable: int = 0  # samples etcd did not answer (some tests restart it)
    violations: list[PendingTruth] = dataclasses.field(default_factory=list)


@contextlib.asynccontextmanager
async def watching_pending_index(server: devservers.EtcdServer, functions: Sequence[str], partitions: int,
                                 every: float = 0.3) -> AsyncIterator[PendingWatch]:
    """Sample the safety check in the background while the block runs, faults and all.

    An entry wrong only between two commits, or until a takeover, is gone by the end of a run:
    only sampling during it can see one.
    """
    watch = PendingWatch()

    async def sample(raw: aetcd.Client) -> None:
        for function in functions:
            truths = await pending_index(raw, function, partitions)
            watch.violations += [t for t in truths if t.unsafe]
            watch.with_timers += any(t.due_ms is not None for t in truths)

    async def run() -> None:
        async with etcd(server) as raw:
            while True:
                try:
                    async with asyncio.timeout(5):
                        await sample(raw)
                    watch.samples += 1
                except (aetcd.exceptions.ClientError, TimeoutError):
                    watch.unavailable += 1
                await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # re-raises what stopped the sampling otherwise (an entry that does not decode)


def assert_pending_index_safe(watch: PendingWatch, *, timers: bool = False) -> None:
    """No snapshot sampled during the run had an entry later than its partition's timers.

    Enough samples must have been taken, and with ``timers`` some of them with timers pending, or
    the check checked nothing.
    """
    seen = f"{watch.samples} samples ({watch.with_timers} with timers, {watch.unavailable} unanswered)"
    assert watch.violations == [], (f"{len(watch.violations)} entries later than their timers in {seen}; "
                                    f"the first: {watch.violations[:5]}")
    assert watch.samples >= 5 and (watch.with_timers > 0 or not timers), f"checked nothing: {seen}"


async def settled_pending_index(server: devservers.EtcdServer, functions: Sequence[str],
                                partitions: int = 8) -> list[PendingTruth]:
    """The entries that still differ from what is pending, once idle owners had time to correct theirs."""
    async def inexact() -> list[PendingTruth]:
        return [t for fn in functions for t in await pending_violations(server, fn, partitions, exact=True)]
    return await eventually_value(inexact, lambda found: not found, timeout=10)

