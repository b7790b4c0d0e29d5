"""Remote (pod) mode: the sidecar calls ``statefn serve`` over HTTP; same semantics as embedded."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import statefn
from statefn import _serve
from statefn_sidecar import config, devservers, invoker, sidecar
from tests import helpers, test_calls, test_semantics, test_transactions


@contextlib.asynccontextmanager
async def function_server(app: statefn.App, port: int) -> AsyncIterator[web.AppRunner]:
    runner = _serve.make_runner(app)  # as ``statefn serve`` runs it
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def remote_sidecar(url: str, nats: Any, etcd: Any, app: statefn.App) -> AsyncIterator[sidecar.Sidecar]:
    cfg = config.SidecarConfig(nats_url=nats.url, etcd_endpoint=etcd.endpoint, partitions=4, lease_ttl=3,
                               fetch_timeout=0.2, rebalance_interval=0.1, max_state_bytes=1024)
    sc = sidecar.Sidecar(cfg, invoker.RemoteInvoker(url))
    await sc.start()
    try:
        yield sc
    finally:
        await sc.stop()


async def test_remote_mode_same_semantics(nats_server, etcd_server, namespace) -> None:
    app, calls = test_semantics.make_app(namespace)
    fn = f"{namespace}/account"
    port = devservers.free_port()
    async with function_server(app, port), \
            remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, app), \
            helpers.client(nats_server, etcd_server, retry_interval=2.0, timeout=20) as c:
        assert await c.invoke(fn, "a", "deposit", amount=5) == 5
        assert await c.invoke(fn, "a", "transfer", to="b", amount=2) == 3
        assert await c.invoke(fn, "a", "flaky", fail_times=1) == 4
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fn, "a", "boom")
        assert (err.value.kind, err.value.message) == ("handler_error", "the handler broke")
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fn, "a", "nope")
        assert err.value.kind == "unknown_handler"
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fn, "a", "grow", size=5000)
        assert err.value.kind == "state_too_large"
        for _ in range(50):
            if (await c.get_state(fn, "b")).get("balance") == 2:
                break
            await asyncio.sleep(0.1)
        assert await c.get_state(fn, "a") == {"balance": 4, "history": [5]}
        assert await c.get_state(fn, "b") == {"balance": 2, "history": [2]}
        assert calls == {"flaky": 2, "boom": 1}


async def test_function_server_down_loses_nothing(nats_server, etcd_server, namespace) -> None:
    app, _ = test_semantics.make_app(namespace)
    fn = f"{namespace}/account"
    port = devservers.free_port()
    async with function_server(app, port) as runner, \
            remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, app), \
            helpers.client(nats_server, etcd_server, retry_interval=2.0, timeout=30) as c:
        assert await c.invoke(fn, "k", "deposit", amount=1) == 1
        await runner.cleanup()  # the user container goes away
        pending = asyncio.create_task(c.invoke(fn, "k", "deposit", amount=2))
        await asyncio.sleep(1.5)
        assert not pending.done()
        async with function_server(app, port):
            assert await pending == 3
            assert (await c.get_state(fn, "k"))["balance"] == 3


async def test_malformed_batch_is_a_400() -> None:
    app, _ = test_semantics.make_app("malformed")
    port = devservers.free_port()
    async with function_server(app, port), aiohttp.ClientSession() as http:
        async with http.post(f"http://127.0.0.1:{port}/invoke", data=b"\x01\x02") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"].startswith("malformed batch request: ")
        async with http.get(f"http://127.0.0.1:{port}/discover") as resp:
            assert sorted((await resp.json())["malformed/account"]["handlers"])[:3] == ["boom", "deposit", "echo_big"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("examples.counter.app",
         "expected MODULE:ATTRIBUTE (e.g. examples.counter.app:app), got 'examples.counter.app'"),
        ("examples.nosuch:app", "module 'examples.nosuch' not found (No module named 'examples.nosuch')"),
        ("examples.counter.app:nope", "module 'examples.counter.app' has no attribute 'nope'"),
        ("examples.counter.app:counter", "examples.counter.app:counter is a StatefulFunction, not a statefn.App"),
    ],
)
def test_load_app_errors(spec: str, message: str) -> None:
    with pytest.raises(statefn.DefinitionError) as err:
        _serve.load_app(spec)
    assert str(err.value) == message


def test_load_app() -> None:
    functions = _serve.load_app("examples.counter.app:app").functions
    assert sorted(functions) == ["bank/account", "bank/payment", "demo/counter"]


def test_serve_imports_from_the_working_directory(tmp_path: Path) -> None:
    """As the console script runs it (sys.path starts at bin/, not the cwd): the user's app.py is found."""
    (tmp_path / "userapp.py").write_text("import statefn\nf = statefn.StatefulFunction('u/f')\n"
                                         "@f.handler\nasync def h(ctx):\n    return 1\napp = statefn.App(f)\n")
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
            "from statefn import _serve; print(sorted(_serve.load_app('userapp:app').functions))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['u/f']"


async def test_sidecar_started_before_the_function_server_waits_for_it(nats_server, etcd_server, namespace) -> None:
    """In a pod the native sidecar starts first; it must wait, not crash-loop."""
    app, _ = test_semantics.make_app(namespace)
    port = devservers.free_port()
    remote = invoker.RemoteInvoker(f"http://127.0.0.1:{port}")
    starting = asyncio.create_task(sidecar.describe_when_up(remote))
    await asyncio.sleep(0.5)
    assert not starting.done()
    async with function_server(app, port):
        description = await asyncio.wait_for(starting, 10)
    await remote.close()
    assert list(description) == [f"{namespace}/account"]


async def test_remote_mode_durable_calls(nats_server, etcd_server, namespace) -> None:
    """The journal and the suspension cross the HTTP protocol: replays, errors and sends as embedded."""
    shop = test_calls.Shop(namespace)
    port = devservers.free_port()
    async with function_server(shop.app, port), \
            remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, shop.app), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        assert await c.invoke(shop.order, "r1", "place_two", first="a", second="b") == [9, 8]
        assert await c.invoke(shop.order, "r2", "place", item="c", qty=4) == 6
        assert await c.invoke(shop.order, "r3", "try_place", item="d", qty=99) == "handler_error: only 10 of d left"
        assert shop.runs == {"place_two": 3, "place": 2, "reserve a": 1, "reserve b": 1, "reserve c": 1,
                             "reserve d": 1}
        for _ in range(50):
            if await c.get_state(shop.audit, "r2") == {"entries": ["placing c"]}:
                break
            await asyncio.sleep(0.1)
        assert await c.get_state(shop.audit, "r2") == {"entries": ["placing c"]}


async def test_remote_mode_transactions(nats_server, etcd_server, namespace) -> None:
    """Prepares, staged effects, decisions and a failed run's abort cross the HTTP protocol as embedded."""
    bank = test_transactions.Bank(namespace)
    port = devservers.free_port()
    async with function_server(bank.app, port), \
            remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, bank.app), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        assert await c.invoke(bank.account, "alice", "transfer", to="bob", amount=30, ref="t1") == [70, 130]
        with pytest.raises(statefn.InvocationFailed):
            await c.invoke(bank.account, "carol", "transfer", to="closed-1", amount=5)
        await test_transactions.settled(etcd_server, bank, timeout=3)
        assert await test_transactions.balances(c, bank, "alice", "bob", "carol") == {
            "alice": 70, "bob": 130, "carol": 100}
        assert await c.invoke(bank.account, "gus", "move_twice", source="hal", target="ida") == 115
