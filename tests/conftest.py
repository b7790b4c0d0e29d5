"""Fixtures: a real nats-server (JetStream) and a real etcd on free loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from statefn_sidecar import devservers


@pytest.fixture(scope="session")
def nats_server() -> Iterator[devservers.NatsServer]:
    server = devservers.NatsServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[devservers.EtcdServer]:
    server = devservers.EtcdServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def servers() -> Iterator[tuple[devservers.NatsServer, devservers.EtcdServer]]:
    """A nats-server and an etcd of the test's own, for suites that stop and restart them."""
    nats_s, etcd_s = devservers.NatsServer(), devservers.EtcdServer()
    nats_s.start()
    etcd_s.start()
    yield nats_s, etcd_s
    nats_s.cleanup()
    etcd_s.cleanup()


@pytest.fixture
def namespace() -> str:
    """A fresh function namespace per test, so tests never see each other's streams or state."""
    return f"t{uuid.uuid4().hex[:10]}"
