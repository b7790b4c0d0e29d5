"""``statefn serve``: the function server the sidecar calls in pod mode.

The user container runs this; the sidecar next to it sends one HTTP request per batch
(msgpack, the ``statefn_core.wire`` protocol) and gets every invocation's outcome back. Handler
errors are outcomes, not HTTP errors; a 4xx means the request itself was malformed.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from aiohttp import web

from statefn import _function, _runtime
from statefn_core import errors, signals, wire

_log = logging.getLogger("statefn.serve")
CONTENT_TYPE = "application/x-msgpack"


def load_app(spec: str) -> _function.App:
    """Resolve ``package.module:attribute`` to an App, with errors a user can act on.

    The working directory is importable, as with uvicorn and gunicorn: a console script's sys.path starts at its own
    bin directory, so ``statefn serve app:app`` would otherwise not find the ``app.py`` next to it.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise errors.DefinitionError(f"expected MODULE:ATTRIBUTE (e.g. examples.counter.app:app), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise errors.DefinitionError(f"module {module_name!r} not found ({exc})") from exc
    try:
        app = getattr(module, attr)
    except AttributeError:
        raise errors.DefinitionError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(app, _function.App):
        raise errors.DefinitionError(f"{spec} is a {type(app).__name__}, not a statefn.App")
    return app


def build_app(app: _function.App) -> web.Application:
    async def invoke(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            batch = wire.decode_request(body)
        except Exception as exc:
            return web.json_response({"error": f"malformed batch request: {type(exc).__name__}: {exc}"}, status=400)
        response = await _runtime.execute(app, batch)
        return web.Response(body=wire.encode_response(response), content_type=CONTENT_TYPE)

    async def discover(_: web.Request) -> web.Response:
        return web.json_response(app.describe())

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True, "functions": sorted(app.functions)})

    web_app = web.Application(client_max_size=64 * 1024 * 1024)
    web_app.add_routes([web.post("/invoke", invoke), web.get("/discover", discover), web.get("/healthz", healthz)])
    return web_app


def make_runner(app: _function.App) -> web.AppRunner:
    """The function server: a batch the sidecar gave up waiting for (its connection closed) is cancelled,
    its handlers with it, not left running."""
    return web.AppRunner(build_app(app), access_log=None, handler_cancellation=True)


async def serve(app: _function.App, host: str = "127.0.0.1", port: int = 9000) -> None:
    """Serve until SIGTERM/SIGINT or cancellation."""
    runner = make_runner(app)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    _log.info("serving %s on http://%s:%d", ", ".join(app.functions), host, port)
    try:
        await signals.until_stopped()
    finally:
        await runner.cleanup()
