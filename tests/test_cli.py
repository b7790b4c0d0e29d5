"""The statefn command, as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from statefn_cli import main
from statefn_sidecar import deadletters, devservers
from tests import procs

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def statefn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "statefn_cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env=dict(os.environ, COLUMNS="200", **(env or {})), timeout=60)


@pytest.fixture
def sidecar_proc(nats_server, etcd_server):
    port = devservers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "statefn_cli.main", "sidecar", "--app", "examples.counter.app:app",
         "--nats", nats_server.url, "--etcd", etcd_server.endpoint, "--health-port", str(port),
         "--partitions", "4", "--lease-ttl", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.wait_ready(proc, port)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def test_invoke_state_and_sigterm(sidecar_proc, nats_server, etcd_server) -> None:
    conn = ["--nats", nats_server.url, "--etcd", etcd_server.endpoint]
    out = statefn("invoke", "bank/account", "cli-alice", "deposit", "--arg", "amount=5", *conn)
    assert (out.returncode, out.stdout.strip()) == (0, "5"), out.stderr
    out = statefn("invoke", "bank/account", "cli-alice", "deposit", "--json", '{"amount": 2}', *conn)
    assert out.stdout.strip() == "7"
    out = statefn("state", "get", "bank/account", "cli-alice", *conn)
    assert json.loads(out.stdout) == {"balance": 7}
    out = statefn("invoke", "bank/account", "cli-alice", "withdraw", "--arg", "amount=100", *conn)
    assert out.returncode == 1
    assert out.stderr.strip() == "error: handler_error: insufficient funds: balance 7, withdrawal 100"
    out = statefn("invoke", "nosuch/fn", "k", "h", *conn)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: unknown function nosuch/fn: no sidecar has registered it")
    out = statefn("dlq", "list", "--function", "bank/account", *conn)
    assert out.returncode == 0 and "withdraw" in out.stdout and "insufficient funds" in out.stdout
    # A withdrawal that failed inside a payment answered the payment's durable call: never replayed.
    out = statefn("invoke", "bank/payment", "cli-pay", "pay", "--arg", "source=cli-alice", "--arg", "target=cli-bob",
                  "--arg", "amount=100", *conn)
    assert out.stdout.strip().startswith('"declined: insufficient funds'), out.stderr
    seq = asyncio.run(dead_letter_of(nats_server, "bank/account", "bank/payment('cli-pay')"))
    out = statefn("dlq", "replay", str(seq), *conn)
    assert out.returncode == 1 and "not replayed" in out.stdout and "answered a durable call" in out.stdout
    # Purge all but the newest letter of the function.
    out = statefn("dlq", "purge", "--function", "bank/account", "--keep", "1", *conn)
    assert out.returncode == 0 and out.stdout.strip() == "purged 1 dead letter(s) of bank/account", out.stderr
    assert [d.seq for d in asyncio.run(letters_of(nats_server, "bank/account"))] == [seq]
    # SIGTERM: the sidecar hands its partitions back and exits cleanly.
    sidecar_proc.send_signal(signal.SIGTERM)
    assert sidecar_proc.wait(30) == 0
    log = sidecar_proc.stdout.read()
    assert "released partition" in log and " ERROR " not in log


async def letters_of(nats_server: devservers.NatsServer, function: str) -> list[deadletters.DeadLetter]:
    nc = await nats.connect(nats_server.url)
    try:
        return await deadletters.list_dead_letters(nc.jetstream(), function=function)
    finally:
        await nc.close()


async def dead_letter_of(nats_server: devservers.NatsServer, function: str, caller: str) -> int:
    nc = await nats.connect(nats_server.url)
    try:
        letters = await deadletters.list_dead_letters(nc.jetstream(), function=function)
    finally:
        await nc.close()
    return next(d.seq for d in letters if d.record.get("caller") == caller)


def test_usage_errors_are_one_line() -> None:
    result = runner.invoke(main.app, ["sidecar"])
    assert result.exit_code == 1
    assert "give exactly one of --app MODULE:ATTR (embedded) or --remote URL (pod mode)" in result.output
    result = runner.invoke(main.app, ["invoke", "bank/account", "k", "deposit", "--arg", "novalue"])
    assert result.exit_code == 1 and "--arg takes name=value, got 'novalue'" in result.output
    result = runner.invoke(main.app, ["dlq", "replay"])
    assert result.exit_code == 1 and "give dead letter sequence numbers, or --all" in result.output
    result = runner.invoke(main.app, ["dlq", "purge", "--keep", "3", "--all"])
    assert result.exit_code == 1 and "say which to delete: --older-than DURATION, --keep N or --all" in result.output
    result = runner.invoke(main.app, ["dlq", "purge", "--older-than", "soon"])
    assert result.exit_code == 1 and "not a duration: 'soon'" in result.output
    result = runner.invoke(main.app, ["serve", "examples.nosuch:app"])
    assert result.exit_code == 1
    assert "module 'examples.nosuch' not found" in result.output


def test_dev_runs_everything_locally() -> None:
    """`statefn dev APP`: nats-server, etcd, sidecar and gateway in one command; Ctrl-C cleans up."""
    port = devservers.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "statefn_cli.main", "dev", "examples.counter.app:app",
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, COLUMNS="200"))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/functions/demo/counter/k/increment",
                                             data=b'{"by": 3}', method="POST")
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert json.loads(r.read()) == {"result": 3}
                    break
            except OSError:
                assert time.monotonic() < deadline, "statefn dev did not serve in time"
                time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        out = proc.stdout.read() if proc.stdout else ""
        assert f"gateway  http://127.0.0.1:{port}" in out and "serving demo/counter, bank/account, bank/payment" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
