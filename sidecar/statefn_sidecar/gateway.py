"""The HTTP gateway: invoke functions and read state from outside the platform.

Requests are checked against the function's published metadata before anything is enqueued
(unknown function or handler: 404; arguments that do not match the handler's JSON schema:
400 naming the field), so a bad request never becomes a dead letter. Each request gets an
idempotency key (the caller's ``Idempotency-Key`` or a fresh one) that the client reuses on
its own re-sends, so a retried request returns the original reply.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from typing import Any

import jsonschema
from aiohttp import web
from opentelemetry import trace

import statefn
from statefn_core import codec, constants, errors, layout, signals
from statefn_sidecar import metrics, tracing

_META_TTL_S = 5.0
MAX_JSON_DEPTH = codec.MAX_DEPTH
_STATUS_BY_KIND: dict[str, int] = {
    errors.ErrorKind.INVALID_ARGUMENT: 400,
    errors.ErrorKind.UNDECODABLE: 400,
    errors.ErrorKind.UNKNOWN_HANDLER: 404,
    errors.ErrorKind.UNKNOWN_FUNCTION: 404,
    errors.ErrorKind.STATE_TOO_LARGE: 413,
    errors.ErrorKind.IDEMPOTENCY_MISMATCH: 422,
    errors.ErrorKind.HANDLER: 500,
    errors.ErrorKind.RETRIES_EXHAUSTED: 500,
}
# Request-scoped: the function the path named, once known to exist.
_FUNCTION: web.RequestKey[str] = web.RequestKey("function", str)
CLIENT_KEY: web.AppKey[statefn.Client] = web.AppKey("client", statefn.Client)
META_KEY: web.AppKey[dict[str, tuple[float, dict[str, Any]]]] = web.AppKey("meta", dict)


def _jsonable(value: Any) -> Any:
    """msgpack values may hold bytes; JSON carries them as base64 strings."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _not_json(constant: str) -> Any:
    """NaN and Infinity: Python's reader takes them, JSON has no such values (nor has a handler's schema)."""
    raise ValueError(f"{constant} is not a JSON value")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"kind": kind, "message": message}}, status=status)


async def _functions(request: web.Request) -> list[dict[str, Any]]:
    return sorted(await request.app[CLIENT_KEY].list_functions(), key=lambda m: str(m["type"]))


async def _meta(request: web.Request, function: str) -> dict[str, Any] | web.Response:
    """The function's metadata, cached briefly and refreshed on a miss."""
    cache = request.app[META_KEY]
    hit = cache.get(function)
    if hit is not None and time.monotonic() - hit[0] < _META_TTL_S:
        return hit[1]
    try:
        meta = await request.app[CLIENT_KEY].describe(function, refresh=True)
    except errors.UnknownFunction:
        known = ", ".join(str(m["type"]) for m in await _functions(request)) or "none"
        return _error(404, errors.ErrorKind.UNKNOWN_FUNCTION, f"unknown function {function}; known functions: {known}")
    cache[function] = (time.monotonic(), meta)
    return meta


async def _resolve(request: web.Request) -> tuple[str, dict[str, Any]] | web.Response:
    """The function named by the path and its metadata, or the 404 to answer."""
    function = f"{request.match_info['namespace']}/{request.match_info['name']}"
    try:
        layout.FunctionType.parse(function)
    except errors.InvalidFunctionType as exc:
        return _error(404, errors.ErrorKind.UNKNOWN_FUNCTION, str(exc))
    meta = await _meta(request, function)
    return meta if isinstance(meta, web.Response) else (function, meta)


def _schema_errors(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    found = sorted(jsonschema.Draft202012Validator(schema).iter_errors(args), key=lambda e: list(e.path))
    if not found:
        return None
    parts = []
    for e in found:
        field = ".".join(str(p) for p in e.path)
        parts.append(f"{field}: {e.message}" if field else e.message)
    return "; ".join(parts)


_INVOKE_ROUTE = "/v1/functions/{namespace}/{name}/{key}/{handler}"
# The values of ?async= the gateway understands (case-insensitive); any other is refused.
_ASYNC_VALUES = {"0": False, "false": False, "no": False, "1": True, "true": True, "yes": True}


def _caller_traceparent(request: web.Request) -> str | None:
    """The caller's ``traceparent`` if it is a valid W3C one; anything else is ignored, as the spec says.

    What is not one never travels on: header bytes that are not UTF-8 reach us as surrogate escapes, which
    no NATS header can carry (the publish raised, and the request was a 500).
    """
    value = request.headers.get("traceparent")
    if not value:
        return None
    parent = tracing.extract(value)
    if parent is None or not trace.get_current_span(parent).get_span_context().is_valid:
        return None
    return value.strip()


def _idempotency_key_problem(idem: str) -> str | None:
    """Why an ``Idempotency-Key`` cannot be used, or None."""
    if idem.startswith(constants.RESERVED_IDEMPOTENCY_PREFIX):
        return (f"Idempotency-Key values starting with {constants.RESERVED_IDEMPOTENCY_PREFIX!r} are reserved "
                "for the platform")
    try:
        idem.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept by aiohttp as surrogate escapes
        return "the Idempotency-Key header is not valid UTF-8"
    return None


async def invoke(request: web.Request) -> web.Response:
    """Times, counts and (when tracing) spans each invocation request around ``_invoke``."""
    started = time.monotonic()
    tracer = tracing.TRACER
    if tracer is None:
        response = await _invoke(request, _caller_traceparent(request))
    else:
        with tracer.start_as_current_span(
                f"POST {_INVOKE_ROUTE}", context=tracing.extract(_caller_traceparent(request)),
                kind=trace.SpanKind.SERVER, record_exception=False,
                attributes={"http.request.method": "POST", "http.route": _INVOKE_ROUTE, "url.path": request.path,
                            tracing.KEY: request.match_info["key"],
                            tracing.HANDLER: request.match_info["handler"]}) as span:
            response = await _invoke(request, tracing.traceparent_of(span))
            span.set_attribute("http.response.status_code", response.status)
            span.set_attribute(tracing.FUNCTION, request.get(_FUNCTION, "unknown"))
            if response.status >= 500:
                span.set_status(trace.Status(trace.StatusCode.ERROR, f"HTTP {response.status}"))
    # Only functions that exist get their own series: paths are caller input, label values must be bounded.
    function = request.get(_FUNCTION, "unknown")
    metrics.GATEWAY_REQUESTS.labels(function, str(response.status)).inc()
    metrics.GATEWAY_SECONDS.labels(function).observe(time.monotonic() - started)
    return response


async def _invoke(request: web.Request, traceparent: str | None) -> web.Response:
    resolved = await _resolve(request)
    if isinstance(resolved, web.Response):
        return resolved
    function, meta = resolved
    request[_FUNCTION] = function
    handler, key = request.match_info["handler"], request.match_info["key"]
    handlers = meta.get("handlers", {})
    # A function the operator registered but no pod has described yet (minReplicas 0, never run): its handlers are
    # unknown here, so the invocation goes through and the sidecar that wakes up validates it.
    described = meta.get("described", True)
    if described and handler not in handlers:
        return _error(404, errors.ErrorKind.UNKNOWN_HANDLER,
                      f"{function} has no handler {handler!r}; known handlers: {', '.join(sorted(handlers))}")
    raw = await request.read()
    try:
        args = json.loads(raw, parse_constant=_not_json) if raw.strip() else {}
    except ValueError as exc:
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT, f"the body is not JSON: {exc}")
    except RecursionError:  # nested past Python's own limit
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT,
                      f"the body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
    if codec.too_deep(args, MAX_JSON_DEPTH):
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT,
                      f"the body nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects")
    if not isinstance(args, dict):
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT,
                      f"the body must be a JSON object of {handler}'s arguments, not {type(args).__name__}")
    problem = _schema_errors(handlers[handler]["parameters"], args) if handler in handlers else None
    if problem:
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT, f"{function}.{handler}: {problem}")
    try:
        # JSON carries what msgpack cannot (integers past 64 bits, lone UTF-16 surrogates in strings): refused
        # here, or the client's publish raised and the request was a 500.
        codec.pack(args)
    except errors.CodecError as exc:
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT, f"{function}.{handler}: {exc}")
    asynchronous = _ASYNC_VALUES.get(request.query["async"].lower()) if "async" in request.query else False
    if asynchronous is None:  # a typo ("?async=ture") must not quietly make a caller wait for the reply
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT,
                      f"the async query parameter must be true or false, not {request.query['async']!r}")
    client = request.app[CLIENT_KEY]
    idem = request.headers.get("Idempotency-Key") or uuid.uuid4().hex
    idem_problem = _idempotency_key_problem(idem)
    if idem_problem:
        return _error(400, errors.ErrorKind.INVALID_ARGUMENT, idem_problem)
    try:
        if asynchronous:
            await client.send_raw(function, key, handler, args=args, idempotency_key=idem, traceparent=traceparent)
            return web.json_response({"invocation_id": idem}, status=202)
        reply = await client.invoke_raw(function, key, handler, args=args, idempotency_key=idem,
                                        traceparent=traceparent)
    except errors.PayloadTooLarge as exc:
        return _error(413, errors.ErrorKind.PAYLOAD_TOO_LARGE, str(exc))
    except errors.InvocationTimeout as exc:
        return _error(504, errors.ErrorKind.TIMEOUT, str(exc))
    if not reply.ok:
        assert reply.error is not None
        return _error(_STATUS_BY_KIND.get(reply.error.kind, 500), reply.error.kind, reply.error.message)
    value = None if reply.value is None else codec.unpack(reply.value)
    return web.json_response({"result": _jsonable(value)}, headers={"Idempotency-Key": idem})


async def get_state(request: web.Request) -> web.Response:
    resolved = await _resolve(request)
    if isinstance(resolved, web.Response):
        return resolved
    function, _ = resolved
    state = await request.app[CLIENT_KEY].get_state(function, request.match_info["key"])
    return web.json_response({"state": _jsonable(state)})


async def list_functions(request: web.Request) -> web.Response:
    return web.json_response({"functions": [
        {"type": m["type"], "partitions": m["partitions"], "handlers": sorted(m.get("handlers", {}))}
        for m in await _functions(request)
    ]})


async def openapi(request: web.Request) -> web.Response:
    paths: dict[str, Any] = {}
    error = {"description": "error", "content": {"application/json": {"schema": {
        "type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["kind", "message"], "properties": {
                "kind": {"type": "string"}, "message": {"type": "string"}}}}}}}}
    for meta in await _functions(request):
        ns, name = str(meta["type"]).split("/")
        for handler, spec in sorted(meta.get("handlers", {}).items()):
            paths[f"/v1/functions/{ns}/{name}/{{key}}/{handler}"] = {"post": {
                "operationId": f"{ns}_{name}_{handler}".replace("-", "_"),
                "summary": f"Invoke {meta['type']}.{handler}",
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}},
                    {"name": "async", "in": "query", "required": False, "schema": {"type": "boolean"}},
                    {"name": "Idempotency-Key", "in": "header", "required": False, "schema": {"type": "string"}},
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": spec["parameters"]}}},
                "responses": {"200": {"description": "the handler's reply", "content": {"application/json": {
                    "schema": {"type": "object", "properties": {"result": {}}}}}},
                    "202": {"description": "enqueued (async=true)", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["invocation_id"],
                        "properties": {"invocation_id": {"type": "string"}}}}}},
                    # 422: the Idempotency-Key was used for a request with other arguments
                    "400": error, "404": error, "413": error, "422": error, "500": error, "504": error},
            }}
        paths[f"/v1/functions/{ns}/{name}/{{key}}/state"] = {"get": {
            "operationId": f"{ns}_{name}_state".replace("-", "_"),
            "summary": f"Read the committed state of one {meta['type']} key",
            "parameters": [{"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"200": {"description": "state", "content": {"application/json": {
                "schema": {"type": "object", "properties": {"state": {"type": "object"}}}}}}, "404": error},
        }}
    return web.json_response({"openapi": "3.1.0", "info": {"title": "statefn gateway", "version": "v1"},
                              "paths": paths})


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    client = request.app[CLIENT_KEY]
    try:
        ready = client.nats.is_connected
        await asyncio.wait_for(client.etcd.get(b"/statefn"), 2.0)
    except Exception:
        ready = False
    return web.json_response({"ready": ready}, status=200 if ready else 503)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (body over client_max_size, ...) in the gateway's error format."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size
        return _error(413, errors.ErrorKind.PAYLOAD_TOO_LARGE,
                      f"the request body is larger than the gateway accepts ({limit} bytes)")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # No such route (404), a route's wrong method (405, its Allow header kept), ...: JSON like every refusal.
        kind = exc.reason.lower().replace(" ", "_").replace("-", "_")
        refusal = _error(exc.status, kind, f"{request.method} {request.path}: {exc.reason}")
        if "Allow" in exc.headers:
            refusal.headers["Allow"] = exc.headers["Allow"]
        return refusal


def build_app(client: statefn.Client) -> web.Application:
    # Bodies up to 8 MiB reach the handler, which refuses what NATS would not carry, clearly.
    app = web.Application(client_max_size=8 * 1024 * 1024, middlewares=[_json_errors])
    app[CLIENT_KEY] = client
    app[META_KEY] = {}
    app.add_routes([
        web.post(_INVOKE_ROUTE, invoke),
        web.get("/v1/functions/{namespace}/{name}/{key}/state", get_state),
        web.get("/v1/functions", list_functions),
        web.get("/openapi.json", openapi),
        web.get("/healthz", healthz),
        web.get("/readyz", readyz),
        web.get("/metrics", metrics.handle_metrics),
    ])
    return app


async def start_gateway(client: statefn.Client, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(client), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def run_gateway(nats_url: str, etcd_endpoint: str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until SIGTERM/SIGINT (the process entry: tracing is configured here, from OTEL_*)."""
    tracing.configure("statefn-gateway")
    async with statefn.Client(nats=nats_url, etcd=etcd_endpoint) as client:
        runner = await start_gateway(client, host, port)
        try:
            await signals.until_stopped()
        finally:
            await runner.cleanup()
            tracing.shutdown()
