from __future__ import annotations

import statefn
from statefn import Context, StatefulFunction
from tests import helpers


def make_app(ns: str) -> statefn.App:
    counter = StatefulFunction(f"{ns}/counter")
    count = counter.state("count", int, default=0)

    @counter.handler
    async def increment(ctx: Context, by: int = 1) -> int:
        ctx[count] += by
        return ctx[count]

    return statefn.App(counter)


async def test_invoke_roundtrip(nats_server, etcd_server, namespace) -> None:
    app = make_app(namespace)
    async with helpers.running_sidecar(app, nats_server, etcd_server), helpers.client(nats_server, etcd_server) as c:
        assert await c.invoke(f"{namespace}/counter", "a", "increment", by=2) == 2
        assert await c.invoke(f"{namespace}/counter", "a", "increment", by=3) == 5
        assert await c.get_state(f"{namespace}/counter", "a") == {"count": 5}
