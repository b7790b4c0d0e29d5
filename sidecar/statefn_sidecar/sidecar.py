"""The sidecar process: connect, provision, hold a lease, balance partitions, serve health.

NATS or etcd being down is a state to wait out, never a crash: the sidecar reconnects with
backoff, reports not-ready meanwhile, and loses nothing (unacked messages stay in the stream,
uncommitted work is redone by whoever owns the partition next).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from typing import Any

import aetcd
from aiohttp import web
from nats.aio.client import Client as NatsClient

from statefn_core import backoff, connect, errors, layout, signals
from statefn_sidecar import config, execution, faults, host, invoker, metrics, topology, tracing

_log = logging.getLogger("statefn.sidecar")


async def describe_when_up(runner: invoker.Invoker) -> dict[str, Any]:
    """The app's functions, waiting for its server: in a pod the sidecar starts first."""
    return await backoff.until_done(runner.describe, transient=invoker.unavailable, first=0.1, cap=2.0, log=_log,
                                    what="reaching the function server", level=logging.INFO)


def hosted(description: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, Any]:
    """The functions this sidecar runs: those asked for, or all the app defines."""
    if not wanted:
        return description
    missing = [w for w in wanted if w not in description]
    if missing:
        raise errors.UnknownFunction(
            f"the app does not define {', '.join(missing)}; it defines {', '.join(sorted(description)) or 'nothing'}")
    return {name: description[name] for name in wanted}


class Sidecar:
    def __init__(self, cfg: config.SidecarConfig, runner: invoker.Invoker,
                 fault_injection: faults.Faults | None = None) -> None:
        self.cfg = cfg
        self.invoker = runner
        self.faults = fault_injection or faults.Faults.from_env()
        self.hosts: dict[str, host.FunctionHost] = {}
        self._started = False
        self._etcd_ok = False
        self._lease_id: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._nc: NatsClient | None = None
        self._etcd: aetcd.Client | None = None

    async def start(self) -> None:
        # What to host is settled before connecting: a wrong --function fails without a leak.
        description = hosted(await describe_when_up(self.invoker), self.cfg.functions)
        self._nc = await connect.nats_connection(self.cfg.nats_url, f"statefn-sidecar-{self.cfg.member_id}")
        self._etcd = await connect.etcd_connection(self.cfg.etcd_endpoint)
        js = self._nc.jetstream(timeout=10)
        router = topology.Router(self._etcd)
        for name, desc in description.items():
            if self.cfg.max_attempts is not None:
                desc = dict(desc, max_attempts=self.cfg.max_attempts)
            if self.cfg.handler_timeout is not None:
                desc = dict(desc, handler_timeout=self.cfg.handler_timeout)
            fn = layout.FunctionType.parse(name)
            count = await topology.provision(js, self._etcd, fn, desc, self.cfg.partitions,
                                             ack_wait=self.cfg.ack_wait, batch_size=self.cfg.batch_size)
            router.known(name, count)
            executor = execution.Executor(fn, count, self.invoker, execution.Policy.from_description(desc),
                                          router, self.cfg.max_state_bytes)
            self.hosts[name] = host.FunctionHost(fn=fn, partition_count=count, etcd=self._etcd, nc=self._nc,
                                                 js=js, executor=executor, cfg=self.cfg, faults=self.faults)
        await self._register()
        self._tasks = [asyncio.create_task(self._keepalive(), name="lease keepalive"),
                       asyncio.create_task(self._balance(), name="balance")]
        self._started = True
        self._etcd_ok = True
        _log.info("sidecar %s serving %s", self.cfg.member_id, ", ".join(self.hosts))

    @property
    def ready(self) -> bool:
        """Serving: started, connected to NATS, and etcd answered the last lease keepalive."""
        return self._started and self._etcd_ok and self._nc is not None and self._nc.is_connected

    async def _register(self) -> None:
        assert self._etcd is not None
        lease = await self._etcd.lease(self.cfg.lease_ttl)
        self._lease_id = lease.id
        for h in self.hosts.values():
            await self._etcd.put(h.member_key, json.dumps({"member": self.cfg.member_id}).encode(), lease=lease.id)

    async def _keepalive(self) -> None:
        assert self._etcd is not None
        while True:
            await asyncio.sleep(self.cfg.lease_ttl / 3)
            try:
                reply = await self._etcd.refresh_lease(self._lease_id)
                self._etcd_ok = True
                if reply is not None and reply.TTL <= 0:
                    _log.warning("lease expired: every partition is lost; registering again")
                    self._started = False
                    for h in self.hosts.values():
                        await h.stop(graceful=False)
                    await self._register()
                    self._started = True
            except Exception as exc:
                if not connect.etcd_transient(exc):
                    raise
                self._etcd_ok = False
                _log.warning("lease keepalive failed (%s); not ready until etcd answers", exc)

    async def _balance(self) -> None:
        while True:
            try:
                assert self._lease_id is not None
                for h in self.hosts.values():
                    await h.reconcile(self._lease_id)
            except Exception as exc:
                if not connect.etcd_transient(exc):
                    _log.exception("rebalancing failed")
                else:
                    _log.warning("rebalancing postponed: %s", exc)
            await asyncio.sleep(self.cfg.rebalance_interval)

    async def stop(self) -> None:
        """Hand every partition back cleanly, then leave (SIGTERM does this)."""
        self._started = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in self.hosts.values():
            await h.stop(graceful=True)
        if self._etcd is not None and self._lease_id is not None:
            try:
                await self._etcd.revoke_lease(self._lease_id)
            except Exception as exc:
                _log.warning("could not revoke the lease (%s); it will expire", exc)
        await self.invoker.close()
        if self._nc is not None:
            await self._nc.drain()
        if self._etcd is not None:
            await self._etcd.close()
        self._stopped.set()

    def status(self) -> dict[str, Any]:
        stats: collections.Counter[str] = collections.Counter()
        functions = {}
        for name, h in self.hosts.items():
            for w in h.workers.values():
                stats.update(w.stats)
            functions[name] = {"partitions": sorted(h.workers), "partition_count": h.partition_count}
        return {"member": self.cfg.member_id, "ready": self.ready, "functions": functions,
                "stats": dict(stats), "faults": dict(self.faults.fired)}

    # ---- process entry ----
    async def serve(self, health_port: int | None = None, health_host: str = "127.0.0.1") -> None:
        """The process entry: tracing from OTEL_*, the health and metrics server, then run until a signal."""
        tracing.configure("statefn-sidecar", install_global=True)
        runner = None
        if health_port is not None:
            runner = await start_health(self, health_host, health_port)
        stopped = asyncio.create_task(signals.until_stopped())
        await asyncio.sleep(0)  # the handlers are in place before startup, which may wait for NATS/etcd
        await self.start()
        await stopped
        _log.info("signal received: releasing partitions")
        await self.stop()
        if runner is not None:
            await runner.cleanup()
        tracing.shutdown()


async def start_health(sidecar: Sidecar, host: str, port: int) -> web.AppRunner:
    """/healthz (alive), /readyz (connected and provisioned), /status (partitions, counters), /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_: web.Request) -> web.Response:
        return web.json_response({"ready": sidecar.ready}, status=200 if sidecar.ready else 503)

    async def status(_: web.Request) -> web.Response:
        return web.json_response(sidecar.status())

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/status", status),
                    web.get("/metrics", metrics.handle_metrics)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
