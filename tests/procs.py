"""Sidecar processes the crash suites can kill -9, pause, resume and stop."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from statefn_sidecar import devservers

ROOT = Path(__file__).resolve().parent.parent


def wait_ready(proc: subprocess.Popen[Any], health_port: int, timeout: float = 30,
               log: Callable[[], str] = lambda: "") -> None:
    """Poll the sidecar's /readyz until it answers 200; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}:\n{log()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"sidecar not ready after {timeout}s:\n{log()[-3000:]}")


def keep_logs(group: list[SidecarProcess], name: str) -> str:
    """Copy a group's logs (every incarnation of each sidecar) into one directory, for a failure to point at."""
    out = Path(tempfile.gettempdir()) / name
    out.mkdir(parents=True, exist_ok=True)
    for i, sc in enumerate(group):
        (out / f"sidecar-{i}.log").write_text(sc.log_text())
    return str(out)


@contextlib.contextmanager
def group(n: int, namespace: str, servers: tuple[devservers.NatsServer, devservers.EtcdServer],
          app: str, **settings: Any) -> Iterator[list[SidecarProcess]]:
    """``n`` sidecar processes of one app, ready; killed and their logs removed on the way out."""
    started = [SidecarProcess(app, namespace, *servers, **settings).start() for _ in range(n)]
    try:
        for s in started:
            s.wait_ready()
        yield started
    finally:
        for s in started:
            s.cleanup()


class SidecarProcess:
    def __init__(self, app: str, namespace: str, nats: devservers.NatsServer, etcd: devservers.EtcdServer,
                 *, faults: str = "", env: dict[str, str] | None = None, **settings: Any) -> None:
        self.app = app
        self.faults = faults
        self.env = env or {}
        self.namespace = namespace
        self.settings: dict[str, Any] = {
            "nats_url": nats.url, "etcd_endpoint": etcd.endpoint, "lease_ttl": 2, "ack_wait": 3.0,
            "fetch_timeout": 0.2, "rebalance_interval": 0.2, "partitions": 8, **settings,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.health_port = 0

    def start(self) -> SidecarProcess:
        self.health_port = devservers.free_port()
        settings = dict(self.settings, health_port=self.health_port)
        log = Path(tempfile.mkstemp(prefix="sidecar-", suffix=".log")[1])
        self.logs.append(log)
        env = dict(os.environ, STATEFN_TEST_NS=self.namespace, PYTHONPATH=str(ROOT), STATEFN_FAULTS=self.faults,
                   **self.env)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.run_sidecar", self.app, json.dumps(settings)],
                                         stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        assert self.proc is not None
        wait_ready(self.proc, self.health_port, timeout, self.log_text)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/status", timeout=2) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def partitions(self) -> list[int]:
        return [p for f in self.status()["functions"].values() for p in f["partitions"]]

    def kill(self) -> None:
        self._signal(signal.SIGKILL)
        self._wait()

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def terminate(self, timeout: float = 30) -> int:
        self._signal(signal.SIGTERM)
        return self._wait(timeout)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def _wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def cleanup(self) -> None:
        if self.alive:
            self.resume()
            self.kill()
        for p in self.logs:
            p.unlink(missing_ok=True)
