"""The data plane (nats-server, etcd) and the operator as local processes for e2e tests.

The data plane listens on a loopback address of its own (not 127.0.0.1): the test agent gives
each pod a private 127.x.y.z and rewrites 127.0.0.1 inside pods, so pods reach these servers
by an address that is the same from everywhere, like a Service's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from e2e import harness
from statefn_sidecar import devservers

DATA_PLANE_HOST = "127.254.0.1"


class DataPlane:
    def __init__(self, workdir: Path) -> None:
        self.nats = devservers.NatsServer(workdir / "nats", host=DATA_PLANE_HOST)
        self.etcd = devservers.EtcdServer(workdir / "etcd", host=DATA_PLANE_HOST)

    def start(self) -> None:
        for server in (self.nats, self.etcd):
            server.workdir.mkdir(parents=True, exist_ok=True)
            server.start()

    def stop(self) -> None:
        self.nats.stop()
        self.etcd.stop()


class Operator:
    """``statefn operator`` as a user runs it outside the cluster, with a kubeconfig."""

    def __init__(self, cluster: harness.ControlPlane, plane: DataPlane, *args: str, name: str = "operator") -> None:
        self.cluster = cluster
        self.log_path = cluster.workdir / f"{name}.log"
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), STATEFN_NATS=plane.nats.url,
                   STATEFN_ETCD=plane.etcd.endpoint)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "statefn"), "operator", "--verbose", *args],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=harness.ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            assert self.proc.poll() is None, "operator exited:\n" + self.log()[-3000:]
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not in the operator's log:\n" + self.log()[-3000:])

    def stop(self) -> None:
        harness.terminate(self.proc)
