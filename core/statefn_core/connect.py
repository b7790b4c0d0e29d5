"""Connecting to NATS and etcd the same way from every process, and telling a passing outage from a fault.

NATS or etcd being down is a state to wait out: each connection is retried with backoff until
it succeeds, and nats-py reconnects by itself afterwards. etcd errors are sorted once here into
transient ones (unreachable, slow, restarting: wait and try again) and the rest (a bad request).
"""

from __future__ import annotations

import logging

import aetcd
import aetcd.exceptions
import grpc
import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from statefn_core import backoff, constants

_log = logging.getLogger("statefn.connect")

_ETCD_PERMANENT = (
    aetcd.exceptions.InvalidArgumentError,
    aetcd.exceptions.PreconditionFailedError,
    aetcd.exceptions.UnauthenticatedError,
)


def etcd_transient(exc: BaseException) -> bool:
    """etcd unreachable, slow or restarting: wait and try again (never for a bad request)."""
    if isinstance(exc, _ETCD_PERMANENT):
        return False
    return isinstance(exc, aetcd.exceptions.ClientError | grpc.RpcError | TimeoutError | ConnectionError)


def nats_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError | nats.errors.Error)


def parse_etcd_endpoint(endpoint: str) -> tuple[str, int]:
    """Accept ``host:port`` or ``http://host:port``."""
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host or "127.0.0.1", int(port or 2379)


async def nats_connection(url: str, name: str) -> NatsClient:
    """Connected (waiting out an outage); nats-py reconnects by itself from then on."""

    async def attempt() -> NatsClient:
        return await nats.connect(url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                  connect_timeout=2)

    return await backoff.until_done(attempt, transient=nats_transient, first=0.2, cap=5.0, log=_log,
                                    what=f"connecting to NATS at {url}")


async def etcd_connection(endpoint: str, *, timeout: float = 5) -> aetcd.Client:
    """A client that has answered one read (waiting out an outage)."""
    host, port = parse_etcd_endpoint(endpoint)
    client = aetcd.Client(host=host, port=port, timeout=timeout)

    async def attempt() -> aetcd.Client:
        await client.get(constants.ETCD_ROOT.encode())
        return client

    return await backoff.until_done(attempt, transient=etcd_transient, first=0.2, cap=5.0, log=_log,
                                    what=f"connecting to etcd at {endpoint}")
