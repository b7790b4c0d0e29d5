"""``statefn operator``: the control plane process."""

from __future__ import annotations

import os
import secrets
from typing import Annotated

import typer

from statefn_cli import common
from statefn_core import constants

app = typer.Typer()


@app.command("operator")
def operator_cmd(
    nats_url: common.NatsOpt = common.DEFAULT_NATS,
    etcd: common.EtcdOpt = common.DEFAULT_ETCD,
    namespace: Annotated[list[str] | None, typer.Option(
        "--namespace", "-n", help="watch this namespace (repeatable); default: all namespaces")] = None,
    all_namespaces: Annotated[bool, typer.Option("--all-namespaces", "-A", help="watch every namespace")] = False,
    peering: Annotated[str | None, typer.Option(
        envvar="STATEFN_PEERING", help="kopf peering name: replicas elect one active leader")] = None,
    priority: Annotated[int | None, typer.Option(
        envvar="STATEFN_PEERING_PRIORITY",
        help="peering priority; the highest is active (default: random, so replicas never tie and pause)")] = None,
    standalone: Annotated[bool, typer.Option(help="no leader election (one replica only)")] = False,
    stream_replicas: Annotated[int, typer.Option(
        envvar="STATEFN_STREAM_REPLICAS", min=1, max=5,
        help="JetStream replicas of each function's stream (3 on a 3-server NATS cluster)")] = 1,
    sidecar_image: Annotated[str | None, typer.Option(envvar="STATEFN_SIDECAR_IMAGE")] = None,
    autoscale_interval: Annotated[float, typer.Option(envvar="STATEFN_AUTOSCALE_INTERVAL")] = (
        constants.DEFAULT_AUTOSCALE_INTERVAL_S),
    health_host: Annotated[str, typer.Option(envvar="STATEFN_HEALTH_HOST")] = "127.0.0.1",
    health_port: Annotated[int | None, typer.Option(envvar="STATEFN_HEALTH_PORT", help="serve /healthz")] = None,
    metrics_host: Annotated[str, typer.Option(envvar="STATEFN_METRICS_HOST")] = "127.0.0.1",
    metrics_port: Annotated[int | None, typer.Option(
        envvar="STATEFN_METRICS_PORT", min=1, max=65535,
        help=f"serve GET /metrics (Prometheus) here; the chart uses {constants.OPERATOR_METRICS_PORT}")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Turn StatefulFunctions and Workflows into Deployments, streams and registrations; autoscale them."""
    if all_namespaces and namespace:
        raise common.fail("give --all-namespaces or --namespace, not both")
    if (peering is None) == (not standalone):
        raise common.fail("give --peering NAME (leader election among replicas) or --standalone (one replica)")
    with common.needs("operator"):
        from statefn_operator import runner, settings
    common.setup_logging(verbose)
    cfg = settings.Settings(nats_url=nats_url, etcd_endpoint=etcd, sidecar_image=sidecar_image,
                            autoscale_interval=autoscale_interval, stream_replicas=stream_replicas,
                            otel_env=settings.Settings.otel_env_of(dict(os.environ)))
    if priority is None and peering is not None:
        priority = secrets.randbelow(2**31)  # kopf pauses every peer when priorities tie
    liveness = f"http://{health_host}:{health_port}/healthz" if health_port else None
    common.run(runner.run(cfg, namespaces=list(namespace or []), peering=peering, priority=priority or 0,
                          liveness_endpoint=liveness,
                          metrics_endpoint=(metrics_host, metrics_port) if metrics_port else None))
