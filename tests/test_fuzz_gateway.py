"""Fuzzing the HTTP gateway from its own OpenAPI document ("no single caller can stall the platform").

The gateway is the platform's front door: whatever a caller sends, it must answer with a 2xx or a
4xx in its JSON error format ({"error": {"kind", "message"}}), never a 5xx, a hang, or an
undocumented status. Schemathesis reads the live ``/openapi.json`` (generated from the registered
functions' handler signatures) and generates requests that fit it (positive) and that do not
(negative: wrong types, missing fields, extra fields); each goes to a real gateway in front of a
real sidecar, nats-server and etcd. The handlers are cheap and cannot fail on valid input, so a
5xx is always the platform's fault. A second, explicit sweep sends what the schema cannot describe:
garbage ``traceparent`` headers, reserved and odd ``Idempotency-Key`` values, odd paths and bodies.

The run is seeded (``STATEFN_FUZZ_SEED`` overrides the seed; it is printed) and bounded in examples
and wall-clock time, so it fits the normal suite.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import hypothesis
import pydantic
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

import statefn
from statefn import Context, StatefulFunction
from statefn_sidecar import devservers, gateway
from tests import helpers

SEED = int(os.environ.get("STATEFN_FUZZ_SEED", "20260611"))
MAX_EXAMPLES = 400
# Past this many seconds of generation, further examples are skipped (the run still ends cleanly).
TIME_BUDGET_S = 45.0
REQUEST_TIMEOUT_S = 15.0


class Dimensions(pydantic.BaseModel):
    width: float
    height: float
    unit: str = "cm"


class Item(pydantic.BaseModel):
    sku: str
    quantity: int
    dimensions: Dimensions | None = None
    labels: list[str] = []


class Order(pydantic.BaseModel):
    order_id: int
    items: list[Item]
    note: str | None = None


def make_app(ns: str) -> statefn.App:
    """Cheap handlers that cannot fail on arguments that fit their schema, and a rich schema to fuzz."""
    shop = StatefulFunction(f"{ns}/shop", max_attempts=1)
    count = shop.state("count", int, default=0)
    last = shop.state("last", str, default="")

    @shop.handler
    async def bump(ctx: Context, by: int = 1) -> int:
        ctx[count] = (ctx[count] + 1) % 1_000_000  # bounded: arguments may be any integer
        return ctx[count]

    @shop.handler
    async def place(ctx: Context, order: Order, tags: list[str], attributes: dict[str, int],
                    coupon: str | None = None, express: bool = False, weight: float = 1.0,
                    priority: int | None = None) -> dict[str, Any]:
        ctx[last] = str(order.order_id)[:32]
        return {"items": len(order.items), "tags": len(tags), "attributes": len(attributes),
                "coupon": coupon is not None, "express": express}

    @shop.handler
    async def echo(ctx: Context, text: str, repeat: int = 1, extra: dict[str, Any] | None = None) -> str:
        return text[:64]

    @shop.handler
    def ping(ctx: Context) -> None:
        return None

    return statefn.App(shop)


@pytest.fixture
async def live_gateway(nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer,
                       namespace: str) -> AsyncIterator[tuple[str, str]]:
    """A real sidecar running ``make_app`` and a gateway in front of it: (base URL, namespace)."""
    port = devservers.free_port()
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server, partitions=2,
                                       max_state_bytes=4096), \
            helpers.client(nats_server, etcd_server, timeout=10) as c:
        runner = await gateway.start_gateway(c, "127.0.0.1", port)
        try:
            yield f"http://127.0.0.1:{port}", namespace
        finally:
            await runner.cleanup()


def _own_paths(doc: dict[str, Any], ns: str) -> dict[str, Any]:
    """Only this test's function: the session's etcd holds other tests' registrations too."""
    return {**doc, "paths": {p: op for p, op in doc["paths"].items() if p.startswith(f"/v1/functions/{ns}/")}}


def _check_answer(status: int, content_type: str, text: str, what: str) -> None:
    """No 5xx; every refusal is JSON in the gateway's error format."""
    assert status < 500, f"{what}: {status} {text[:500]}"
    if status < 400:
        return
    assert content_type.startswith("application/json"), f"{what}: {status} {content_type} {text[:300]}"
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: {body}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"kind", "message"}, f"{what}: {body}"
    assert isinstance(error["kind"], str) and error["kind"], f"{what}: {body}"
    assert isinstance(error["message"], str), f"{what}: {body}"


_TRACEPARENTS = st.one_of(
    st.none(),
    st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    st.just("ff-ffffffffffffffffffffffffffffffff-ffffffffffffffff-ff"),
    st.just("00-00000000000000000000000000000000-0000000000000000-00"),
    # What an HTTP header can carry (RFC 9110 field-value: visible ASCII, spaces, obs-text 0x80-0xFF); a
    # header outside it (a control character) is refused by aiohttp's parser before the gateway sees it.
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80).map(str.strip),
    st.text(st.sampled_from([chr(c) for c in (*range(0x21, 0x7F), *range(0x80, 0x100)) if not chr(c).isspace()]),
            min_size=1, max_size=80),
)


def _run_fuzz(base: str, doc: dict[str, Any]) -> dict[int, int]:
    """The schema-driven sweep: runs in a thread, while the event loop serves the gateway and the sidecar."""
    schema = schemathesis.openapi.from_dict(doc)
    strategy = schema.as_strategy(schemathesis.GenerationMode.POSITIVE) | schema.as_strategy(
        schemathesis.GenerationMode.NEGATIVE)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
              negative_data_rejection]
    statuses: dict[int, int] = {}
    started = time.monotonic()
    session = requests.Session()

    @hypothesis.seed(SEED)
    @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, print_blob=True,
                         suppress_health_check=list(HealthCheck),
                         phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink])
    @hypothesis.given(case=strategy, traceparent=_TRACEPARENTS)
    def fuzz(case: schemathesis.Case[Any], traceparent: str | None) -> None:
        if time.monotonic() - started > TIME_BUDGET_S:
            return
        headers = {"traceparent": traceparent} if traceparent else None
        response = case.call(base_url=base, session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        what = case.as_curl_command(headers=headers)
        _check_answer(response.status_code, (response.headers.get("content-type") or [""])[0], response.text, what)
        case.validate_response(response, checks=checks, headers=headers)

    fuzz()
    return statuses


async def test_the_gateway_fuzzed_from_its_openapi_document(live_gateway: tuple[str, str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    base, ns = live_gateway
    print(f"STATEFN_FUZZ_SEED={SEED}")
    doc = await asyncio.to_thread(lambda: requests.get(f"{base}/openapi.json", timeout=10).json())
    doc = _own_paths(doc, ns)
    assert len(doc["paths"]) == 5, sorted(doc["paths"])
    started = time.monotonic()
    statuses = await asyncio.to_thread(_run_fuzz, base, doc)
    print(f"statuses: {dict(sorted(statuses.items()))} in {time.monotonic() - started:.1f}s")
    assert sum(statuses.values()) >= 50
    assert any(200 <= s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
    # Still serving after all of it.
    status, body = await asyncio.to_thread(_post, f"{base}/v1/functions/{ns}/shop/after/bump", b"{}", {})
    assert (status, body) == (200, {"result": 1})
    _no_errors_logged(caplog)


def _no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing failed behind a refusal either: aiohttp logs a handler's exception, the sidecar its own."""
    errors = [f"{r.name}: {r.getMessage()}\n{r.exc_text or ''}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, "\n".join(errors)


def _post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    response = requests.post(url, data=data, headers=headers, timeout=REQUEST_TIMEOUT_S)
    _check_answer(response.status_code, response.headers.get("Content-Type", ""), response.text, f"POST {url}")
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


Request = tuple[str, str, dict[str, str | bytes], bytes, int | None]  # method, path, headers, body, status


def _adversarial(ns: str) -> list[Request]:
    """Requests the schema cannot describe, each with the status it must get (None: any but a 5xx)."""
    shop = f"/v1/functions/{ns}/shop"
    ok = b'{"text": "hi"}'
    cases: list[Request] = []
    # Idempotency keys: reserved ones, odd characters, long, and header bytes that are not UTF-8 (aiohttp
    # keeps them as surrogate escapes, which no NATS header can carry: a 500 before).
    cases += [("POST", f"{shop}/i/echo", {"Idempotency-Key": v}, ok, 400) for v in
              ("~", "~seq:1", "~dlq-replay:1", b"\xff\xfe", b"\x80", "caf\u00e9".encode("latin-1"))]
    cases += [("POST", f"{shop}/i/echo", {"Idempotency-Key": v}, ok, 200) for v in
              ("a b", "*", ">", "a.b.c", "k:1", "x" * 4000, "\u00e9".encode())]
    # traceparent garbage is ignored, as W3C says (the non-UTF-8 ones were a 500 before).
    cases += [("POST", f"{shop}/t/echo", {"traceparent": v}, ok, 200) for v in (
        "", "garbage", f"00-{'0' * 32}-{'0' * 16}-01", "00-zz-zz-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra", "0" * 5000, b"\xc3\x28", b"\xff",
        "tr\u00e9s".encode())]
    # Bodies: not JSON, not an object, and JSON that msgpack cannot carry (integers past 64 bits, lone
    # surrogates: a 500 before), nested too deep.
    bodies = [b"", b"null", b"[]", b'"x"', b"1", b"{", b"\xff\xfe{}", b'{"text": "\\ud800"}', b'{"text": "\\udfff x"}',
              b'{"text": "a", "text": 1}', b'{"text": "a", "repeat": 18446744073709551616}',
              b'{"text": "a", "repeat": -9223372036854775809}', b'{"text": "a", "repeat": 1e400}',
              b'{"text": "a", "extra": {"big": 123456789012345678901234567890}}',
              b'{"text": "a", "extra": {"\\ud800": 1}}', b'{"text": "\x00"}',
              b'{"text": "a", "extra": ' + b"[" * 64 + b"]" * 64 + b"}"]
    cases += [("POST", f"{shop}/b/echo", {"Content-Type": "application/json"}, b, 400) for b in bodies]
    cases += [("POST", f"{shop}/b/echo", {}, b'{"text": "\xe2\x80\xa8\xc3\xa9"}', 200),
              # (Python's json reads NaN and Infinity, which JSON has not: taken, not a 5xx)
              ("POST", f"{shop}/b/echo", {}, b'{"text": "a", "extra": {"n": NaN, "i": Infinity}}', None),
              ("POST", f"{shop}/b/bump", {}, b'{"by": 18446744073709551616}', 400),
              ("POST", f"{shop}/b/bump", {}, b'{"by": 340282366920938463463374607431768211456}', 400),
              ("POST", f"{shop}/b/bump", {}, b'{"by": true}', 400), ("POST", f"{shop}/b/ping", {}, b'{"x": 1}', 400)]
    # Paths: unknown and reserved handlers, functions that are not, routes that are not (text/plain before).
    cases += [("POST", p, {}, ok, 404) for p in (
        f"{shop}/k/nope", f"{shop}/k/%7Ecommit", f"{shop}/k/~response", f"{shop}/k/__init__",
        f"/v1/functions/{ns}/nosuch/k/echo", f"/v1/functions/{ns.upper()}/shop/k/echo",
        "/v1/functions/_registry/x/k/echo", f"/v1/functions/{ns}/shop.x/k/echo", f"{shop}//echo",
        f"{shop}/k/echo/extra", "/v1/functions/x", "/nowhere")]
    cases += [("POST", p, {}, ok, 200) for p in (
        f"{shop}/a%2Fb/echo", f"{shop}/%00/echo", f"{shop}/%ED%A0%80/echo", f"{shop}/%FF/echo",
        f"{shop}/{'k' * 3000}/echo")]
    cases += [("POST", f"{shop}/k/echo?async=maybe", {}, ok, 400), ("POST", f"{shop}/k/echo?async=", {}, ok, 400),
              ("POST", f"{shop}/k/echo?async=TRUE&async=false", {}, ok, 202)]
    cases += [("GET", p, {}, b"", 200) for p in (
        f"{shop}/k/state", f"{shop}/%FF/state", f"{shop}/%ED%A0%80/state", f"{shop}/a%2Fb/state")]
    cases += [("GET", p, {}, b"", 404) for p in (
        f"/v1/functions/{ns}/nosuch/k/state", "/v1/functions/-bad-/shop/k/state")]
    cases += [("GET", f"{shop}/k/echo", {}, b"", 405), ("PUT", f"{shop}/k/echo", {}, ok, 405),
              ("DELETE", f"{shop}/k/state", {}, b"", 405), ("PATCH", "/openapi.json", {}, b"", 405)]
    return cases


def _send_adversarial(base: str, ns: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    with requests.Session() as session:
        # One idempotency key, two argument sets: the second is a 422, not a second run.
        for text in ("one", "two"):
            response = session.post(f"{base}/v1/functions/{ns}/shop/m/echo", data=json.dumps({"text": text}),
                                    headers={"Idempotency-Key": "same"}, timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code == 422 and response.json()["error"]["kind"] == "idempotency_mismatch"
        failures: list[str] = []
        for method, path, headers, body, expected in _adversarial(ns):
            request = requests.Request(method, base + path, headers=headers, data=body).prepare()
            request.url = base + path  # as written: requests would re-quote it
            response = session.send(request, timeout=REQUEST_TIMEOUT_S)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            what = f"{method} {path[:200]} headers={str(headers)[:200]} body={body[:200]!r}"
            try:
                _check_answer(response.status_code, response.headers.get("Content-Type", ""), response.text, what)
                assert expected is None or response.status_code == expected, (
                    f"{what}: {response.status_code}, not {expected}: {response.text[:300]}")
                if response.status_code == 405:
                    assert response.headers.get("Allow"), what
            except AssertionError as exc:
                failures.append(str(exc).splitlines()[0])
        assert not failures, "\n".join(failures)
    return statuses


async def test_the_gateway_refuses_what_the_schema_cannot_describe(live_gateway: tuple[str, str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    base, ns = live_gateway
    statuses = await asyncio.to_thread(_send_adversarial, base, ns)
    print(f"statuses: {dict(sorted(statuses.items()))}")
    status, body = await asyncio.to_thread(_post, f"{base}/v1/functions/{ns}/shop/after/bump", b"{}", {})
    assert (status, body) == (200, {"result": 1})
    _no_errors_logged(caplog)
