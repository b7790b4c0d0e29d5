"""The HTTP gateway against a real sidecar, nats-server and etcd."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import nats
import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import layout
from statefn_sidecar import devservers, gateway, topology
from tests import helpers


def make_app(ns: str) -> tuple[statefn.App, dict[str, int]]:
    calls = {"deposit": 0}
    account = StatefulFunction(f"{ns}/account", max_attempts=1)
    balance = account.state("balance", int, default=0)
    blob = account.state("blob", bytes, default=b"")

    @account.handler
    async def deposit(ctx: Context, amount: int, note: str = "") -> int:
        calls["deposit"] += 1
        ctx[balance] += amount
        return ctx[balance]

    @account.handler
    async def fail(ctx: Context) -> None:
        raise RuntimeError("it failed")

    @account.handler
    async def store(ctx: Context, size: int) -> bytes:
        ctx[blob] = b"\x00" * size
        return b"\x01\x02"

    return statefn.App(account), calls


@pytest.fixture
async def gw(nats_server, etcd_server, namespace) -> AsyncIterator[tuple[aiohttp.ClientSession, str, str, Any]]:
    app, calls = make_app(namespace)
    port = devservers.free_port()
    async with helpers.running_sidecar(app, nats_server, etcd_server, max_state_bytes=1000), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        runner = await gateway.start_gateway(c, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as http:
                yield http, f"http://127.0.0.1:{port}", namespace, calls
        finally:
            await runner.cleanup()


async def _post(http: aiohttp.ClientSession, url: str, body: Any = None, *, data: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with http.post(url, json=body if data is None else None, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_invoke_and_state(gw) -> None:
    http, base, ns, _ = gw
    url = f"{base}/v1/functions/{ns}/account/alice"
    assert await _post(http, f"{url}/deposit", {"amount": 5}) == (200, {"result": 5})
    assert await _post(http, f"{url}/deposit", {"amount": 2, "note": "x"}) == (200, {"result": 7})
    async with http.get(f"{url}/state") as resp:
        assert (resp.status, await resp.json()) == (200, {"state": {"balance": 7}})
    status, body = await _post(http, f"{url}/store", {"size": 3})
    assert (status, body) == (200, {"result": base64.b64encode(b"\x01\x02").decode()})


async def test_idempotency_key_returns_the_original_reply(gw) -> None:
    http, base, ns, calls = gw
    url = f"{base}/v1/functions/{ns}/account/bob/deposit"
    first = await _post(http, url, {"amount": 10}, headers={"Idempotency-Key": "pay-1"})
    second = await _post(http, url, {"amount": 10}, headers={"Idempotency-Key": "pay-1"})
    assert first == second == (200, {"result": 10})
    assert calls["deposit"] == 1


async def test_one_idempotency_key_on_eight_keys_is_eight_requests(gw) -> None:
    """The same Idempotency-Key names one request per key and handler: before, k2..k8 got k1's reply and
    never ran (their state stayed empty)."""
    http, base, ns, calls = gw
    urls = [f"{base}/v1/functions/{ns}/account/k{i}/deposit" for i in range(1, 9)]
    same = {"Idempotency-Key": "same-key-1"}
    answers = await asyncio.gather(*(_post(http, url, {"amount": i}, headers=same) for i, url in enumerate(urls, 1)))
    assert answers == [(200, {"result": i}) for i in range(1, 9)]
    assert calls["deposit"] == 8
    for i in range(1, 9):
        async with http.get(f"{base}/v1/functions/{ns}/account/k{i}/state") as resp:
            assert (await resp.json()) == {"state": {"balance": i}}
    # A re-send of k1's request is answered from its record; the same key with other arguments is refused.
    assert await _post(http, urls[0], {"amount": 1}, headers=same) == (200, {"result": 1})
    status, body = await _post(http, urls[0], {"amount": 100}, headers=same)
    assert status == 422 and body["error"]["kind"] == "idempotency_mismatch"
    assert calls["deposit"] == 8


async def test_a_reserved_idempotency_key_is_refused(gw) -> None:
    http, base, ns, calls = gw
    url = f"{base}/v1/functions/{ns}/account/r/deposit"
    for reserved in ("~seq:1", "~dlq-replay:4"):
        status, body = await _post(http, url, {"amount": 1}, headers={"Idempotency-Key": reserved})
        assert status == 400 and "reserved" in body["error"]["message"]
    assert calls["deposit"] == 0


async def test_async_invocation(gw) -> None:
    http, base, ns, _ = gw
    url = f"{base}/v1/functions/{ns}/account/carol"
    status, body = await _post(http, f"{url}/deposit?async=true", {"amount": 4}, headers={"Idempotency-Key": "a-1"})
    assert (status, body) == (202, {"invocation_id": "a-1"})
    for _ in range(50):
        async with http.get(f"{url}/state") as resp:
            if (await resp.json())["state"] == {"balance": 4}:
                break
        await asyncio.sleep(0.1)
    async with http.get(f"{url}/state") as resp:
        assert (await resp.json()) == {"state": {"balance": 4}}


async def test_bad_requests_enqueue_nothing(gw) -> None:
    http, base, ns, calls = gw
    url = f"{base}/v1/functions/{ns}/account/dave"
    assert await _post(http, f"{base}/v1/functions/{ns}/nosuch/k/deposit", {"amount": 1}) == (404, {"error": {
        "kind": "unknown_function",
        "message": f"unknown function {ns}/nosuch; known functions: " + (await _known(http, base))}})
    assert await _post(http, f"{url}/nope", {}) == (404, {"error": {
        "kind": "unknown_handler",
        "message": f"{ns}/account has no handler 'nope'; known handlers: deposit, fail, store"}})
    assert await _post(http, f"{url}/deposit", data=b"{not json") == (400, {"error": {
        "kind": "invalid_argument",
        "message": "the body is not JSON: "
                   "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"}})
    assert await _post(http, f"{url}/deposit", [1, 2]) == (400, {"error": {
        "kind": "invalid_argument", "message": "the body must be a JSON object of deposit's arguments, not list"}})
    assert await _post(http, f"{url}/deposit", {"amount": "x"}) == (400, {"error": {
        "kind": "invalid_argument", "message": f"{ns}/account.deposit: amount: 'x' is not of type 'integer'"}})
    assert await _post(http, f"{url}/deposit", {}) == (400, {"error": {
        "kind": "invalid_argument", "message": f"{ns}/account.deposit: 'amount' is a required property"}})
    # Deeply nested bodies: past Python's recursion limit (a RecursionError, a plain 500 before) and past ours.
    too_deep = {"error": {"kind": "invalid_argument",
                          "message": "the body nests deeper than 64 levels of arrays and objects"}}
    for depth in (100_000, 65):
        body = b'{"amount": 1, "note": ' + b"[" * depth + b"]" * depth + b"}"
        assert await _post(http, f"{url}/deposit", data=body) == (400, too_deep), depth
    assert calls["deposit"] == 0
    async with http.get(f"{url}/state") as resp:
        assert (await resp.json()) == {"state": {}}


async def test_handler_errors_map_to_status(gw) -> None:
    http, base, ns, _ = gw
    url = f"{base}/v1/functions/{ns}/account/erin"
    assert await _post(http, f"{url}/fail", {}) == (500, {"error": {
        "kind": "handler_error", "message": "it failed"}})
    status, body = await _post(http, f"{url}/store", {"size": 5000})
    assert status == 413 and body["error"]["kind"] == "state_too_large"
    big = json.dumps({"amount": 1, "note": "x" * (2 * 1024 * 1024)}).encode()
    async with http.post(f"{url}/deposit", data=io.BytesIO(big)) as resp:
        status, body = resp.status, await resp.json()
    assert status == 413 and body["error"]["kind"] == "payload_too_large"


async def test_openapi_health_and_listing(gw) -> None:
    http, base, ns, _ = gw
    async with http.get(f"{base}/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"] == "3.1.0"
    op = doc["paths"][f"/v1/functions/{ns}/account/{{key}}/deposit"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["amount"] and schema["properties"]["amount"]["type"] == "integer"
    assert f"/v1/functions/{ns}/account/{{key}}/state" in doc["paths"]
    async with http.get(f"{base}/v1/functions") as resp:
        listed = {f["type"]: f for f in (await resp.json())["functions"]}
    assert listed[f"{ns}/account"]["handlers"] == ["deposit", "fail", "store"]
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{base}{path}") as resp:
            assert resp.status == 200


async def test_keys_named_meta_do_not_break_the_listing(gw) -> None:
    """The listing read every key under the root and took any ending in '/meta' for a function's registration:
    one increment sent with 'Idempotency-Key: meta' made GET /v1/functions a 500. Registrations now have a
    prefix of their own."""
    http, base, ns, _ = gw
    assert await _post(http, f"{base}/v1/functions/{ns}/account/meta/deposit", {"amount": 1},
                       headers={"Idempotency-Key": "meta"}) == (200, {"result": 1})
    for path in ("/v1/functions", "/openapi.json"):
        async with http.get(f"{base}{path}") as resp:
            assert resp.status == 200, path
    async with http.get(f"{base}/v1/functions") as resp:
        assert [f["type"] for f in (await resp.json())["functions"] if f["type"].startswith(ns)] == [f"{ns}/account"]
    assert (await _post(http, f"{base}/v1/functions/{ns}/nosuch/k/deposit", {"amount": 1}))[0] == 404


async def _known(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(f"{base}/v1/functions") as resp:
        return ", ".join(f["type"] for f in (await resp.json())["functions"])


async def test_a_registered_function_no_pod_has_described_yet_takes_invocations(
        nats_server, etcd_server, namespace) -> None:
    """minReplicas 0 and never run: the operator's registration has no handlers; the first call must get through
    (it is what brings a pod up), and the sidecar that starts validates and runs it."""
    app, calls = make_app(namespace)
    fn = layout.FunctionType.parse(f"{namespace}/account")
    nc = await nats.connect(nats_server.url)
    try:
        await topology.ensure_stream(nc.jetstream(), fn)
        await topology.ensure_consumers(nc.jetstream(), fn, 4, ack_wait=30,
                                        max_ack_pending=topology.max_ack_pending(32))
    finally:
        await nc.close()
    port = devservers.free_port()
    async with helpers.client(nats_server, etcd_server, timeout=20) as c:
        await topology.reserve(c.etcd, fn, 4)
        runner = await gateway.start_gateway(c, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/functions/{namespace}/account/zed"
                assert await _post(http, f"{url}/deposit?async=true", {"amount": 3},
                                   headers={"Idempotency-Key": "early"}) == (202, {"invocation_id": "early"})
                assert await _post(http, f"{url}/nope?async=true", {}, headers={"Idempotency-Key": "bad"}) == (
                    202, {"invocation_id": "bad"})
                async with helpers.running_sidecar(app, nats_server, etcd_server):
                    for _ in range(100):
                        if calls["deposit"]:
                            break
                        await asyncio.sleep(0.1)
                    await asyncio.sleep(gateway._META_TTL_S)  # the cached placeholder expires
                    # described now: the gateway validates again
                    assert (await _post(http, f"{url}/nope", {}))[0] == 404
                    async with http.get(f"{url}/state") as resp:
                        assert (await resp.json()) == {"state": {"balance": 3}}
        finally:
            await runner.cleanup()
    assert calls["deposit"] == 1
