"""Shared test helpers: an in-process sidecar with an App built per test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aetcd

import statefn
from statefn_sidecar import config, devservers, invoker, sidecar


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
