"""A sidecar hosts the function types it is told to (one per StatefulFunction's Deployment)."""

from __future__ import annotations

import pytest

import statefn
from statefn import Context, StatefulFunction
from tests import helpers


def two_functions(ns: str) -> statefn.App:
    counter, other = StatefulFunction(f"{ns}/counter"), StatefulFunction(f"{ns}/other", max_attempts=9)
    count = counter.state("count", int, default=0)

    @counter.handler
    async def increment(ctx: Context) -> int:
        ctx[count] += 1
        return ctx[count]

    @other.handler
    async def ping(ctx: Context) -> str:
        return "pong"

    return statefn.App(counter, other)


async def test_hosts_only_the_named_function_with_the_overridden_retry_limit(
        nats_server, etcd_server, namespace) -> None:
    app = two_functions(namespace)
    async with helpers.running_sidecar(app, nats_server, etcd_server, functions=(f"{namespace}/counter",),
                                       max_attempts=2) as sc:
        assert list(sc.hosts) == [f"{namespace}/counter"]
        async with helpers.client(nats_server, etcd_server) as c:
            assert await c.invoke(f"{namespace}/counter", "k", "increment") == 1
            assert (await c.describe(f"{namespace}/counter"))["max_attempts"] == 2
            with pytest.raises(statefn.UnknownFunction, match=f"unknown function {namespace}/other"):
                await c.invoke(f"{namespace}/other", "k", "ping", timeout=2)


async def test_naming_a_function_the_app_lacks_is_a_clear_error(nats_server, etcd_server, namespace) -> None:
    app = two_functions(namespace)
    with pytest.raises(statefn.UnknownFunction) as info:
        async with helpers.running_sidecar(app, nats_server, etcd_server, functions=(f"{namespace}/missing",)):
            pass
    assert str(info.value) == (f"the app does not define {namespace}/missing; it defines "
                               f"{namespace}/counter, {namespace}/other")
