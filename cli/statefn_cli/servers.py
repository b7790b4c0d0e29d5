"""Long-running commands: sidecar, serve, gateway, dev.

Each imports its plane when it starts, so a function's image with only ``statefn[serve]`` runs
``statefn serve`` without the data plane's dependencies.
"""

from __future__ import annotations

import asyncio
import os
from typing import Annotated

import typer

import statefn
from statefn_cli import common
from statefn_core import signals

app = typer.Typer()


@app.command("sidecar")
def sidecar_cmd(
    app_spec: Annotated[str | None, typer.Option("--app", envvar="STATEFN_APP",
                                                 help="run MODULE:ATTR in-process (embedded mode)")] = None,
    remote: Annotated[str | None, typer.Option("--remote", envvar="STATEFN_REMOTE",
                                               help="call the function server at this URL (pod mode)")] = None,
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
    partitions: Annotated[int | None, typer.Option(envvar="STATEFN_PARTITIONS",
                                                   help="for a new function; fixed once created")] = None,
    functions: Annotated[list[str] | None, typer.Option(
        "--function", help="host only this function type (repeatable); default: all the app defines")] = None,
    max_attempts: Annotated[int | None, typer.Option(envvar="STATEFN_MAX_ATTEMPTS",
                                                     help="override the functions' retry limit")] = None,
    handler_timeout: Annotated[float | None, typer.Option(envvar="STATEFN_HANDLER_TIMEOUT",
                                                          help="override the functions' handler timeout (s)")] = None,
    health_host: Annotated[str, typer.Option(envvar="STATEFN_HEALTH_HOST")] = "127.0.0.1",
    health_port: Annotated[int, typer.Option(envvar="STATEFN_HEALTH_PORT")] = 8081,
    lease_ttl: Annotated[int, typer.Option(envvar="STATEFN_LEASE_TTL")] = 10,
    ack_wait: Annotated[float, typer.Option(envvar="STATEFN_ACK_WAIT")] = 30.0,
    batch_size: Annotated[int, typer.Option(envvar="STATEFN_BATCH_SIZE")] = 128,
    max_state_bytes: Annotated[int, typer.Option(envvar="STATEFN_MAX_STATE_BYTES")] = 256 * 1024,
    member_id: Annotated[str | None, typer.Option(envvar="STATEFN_MEMBER_ID")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the data plane for an app: take partitions, run invocations, commit them exactly once."""
    if (app_spec is None) == (remote is None):
        raise common.fail("give exactly one of --app MODULE:ATTR (embedded) or --remote URL (pod mode)")
    with common.needs("sidecar"):
        from statefn import _serve
        from statefn_sidecar import config, invoker, sidecar
    common.setup_logging(verbose)

    async def main() -> None:
        runner: invoker.Invoker = (invoker.EmbeddedInvoker(_serve.load_app(app_spec)) if app_spec
                                   else invoker.RemoteInvoker(str(remote)))
        settings: dict[str, object] = {
            "nats_url": nats_url, "etcd_endpoint": etcd, "partitions": partitions, "lease_ttl": lease_ttl,
            "ack_wait": ack_wait, "batch_size": batch_size, "max_state_bytes": max_state_bytes,
            "functions": tuple(functions or ()), "max_attempts": max_attempts,
            "handler_timeout": handler_timeout}
        if member_id:
            settings["member_id"] = member_id
        await sidecar.Sidecar(config.SidecarConfig.model_validate(settings), runner).serve(health_port, health_host)

    common.run(main())


@app.command("serve")
def serve_cmd(
    app_spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR")],
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STATEFN_PORT")] = 9000,
) -> None:
    """Serve an app's handlers to the sidecar next to it (pod mode)."""
    with common.needs("serve"):
        from statefn import _serve
        from statefn_sidecar import tracing
    common.setup_logging(False)
    # Handlers run in their invocation's trace context; with OTEL_* set, the spans they start are exported.
    tracing.configure("statefn-function", install_global=True)

    async def main() -> None:
        try:
            await _serve.serve(_serve.load_app(app_spec), host, port)
        finally:
            tracing.shutdown()

    common.run(main())


@app.command("gateway")
def gateway_cmd(
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="STATEFN_PORT")] = 8080,
) -> None:
    """The HTTP gateway for callers outside the platform."""
    with common.needs("sidecar"):
        from statefn_sidecar import gateway
    common.setup_logging(False)
    common.run(gateway.run_gateway(nats_url, etcd, host, port))


@app.command("dev")
def dev_cmd(
    app_spec: Annotated[str, typer.Argument(metavar="MODULE:ATTR")],
    port: Annotated[int, typer.Option(help="gateway port")] = 8080,
    partitions: int = 4,
) -> None:
    """Everything local in one command: nats-server, etcd, a sidecar running the app, the gateway."""
    with common.needs("sidecar"):
        from statefn import _serve
        from statefn_sidecar import config, devservers, gateway, invoker, sidecar, tracing
    common.setup_logging(False)
    traced = tracing.configure("statefn-dev", install_global=True)

    async def main() -> None:
        fns = _serve.load_app(app_spec)
        with common.console.status("starting nats-server and etcd..."):
            nats_s, etcd_s = devservers.NatsServer(), devservers.EtcdServer()
            await asyncio.to_thread(nats_s.start)
            await asyncio.to_thread(etcd_s.start)
        try:
            cfg = config.SidecarConfig(nats_url=nats_s.url, etcd_endpoint=etcd_s.endpoint, partitions=partitions,
                                       lease_ttl=5)
            sc = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(fns))
            await sc.start()
            async with statefn.Client(nats=nats_s.url, etcd=etcd_s.endpoint) as client:
                runner = await gateway.start_gateway(client, "127.0.0.1", port)
                common.console.print(f"[green]statefn dev[/] serving {', '.join(fns.functions)}")
                common.console.print(f"  gateway  http://127.0.0.1:{port}  (OpenAPI: /openapi.json)")
                common.console.print(f"  nats     {nats_s.url}")
                common.console.print(f"  etcd     {etcd_s.endpoint}")
                endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "the console")
                tracing_state = f"on, to {endpoint}" if traced else "off (set OTEL_EXPORTER_OTLP_ENDPOINT)"
                common.console.print(f"  tracing  {tracing_state}")
                common.console.print(f"  try:     statefn invoke --nats {nats_s.url} --etcd {etcd_s.endpoint} "
                                     f"{next(iter(fns.functions))} k1 <handler>")
                await signals.until_stopped()
                await runner.cleanup()
            await sc.stop()
        finally:
            tracing.shutdown()
            nats_s.cleanup()
            etcd_s.cleanup()

    common.run(main())
