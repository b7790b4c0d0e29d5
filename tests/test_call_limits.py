"""What a durable call cannot do to its caller: wait on a cycle, wait forever, or mistake arguments for options.

A call that comes back to a key waiting on it fails at once, and every call has a timeout.

Before, A(k) calling B(k) calling A(k) waited forever: A's key stays locked until A answers, so
B's call queued in A's inbox behind the invocation waiting for B (and, without a timeout, nothing
ever ended it). Arguments named like a call's parameters or options were a TypeError or were
silently taken as the option.
"""

from __future__ import annotations

import time

import pytest

import statefn
from statefn import Context, StatefulFunction, _context
from statefn_core import errors
from tests import helpers


def make_app(ns: str) -> statefn.App:
    a = StatefulFunction(f"{ns}/a", max_attempts=1)
    b = StatefulFunction(f"{ns}/b", max_attempts=1, call_timeout=42.0)
    c = StatefulFunction(f"{ns}/c", max_attempts=1)

    @a.handler
    async def start(ctx: Context, via: str) -> str:
        return str(await ctx.call(f"{ns}/{via}", ctx.key, "relay", back=f"{ns}/a"))

    @a.handler
    async def ping(ctx: Context) -> str:
        return "pong"

    @b.handler
    async def relay(ctx: Context, back: str) -> str:
        try:
            return str(await ctx.call(back, ctx.key, "ping"))
        except statefn.CallFailed as exc:
            return f"{exc.kind}: {exc.message}"

    @c.handler
    async def relay(ctx: Context, back: str) -> str:  # noqa: F811 (c's own handler of that name)
        return str(await ctx.call(f"{ns}/b", ctx.key, "relay", back=back))

    return statefn.App(a, b, c)


async def test_a_call_back_to_a_waiting_key_fails_at_once(nats_server, etcd_server, namespace) -> None:
    async with helpers.running_sidecar(make_app(namespace), nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        started = time.monotonic()
        direct = await c.invoke(f"{namespace}/a", "k", "start", via="b")
        assert direct == (f"call_cycle: a call cycle: {namespace}/a('k') -> {namespace}/b('k') -> {namespace}/a('k'); "
                          f"{namespace}/a('k') waits for this call's caller, so its key stays locked and the call "
                          "could never run")
        # Through one more hop: a -> c -> b -> a.
        longer = await c.invoke(f"{namespace}/a", "k2", "start", via="c")
        assert longer.startswith(f"call_cycle: a call cycle: {namespace}/a('k2') -> {namespace}/c('k2') -> "
                                 f"{namespace}/b('k2') -> {namespace}/a('k2');")
        assert time.monotonic() - started < 10
        # Another key of the same function is no cycle.
        assert await c.invoke(f"{namespace}/b", "k3", "relay", back=f"{namespace}/a") == "pong"


def test_a_call_without_a_timeout_gets_its_functions_default() -> None:
    ctx = _context.Context(function="ns/b", key="k", specs={}, stored={}, call_timeout=42.0)
    with pytest.raises(errors.Suspended):
        ctx._call("ns/a", "k", "ping", {}, "").__await__().send(None)
    assert [c.timeout for c in ctx._calls] == [42.0] and ctx._waiting == 0
    explicit = _context.Context(function="ns/b", key="k", specs={}, stored={})
    with pytest.raises(errors.Suspended):
        explicit._call("ns/a", "k", "ping", {}, "", timeout=3.0).__await__().send(None)
    assert [c.timeout for c in explicit._calls] == [3.0] and explicit._waiting == 0


def test_a_cycle_is_found_in_the_chain_before_anything_is_journaled() -> None:
    ctx = _context.Context(function="ns/b", key="k", specs={}, stored={}, chain=[["ns/a", "x"], ["ns/c", "y"]])
    with pytest.raises(statefn.CallFailed) as err:
        ctx._call("ns/a", "x", "ping", {}, "")  # raised when the call is made, before it is awaited
    assert err.value.kind == "call_cycle" and ctx._ops == 0
    assert ctx._calls == [] and ctx._recorded == [] and ctx._waiting is None
    with pytest.raises(errors.Suspended):  # a key not in the chain
        ctx._call("ns/a", "other", "ping", {}, "").__await__().send(None)
    assert [(c.key, c.index) for c in ctx._calls] == [("other", 0)]


def test_a_call_timeout_must_be_positive() -> None:
    with pytest.raises(statefn.DefinitionError, match="call_timeout must be > 0"):
        StatefulFunction("t/x", call_timeout=-1)


def test_handler_parameters_named_like_call_options_are_refused() -> None:
    fn = StatefulFunction("t/opts")
    for option in ("timeout", "delay", "compensate", "idempotency_key", "traceparent"):
        with pytest.raises(statefn.DefinitionError, match=f"may not be named '{option}', an option of ctx.call"):
            exec(f"async def h(ctx, {option}: int) -> None: ...\nfn.handler(h)", {"fn": fn})


async def test_arguments_named_function_key_or_handler_reach_the_handler(nats_server, etcd_server,
                                                                           namespace) -> None:
    """function, key and handler are positional-only in the calling APIs: arguments of those names are the
    handler's (before: a TypeError, 'got multiple values for argument')."""
    fn = StatefulFunction(f"{namespace}/names")

    @fn.handler
    async def echo(ctx: Context, function: str, key: str, handler: str) -> list[str]:
        return [function, key, handler]

    @fn.handler
    async def relay(ctx: Context) -> list[str]:
        ctx.send(f"{namespace}/names", "other", "echo", function="f", key="k", handler="h")
        return list(await ctx.call(f"{namespace}/names", "other", "echo", function="f2", key="k2", handler="h2"))

    async with helpers.running_sidecar(statefn.App(fn), nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        assert await c.invoke(f"{namespace}/names", "x", "echo", function="a", key="b", handler="c") == ["a", "b", "c"]
        assert await c.invoke(f"{namespace}/names", "x", "relay") == ["f2", "k2", "h2"]
