"""A partition whose loop fails unexpectedly is given up and taken again; nothing is lost."""

from __future__ import annotations

from statefn_core import wire
from statefn_sidecar import config, invoker, sidecar
from tests import helpers, test_smoke


class BreaksOnce(invoker.EmbeddedInvoker):
    """An invoker with a bug that shows once (not an InvokerUnavailable: an unexpected error)."""

    broken = True

    async def execute(self, request: wire.BatchRequest) -> wire.BatchResponse:
        if self.broken:
            self.broken = False
            raise RuntimeError("a bug in the invoker")
        return await super().execute(request)


async def test_crashed_partition_loop_is_recovered(nats_server, etcd_server, namespace) -> None:
    cfg = config.SidecarConfig(nats_url=nats_server.url, etcd_endpoint=etcd_server.endpoint, partitions=1,
                               lease_ttl=3, fetch_timeout=0.2, rebalance_interval=0.1, ack_wait=2.0)
    runner = BreaksOnce(test_smoke.make_app(namespace))
    sc = sidecar.Sidecar(cfg, runner)
    await sc.start()
    try:
        async with helpers.client(nats_server, etcd_server, retry_interval=1.0, timeout=30) as c:
            assert await c.invoke(f"{namespace}/counter", "a", "increment", by=2) == 2
            assert not runner.broken
            assert sc.status()["functions"][f"{namespace}/counter"]["partitions"] == [0]
    finally:
        await sc.stop()
