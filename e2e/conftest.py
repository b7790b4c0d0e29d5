"""The e2e suite: a real control plane (built from the pinned Go modules) and one agent node per session."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from e2e import harness, helmcli, operator_proc


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
    """One Ready node run by ``e2e.agent`` (the kubelet stand-in); yields its name. Pod logs land in workdir."""
    workdir = cluster.workdir / f"node-{NODE}"
    with open(cluster.workdir / f"agent-{NODE}.log", "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "e2e.agent", "--kubeconfig", str(cluster.kubeconfig),
                                  "--node", NODE, "--workdir", str(workdir)],
                                 cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while cluster.kubectl("get", "node", NODE, check=False).returncode != 0:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not register its node:\n"
                                   + (cluster.workdir / f"agent-{NODE}.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        cluster.kubectl("wait", "--for=condition=Ready", "--timeout=30s", f"node/{NODE}")
        yield NODE
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> helmcli.Helm:
    return helmcli.Helm(harness.k8s_bin_dir(), tmp_path_factory.mktemp("helm"))
