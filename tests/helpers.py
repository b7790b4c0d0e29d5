"""Shared test helpers: an in-process sidecar with an App built per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aetcd

import statefn
from statefn_core import layout
from statefn_sidecar import config, devservers, invoker, sidecar

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
