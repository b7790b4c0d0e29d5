"""No handler and no function server can stall a partition: timeouts, blocking handlers, refused batches.

Before, a handler that never returned blocked its partition forever (embedded; its in-progress
reports kept NATS from redelivering) or had its batch retried forever (remote), a synchronous
handler blocked every other key's handlers, and a function server answering 400 or garbage had
its batch retried forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

import statefn
from statefn import Context, StatefulFunction, _runtime
from statefn_core import codec, layout, wire
from statefn_sidecar import devservers
from tests import helpers, test_remote


def make_app(ns: str, handler_timeout: float = 0.3) -> statefn.App:
    fn = StatefulFunction(f"{ns}/worker", handler_timeout=handler_timeout, max_attempts=2, backoff_initial=0.05)
    done = fn.state("done", int, default=0)

    @fn.handler
    async def hang(ctx: Context) -> None:
        ctx[done] += 1  # must not commit
        await asyncio.Event().wait()

    @fn.handler
    def block(ctx: Context, seconds: float) -> None:
        ctx[done] += 1
        time.sleep(seconds)  # a synchronous handler that blocks: it runs in a thread, not on the loop

    @fn.handler
    async def own_timeout(ctx: Context) -> None:
        raise TimeoutError("the payment service timed out")  # the handler's own: not a handler timeout

    @fn.handler
    async def work(ctx: Context) -> int:
        ctx[done] += 1
        return ctx[done]

    return statefn.App(fn)


def _request(ns: str, *keys: tuple[str, str, dict[str, object]], timeout: float | None = None) -> wire.BatchRequest:
    return wire.BatchRequest(
        keys=[wire.KeyRequest(function=f"{ns}/worker", key=key, state={},
                              invocations=[wire.Invocation(id=f"i-{key}", handler=handler, args=args, attempt=1)])
              for key, handler, args in keys],
        max_state_bytes=1024, handler_timeout=timeout)


async def test_a_hanging_handler_is_abandoned_and_the_other_keys_finish() -> None:
    started = time.monotonic()
    response = await _runtime.execute(make_app("t"), _request("t", ("a", "hang", {}), ("b", "work", {})))
    assert time.monotonic() - started < 2
    (hung,), (fine,) = response.results
    assert hung.error is not None and hung.error.kind == "handler_timeout" and hung.error.retry
    assert "t/worker.hang ran past its timeout of 0.3s" in hung.error.message
    assert hung.state == {} and fine.error is None and codec.unpack(fine.reply) == 1


async def test_a_blocking_synchronous_handler_does_not_block_the_others() -> None:
    app = make_app("t", handler_timeout=5.0)
    started = time.monotonic()
    response = await _runtime.execute(app, _request("t", ("a", "block", {"seconds": 0.5}), ("b", "work", {})))
    assert response.results[0][0].error is None and response.results[1][0].error is None
    assert time.monotonic() - started < 1.5
    # Past its timeout, it is abandoned like an async one.
    late = await _runtime.execute(app, _request("t", ("a", "block", {"seconds": 1.0}), timeout=0.2))
    assert late.results[0][0].error is not None and late.results[0][0].error.kind == "handler_timeout"


async def test_the_sidecars_timeout_wins_and_a_handlers_own_timeout_error_is_its_own() -> None:
    app = make_app("t", handler_timeout=60.0)
    response = await _runtime.execute(app, _request("t", ("a", "hang", {}), ("b", "own_timeout", {}), timeout=0.2))
    (hung,), (own,) = response.results
    assert hung.error is not None and hung.error.kind == "handler_timeout" and "0.2s" in hung.error.message
    assert own.error is not None and (own.error.kind, own.error.message) == (
        "handler_error", "the payment service timed out")


def test_a_handler_timeout_must_be_positive() -> None:
    with pytest.raises(statefn.DefinitionError, match="handler_timeout must be > 0"):
        StatefulFunction("t/x", handler_timeout=0)


async def test_a_hanging_handler_costs_its_invocation_not_the_partition(nats_server, etcd_server, namespace) -> None:
    """One partition, embedded: the hung invocation fails (twice tried) while the same partition serves others."""
    fn = f"{namespace}/worker"
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server, partitions=1), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        hung = asyncio.create_task(c.invoke(fn, "stuck", "hang"))
        assert await c.invoke(fn, "other", "work") == 1
        with pytest.raises(statefn.InvocationFailed) as err:
            await hung
        assert err.value.kind == statefn.ErrorKind.HANDLER_TIMEOUT
        assert err.value.message.startswith("gave up after 2 attempts: ")
        assert await c.get_state(fn, "stuck") == {}
        assert await c.invoke(fn, "stuck", "work") == 1  # its key is free


async def test_a_hanging_handler_in_a_function_server(nats_server, etcd_server, namespace) -> None:
    app = make_app(namespace)
    fn = f"{namespace}/worker"
    port = devservers.free_port()
    async with test_remote.function_server(app, port), \
            test_remote.remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, app), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fn, "stuck", "hang")
        assert err.value.kind == "handler_timeout"
        assert await c.invoke(fn, "stuck", "work") == 1


@contextlib.asynccontextmanager
async def refusing_server(app: statefn.App, port: int,
                          answer: Callable[[], web.Response]) -> AsyncIterator[None]:
    """A function server that describes the app but answers every batch with ``answer()``."""
    async def discover(_: web.Request) -> web.Response:
        return web.json_response(app.describe())

    async def invoke(request: web.Request) -> web.Response:
        await request.read()
        return answer()

    web_app = web.Application()
    web_app.add_routes([web.get("/discover", discover), web.post("/invoke", invoke)])
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("answer", ["400", "garbage"])
async def test_a_function_server_that_refuses_batches_fails_them(nats_server, etcd_server, namespace,
                                                                 answer: str) -> None:
    app = make_app(namespace)
    port = devservers.free_port()
    def response() -> web.Response:
        if answer == "400":
            return web.json_response({"error": "malformed batch request: KeyError: 'keys'"}, status=400)
        return web.Response(body=b"\x93\x01\x02", content_type="application/x-msgpack")

    async with refusing_server(app, port, response), \
            test_remote.remote_sidecar(f"http://127.0.0.1:{port}", nats_server, etcd_server, app), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(f"{namespace}/worker", "k", "work")
    assert err.value.kind == "retries_exhausted" and err.value.error_type == "FunctionServerError"
    expected = "answered 400: " if answer == "400" else "answer is malformed"
    assert expected in err.value.message


async def test_a_blocking_synchronous_handler_leaves_the_other_partitions_running(nats_server, etcd_server,
                                                                                 namespace) -> None:
    """Embedded, handlers share the sidecar's event loop: a synchronous handler that blocks ran on it and stopped
    every partition (and the lease keep-alive). It runs in a thread now: another partition's key is served
    meanwhile, while the blocked one's batch waits for its handler."""
    fn = f"{namespace}/worker"
    slow = "k0"
    fast = next(f"k{i}" for i in range(1, 100) if layout.partition_of(f"k{i}", 2) != layout.partition_of(slow, 2))
    app = make_app(namespace, handler_timeout=10.0)
    async with helpers.running_sidecar(app, nats_server, etcd_server, partitions=2), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        blocked = asyncio.create_task(c.invoke(fn, slow, "block", seconds=3.0))
        await asyncio.sleep(0.5)  # it is running (blocking) now
        assert await c.invoke(fn, fast, "work") == 1
        assert not blocked.done()  # answered while the synchronous handler still blocked
        assert await blocked is None


async def test_the_function_server_cancels_a_batch_its_sidecar_gave_up_on() -> None:
    """Remote: past a batch's budget the sidecar drops the request and sends the batch again; the function
    server cancels the dropped one's handlers instead of leaving them running (they piled up before)."""
    fn = StatefulFunction("t/remote", handler_timeout=60.0)
    cancelled = asyncio.Event()

    @fn.handler
    async def linger(ctx: Context) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    port = devservers.free_port()
    request = wire.encode_request(wire.BatchRequest(
        keys=[wire.KeyRequest(function="t/remote", key="k", state={},
                              invocations=[wire.Invocation(id="i", handler="linger", args={})])],
        max_state_bytes=1024))
    async with test_remote.function_server(statefn.App(fn), port), aiohttp.ClientSession() as http:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await http.post(f"http://127.0.0.1:{port}/invoke", data=request,
                                headers={"Content-Type": "application/x-msgpack"})
        async with asyncio.timeout(5):
            await cancelled.wait()
