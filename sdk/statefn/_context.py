"""The context a handler gets: its address, its state, and the messages it sends.

State reads and writes are local and staged: nothing reaches etcd unless the invocation
succeeds, and then together with everything else the invocation did (one commit).
"""

from __future__ import annotations

from typing import Any, TypeVar

from statefn import _codec, _envelope, _errors, _naming, _saga, _state, _wire

T = TypeVar("T")
_MISSING: Any = object()


class Context:
    """Passed as the first argument to every handler."""

    __slots__ = ("_attempt", "_calls", "_function", "_invocation_id", "_journal", "_key", "_pending_call",
                 "_sends", "_specs", "_stored", "_values")

    def __init__(
        self,
        *,
        function: str,
        key: str,
        specs: dict[str, _state.StateSpec[Any]],
        stored: dict[str, bytes],
        invocation_id: str = "",
        attempt: int = 1,
        journal: list[bytes] | None = None,
    ) -> None:
        self._function = function
        self._key = key
        self._specs = specs
        self._stored = stored
        self._values: dict[str, Any] = {}
        self._sends: list[_wire.Outgoing] = []
        self._invocation_id = invocation_id
        self._attempt = attempt
        self._journal = journal or []
        self._calls = 0
        self._pending_call: _wire.Outgoing | None = None

    @property
    def key(self) -> str:
        """The key this instance is addressed by."""
        return self._key

    @property
    def function(self) -> str:
        """The function type, ``namespace/name``."""
        return self._function

    @property
    def attempt(self) -> int:
        """1 on the first try; grows with each retry after :class:`statefn.Retry`."""
        return self._attempt

    @property
    def invocation_id(self) -> str:
        return self._invocation_id

    def _spec(self, spec: _state.StateSpec[Any]) -> _state.StateSpec[Any]:
        own = self._specs.get(spec.name)
        if own is not spec:
            raise KeyError(
                f"state {spec.function}:{spec.name} is not declared by {self._function}; "
                f"declared: {sorted(self._specs) or 'none'}"
            )
        return own

    def __getitem__(self, spec: _state.StateSpec[T]) -> T:
        s = self._spec(spec)
        value = self._values.get(s.name, _MISSING)
        if value is _MISSING:
            raw = self._stored.get(s.name)
            value = s.fresh_default() if raw is None else s.codec.decode(raw)
            self._values[s.name] = value
        return value  # type: ignore[no-any-return]

    def __setitem__(self, spec: _state.StateSpec[T], value: T) -> None:
        self._values[self._spec(spec).name] = value

    def __delitem__(self, spec: _state.StateSpec[Any]) -> None:
        """Reset to the default; the stored value is removed."""
        s = self._spec(spec)
        self._values[s.name] = _MISSING_DELETED

    def send(
        self,
        function: str,
        key: str,
        handler: str,
        *,
        delay: float | None = None,
        **args: Any,
    ) -> None:
        """Send a one-way message; delivered exactly once after this invocation commits."""
        _naming.FunctionType.parse(function)
        if delay is not None and delay < 0:
            raise ValueError("delay must be >= 0 seconds")
        plain = {k: _codec.to_plain(v) for k, v in args.items()}
        self._sends.append(_wire.Outgoing(function=function, key=key, handler=handler, args=plain, delay=delay))

    async def call(self, function: str, key: str, handler: str, **args: Any) -> Any:
        """Invoke another function's handler and wait for its reply, durably.

        The call is committed with this invocation's progress and delivered exactly once; this
        key is locked until the invocation ends (later messages to it wait, in order). While the
        reply is outstanding the handler is unwound and later replayed from the start with the
        replies so far: code between calls must be deterministic. Raises :class:`CallFailed`
        when the callee ended in an error.
        """
        return await self._call(function, key, handler, args, "")

    def saga(self, *, compensation_rounds: int = 5) -> _saga.Saga:
        """Steps that each commit on their own, undone in reverse order if the block fails.

        ``async with ctx.saga() as saga: await saga.call(..., compensate=("cancel", {...}))``.
        Each compensation is a durable call, tried up to ``compensation_rounds`` times (each try
        includes the callee's own retries); what still fails is reported in :class:`SagaFailed`.
        """
        return _saga.Saga(self, compensation_rounds)

    async def _call(self, function: str, key: str, handler: str, args: dict[str, Any], purpose: str) -> Any:
        _naming.FunctionType.parse(function)
        if function == self._function and key == self._key:
            raise _errors.InvalidCall(
                f"{function}({key!r}) cannot call its own key: the key stays locked until this invocation "
                "ends, so the call could never run; use ctx.send for a message to self")
        index = self._calls
        self._calls += 1
        if index < len(self._journal):
            reply = _envelope.Reply.decode(self._journal[index])
            if reply.ok:
                return _codec.unpack(reply.value) if reply.value is not None else None
            err = reply.error
            assert err is not None
            raise _errors.CallFailed(err.kind, err.message, error_type=err.type,
                                     target=f"{function}({key!r}).{handler}")
        if self._pending_call is None:  # only the first unanswered call goes out (calls run one at a time)
            plain = {k: _codec.to_plain(v) for k, v in args.items()}
            self._pending_call = _wire.Outgoing(function=function, key=key, handler=handler, args=plain,
                                                purpose=purpose)
        raise _errors.Suspended()

    # ---- used by the runtime ----
    def _changes(self, max_state_bytes: int) -> dict[str, bytes | None]:
        """Re-encode every value the handler touched; mutations in place count as writes."""
        changes: dict[str, bytes | None] = {}
        for name, value in self._values.items():
            old = self._stored.get(name)
            if value is _MISSING_DELETED:
                if old is not None:
                    changes[name] = None
                continue
            encoded = self._specs[name].codec.encode(value)
            if len(encoded) > max_state_bytes:
                raise _errors.StateTooLarge(
                    f"state {self._function}:{name} of key {self._key!r} would be {len(encoded)} bytes; "
                    f"the limit is {max_state_bytes} bytes"
                )
            if encoded != old:
                changes[name] = encoded
        return changes


class _Deleted:
    def __repr__(self) -> str:
        return "<deleted>"


_MISSING_DELETED: Any = _Deleted()
