"""Run one agent node (``python -m e2e.agent``) for as long as a ``with`` block lasts."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

from e2e import harness


@contextlib.contextmanager
def running(cluster: harness.ControlPlane, name: str) -> Iterator[str]:
    """A Ready node; pods' container logs land in ``workdir/node-<name>``. On exit the agent kills its pods."""
    log_path = cluster.workdir / f"agent-{name}.log"
    with open(log_path, "ab") as log:
        agent = subprocess.Popen([sys.executable, "-m", "e2e.agent", "--kubeconfig", str(cluster.kubeconfig),
                                  "--node", name, "--workdir", str(cluster.workdir / f"node-{name}")],
                                 cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while cluster.kubectl("get", "node", name, check=False).returncode != 0:
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("agent did not register its node:\n" + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        cluster.kubectl("wait", "--for=condition=Ready", "--timeout=30s", f"node/{name}")
        yield name
    finally:
        harness.terminate(agent, grace=15)
