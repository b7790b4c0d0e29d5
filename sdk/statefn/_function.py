"""Declaring functions: ``StatefulFunction``, its state specs and handlers, and the ``App``.

A handler is a plain (async) Python function taking a :class:`~statefn.Context` first and its
arguments by keyword. Its signature becomes a pydantic model, so arguments are validated with
field-level errors and a JSON schema can be published for the gateway.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

import pydantic

from statefn import _state
from statefn_core import constants, errors, layout

T = TypeVar("T")
HandlerFn = Callable[..., Any]
F = TypeVar("F", bound=HandlerFn)


@dataclasses.dataclass(frozen=True)
class HandlerSpec:
    name: str
    fn: HandlerFn
    is_async: bool
    args_model: type[pydantic.BaseModel]
    returns: Any

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()


# The keyword options of the calling APIs (ctx.call/send, saga and transaction calls, Client.invoke/send):
# a handler parameter of one of these names could not be passed through them. (Their function, key and
# handler are positional-only, so parameters named so are fine.)
RESERVED_PARAMETERS = frozenset({"timeout", "delay", "compensate", "idempotency_key", "traceparent"})


def _args_model(function: str, name: str, fn: HandlerFn) -> tuple[type[pydantic.BaseModel], Any]:
    sig = inspect.signature(fn, eval_str=True)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise errors.DefinitionError(f"handler {function}.{name} must take the Context as first argument")
    fields: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise errors.DefinitionError(f"handler {function}.{name}: *args/**kwargs are not supported")
        if p.name in RESERVED_PARAMETERS:
            raise errors.DefinitionError(
                f"handler {function}.{name}: a parameter may not be named {p.name!r}, an option of ctx.call, "
                f"ctx.send and Client.invoke (reserved: {', '.join(sorted(RESERVED_PARAMETERS))}); rename it")
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    model = pydantic.create_model(
        f"{function.replace('/', '_').replace('-', '_')}__{name}__args",
        __config__=pydantic.ConfigDict(extra="forbid"),
        **fields,
    )
    returns = Any if sig.return_annotation is inspect.Signature.empty else sig.return_annotation
    return model, returns


class StatefulFunction:
    """A function type whose instances are addressed by key and keep declared state per key.

    ``max_attempts`` bounds how often an invocation that raises :class:`statefn.Retry` is tried
    before it is dead-lettered; retries back off exponentially from ``backoff_initial`` seconds
    up to ``backoff_max``. A handler run longer than ``handler_timeout`` seconds is abandoned: the
    attempt fails with kind ``handler_timeout`` and is retried the same way, and its key is free
    meanwhile (a synchronous handler's thread cannot be stopped; it runs on, its results ignored).
    A durable call without its own ``timeout=`` waits at most ``call_timeout`` seconds.
    """

    def __init__(
        self,
        type: str,
        *,
        max_attempts: int = constants.DEFAULT_MAX_ATTEMPTS,
        backoff_initial: float = constants.DEFAULT_BACKOFF_INITIAL_S,
        backoff_max: float = constants.DEFAULT_BACKOFF_MAX_S,
        handler_timeout: float = constants.DEFAULT_HANDLER_TIMEOUT_S,
        call_timeout: float = constants.DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        self.type = layout.FunctionType.parse(type)
        if max_attempts < 1:
            raise errors.DefinitionError(f"{type}: max_attempts must be >= 1")
        self.max_attempts = max_attempts
        if not handler_timeout > 0:
            raise errors.DefinitionError(f"{type}: handler_timeout must be > 0 seconds")
        self.handler_timeout = float(handler_timeout)
        if not call_timeout > 0:
            raise errors.DefinitionError(f"{type}: call_timeout must be > 0 seconds")
        self.call_timeout = float(call_timeout)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.states: dict[str, _state.StateSpec[Any]] = {}
        self.handlers: dict[str, HandlerSpec] = {}

    def __repr__(self) -> str:
        return f"StatefulFunction({str(self.type)!r})"

    def state(self, name: str, tp: type[T] | Any, *, default: T) -> _state.StateSpec[T]:
        """Declare a per-key state value; returns the spec to index the context with."""
        if name in self.states:
            raise errors.DefinitionError(f"{self.type}: state {name!r} declared twice")
        spec: _state.StateSpec[T] = _state.StateSpec.declare(str(self.type), name, tp, default)
        self.states[name] = spec
        return spec

    @overload
    def handler(self, fn: F, /) -> F: ...
    @overload
    def handler(self, fn: None = None, /, *, name: str | None = None) -> Callable[[F], F]: ...

    def handler(self, fn: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
        """Register a handler; usable bare (``@fn.handler``) or with a name (``@fn.handler(name=...)``)."""

        def decorator(f: F) -> F:
            hname = name or f.__name__
            if not hname or hname.startswith("~"):
                raise errors.DefinitionError(f"{self.type}: handler name {hname!r} is reserved or empty")
            if hname in self.handlers:
                raise errors.DefinitionError(f"{self.type}: handler {hname!r} registered twice")
            model, returns = _args_model(str(self.type), hname, f)
            self.handlers[hname] = HandlerSpec(
                name=hname,
                fn=f,
                is_async=inspect.iscoroutinefunction(f),
                args_model=model,
                returns=returns,
            )
            return f

        return decorator(fn) if fn is not None else decorator

    def describe(self) -> dict[str, Any]:
        """What the sidecar publishes to etcd so gateways and tools know the function."""
        return {
            "type": str(self.type),
            "max_attempts": self.max_attempts,
            "backoff_initial": self.backoff_initial,
            "backoff_max": self.backoff_max,
            "handler_timeout": self.handler_timeout,
            "states": sorted(self.states),
            "handlers": {n: {"parameters": h.json_schema()} for n, h in sorted(self.handlers.items())},
        }


class App:
    """The set of functions one process serves (``statefn serve module:app``)."""

    def __init__(self, *functions: StatefulFunction | Iterable[StatefulFunction]) -> None:
        self.functions: dict[str, StatefulFunction] = {}
        for f in functions:
            for fn in [f] if isinstance(f, StatefulFunction) else f:
                if str(fn.type) in self.functions:
                    raise errors.DefinitionError(f"function {fn.type} added to the app twice")
                self.functions[str(fn.type)] = fn

    def __repr__(self) -> str:
        return f"App({', '.join(self.functions)})"

    def describe(self) -> dict[str, Any]:
        return {name: fn.describe() for name, fn in self.functions.items()}
