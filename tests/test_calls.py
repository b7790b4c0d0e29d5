"""Durable calls: ``await ctx.call(...)`` suspends the caller, locks its key, and resumes it from its journal.

Against a real nats-server and etcd: the call and its reply each happen exactly once, the caller's
sends before a call are not repeated by the replay, later messages to a locked key wait in order,
errors come back as CallFailed, and a suspended invocation survives a sidecar being replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import AsyncIterator

import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import envelope, layout
from tests import helpers


class Shop:
    """Three functions: orders call the inventory (directly or through a broker) and log to an audit."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.runs: collections.Counter[str] = collections.Counter()
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_after_call = 0
        inventory = StatefulFunction(f"{ns}/inventory", max_attempts=3, backoff_initial=0.05)
        stock = inventory.state("stock", int, default=10)
        order = StatefulFunction(f"{ns}/order", max_attempts=3, backoff_initial=0.05)
        log = order.state("log", list[str], default=[])
        status = order.state("status", str, default="new")
        broker = StatefulFunction(f"{ns}/broker")
        audit = StatefulFunction(f"{ns}/audit")
        entries = audit.state("entries", list[str], default=[])
        self.inventory, self.order, self.broker, self.audit = (
            str(inventory.type), str(order.type), str(broker.type), str(audit.type))

        @inventory.handler
        async def reserve(ctx: Context, qty: int) -> int:
            self.runs[f"reserve {ctx.key}"] += 1
            await self.gate.wait()
            if qty > ctx[stock]:
                raise ValueError(f"only {ctx[stock]} of {ctx.key} left")
            ctx[stock] -= qty
            return ctx[stock]

        @broker.handler
        async def forward(ctx: Context, item: str, qty: int) -> dict[str, int]:
            self.runs["forward"] += 1
            left = await ctx.call(self.inventory, item, "reserve", qty=qty)
            return {"left": left}

        @audit.handler
        async def record(ctx: Context, text: str) -> None:
            ctx[entries].append(text)

        @order.handler
        async def place(ctx: Context, item: str, qty: int) -> int:
            self.runs["place"] += 1
            ctx[log].append(f"place {item}")
            ctx.send(self.audit, ctx.key, "record", text=f"placing {item}")
            left: int = await ctx.call(self.inventory, item, "reserve", qty=qty)
            ctx[status] = "placed"
            if self.fail_after_call > 0:
                self.fail_after_call -= 1
                raise statefn.Retry("not yet")
            return left

        @order.handler
        async def place_two(ctx: Context, first: str, second: str) -> list[int]:
            self.runs["place_two"] += 1
            a = await ctx.call(self.inventory, first, "reserve", qty=1)
            b = await ctx.call(self.inventory, second, "reserve", qty=2)
            ctx[log].append(f"two {a} {b}")
            return [a, b]

        @order.handler
        async def place_via_broker(ctx: Context, item: str, qty: int) -> int:
            reply = await ctx.call(self.broker, ctx.key, "forward", item=item, qty=qty)
            return int(reply["left"])

        @order.handler
        async def try_place(ctx: Context, item: str, qty: int) -> str:
            try:
                await ctx.call(self.inventory, item, "reserve", qty=qty)
            except statefn.CallFailed as exc:
                ctx[status] = "rejected"
                return f"{exc.kind}: {exc.message}"
            return "placed"

        @order.handler
        async def call_self(ctx: Context) -> None:
            await ctx.call(self.order, ctx.key, "note", text="x")

        @order.handler
        async def stamp(ctx: Context, item: str) -> dict[str, object]:
            """Side effects and clocks before a call: run once, the same values in the replay."""
            self.runs["stamp"] += 1

            def side_effect() -> int:
                self.runs["side effect"] += 1
                return 41 + self.runs["side effect"]

            at = ctx.now()
            roll = ctx.random().randint(1, 10**9)
            ticket = await ctx.run("ticket", side_effect)
            left = await ctx.call(self.inventory, item, "reserve", qty=1)
            return {"at": at, "roll": roll, "ticket": ticket, "left": left}

        @order.handler
        async def wobbly(ctx: Context, item: str) -> int:
            """Takes a different path on its replay: refused, not silently mixed up."""
            self.runs["wobbly"] += 1
            if self.runs["wobbly"] > 1:
                await ctx.run("extra", lambda: 1)
            return int(await ctx.call(self.inventory, item, "reserve", qty=1))

        @order.handler
        async def impatient(ctx: Context, item: str, seconds: float) -> str:
            try:
                left = await ctx.call(self.inventory, item, "reserve", qty=1, timeout=seconds)
            except statefn.CallFailed as exc:
                ctx[status] = exc.kind
                return f"{exc.kind}: {exc.message}"
            return f"reserved, {left} left"

        @order.handler
        async def ping(ctx: Context, other: str, hops: int, seconds: float) -> str:
            """Calls ``other``'s ping, which calls back: a cycle of calls, which fails at once."""
            if hops == 0:
                return "pong"
            try:
                return str(await ctx.call(self.order, other, "ping", other=ctx.key, hops=hops - 1, seconds=seconds,
                                          timeout=seconds))
            except statefn.CallFailed as exc:
                return exc.kind

        @order.handler
        async def nap(ctx: Context, seconds: float) -> float:
            self.runs["nap"] += 1
            started = ctx.now()
            ctx[log].append("before")
            await ctx.sleep(seconds)
            ctx[log].append("after")
            return ctx.now() - started

        @order.handler
        async def note(ctx: Context, text: str) -> list[str]:
            ctx[log].append(text)
            return ctx[log]

        self.app = statefn.App(inventory, order, broker, audit)
        self.callers = statefn.App(order, broker, audit)
        self.callees = statefn.App(inventory)


@pytest.fixture
def shop(namespace: str) -> Shop:
    return Shop(namespace)


@contextlib.asynccontextmanager
async def platform(shop: Shop, nats_server, etcd_server, **kw) -> AsyncIterator[statefn.Client]:
    async with helpers.running_sidecar(shop.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20, **kw) as c:
        yield c


async def test_call_returns_the_reply_and_replays_without_repeating_sends(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        assert await c.invoke(shop.order, "o1", "place", item="apple", qty=3) == 7
        assert await c.get_state(shop.order, "o1") == {"log": ["place apple"], "status": "placed"}
        assert await c.get_state(shop.inventory, "apple") == {"stock": 7}
        # Run once up to the call, once more (the replay) to the end; the call itself ran once.
        assert shop.runs["place"] == 2 and shop.runs["reserve apple"] == 1

        async def audited() -> bool:
            return await c.get_state(shop.audit, "o1") == {"entries": ["placing apple"]}
        await helpers.eventually(audited)
        await asyncio.sleep(0.3)
        assert await audited()  # the send before the call went out once, not once per replay


async def test_calls_in_sequence_and_through_another_function(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        assert await c.invoke(shop.order, "o2", "place_two", first="pear", second="plum") == [9, 8]
        assert shop.runs["place_two"] == 3  # suspended twice, then ran to the end
        assert (await c.get_state(shop.order, "o2"))["log"] == ["two 9 8"]
        assert await c.invoke(shop.order, "o3", "place_via_broker", item="fig", qty=4) == 6
        assert shop.runs["forward"] == 2 and shop.runs["reserve fig"] == 1


async def test_a_failed_call_raises_call_failed_in_the_caller(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        got = await c.invoke(shop.order, "o4", "try_place", item="kiwi", qty=50)
        assert got == "handler_error: only 10 of kiwi left"
        assert await c.get_state(shop.order, "o4") == {"status": "rejected"}
        assert await c.get_state(shop.inventory, "kiwi") == {}


async def test_a_key_calling_itself_is_refused_clearly(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(shop.order, "o5", "call_self")
        assert err.value.kind == "handler_error" and err.value.error_type == "InvalidCall"
        assert "cannot call its own key" in err.value.message
        assert await c.invoke(shop.order, "o5", "note", text="still usable") == ["still usable"]


async def test_messages_to_a_locked_key_wait_in_order(shop, nats_server, etcd_server) -> None:
    """While ``place`` waits for its reply, later messages to the order queue up and run after it, in order."""
    shop.gate.clear()
    async with platform(shop, nats_server, etcd_server, retry_interval=0.5) as c:
        placing = asyncio.create_task(c.invoke(shop.order, "o6", "place", item="lime", qty=1,
                                               idempotency_key="place-o6"))
        await helpers.eventually(lambda: _exists(etcd_server, shop.order, "o6"))
        notes = [asyncio.create_task(c.invoke(shop.order, "o6", "note", text=f"n{i}")) for i in range(3)]
        await asyncio.sleep(1.5)  # the client checked the record of ``place`` meanwhile: pending, nothing re-run
        assert not placing.done() and not any(n.done() for n in notes)
        shop.gate.set()
        assert await placing == 9
        logs = [await n for n in notes]
        assert logs[-1] == ["place lime", "n0", "n1", "n2"]
        assert shop.runs["place"] == 2 and shop.runs["reserve lime"] == 1
        assert await c.invoke(shop.order, "o6", "place", item="lime", qty=1, idempotency_key="place-o6") == 9


async def test_a_retry_after_a_call_resumes_from_the_journal(shop, nats_server, etcd_server) -> None:
    shop.fail_after_call = 1
    async with platform(shop, nats_server, etcd_server) as c:
        assert await c.invoke(shop.order, "o7", "place", item="date", qty=2) == 8
        assert shop.runs["reserve date"] == 1  # the retry replayed the call's reply, it did not call again
        assert shop.runs["place"] == 3


async def test_a_suspended_invocation_survives_its_sidecar_being_replaced(shop, nats_server, etcd_server) -> None:
    """The suspension lives in etcd: a new owner resumes it when the reply comes."""
    async with helpers.client(nats_server, etcd_server, timeout=30) as c:
        async with helpers.running_sidecar(shop.callees, nats_server, etcd_server):
            pass  # registers the inventory, then leaves: calls to it wait in its stream
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server):
            await c.send(shop.order, "o8", "place", item="nut", qty=5)
            await helpers.eventually(lambda: _exists(etcd_server, shop.order, "o8"))
        assert shop.runs["place"] == 1
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server), \
                helpers.running_sidecar(shop.callees, nats_server, etcd_server):
            async def placed() -> bool:
                return (await c.get_state(shop.order, "o8")).get("status") == "placed"
            await helpers.eventually(placed, timeout=20)
            assert await c.get_state(shop.inventory, "nut") == {"stock": 5}
        assert shop.runs["place"] == 2 and shop.runs["reserve nut"] == 1
        assert not await _exists(etcd_server, shop.order, "o8")


async def test_runs_clocks_and_randoms_are_journaled_across_the_replay(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        before = time.time()
        got = await c.invoke(shop.order, "o10", "stamp", item="oat", idempotency_key="stamp-o10")
        assert shop.runs["stamp"] == 2  # first run and replay
        assert shop.runs["side effect"] == 1  # the replay took the ticket from the journal
        assert got["ticket"] == 42 and got["left"] == 9
        assert before <= got["at"] <= time.time()  # the first run's clock, not the replay's
        invocation_id = f"{shop.order}/{envelope.idempotency_id('o10', 'stamp', 'stamp-o10')}"
        assert got["roll"] == random.Random(invocation_id).randint(1, 10**9)  # seeded by the invocation id


async def test_a_replay_that_diverges_from_its_journal_is_an_error(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(shop.order, "o11", "wobbly", item="rye")
        assert (err.value.kind, err.value.error_type) == ("handler_error", "ReplayDiverged")
        assert "step 1 is now a run 'extra', its journal holds a call's reply" in err.value.message


async def test_a_copy_of_a_suspended_request_beside_its_reply_loses_nothing(
        shop, nats_server, etcd_server) -> None:
    """A new owner pulls, in one batch, the call's reply and a re-sent copy of the request that made the call.

    The copy is a duplicate (the PENDING record says so, failing the commit's idempotency check); the
    reply is not, though it resumes the same request: it must be run again, not acked away.
    """
    async with helpers.client(nats_server, etcd_server, timeout=30) as c:
        async with helpers.running_sidecar(shop.callees, nats_server, etcd_server):
            pass  # registers the inventory
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server):
            await c.send(shop.order, "o9", "place", idempotency_key="place-o9", item="yam", qty=2)
            await helpers.eventually(lambda: _exists(etcd_server, shop.order, "o9"))
        async with helpers.running_sidecar(shop.callees, nats_server, etcd_server):
            async def reserved() -> bool:
                return await c.get_state(shop.inventory, "yam") == {"stock": 8}
            await helpers.eventually(reserved)
            await asyncio.sleep(0.5)  # the reply is published to the order's stream, which nobody reads now
        copy = envelope.Message(key="o9", handler="place", args={"item": "yam", "qty": 2},
                                 idempotency_key="place-o9")
        await c._publish(await c._subject(shop.order, "o9"), copy, "place-o9:copy")
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server):
            async def placed() -> bool:
                return (await c.get_state(shop.order, "o9")).get("status") == "placed"
            await helpers.eventually(placed, timeout=15)
            await asyncio.sleep(0.5)
            assert await c.get_state(shop.order, "o9") == {"log": ["place yam"], "status": "placed"}
            assert await c.get_state(shop.inventory, "yam") == {"stock": 8}
        # Its replay ran in the batch whose commit the copy failed, and again: runs are not effects.
        assert shop.runs["place"] == 3 and shop.runs["reserve yam"] == 1


async def _exists(etcd_server, function: str, key: str) -> bool:
    """Whether the key has a suspended invocation (read straight from etcd, as a new owner would)."""
    fn = layout.FunctionType.parse(function)
    async with helpers.etcd(etcd_server) as etcd:
        for p in range(4):
            if await etcd.get(layout.PartitionKeys(fn, p).suspended(key)) is not None:
                return True
    return False


async def test_a_call_that_times_out_raises_and_its_late_reply_is_dropped(shop, nats_server, etcd_server) -> None:
    shop.gate.clear()  # the inventory holds on to the call
    async with platform(shop, nats_server, etcd_server) as c:
        started = time.monotonic()
        got = await c.invoke(shop.order, "o9", "impatient", item="yam", seconds=0.5)
        assert got == "call_timeout: no reply within the timeout of 0.5s"
        assert 0.5 <= time.monotonic() - started < 5
        assert await c.invoke(shop.order, "o9", "note", text="unlocked") == ["unlocked"]  # its key is free again
        shop.gate.set()  # the call runs after all: its effects are the callee's, its reply reaches nobody

        async def reserved() -> bool:
            return await c.get_state(shop.inventory, "yam") == {"stock": 9}
        await helpers.eventually(reserved)
        assert await c.get_state(shop.order, "o9") == {"log": ["unlocked"], "status": "call_timeout"}
        assert await c.invoke(shop.order, "o10", "impatient", item="yam", seconds=5.0) == "reserved, 8 left"


async def test_a_cycle_of_calls_fails_at_once(shop, nats_server, etcd_server) -> None:
    """a calls b, which calls a back: a is locked while it waits, so b's call could never run. It fails at once
    (before, only a's timeout ended the wait), b answers a with that, and a ends."""
    async with platform(shop, nats_server, etcd_server) as c:
        started = time.monotonic()
        assert await c.invoke(shop.order, "a", "ping", other="b", hops=2, seconds=30) == "call_cycle"
        assert time.monotonic() - started < 10  # not the 30 s timeout
        # Neither key stays locked.
        assert await c.invoke(shop.order, "a", "note", text="a free") == ["a free"]
        assert await c.invoke(shop.order, "b", "note", text="b free") == ["b free"]


async def test_a_durable_sleep_suspends_and_resumes_from_its_timer(shop, nats_server, etcd_server) -> None:
    async with platform(shop, nats_server, etcd_server) as c:
        napping = asyncio.create_task(c.invoke(shop.order, "s1", "nap", seconds=0.6))
        await helpers.eventually(lambda: _exists(etcd_server, shop.order, "s1"))
        # While it sleeps its key is locked: a later message waits, and runs after it.
        noted = asyncio.create_task(c.invoke(shop.order, "s1", "note", text="later"))
        slept = await napping
        assert 0.6 <= slept < 5  # ctx.now() before, and after in the replay
        assert await noted == ["before", "after", "later"]
        assert shop.runs["nap"] == 2  # up to the sleep, then the replay to the end
        assert not await _exists(etcd_server, shop.order, "s1")


async def test_a_durable_sleep_outlives_its_sidecar(shop, nats_server, etcd_server) -> None:
    async with helpers.client(nats_server, etcd_server, timeout=30) as c:
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server):
            await c.send(shop.order, "s2", "nap", seconds=1.5)
            await helpers.eventually(lambda: _exists(etcd_server, shop.order, "s2"))
        assert shop.runs["nap"] == 1  # stopped while it sleeps: the timer is in etcd

        async def woke() -> bool:
            return (await c.get_state(shop.order, "s2")).get("log") == ["before", "after"]
        async with helpers.running_sidecar(shop.callers, nats_server, etcd_server):
            await helpers.eventually(woke, timeout=20)
        assert shop.runs["nap"] == 2
