"""What a handler author relies on: replies, state, sends, idempotency, retries, dead letters."""

from __future__ import annotations

import asyncio
import dataclasses

import nats
import nats.errors
import pydantic
import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import codec, constants, envelope, layout
from tests import helpers


@dataclasses.dataclass
class Address:
    street: str
    city: str


class Profile(pydantic.BaseModel):
    name: str
    tags: list[str] = []


def make_app(ns: str) -> tuple[statefn.App, dict[str, int]]:
    calls: dict[str, int] = {"flaky": 0, "boom": 0}
    account = StatefulFunction(f"{ns}/account", max_attempts=3, backoff_initial=0.05)
    balance = account.state("balance", int, default=0)
    history = account.state("history", list[int], default=[])
    address = account.state("address", Address | None, default=None)
    profile = account.state("profile", Profile | None, default=None)
    blob = account.state("blob", bytes, default=b"")

    @account.handler
    async def deposit(ctx: Context, amount: int) -> int:
        ctx[balance] += amount
        ctx[history].append(amount)
        return ctx[balance]

    @account.handler
    async def transfer(ctx: Context, to: str, amount: int) -> int:
        ctx[balance] -= amount
        ctx.send(f"{ns}/account", to, "deposit", amount=amount)
        return ctx[balance]

    @account.handler
    async def later(ctx: Context, amount: int, after: float) -> None:
        ctx.send(f"{ns}/account", ctx.key, "deposit", delay=after, amount=amount)

    @account.handler
    async def set_address(ctx: Context, value: Address, who: Profile) -> Profile:
        ctx[address] = value
        ctx[profile] = who
        return who

    @account.handler
    async def show(ctx: Context) -> dict[str, object]:
        return {"address": ctx[address], "profile": ctx[profile]}

    @account.handler
    async def flaky(ctx: Context, fail_times: int) -> int:
        calls["flaky"] += 1
        ctx[balance] += 1000  # must be dropped on every failed attempt
        if calls["flaky"] <= fail_times:
            raise statefn.Retry(f"not yet ({calls['flaky']})")
        ctx[balance] -= 999
        return ctx[balance]

    @account.handler
    async def boom(ctx: Context) -> None:
        calls["boom"] += 1
        ctx[balance] += 5
        raise ValueError("the handler broke")

    @account.handler
    async def grow(ctx: Context, size: int) -> int:
        ctx[blob] = b"x" * size
        return size

    @account.handler
    async def send_nowhere(ctx: Context) -> None:
        ctx.send("nosuch/function", "k", "h")

    @account.handler
    async def echo_big(ctx: Context, size: int) -> bytes:
        ctx[balance] += 1  # must not commit: the reply cannot be delivered
        return b"r" * size

    @account.handler
    async def send_big(ctx: Context, to: str, size: int, after: float = 0.0) -> None:
        ctx[balance] += 1
        ctx.send(f"{ns}/account", to, "note", delay=after, text="t" * size)

    @account.handler
    async def note(ctx: Context, text: str) -> int:
        ctx[history].append(len(text))
        return len(text)

    return statefn.App(account), calls


@pytest.fixture
async def env(nats_server, etcd_server, namespace):
    app, calls = make_app(namespace)
    async with helpers.running_sidecar(app, nats_server, etcd_server, max_state_bytes=1024) as sc, \
            helpers.client(nats_server, etcd_server, retry_interval=2.0, timeout=20) as c:
        yield c, f"{namespace}/account", calls, sc


async def test_reply_state_and_typed_values(env) -> None:
    c, fn, _, _ = env
    assert await c.invoke(fn, "alice", "deposit", amount=5) == 5
    assert await c.invoke(fn, "alice", "deposit", amount=7) == 12
    assert await c.get_state(fn, "alice") == {"balance": 12, "history": [5, 7]}
    who = await c.invoke(fn, "alice", "set_address", value=Address("Main St 1", "Oslo"),
                         who=Profile(name="Alice", tags=["vip"]))
    assert who == {"name": "Alice", "tags": ["vip"]}
    assert await c.invoke(fn, "alice", "show") == {
        "address": {"street": "Main St 1", "city": "Oslo"}, "profile": {"name": "Alice", "tags": ["vip"]}}


async def test_send_is_delivered_once_to_another_key(env) -> None:
    c, fn, _, _ = env
    await c.invoke(fn, "a", "deposit", amount=100)
    for _ in range(10):
        await c.invoke(fn, "a", "transfer", to="b", amount=3)
    for _ in range(50):
        if (await c.get_state(fn, "b")).get("balance") == 30:
            break
        await asyncio.sleep(0.1)
    assert (await c.get_state(fn, "a"))["balance"] == 70
    assert (await c.get_state(fn, "b")) == {"balance": 30, "history": [3] * 10}


async def test_delayed_send(env) -> None:
    c, fn, _, _ = env
    await c.invoke(fn, "d", "later", amount=4, after=0.5)
    assert await c.get_state(fn, "d") == {}
    for _ in range(50):
        if await c.get_state(fn, "d") == {"balance": 4, "history": [4]}:
            break
        await asyncio.sleep(0.1)
    assert await c.get_state(fn, "d") == {"balance": 4, "history": [4]}


async def test_idempotency_key_returns_original_reply_and_runs_once(env) -> None:
    c, fn, _, _ = env
    first = await c.invoke(fn, "i", "deposit", amount=10, idempotency_key="req-1")
    again = await c.invoke(fn, "i", "deposit", amount=10, idempotency_key="req-1")
    assert first == again == 10
    # The same key with other arguments is not a retry but another request under a used key: refused.
    with pytest.raises(statefn.InvocationFailed) as refused:
        await c.invoke(fn, "i", "deposit", amount=99, idempotency_key="req-1")
    assert refused.value.kind == statefn.ErrorKind.IDEMPOTENCY_MISMATCH
    assert (await c.get_state(fn, "i"))["balance"] == 10
    # It names one request to one key's handler: on another key it is another request.
    assert await c.invoke(fn, "j", "deposit", amount=99, idempotency_key="req-1") == 99


async def test_a_repeated_invoke_is_answered_without_waiting_for_a_resend(nats_server, etcd_server, namespace) -> None:
    """A caller that invokes again with the same key (after its own timeout, say) gets the record at once.

    Its publish must reach the sidecar: were its message id the one an earlier call used, JetStream's
    duplicate window would drop it, and only a re-send retry_interval later (here: never) would get through.
    """
    app, _ = make_app(namespace)
    fn = f"{namespace}/account"
    async with helpers.running_sidecar(app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, retry_interval=60, timeout=10) as c:
        assert await c.invoke(fn, "rep", "deposit", amount=4, idempotency_key="rep-1") == 4
        for _ in range(2):
            assert await c.invoke(fn, "rep", "deposit", amount=4, idempotency_key="rep-1") == 4
        assert (await c.get_state(fn, "rep"))["balance"] == 4


async def test_idempotency_across_sidecar_restart(nats_server, etcd_server, namespace) -> None:
    """The record is in etcd, not in the sidecar's memory: a new sidecar still answers from it."""
    fn = f"{namespace}/account"
    async with helpers.client(nats_server, etcd_server, timeout=20) as c:
        app, _ = make_app(namespace)
        async with helpers.running_sidecar(app, nats_server, etcd_server):
            assert await c.invoke(fn, "r", "deposit", amount=3, idempotency_key="k1") == 3
        app, _ = make_app(namespace)
        async with helpers.running_sidecar(app, nats_server, etcd_server):
            assert await c.invoke(fn, "r", "deposit", amount=3, idempotency_key="k1") == 3
            assert await c.invoke(fn, "r", "deposit", amount=3, idempotency_key="k2") == 6
        # Found in etcd by the commit (not in a new owner's memory), other arguments are still refused.
        app, _ = make_app(namespace)
        async with helpers.running_sidecar(app, nats_server, etcd_server):
            with pytest.raises(statefn.InvocationFailed) as refused:
                await c.invoke(fn, "r", "deposit", amount=5, idempotency_key="k1")
            assert refused.value.kind == "idempotency_mismatch"
            assert (await c.get_state(fn, "r"))["balance"] == 6


async def test_retry_then_success_drops_failed_attempts_state(env) -> None:
    c, fn, calls, _ = env
    assert await c.invoke(fn, "f", "flaky", fail_times=2) == 1
    assert calls["flaky"] == 3
    assert (await c.get_state(fn, "f"))["balance"] == 1


async def test_retries_exhausted_dead_letters(env, nats_server) -> None:
    c, fn, calls, _ = env
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "g", "flaky", fail_times=100)
    assert err.value.kind == "retries_exhausted"
    assert err.value.message == "gave up after 3 attempts: not yet (3)"
    assert calls["flaky"] == 3
    assert await c.get_state(fn, "g") == {}
    letter = await _dead_letter(nats_server, fn, "g")
    assert letter["handler"] == "flaky" and letter["attempts"] == 3
    assert letter["error"]["kind"] == "retries_exhausted"


async def test_handler_exception_is_terminal(env, nats_server) -> None:
    c, fn, calls, _ = env
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "h", "boom")
    assert (err.value.kind, err.value.message, err.value.error_type) == (
        "handler_error", "the handler broke", "ValueError")
    assert calls["boom"] == 1
    assert await c.get_state(fn, "h") == {}
    assert (await _dead_letter(nats_server, fn, "h"))["error"]["message"] == "the handler broke"


async def test_unknown_handler_and_bad_arguments(env) -> None:
    c, fn, _, _ = env
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "u", "nope")
    assert err.value.kind == "unknown_handler"
    assert "has no handler 'nope'; known handlers: boom, deposit, echo_big, flaky" in err.value.message
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "u", "deposit", amount="lots")
    assert err.value.kind == "invalid_argument"
    assert err.value.message == (f"{fn}.deposit: amount: Input should be a valid integer, "
                                 "unable to parse string as an integer")
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "u", "deposit", amount=1, extra=2)
    assert err.value.message == f"{fn}.deposit: extra: Extra inputs are not permitted"
    with pytest.raises(statefn.UnknownFunction):
        await c.invoke("nosuch/function", "u", "deposit", amount=1)


async def test_state_over_limit_writes_nothing(env, nats_server) -> None:
    c, fn, _, _ = env
    assert await c.invoke(fn, "s", "grow", size=100) == 100
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "s", "grow", size=5000)
    assert err.value.kind == "state_too_large"
    assert err.value.message == (f"state {fn}:blob of key 's' would be 5003 bytes; the limit is 1024 bytes")
    assert await c.get_state(fn, "s") == {"blob": b"x" * 100}
    assert (await _dead_letter(nats_server, fn, "s"))["error"]["kind"] == "state_too_large"


async def test_send_to_unknown_function_fails_the_invocation(env) -> None:
    c, fn, _, _ = env
    with pytest.raises(statefn.InvocationFailed) as err:
        await c.invoke(fn, "n", "send_nowhere")
    assert err.value.kind == "unknown_function"
    assert "unknown function nosuch/function" in err.value.message


async def test_undecodable_payload_is_dead_lettered(env, nats_server) -> None:
    c, fn, _, _ = env
    meta = await c.describe(fn)
    ftype = layout.FunctionType.parse(fn)
    subject = ftype.ingress_subject(0)
    nc = await nats.connect(nats_server.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.jetstream().publish(subject, b"\xc1 not msgpack",
                                     headers={constants.HEADER_REPLY_TO: inbox})
        reply = envelope.Reply.decode((await sub.next_msg(timeout=10)).data)
    finally:
        await nc.close()
    assert meta["partitions"] == 4
    assert not reply.ok and reply.error is not None and reply.error.kind == "undecodable"
    letter = await _dead_letter(nats_server, fn, None)
    assert letter["error"]["kind"] == "undecodable" and letter["raw"] == b"\xc1 not msgpack"


async def test_payload_over_max_payload_is_a_clear_error(env) -> None:
    c, fn, _, _ = env
    with pytest.raises(statefn.PayloadTooLarge) as err:
        await c.invoke(fn, "big", "deposit", amount=1, padding="x" * (2 * 1024 * 1024))
    assert str(err.value).endswith("bytes; the NATS server accepts at most 1048576 bytes")


@pytest.mark.parametrize("what", ["reply", "send", "delayed send"])
async def test_a_message_over_max_payload_fails_its_invocation_not_its_partition(env, nats_server, what) -> None:
    """Committed, a reply or message larger than NATS carries could never be published: the reply publish
    raised on every redelivery, and an outbox entry was retried forever with its channel blocked behind it.
    Now it is refused before the commit, with a clear error and a dead letter; nothing of it is applied."""
    c, fn, _, _ = env
    size = 1024 * 1024 + 10
    with pytest.raises(statefn.InvocationFailed) as err:
        if what == "reply":
            await c.invoke(fn, "big", "echo_big", size=size)
        else:
            await c.invoke(fn, "big", "send_big", to="small", size=size, after=0.2 if what == "delayed send" else 0.0)
    assert err.value.kind == statefn.ErrorKind.PAYLOAD_TOO_LARGE and "NATS carries at most" in err.value.message
    assert (await c.get_state(fn, "big")).get("balance") is None
    letter = await _dead_letter(nats_server, fn, "big")
    assert letter["error"]["kind"] == "payload_too_large"  # type: ignore[index]
    # The partition and the channel keep serving: a message of a good size goes through, to the same key.
    await c.invoke(fn, "big", "send_big", to="small", size=1000)
    for _ in range(50):
        if (await c.get_state(fn, "small")).get("history") == [1000]:
            break
        await asyncio.sleep(0.1)
    assert (await c.get_state(fn, "small"))["history"] == [1000]
    assert (await c.get_state(fn, "big"))["balance"] == 1


async def _dead_letter(nats_server, fn: str, key: str | None) -> dict[str, object]:
    """Wait for the dead letter of ``key`` (published from the outbox after the commit)."""
    ftype = layout.FunctionType.parse(fn)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for _ in range(100):
            try:
                msg = await js.get_last_msg(constants.DLQ_STREAM, ftype.dlq_subject)
            except nats.js.errors.NotFoundError:
                await asyncio.sleep(0.1)
                continue
            letter: dict[str, object] = codec.unpack(msg.data)
            if letter["key"] == key:
                return letter
            await asyncio.sleep(0.1)
        raise AssertionError(f"no dead letter for {fn} key {key!r}")
    finally:
        await nc.close()
