"""The e2e suite: a real control plane (built from the pinned Go modules) and one agent node per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e import harness, helmcli, operator_proc
from e2e import node as agent_node


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster() -> Iterator[harness.ControlPlane]:
    plane = harness.ControlPlane(harness.k8s_bin_dir())
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def crds(cluster: harness.ControlPlane) -> harness.ControlPlane:
    cluster.kubectl("apply", "-f", str(harness.ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/statefulfunctions.statefn.dev", "crd/workflows.statefn.dev")
    return cluster


@pytest.fixture(scope="module")
def plane(cluster: harness.ControlPlane, request: pytest.FixtureRequest) -> Iterator[operator_proc.DataPlane]:
    """nats-server and etcd per test module: stream and key names never clash between suites."""
    dp = operator_proc.DataPlane(cluster.workdir / f"dataplane-{request.module.__name__.rsplit('.', 1)[-1]}")
    dp.start()
    yield dp
    dp.stop()


NODE = "e2e-node-1"


@pytest.fixture(scope="session")
def node(cluster: harness.ControlPlane) -> Iterator[str]:
    """One Ready node run by ``e2e.agent`` (the kubelet stand-in); yields its name."""
    with agent_node.running(cluster, NODE) as name:
        yield name


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> helmcli.Helm:
    return helmcli.Helm(harness.k8s_bin_dir(), tmp_path_factory.mktemp("helm"))
