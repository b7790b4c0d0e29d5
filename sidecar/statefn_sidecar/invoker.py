"""How the sidecar runs handlers: in its own process (embedded) or in the user container (remote).

Both speak the same batch protocol (``statefn_core.wire``), so they have the same semantics.
"""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from statefn import _function, _runtime
from statefn_core import wire


class InvokerUnavailable(Exception):
    """The function code could not be reached; the batch is retried, nothing is acked."""


class InvokerRefused(Exception):
    """The function server answered, but not with results (an error status, a malformed answer).

    Waiting would not change that: the batch's invocations fail (and are retried by their policy,
    then dead-lettered) instead of the batch being retried forever.
    """


def unavailable(exc: BaseException) -> bool:
    """What waiting for the function server gets past: it is not up (yet, or any more)."""
    return isinstance(exc, InvokerUnavailable)


class Invoker(Protocol):
    async def describe(self) -> dict[str, dict[str, Any]]: ...

    async def execute(self, request: wire.BatchRequest) -> wire.BatchResponse: ...

    async def close(self) -> None: ...


class EmbeddedInvoker:
    """Runs the App's handlers in the sidecar's event loop (``statefn dev``, tests, benchmarks)."""

    def __init__(self, app: _function.App) -> None:
        self.app = app

    async def describe(self) -> dict[str, dict[str, Any]]:
        return self.app.describe()

    async def execute(self, request: wire.BatchRequest) -> wire.BatchResponse:
        return await _runtime.execute(self.app, request)

    async def close(self) -> None:
        return None


class RemoteInvoker:
    """Calls ``statefn serve`` in the user container over localhost HTTP with msgpack bodies."""

    CONTENT_TYPE = "application/x-msgpack"

    def __init__(self, url: str, *, connect_timeout: float = 5.0) -> None:
        self.url = url.rstrip("/")
        # How long a batch may take is the executor's to bound (it knows the handler timeout).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def describe(self) -> dict[str, dict[str, Any]]:
        try:
            async with self._http().get(f"{self.url}/discover") as resp:
                resp.raise_for_status()
                data: dict[str, dict[str, Any]] = await resp.json()
                return data
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise InvokerUnavailable(f"function server at {self.url} unreachable: {exc}") from exc

    async def execute(self, request: wire.BatchRequest) -> wire.BatchResponse:
        body = wire.encode_request(request)
        try:
            async with self._http().post(f"{self.url}/invoke", data=body,
                                         headers={"Content-Type": self.CONTENT_TYPE}) as resp:
                if resp.status in (502, 503, 504):  # starting, or a proxy in front of it that cannot reach it
                    raise InvokerUnavailable(f"function server answered {resp.status}: {await resp.text()}")
                if resp.status != 200:
                    raise InvokerRefused(f"the function server answered {resp.status}: {(await resp.text())[:2000]}")
                body = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise InvokerUnavailable(f"function server at {self.url} unreachable: {exc}") from exc
        try:
            response = wire.decode_response(body)
        except Exception as exc:  # any malformed answer, whatever the decoder trips on
            raise InvokerRefused(f"the function server's answer is malformed: {type(exc).__name__}: {exc}") from exc
        if [len(r) for r in response.results] != [len(k.invocations) for k in request.keys]:
            raise InvokerRefused("the function server's answer does not match the batch (results per key differ)")
        return response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
