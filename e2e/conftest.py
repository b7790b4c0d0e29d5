"""The e2e suite: a real kube-apiserver (built from the pinned Go modules) per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e import harness


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
