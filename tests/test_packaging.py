"""What each install gives: handler code needs only the light SDK, and a missing extra says what to install.

Each check runs in a fresh interpreter in which the heavy dependencies cannot be imported, as on a
machine that installed only ``statefn`` (or ``statefn[serve]``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANES = ["nats", "aetcd", "grpc", "tenacity", "aiohttp", "typer", "rich", "jsonschema", "prometheus_client", "kopf",
          "kubernetes_asyncio", "opentelemetry.sdk", "opentelemetry.exporter"]
BLOCKER = '''
import importlib.abc, sys
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Blocked())
'''


def run_without(blocked: list[str], code: str) -> subprocess.CompletedProcess[str]:
    script = f"BLOCKED = {blocked!r}\n{BLOCKER}\n{code}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_the_sdk_installs_light() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(d.split("==")[0] for d in project["dependencies"]) == ["msgpack", "opentelemetry-api", "pydantic"]
    assert {"client", "serve", "sidecar", "operator", "all"} <= set(project["optional-dependencies"])


def test_handler_code_runs_without_any_plane() -> None:
    out = run_without(PLANES, '''
import asyncio, json, sys
import statefn
from statefn import _runtime
from statefn_core import wire

counter = statefn.StatefulFunction("demo/counter")
count = counter.state("count", int, default=0)

@counter.handler
async def increment(ctx: statefn.Context, by: int = 1) -> int:
    ctx[count] += by
    return ctx[count]

request = wire.BatchRequest(keys=[wire.KeyRequest(function="demo/counter", key="k", state={},
    invocations=[wire.Invocation(id="i1", handler="increment", args={"by": 2})])], max_state_bytes=1024)
result = asyncio.run(_runtime.execute(statefn.App(counter), request)).results[0][0]
try:
    statefn.Client
    client = "imported"
except ImportError as exc:
    client = str(exc)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"nats", "aetcd", "grpc", "aiohttp", "kopf", "tenacity"})
print(json.dumps({"reply": result.reply.hex(), "error": result.error and result.error.message,
                  "client": client, "loaded": loaded, "kind": statefn.ErrorKind.CALL_TIMEOUT}))
''')
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["error"] is None and bytes.fromhex(got["reply"]) == b"\x02"
    assert got["loaded"] == [] and got["kind"] == "call_timeout"
    assert got["client"].startswith("statefn.Client needs the client extra (missing module '")
    assert got["client"].endswith("pip install 'statefn[client]'")


def test_the_command_names_the_extra_it_needs() -> None:
    no_cli = run_without(["typer"], "import sys; sys.argv = ['statefn', '--help']\n"
                                    "from statefn_cli import entry; entry.main()")
    assert no_cli.returncode == 1
    assert "the statefn command needs the serve extra (missing typer)" in no_cli.stderr
    serve_only = run_without(["nats", "aetcd", "jsonschema", "prometheus_client", "kopf", "kubernetes_asyncio"],
                             "import sys; sys.argv = ['statefn', 'sidecar', '--app', 'examples.counter.app:app']\n"
                             "from statefn_cli import entry; entry.main()")
    assert serve_only.returncode == 1, serve_only.stderr
    assert "this command needs statefn's sidecar extra" in serve_only.stderr
    assert "pip install 'statefn[sidecar]'" in serve_only.stderr
    served = run_without(["nats", "aetcd", "jsonschema", "prometheus_client", "kopf", "kubernetes_asyncio"],
                         "import sys; sys.argv = ['statefn', 'serve', '--help']\n"
                         "from statefn_cli import entry; entry.main()")
    assert served.returncode == 0 and "Serve an app's handlers" in served.stdout, served.stderr
