"""The handler context and its journal replay (statefn._context), driven directly and through _runtime.

A handler that awaits a durable call not answered yet is unwound there (``errors.Suspended``) and
later run again from the start, fed the journal: the replies (each in its call's slot; a call made
and not answered yet holds its slot as outstanding) and ``ctx.run``/``ctx.now`` results: this is what
makes calls exactly-once without threads or stored stacks, and it is only correct if a replay
returns exactly what the first run saw, refuses a run that diverged from its journal, and does not
repeat messages already sent. State reads and writes are staged in the context and turned into the
commit's changes by ``_changes``. Until now only integration tests with live servers reached this.
The contexts are built as ``_runtime._invoke_one`` builds them.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import pytest

import statefn
from statefn import _context, _runtime
from statefn_core import codec, constants, envelope, errors, wire

SELF = "test/cart"
counters = statefn.StatefulFunction(SELF)
total = counters.state("total", int, default=0)
items = counters.state("items", list[str], default=list[str]())
note = counters.state("note", str, default="")

other = statefn.StatefulFunction("test/other")
foreign_total = other.state("total", int, default=0)  # same name, another function's spec


@dataclasses.dataclass
class Line:
    sku: str
    qty: int


def make_ctx(journal: list[bytes] | None = None, *, stored: dict[str, bytes] | None = None, key: str = "k1",
             invocation_id: str = "inv-1") -> _context.Context:
    return _context.Context(function=SELF, key=key, specs=counters.states, stored=stored or {},
                            invocation_id=invocation_id, journal=journal)


def ok(value: Any) -> bytes:
    """A journaled call reply, as the sidecar stores it."""
    return envelope.Reply(ok=True, value=codec.pack(value)).encode()


def failed(kind: str, message: str, type_: str = "") -> bytes:
    return envelope.Reply(ok=False, error=wire.ErrorInfo(kind=kind, message=message, type=type_)).encode()


def answered(recorded: list[bytes], index: int, reply: bytes) -> list[bytes]:
    """A suspended run's new journal slots with a call's reply in its slot, as the sidecar journals it."""
    assert wire.outstanding_call(recorded[index]) is not None, "not an outstanding call's slot"
    journal = list(recorded)
    journal[index] = reply
    return journal


# ---- calls -----------------------------------------------------------------------------------------

async def test_a_call_without_a_journaled_reply_suspends_and_records_the_pending_call() -> None:
    ctx = make_ctx()
    call = ctx.call("test/prices", "apple", "quote", timeout=2.5, line=Line("a-1", 2), currency="EUR")
    made = wire.Outgoing(function="test/prices", key="apple", handler="quote",
                         args={"line": {"sku": "a-1", "qty": 2}, "currency": "EUR"},
                         purpose="", tx=None, timeout=2.5, index=0)
    assert ctx._calls == [made] and ctx._waiting is None  # made when called, before it is awaited
    with pytest.raises(errors.Suspended):
        await call
    assert ctx._calls == [made] and ctx._waiting == 0
    # Its journal slot holds it, outstanding, until its reply takes its place.
    assert ctx._sends == [] and ctx._recorded == [wire.outstanding_entry("test/prices", "apple", "quote")]


async def test_suspension_is_not_swallowed_by_a_handlers_except_exception() -> None:
    ctx = make_ctx()
    caught: list[BaseException] = []

    async def handler() -> None:
        try:
            await ctx.call("test/prices", "apple", "quote")
        except Exception as exc:  # what careless handler code writes
            caught.append(exc)

    with pytest.raises(errors.Suspended):
        await handler()
    assert caught == []
    assert not issubclass(errors.Suspended, Exception)


async def test_a_journaled_reply_is_returned_and_the_next_call_suspends() -> None:
    ctx = make_ctx([ok(5)])
    assert await ctx.call("test/prices", "apple", "quote") == 5
    with pytest.raises(errors.Suspended):
        await ctx.call("test/stock", "apple", "reserve", qty=5)
    assert [(c.function, c.handler, c.args, c.index) for c in ctx._calls] == [("test/stock", "reserve", {"qty": 5}, 1)]
    assert ctx._waiting == 1


async def test_replies_are_returned_in_journal_order_in_their_plain_form() -> None:
    ctx = make_ctx([ok({"sku": "a", "qty": 1}), envelope.Reply(ok=True).encode(), ok([1, 2])])
    assert await ctx.call("test/a", "k", "h") == {"sku": "a", "qty": 1}
    assert await ctx.call("test/b", "k", "h") is None  # a handler that returned nothing
    assert await ctx.call("test/c", "k", "h") == [1, 2]
    assert ctx._calls == [] and ctx._waiting is None and ctx._recorded == []


async def test_an_error_reply_raises_call_failed_with_its_kind_message_type_and_target() -> None:
    ctx = make_ctx([failed(errors.ErrorKind.HANDLER, "out of stock", "ValueError")])
    with pytest.raises(errors.CallFailed) as info:
        await ctx.call("test/stock", "apple", "reserve", qty=3)
    exc = info.value
    assert (exc.kind, exc.message, exc.error_type, exc.target) == (
        "handler_error", "out of stock", "ValueError", "test/stock('apple').reserve")
    assert exc.kind == errors.ErrorKind.HANDLER
    assert str(exc) == "test/stock('apple').reserve: handler_error: out of stock"
    assert not isinstance(exc, errors.TransactionAborted)


async def test_a_failed_call_can_be_caught_and_the_handler_goes_on_to_the_next_call() -> None:
    ctx = make_ctx([failed(errors.ErrorKind.CALL_TIMEOUT, "no reply within 1s"), ok("fallback")])
    with pytest.raises(errors.CallFailed) as info:
        await ctx.call("test/fast", "k", "h", timeout=1.0)
    assert info.value.kind == "call_timeout"
    assert await ctx.call("test/slow", "k", "h") == "fallback"


async def test_calls_made_before_the_first_await_all_go_out_and_nothing_runs_past_an_unanswered_await() -> None:
    ctx = make_ctx()
    ran: list[str] = []
    made: list[_context.DurableCall] = []

    async def handler() -> None:
        first = ctx.call("test/first", "k", "h")
        ran.append("between the calls")  # code goes on until it awaits a call not answered yet
        stamp = ctx.now()
        second = ctx.call("test/second", "k", "h", n=2)
        made.extend([first, second])
        await first  # not answered: the handler is unwound here
        ran.append(f"past the await {stamp}")
        await ctx.run("side-effect", lambda: ran.append("side-effect"))
        ctx.call("test/third", "k", "h")
        await second

    with pytest.raises(errors.Suspended):
        await handler()
    # Both calls go out, each with its journal slot; the one awaited is the one whose answer resumes it.
    assert [(c.function, c.args, c.index) for c in ctx._calls] == [("test/first", {}, 0), ("test/second", {"n": 2}, 2)]
    assert ctx._waiting == 0
    assert ran == ["between the calls"]  # nothing past the await ran: no run, no third call
    assert len(ctx._recorded) == 3
    assert ctx._recorded[0] == wire.outstanding_entry("test/first", "k", "h")
    assert codec.unpack(ctx._recorded[1])[:2] == ["~run", "~now"]
    assert ctx._recorded[2] == wire.outstanding_entry("test/second", "k", "h")
    # Awaiting another outstanding call afterwards does not move where it waits.
    with pytest.raises(errors.Suspended):
        await made[1]
    assert ctx._waiting == 0 and not made[0].done and not made[1].done


async def test_a_key_calling_itself_is_an_invalid_call_and_nothing_is_pending() -> None:
    ctx = make_ctx()
    with pytest.raises(errors.InvalidCall, match="cannot call its own key"):
        ctx.call(SELF, "k1", "add", n=1)  # refused when made, not when awaited
    assert ctx._calls == [] and ctx._waiting is None and ctx._recorded == [] and ctx._ops == 0
    assert isinstance(errors.InvalidCall("x"), ValueError)


async def test_the_same_function_under_another_key_or_another_function_under_the_same_key_may_be_called() -> None:
    ctx = make_ctx([ok(1)])
    assert await ctx.call(SELF, "k2", "add") == 1
    with pytest.raises(errors.Suspended):
        await ctx.call("test/other", "k1", "add")
    assert [(c.function, c.key, c.index) for c in ctx._calls] == [("test/other", "k1", 1)] and ctx._waiting == 1


@pytest.mark.parametrize("timeout", [0, -1.0])
async def test_a_call_timeout_must_be_positive(timeout: float) -> None:
    ctx = make_ctx()
    with pytest.raises(ValueError, match="timeout must be > 0"):
        ctx.call("test/prices", "apple", "quote", timeout=timeout)
    assert ctx._calls == [] and ctx._waiting is None and ctx._recorded == []


async def test_a_call_to_a_malformed_function_type_is_refused() -> None:
    with pytest.raises(errors.InvalidFunctionType):
        await make_ctx().call("NoSlash", "k", "h")


async def test_a_sleep_is_a_call_to_the_own_key_that_a_timer_answers() -> None:
    ctx = make_ctx()
    with pytest.raises(errors.Suspended):
        await ctx.sleep(2.0)
    assert ctx._calls == [wire.Outgoing(function=SELF, key="k1", handler=constants.SLEEP_HANDLER, args={},
                                        purpose=_context.SLEEP, timeout=2.0, index=0)]
    assert ctx._waiting == 0
    zero = make_ctx()
    with pytest.raises(errors.Suspended):
        await zero.sleep(0)
    assert [c.timeout for c in zero._calls] == [pytest.approx(0.001)]
    with pytest.raises(ValueError, match="seconds >= 0"):
        await make_ctx().sleep(-1)
    resumed = make_ctx([envelope.Reply(ok=True).encode()])
    assert await resumed.sleep(2.0) is None  # the timer's answer: the handler goes on


# ---- now, random, run ---------------------------------------------------------------------------

async def test_now_is_recorded_past_the_journal_and_replayed_from_it() -> None:
    first = make_ctx()
    before = time.time()
    t = first.now()
    assert before <= t <= time.time()
    assert len(first._recorded) == 1
    replay = make_ctx(list(first._recorded))
    assert replay.now() == t
    assert replay._recorded == []
    later = replay.now()  # past the journal again: a new reading, recorded
    assert later >= t and len(replay._recorded) == 1


async def test_run_calls_the_function_once_and_replays_return_its_result_without_calling_it() -> None:
    calls: list[str] = []

    def charge() -> dict[str, Any]:
        calls.append("charge")
        return {"receipt": "r-1", "amount": 5}

    async def fetch() -> Line:
        calls.append("fetch")
        return Line("a-1", 3)

    first = make_ctx()
    assert await first.run("charge", charge) == {"receipt": "r-1", "amount": 5}
    assert await first.run("fetch", fetch) == {"sku": "a-1", "qty": 3}  # the plain form, as a replay gets it
    assert calls == ["charge", "fetch"] and len(first._recorded) == 2

    replay = make_ctx(list(first._recorded))
    assert await replay.run("charge", charge) == {"receipt": "r-1", "amount": 5}
    assert await replay.run("fetch", fetch) == {"sku": "a-1", "qty": 3}
    assert calls == ["charge", "fetch"]  # not run again
    assert replay._recorded == []


async def test_a_run_returns_the_plain_form_even_on_its_first_run() -> None:
    first = make_ctx()
    got = await first.run("pair", lambda: (1, 2))
    assert got == [1, 2] and type(got) is list
    assert await make_ctx(list(first._recorded)).run("pair", lambda: (9, 9)) == [1, 2]


async def test_a_run_whose_result_msgpack_cannot_hold_is_a_codec_error() -> None:
    ctx = make_ctx()
    with pytest.raises(errors.CodecError):
        await ctx.run("bad", lambda: {1, 2})
    assert ctx._recorded == []


async def test_runs_and_call_replies_interleave_in_one_journal() -> None:
    # The sidecar journals a suspension's recorded runs and calls in order, the call's reply in its slot,
    # then the next ones.
    first = make_ctx()
    stamp = first.now()
    with pytest.raises(errors.Suspended):
        await first.call("test/prices", "apple", "quote")
    assert [c.index for c in first._calls] == [1] and first._waiting == 1
    journal = answered(first._recorded, 1, ok(7))

    second = make_ctx(journal)
    assert second.now() == stamp
    assert await second.call("test/prices", "apple", "quote") == 7
    token = await second.run("token", lambda: "t-42")
    with pytest.raises(errors.Suspended):
        await second.call("test/pay", "o-1", "charge", amount=7)
    assert second._recorded == [codec.pack(["~run", "token", "t-42"]), wire.outstanding_entry("test/pay", "o-1",
                                                                                                "charge")]
    assert [c.index for c in second._calls] == [3] and second._waiting == 3
    assert token == "t-42"


def test_random_is_seeded_by_the_invocation_id() -> None:
    a = [make_ctx(invocation_id="inv-1").random().random() for _ in range(2)]
    assert a[0] == a[1]
    ctx = make_ctx(invocation_id="inv-1")
    seq = [ctx.random().randint(0, 10**9) for _ in range(5)]
    again = make_ctx(invocation_id="inv-1")
    assert [again.random().randint(0, 10**9) for _ in range(5)] == seq  # one generator, continued
    other_id = make_ctx(invocation_id="inv-2")
    assert [other_id.random().randint(0, 10**9) for _ in range(5)] != seq
    assert ctx._recorded == []  # nothing journaled: the seed is enough


# ---- divergence -----------------------------------------------------------------------------------

async def test_a_replay_that_calls_something_where_a_run_was_fails_with_replay_diverged() -> None:
    first = make_ctx()
    await first.run("fetch", lambda: 1)
    replay = make_ctx(list(first._recorded))
    with pytest.raises(errors.ReplayDiverged, match=re.escape("step 1 is now a call test/prices.quote, its journal "
                                                              "holds run 'fetch'")):
        replay.call("test/prices", "apple", "quote")
    assert replay._calls == [] and replay._waiting is None and replay._recorded == []


async def test_a_replay_that_runs_under_another_name_fails_with_replay_diverged() -> None:
    first = make_ctx()
    await first.run("fetch", lambda: 1)
    with pytest.raises(errors.ReplayDiverged, match="now a run 'charge', its journal holds run 'fetch'"):
        await make_ctx(list(first._recorded)).run("charge", lambda: 2)


async def test_a_replay_that_runs_where_a_call_replied_fails_with_replay_diverged() -> None:
    calls: list[int] = []
    with pytest.raises(errors.ReplayDiverged, match="its journal holds a call's reply"):
        await make_ctx([ok(5)]).run("fetch", lambda: calls.append(1))
    assert calls == []


async def test_a_replay_that_reads_the_clock_where_a_run_was_fails_with_replay_diverged() -> None:
    first = make_ctx()
    await first.run("fetch", lambda: 1)
    with pytest.raises(errors.ReplayDiverged, match="now a run '~now'"):
        make_ctx(list(first._recorded)).now()


async def test_replay_diverged_is_an_ordinary_error_the_runtime_reports() -> None:
    assert issubclass(errors.ReplayDiverged, errors.StatefnError) and issubclass(errors.ReplayDiverged, Exception)


# ---- sends -----------------------------------------------------------------------------------------

def test_a_send_with_a_negative_delay_is_a_value_error_and_nothing_is_queued() -> None:
    ctx = make_ctx()
    with pytest.raises(ValueError, match="delay must be >= 0"):
        ctx.send("test/mail", "u-1", "notify", delay=-0.1, text="hi")
    assert ctx._sends == []


def test_sends_are_queued_in_order_with_plain_arguments() -> None:
    ctx = make_ctx()
    ctx.send("test/mail", "u-1", "notify", text="hi")
    ctx.send("test/stock", "apple", "restock", delay=0, line=Line("a", 1))
    ctx.send(SELF, "k1", "remind", delay=30.0)  # a message to self is fine (unlike a call)
    assert ctx._sends == [
        wire.Outgoing("test/mail", "u-1", "notify", {"text": "hi"}),
        wire.Outgoing("test/stock", "apple", "restock", {"line": {"sku": "a", "qty": 1}}, delay=0),
        wire.Outgoing(SELF, "k1", "remind", {}, delay=30.0),
    ]


def test_a_send_to_a_malformed_function_type_is_refused() -> None:
    ctx = make_ctx()
    with pytest.raises(errors.InvalidFunctionType):
        ctx.send("Test/Mail", "u-1", "notify")
    assert ctx._sends == []


# ---- state -----------------------------------------------------------------------------------------

def test_state_reads_the_stored_value_or_a_fresh_copy_of_the_default() -> None:
    ctx = make_ctx(stored={"total": codec.pack(41)})
    assert ctx[total] == 41
    assert ctx[items] == []
    ctx[items].append("x")  # a mutable default is a copy: no other key sees it
    assert items.default == []
    assert make_ctx()[items] == []


def test_writes_and_in_place_mutations_become_changes_and_untouched_values_do_not() -> None:
    stored = {"total": codec.pack(41), "items": codec.pack(["a"]), "note": codec.pack("keep")}
    ctx = make_ctx(stored=stored)
    ctx[total] += 1
    ctx[items].append("b")
    assert ctx[note] == "keep"  # read, not changed
    assert ctx._changes(1024) == {"total": codec.pack(42), "items": codec.pack(["a", "b"])}


def test_writing_back_the_stored_value_is_no_change() -> None:
    ctx = make_ctx(stored={"total": codec.pack(3), "items": codec.pack(["a"])})
    ctx[total] = 3
    ctx[items] = ["a"]
    assert ctx._changes(1024) == {}


def test_deleting_a_stored_value_removes_it_and_deleting_an_absent_one_changes_nothing() -> None:
    ctx = make_ctx(stored={"total": codec.pack(3)})
    del ctx[total]
    del ctx[note]
    assert ctx._changes(1024) == {"total": None}


def test_a_value_written_after_a_delete_is_stored() -> None:
    ctx = make_ctx(stored={"total": codec.pack(3)})
    del ctx[total]
    ctx[total] = 9
    assert ctx._changes(1024) == {"total": codec.pack(9)}


def test_reading_a_state_after_deleting_it_gives_the_default() -> None:
    ctx = make_ctx(stored={"total": codec.pack(3), "items": codec.pack(["a"])})
    del ctx[total]
    del ctx[items]
    assert ctx[total] == 0
    assert ctx[items] == []


def test_reading_a_never_stored_state_writes_nothing() -> None:
    ctx = make_ctx()
    assert (ctx[total], ctx[items]) == (0, [])
    assert ctx._changes(1024) == {}


def test_a_value_over_the_limit_raises_state_too_large_and_one_at_the_limit_is_written() -> None:
    at_limit = ["x" * 10]
    size = len(items.codec.encode(at_limit))
    ctx = make_ctx()
    ctx[items] = at_limit
    assert ctx._changes(size) == {"items": items.codec.encode(at_limit)}
    with pytest.raises(errors.StateTooLarge, match=f"state {SELF}:items of key 'k1' would be {size} bytes; "
                                                    f"the limit is {size - 1} bytes"):
        ctx._changes(size - 1)


def test_an_unchanged_stored_value_over_the_limit_is_still_checked() -> None:
    # The limit applies to every touched value, even one only read.
    ctx = make_ctx(stored={"note": codec.pack("y" * 100)})
    assert ctx[note] == "y" * 100
    with pytest.raises(errors.StateTooLarge):
        ctx._changes(50)


def test_a_state_spec_of_another_function_is_refused_even_under_the_same_name() -> None:
    ctx = make_ctx()
    with pytest.raises(KeyError, match="state test/other:total is not declared by test/cart"):
        ctx[foreign_total]
    with pytest.raises(KeyError):
        ctx[foreign_total] = 1
    with pytest.raises(KeyError):
        del ctx[foreign_total]
    assert ctx._changes(1024) == {}


def test_a_corrupt_stored_value_is_a_codec_error_on_read() -> None:
    with pytest.raises(errors.CodecError, match="stored value does not match"):
        make_ctx(stored={"total": codec.pack("not a number")})[total]


def test_the_context_exposes_its_address_and_attempt() -> None:
    ctx = _context.Context(function=SELF, key="k9", specs=counters.states, stored={}, invocation_id="inv-9",
                           attempt=3)
    assert (ctx.function, ctx.key, ctx.invocation_id, ctx.attempt) == (SELF, "k9", "inv-9", 3)


# ---- through the runtime: sends already done are not repeated -------------------------------------

shop = statefn.StatefulFunction("test/shop")
spent = shop.state("spent", int, default=0)


@shop.handler
async def order(ctx: statefn.Context, item: str) -> int:
    ctx.send("test/audit", item, "log", step="before")
    ctx.now()
    price = await ctx.call("test/prices", item, "quote")
    ctx.send("test/audit", item, "log", step="after", price=price)
    ctx[spent] += price
    return int(ctx[spent])


@shop.handler
def peek(ctx: statefn.Context) -> int:
    return int(ctx[spent])


APP = statefn.App(shop)


def batch(*invocations: wire.Invocation, state: dict[str, bytes] | None = None) -> wire.BatchRequest:
    return wire.BatchRequest(max_state_bytes=1024, keys=[
        wire.KeyRequest(function="test/shop", key="apple", state=state or {}, invocations=list(invocations))])


async def test_a_first_run_suspends_with_its_call_the_sends_before_it_and_the_runs_to_journal() -> None:
    resp = await _runtime.execute(APP, batch(wire.Invocation(id="i1", handler="order", args={"item": "apple"}),
                                             wire.Invocation(id="i2", handler="peek", args={})))
    first, queued = resp.results[0]
    # No timeout given: the function's call_timeout (600 s by default).
    assert first.calls == [wire.Outgoing("test/prices", "apple", "quote", {}, timeout=constants.DEFAULT_CALL_TIMEOUT_S,
                                         index=1)]
    assert first.waiting == 1
    assert first.sends == [wire.Outgoing("test/audit", "apple", "log", {"step": "before"})]
    assert len(first.journal_added) == 2 and codec.unpack(first.journal_added[0])[:2] == ["~run", "~now"]
    assert first.journal_added[1] == wire.outstanding_entry("test/prices", "apple", "quote")
    assert (first.reply, first.error, first.state) == (None, None, {})
    assert queued == wire.Result(id="i2", deferred=True)  # the key is locked by the suspended call


async def test_a_resumed_run_does_not_repeat_the_sends_already_done() -> None:
    suspended = (await _runtime.execute(APP, batch(wire.Invocation(id="i1", handler="order",
                                                                   args={"item": "apple"})))).results[0][0]
    journal = answered(suspended.journal_added, suspended.waiting, ok(7))
    resumed = wire.Invocation(id="i1", handler="order", args={"item": "apple"}, journal=journal,
                              sends_done=len(suspended.sends))
    result = (await _runtime.execute(APP, batch(resumed, state={"spent": codec.pack(10)}))).results[0][0]
    assert result.error is None
    assert codec.unpack(result.reply) == 17  # type: ignore[arg-type]
    assert result.sends == [wire.Outgoing("test/audit", "apple", "log", {"step": "after", "price": 7})]
    assert result.state == {"spent": codec.pack(17)}
    assert result.calls == [] and result.waiting == -1 and result.journal_added == []


async def test_without_sends_done_a_resumed_run_would_send_everything_again() -> None:
    # The control for the test above: sends_done is what keeps the first send from going out twice.
    first = (await _runtime.execute(APP, batch(wire.Invocation(id="i1", handler="order",
                                                               args={"item": "apple"})))).results[0][0]
    again = wire.Invocation(id="i1", handler="order", args={"item": "apple"},
                            journal=answered(first.journal_added, first.waiting, ok(7)))
    result = (await _runtime.execute(APP, batch(again))).results[0][0]
    assert [s.args["step"] for s in result.sends] == ["before", "after"]


async def test_a_resumed_run_that_diverges_fails_as_a_handler_error_with_no_effects() -> None:
    # The journal says a run named "fetch" came first; the handler reads the clock there.
    journal = [codec.pack(["~run", "fetch", 1]), ok(7)]
    inv = wire.Invocation(id="i1", handler="order", args={"item": "apple"}, journal=journal, sends_done=1)
    result = (await _runtime.execute(APP, batch(inv))).results[0][0]
    assert result.error is not None
    assert (result.error.kind, result.error.type, result.error.retry) == ("handler_error", "ReplayDiverged", False)
    assert (result.reply, result.state, result.sends, result.calls, result.waiting) == (None, {}, [], [], -1)
