"""The child processes some workloads need, and their entry points.

- The remote function server (``counter_remote``): the handlers run in their own process, as in
  a pod, served by ``statefn._serve.serve`` and reached by the sidecar over localhost HTTP. Its
  child imports only the SDK and the bench app, like a user container.
- A sidecar process (``memory_100k_keys``): its RSS is read from /proc, which says what a sidecar
  costs without the load generator's memory mixed in.

``python -m bench.procs sidecar SETTINGS_JSON HEALTH_PORT`` is the sidecar child's entry.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import app as bench_app
from statefn_sidecar import config, invoker, sidecar

ROOT = Path(__file__).resolve().parent.parent

# The remote function server: what a user container runs (``statefn serve bench.app:app``).
_SERVE_SNIPPET = (
    "import asyncio, inspect, sys\n"
    "from bench import app\n"
    "from statefn import _serve\n"
    "result = _serve.serve(app.app, sys.argv[1], int(sys.argv[2]))\n"
    "if inspect.iscoroutine(result):\n"
    "    asyncio.run(result)\n"
)


class Unavailable(Exception):
    """A workload cannot run in this tree (a piece it needs does not exist yet)."""


class Child:
    """One child process with its log in a temporary file."""

    def __init__(self, argv: list[str], namespace: str, what: str) -> None:
        self.what = what
        fd, name = tempfile.mkstemp(prefix=f"statefn-bench-{what}-", suffix=".log")
        os.close(fd)
        self.log = Path(name)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env[bench_app.NS_ENV] = namespace
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)

    def log_tail(self, chars: int = 2000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    async def wait_http(self, url: str, timeout: float = 60.0) -> None:
        """Until GET url answers 200 (or the child dies, which is an error with its log)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the {self.what} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"the {self.what} did not answer {url} within {timeout}s:\n{self.log_tail()}")

    def rss_mb(self) -> float:
        """Resident set size from /proc (Linux), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for pid {self.proc.pid}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def function_server(namespace: str, host: str, port: int) -> Child:
    """``statefn._serve.serve(bench.app.app, host, port)`` in a child process."""
    if importlib.util.find_spec("statefn._serve") is None:
        raise Unavailable("statefn._serve does not exist yet, so there is no remote function server to call")
    return Child([sys.executable, "-c", _SERVE_SNIPPET, host, str(port)], namespace, "function server")


def otlp_receiver(port: int) -> Child:
    """An OTLP/HTTP receiver decoding every span (tests.otlp_receiver), in its own process like a collector."""
    return Child([sys.executable, "-m", "tests.otlp_receiver", str(port)], "", "OTLP receiver")


def sidecar_process(namespace: str, settings: dict[str, object], health_port: int) -> Child:
    return Child([sys.executable, "-m", "bench.procs", "sidecar", json.dumps(settings), str(health_port)],
                 namespace, "sidecar")


def _sidecar_main(settings_json: str, health_port: str) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config.SidecarConfig.model_validate(json.loads(settings_json))
    sc = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(bench_app.app))
    asyncio.run(sc.serve(int(health_port)))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "sidecar":
        sys.exit("usage: python -m bench.procs sidecar SETTINGS_JSON HEALTH_PORT")
    _sidecar_main(sys.argv[2], sys.argv[3])
