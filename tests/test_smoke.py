from __future__ import annotations

import pytest

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


async def test_an_etcd_outage_while_the_client_checks_its_record_is_waited_out(servers, namespace) -> None:
    """The client reads the idempotency record when no reply comes; etcd down then means 'not known yet'."""
    nats_s, etcd_s = servers
    fn = f"{namespace}/counter"
    async with helpers.client(nats_s, etcd_s, retry_interval=0.3, timeout=2.0) as c:
        async with helpers.running_sidecar(make_app(namespace), nats_s, etcd_s):
            assert await c.invoke(fn, "a", "increment") == 1  # the client knows the function now
        etcd_s.stop()  # no sidecar to reply, and no etcd to read the record from
        try:
            with pytest.raises(statefn.InvocationTimeout):  # not an etcd client error
                await c.invoke(fn, "a", "increment", idempotency_key="during-outage")
        finally:
            etcd_s.start()
        async with helpers.running_sidecar(make_app(namespace), nats_s, etcd_s):
            # The stored request ran once the sidecar was back; asking again answers from its record.
            assert await c.invoke(fn, "a", "increment", idempotency_key="during-outage") == 2
