"""``statefn.Client``: invoke, send and read state from outside the platform.

Every request carries an idempotency key (given or generated). ``invoke`` publishes its request
once (until JetStream has stored it), then waits: a stored request runs, even if its owner
crashes, so only its reply can be lost (the client's connection dropped while it was published).
So the client never re-sends a stored request; when no reply has come in ``retry_interval``, it
reads the request's idempotency record, then again at doubling intervals (at most 30 s), and
returns the reply found there. Another ``invoke`` with the same key is a new stream message
(``Nats-Msg-Id`` is ``<key>:<call>``, unique per call, so JetStream's duplicate window never
swallows it), and the owning sidecar answers it from the record instead of running it again.
So a retried ``invoke`` returns the original reply and has its effects once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

import aetcd
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from statefn import _tracecontext
from statefn_core import codec, connect, constants, envelope, errors, layout

_log = logging.getLogger("statefn.client")
# Waiting for a reply, the idempotency record is read after retry_interval, then at doubling intervals up to this.
_MAX_RECORD_CHECK_INTERVAL = 30.0


class Client:
    """A connection to the platform for callers outside it (scripts, services, the gateway)."""

    def __init__(
        self,
        nats: str = "nats://127.0.0.1:4222",
        etcd: str = "127.0.0.1:2379",
        *,
        retry_interval: float = 5.0,
        timeout: float = constants.DEFAULT_INVOKE_TIMEOUT_S,
    ) -> None:
        self._nats_url = nats
        self._etcd_host, self._etcd_port = connect.parse_etcd_endpoint(etcd)
        self.retry_interval = retry_interval
        self.timeout = timeout
        self._nc: NatsClient | None = None
        self._etcd: aetcd.Client | None = None
        self._inbox = ""
        self._waiters: dict[str, asyncio.Future[envelope.Reply]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._nc = await nats.connect(self._nats_url, max_reconnect_attempts=-1, name="statefn-client")
        self._etcd = aetcd.Client(host=self._etcd_host, port=self._etcd_port, timeout=10)
        await self._etcd.connect()
        self._inbox = f"_INBOX.statefn.{uuid.uuid4().hex}"
        await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)

    async def close(self) -> None:
        if self._nc is not None:
            await self._nc.drain()
            self._nc = None
        if self._etcd is not None:
            await self._etcd.close()
            self._etcd = None

    @property
    def nats(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("Client is not connected; use 'async with Client(...)' or 'await connect()'")
        return self._nc

    @property
    def etcd(self) -> aetcd.Client:
        if self._etcd is None:
            raise RuntimeError("Client is not connected; use 'async with Client(...)' or 'await connect()'")
        return self._etcd

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        fut = self._waiters.get(token)
        if fut is not None and not fut.done():
            try:
                fut.set_result(envelope.Reply.decode(msg.data))
            except errors.CodecError as exc:
                _log.warning("undecodable reply on %s: %s", msg.subject, exc)

    # ---- function metadata ----
    async def describe(self, function: str, *, refresh: bool = False) -> dict[str, Any]:
        """The function's published metadata (partitions, handlers, states)."""
        ftype = layout.FunctionType.parse(function)
        if refresh or function not in self._meta:
            got = await self.etcd.get(ftype.meta_key.encode())
            if got is None:
                raise errors.UnknownFunction(
                    f"unknown function {function}: no sidecar has registered it "
                    f"(no {ftype.meta_key} in etcd)"
                )
            self._meta[function] = json.loads(got.value)
        return self._meta[function]

    async def list_functions(self) -> list[dict[str, Any]]:
        """Every registered function's metadata: one read of the registrations, never of any state."""
        return [json.loads(kv.value) for kv in await self.etcd.get_prefix(layout.REGISTRY_PREFIX.encode())]

    async def _subject(self, function: str, key: str) -> str:
        meta = await self.describe(function)
        ftype = layout.FunctionType.parse(function)
        return ftype.ingress_subject(layout.partition_of(key, int(meta["partitions"])))

    async def _publish(self, subject: str, msg: envelope.Message, msg_id: str) -> None:
        body, headers = envelope.encode_invoke(msg)
        headers[constants.HEADER_MSG_ID] = msg_id
        limit = self.nats.max_payload
        if len(body) > limit:
            raise errors.PayloadTooLarge(
                f"the request to {subject} is {len(body)} bytes; the NATS server accepts at most {limit} bytes"
            )
        await self.nats.jetstream().publish(subject, body, headers=headers)

    async def _recorded_reply(self, function: str, msg: envelope.Message) -> envelope.Reply | None:
        """The reply the invocation's idempotency record holds, once it has one (a lost reply, found again)."""
        assert msg.idempotency_key is not None
        ftype = layout.FunctionType.parse(function)
        partitions = int((await self.describe(function))["partitions"])
        keys = layout.PartitionKeys(ftype, layout.partition_of(msg.key, partitions))
        got = await self.etcd.get(keys.idempotency(envelope.idempotency_id(msg.key, msg.handler, msg.idempotency_key)))
        if got is None:
            return None
        record = envelope.Record.decode(got.value)
        if record.fingerprint != envelope.fingerprint(msg):
            return envelope.mismatch_reply(msg.idempotency_key)
        return None if record.reply is None else envelope.Reply.decode(record.reply)

    # ---- the API ----
    async def send(
        self, function: str, key: str, handler: str, /, *, idempotency_key: str | None = None,
        traceparent: str | None = None, **args: Any,
    ) -> str:
        """Enqueue a one-way invocation; returns its idempotency key once JetStream stored it."""
        return await self.send_raw(function, key, handler, args=args, idempotency_key=idempotency_key,
                                   traceparent=traceparent)

    async def send_raw(
        self, function: str, key: str, handler: str, /, *, args: dict[str, Any],
        idempotency_key: str | None = None, traceparent: str | None = None,
    ) -> str:
        """Like send, with the arguments apart from the options (a handler may take an argument named ``key``)."""
        idem = _idempotency_key(idempotency_key)
        msg = envelope.Message(key=key, handler=handler, args={k: codec.to_plain(v) for k, v in args.items()},
                                idempotency_key=idem, traceparent=traceparent or _tracecontext.current_traceparent())
        # The same id for every send of this key: JetStream stores a repeated send once.
        await self._publish(await self._subject(function, key), msg, f"{idem}:0")
        return idem

    async def invoke(
        self, function: str, key: str, handler: str, /, *, idempotency_key: str | None = None,
        timeout: float | None = None, traceparent: str | None = None, **args: Any,
    ) -> Any:
        """Invoke and wait for the reply; raises InvocationFailed with the handler's error."""
        reply = await self.invoke_raw(function, key, handler, idempotency_key=idempotency_key,
                                      timeout=timeout, traceparent=traceparent, args=args)
        if not reply.ok:
            assert reply.error is not None
            raise errors.InvocationFailed(reply.error.kind, reply.error.message, error_type=reply.error.type)
        return None if reply.value is None else codec.unpack(reply.value)

    async def invoke_raw(
        self, function: str, key: str, handler: str, /, *, args: dict[str, Any],
        idempotency_key: str | None = None, timeout: float | None = None, traceparent: str | None = None,
    ) -> envelope.Reply:
        """Like invoke, but returns the reply envelope, with the arguments apart from the options (the gateway's)."""
        idem = _idempotency_key(idempotency_key)
        token = uuid.uuid4().hex
        msg = envelope.Message(
            key=key, handler=handler, args={k: codec.to_plain(v) for k, v in args.items()},
            idempotency_key=idem, reply_to=f"{self._inbox}.{token}",
            traceparent=traceparent or _tracecontext.current_traceparent(),
        )
        subject = await self._subject(function, key)
        fut: asyncio.Future[envelope.Reply] = asyncio.get_running_loop().create_future()
        self._waiters[token] = fut
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        published = False
        wait = self.retry_interval
        checks = 0
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    how = f"its record checked {checks} times" if published else "never stored: every publish failed"
                    raise errors.InvocationTimeout(
                        f"no reply from {function}({key!r}).{handler} within the timeout "
                        f"(idempotency key {idem!r}; {how})"
                    )
                if not published:
                    try:
                        # Unique to this call: another invoke with the same key must reach the sidecar (to be
                        # answered from the record), not be dropped by JetStream's duplicate window.
                        await self._publish(subject, msg, f"{idem}:{token[:12]}")
                        published = True
                    except (TimeoutError, nats.errors.Error, nats.js.errors.Error) as exc:
                        _log.info("publish of %s failed (%s); retrying", idem, exc)
                        await asyncio.sleep(min(0.5, max(remaining, 0)))
                    continue
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), min(wait, remaining))
                except TimeoutError:
                    # Stored, so it runs (a crashed owner's successor takes it); only its reply can be lost
                    # (our connection dropped while it was published). The record has it once it is done.
                    checks += 1
                    try:
                        recorded = await self._recorded_reply(function, msg)
                    except Exception as exc:
                        if not connect.etcd_transient(exc):
                            raise
                        # etcd unreachable or restarting: the record is not known yet, not absent. Keep waiting.
                        _log.info("reading the record of %s failed (%s); waiting on", idem, type(exc).__name__)
                        recorded = None
                    if recorded is not None:
                        return recorded
                    wait = min(wait * 2, _MAX_RECORD_CHECK_INTERVAL)
        finally:
            self._waiters.pop(token, None)

    async def get_state(self, function: str, key: str) -> dict[str, Any]:
        """The committed state of one key, decoded to plain values (defaults are not filled in)."""
        ftype = layout.FunctionType.parse(function)
        prefix = ftype.state_prefix(key)
        out: dict[str, Any] = {}
        for kv in await self.etcd.get_prefix(prefix.encode()):
            out[kv.key.decode()[len(prefix):]] = codec.unpack(kv.value)
        return out


def _idempotency_key(given: str | None) -> str:
    """The caller's idempotency key, or a fresh one; a key the platform reserves for itself is refused."""
    if given is None:
        return uuid.uuid4().hex
    if not isinstance(given, str) or not given:
        raise ValueError(f"an idempotency key must be a non-empty string, not {given!r}")
    if given.startswith(constants.RESERVED_IDEMPOTENCY_PREFIX):
        raise ValueError(f"idempotency keys starting with {constants.RESERVED_IDEMPOTENCY_PREFIX!r} are reserved "
                         f"for the platform: {given!r}")
    return given
