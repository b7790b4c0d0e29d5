"""Parallel durable calls: several ``ctx.call``s in flight at once, their replies journaled in any order.

Against a real nats-server and etcd: calls made before any is awaited all go out together; replies
that come back out of order fill their own journal slots, and only the awaited one runs the handler
again; one call failing or timing out leaves the others' replies intact; a caller whose sidecar is
replaced while its calls are in flight finishes with every callee run once; a replay that makes a
different call where one is in flight fails with ``replay_diverged``; a sleep runs beside calls.
"""

from __future__ import annotations

import asyncio
import collections

import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import layout
from statefn_sidecar import devservers
from tests import helpers


class Fanout:
    """A ``hub`` that calls several ``worker`` keys at once; workers take ``ms`` and count their runs."""

    def __init__(self, ns: str) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.flip = False  # makes the hub's replay diverge
        worker = StatefulFunction(f"{ns}/worker")
        done = worker.state("done", int, default=0)
        hub = StatefulFunction(f"{ns}/hub")
        results = hub.state("results", list[str], default=[])
        self.worker, self.hub = str(worker.type), str(hub.type)

        @worker.handler
        async def work(ctx: Context, ms: int = 0, fail: bool = False) -> str:
            self.runs[f"work {ctx.key}"] += 1
            loop = asyncio.get_running_loop()
            self.started.setdefault(ctx.key, loop.time())
            gate = self.gates.get(ctx.key)
            if gate is not None:
                await gate.wait()
            await asyncio.sleep(ms / 1000)
            self.finished.setdefault(ctx.key, loop.time())
            if fail:
                raise ValueError(f"{ctx.key} failed")
            ctx[done] += 1
            return f"{ctx.key}:{ctx[done]}"

        @hub.handler
        async def gather(ctx: Context, plan: dict[str, int], failing: list[str] | None = None) -> list[str]:
            self.runs["gather"] += 1
            calls = [ctx.call(self.worker, key, "work", ms=ms, fail=key in (failing or [])) for key, ms in plan.items()]
            got = await asyncio.gather(*calls)
            ctx[results] = list(got)
            return list(got)

        @hub.handler
        async def settle(ctx: Context, plan: dict[str, int], failing: list[str], limit: float = 60) -> list[str]:
            self.runs["settle"] += 1
            calls = [ctx.call(self.worker, key, "work", timeout=limit, ms=ms, fail=key in failing)
                     for key, ms in plan.items()]
            got = await ctx.call_all(*calls, return_exceptions=True)
            return [g.kind if isinstance(g, statefn.CallFailed) else g for g in got]

        @hub.handler
        async def diverge(ctx: Context) -> str:
            self.runs["diverge"] += 1
            first = ctx.call(self.worker, "d1", "work", ms=50)
            second = ctx.call(self.worker, "d3" if self.flip else "d2", "work", ms=400)
            self.flip = True
            await first
            return str(await second)

        @hub.handler
        async def nap_beside(ctx: Context) -> str:
            self.runs["nap_beside"] += 1
            _, got = await asyncio.gather(ctx.sleep(0.3), ctx.call(self.worker, "n1", "work", ms=10))
            return str(got)

        @hub.handler
        async def stubborn(ctx: Context) -> str:
            self.runs["stubborn"] += 1
            try:
                got = await ctx.call(self.worker, "s1", "work", ms=10)
            except BaseException:  # catches the unwinding too
                ctx.send(self.worker, "s2", "work")  # must not go out: the run is over at the await
                return "swallowed"
            return str(got)

        self.app = statefn.App(worker, hub)


@pytest.fixture
def fanout(namespace: str) -> Fanout:
    return Fanout(namespace)


async def test_calls_made_together_run_together_and_replies_fill_their_own_slots(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    # The first call is the slowest: its reply comes last, after the others were journaled out of order.
    plan = {"w1": 600, "w2": 10, "w3": 200}
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        got = await c.invoke(fanout.hub, "h", "gather", plan=plan)
        assert got == ["w1:1", "w2:1", "w3:1"]  # in the order made, whatever order they came back in
        assert [fanout.runs[f"work {k}"] for k in plan] == [1, 1, 1]
        # All three were in flight at once: the last one started before the first one finished.
        assert max(fanout.started.values()) < min(fanout.finished.values())
        # Only the awaited call's answer runs the hub again (w1, which came last): one run to make the
        # calls, one when w1's reply came. The replies of w2 and w3 were journaled without a run.
        assert fanout.runs["gather"] == 2
        assert (await c.get_state(fanout.hub, "h"))["results"] == got
        assert not await helpers.locks_left(etcd_server, fanout.hub, 4, timers=True)


async def test_one_call_failing_leaves_the_others_replies(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        got = await c.invoke(fanout.hub, "s", "settle", plan={"f1": 100, "f2": 10, "f3": 50}, failing=["f2"])
        assert got == ["f1:1", "handler_error", "f3:1"]
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fanout.hub, "g", "gather", plan={"g1": 300, "g2": 10}, failing=["g2"])
        assert err.value.kind == "handler_error" and "g2 failed" in err.value.message
        # g1 was in flight when the hub failed: it ran once, and its late reply was dropped.
        await helpers.eventually(lambda: _ran(fanout, "work g1"))
        await asyncio.sleep(0.5)
        assert fanout.runs["work g1"] == 1
        assert not await helpers.locks_left(etcd_server, fanout.hub, 4, timers=True)


async def _ran(fanout: Fanout, what: str) -> bool:
    return fanout.runs[what] == 1


async def test_a_call_timing_out_beside_answered_ones(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    # The slow key is alone in its partition: a handler that does not return holds back its batch's commit.
    slow = "t0"
    fast = [k for k in (f"t{i}" for i in range(1, 40)) if layout.partition_of(k, 4) != layout.partition_of(slow, 4)]
    fanout.gates[slow] = asyncio.Event()  # it does not answer until the test says so
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        plan = {fast[0]: 10, slow: 0, fast[1]: 10}
        got = await c.invoke(fanout.hub, "t", "settle", plan=plan, failing=[], limit=1.0)
        assert got == [f"{fast[0]}:1", "call_timeout", f"{fast[1]}:1"]
        fanout.gates[slow].set()  # its late reply finds nothing waiting: dropped
        await helpers.eventually(lambda: _ran(fanout, f"work {slow}"))
        await asyncio.sleep(0.5)
        assert not await helpers.locks_left(etcd_server, fanout.hub, 4, timers=True)


async def test_a_sleep_beside_a_call(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await c.invoke(fanout.hub, "n", "nap_beside") == "n1:1"
        assert loop.time() - started >= 0.3  # it waited for the sleep too
        assert not await helpers.locks_left(etcd_server, fanout.hub, 4, timers=True)


async def test_a_handler_that_catches_the_unwinding_is_suspended_all_the_same(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        assert await c.invoke(fanout.hub, "u", "stubborn") == "s1:1"
        await asyncio.sleep(0.3)
        assert fanout.runs["work s2"] == 0 and fanout.runs["stubborn"] == 2


async def test_a_replay_that_makes_another_call_where_one_is_in_flight_diverges(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    async with helpers.running_sidecar(fanout.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fanout.hub, "d", "diverge")
        assert err.value.kind == "handler_error", err.value
        assert "replayed differently" in err.value.message and "call" in err.value.message
        assert "worker('d3')" in err.value.message and "worker('d2')" in err.value.message
        assert fanout.runs["work d3"] == 0


async def test_calls_in_flight_survive_their_callers_sidecar_being_replaced(
        fanout: Fanout, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer,
        namespace: str) -> None:
    """The hub's sidecar goes away with its calls in flight; the workers (another sidecar) answer meanwhile."""
    hub_only = statefn.App(*(f for name, f in fanout.app.functions.items() if name == fanout.hub))
    workers_only = statefn.App(*(f for name, f in fanout.app.functions.items() if name == fanout.worker))
    for key in ("r1", "r2", "r3"):
        fanout.gates[key] = asyncio.Event()
    plan = {"r1": 10, "r2": 10, "r3": 10}
    async with helpers.running_sidecar(workers_only, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        async with helpers.running_sidecar(hub_only, nats_server, etcd_server):
            pending = asyncio.create_task(c.invoke(fanout.hub, "r", "gather", plan=plan))
            await helpers.eventually(lambda: _all_started(fanout, plan))
            fanout.gates["r2"].set()  # one reply comes back while the hub's first sidecar is still there
            await helpers.eventually(lambda: _finished(fanout, "r2"))
            await asyncio.sleep(0.3)
        fanout.gates["r1"].set()  # ...and the others while no sidecar hosts the hub
        fanout.gates["r3"].set()
        await helpers.eventually(lambda: _finished(fanout, "r1", "r3"))
        async with helpers.running_sidecar(hub_only, nats_server, etcd_server):
            assert await asyncio.wait_for(pending, 30) == ["r1:1", "r2:1", "r3:1"]
        assert [fanout.runs[f"work {k}"] for k in plan] == [1, 1, 1]
        assert not await helpers.locks_left(etcd_server, fanout.hub, 4, timers=True)


async def _all_started(fanout: Fanout, plan: dict[str, int]) -> bool:
    return all(k in fanout.started for k in plan)


async def _finished(fanout: Fanout, *keys: str) -> bool:
    return all(k in fanout.finished for k in keys)


class Bank:
    """Accounts prepared in parallel by one transaction (``spread``), each prepare a ``deposit``."""

    def __init__(self, ns: str) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        account = StatefulFunction(f"{ns}/account")
        balance = account.state("balance", int, default=0)
        teller = StatefulFunction(f"{ns}/teller", max_attempts=50, backoff_initial=0.01)
        self.account, self.teller = str(account.type), str(teller.type)

        @account.handler
        async def deposit(ctx: Context, amount: int, fail: bool = False) -> int:
            self.runs[f"deposit {ctx.key}"] += 1
            await asyncio.sleep(0.01 * (hash(ctx.key) % 5))  # votes come back in no particular order
            if fail:
                raise ValueError(f"{ctx.key} refuses")
            ctx[balance] += amount
            return ctx[balance]

        @teller.handler
        async def spread(ctx: Context, plan: dict[str, int], refuse: str = "") -> list[int] | str:
            self.runs[f"spread {ctx.attempt}"] += 1
            try:
                async with ctx.transaction(timeout=30) as tx:
                    votes = [tx.call(self.account, key, "deposit", amount=amount, fail=key == refuse)
                             for key, amount in plan.items()]
                    return list(await asyncio.gather(*votes))
            except statefn.TransactionAborted:
                raise  # it gave way under wait-die: it runs again, from scratch, once its key is free
            except statefn.CallFailed as exc:
                return f"aborted: {exc.message}"

        self.app = statefn.App(account, teller)

    async def balances(self, c: statefn.Client, *keys: str) -> dict[str, int]:
        return {k: (await c.get_state(self.account, k)).get("balance", 0) for k in keys}


async def test_a_transaction_prepares_its_participants_in_parallel(
        namespace: str, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    bank = Bank(namespace)
    keys = [f"a{i}" for i in range(5)]
    async with helpers.running_sidecar(bank.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        assert await c.invoke(bank.teller, "t1", "spread", plan=dict.fromkeys(keys, 10)) == [10] * 5
        # Each participant applies the commit decision just after the coordinator replied.
        applied = await helpers.eventually_value(lambda: bank.balances(c, *keys),
                                                 lambda b: b == dict.fromkeys(keys, 10))
        assert applied == dict.fromkeys(keys, 10)
        assert [bank.runs[f"deposit {k}"] for k in keys] == [1] * 5

        # One votes no: the others were prepared (or are about to be) and are all released at once, not
        # after the transaction's 30 s timeout.
        got = await c.invoke(bank.teller, "t2", "spread", plan=dict.fromkeys(keys, 5), refuse="a2")
        assert got == "aborted: a2 refuses"

        async def released() -> bool:
            return not await helpers.locks_left(etcd_server, bank.account, 4)
        await helpers.eventually(released, timeout=5)
        assert await bank.balances(c, *keys) == dict.fromkeys(keys, 10)
        assert not await helpers.locks_left(etcd_server, bank.teller, 4, timers=True)


async def test_parallel_prepares_under_wait_die_commit_each_transaction_once(
        namespace: str, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer) -> None:
    """Transactions preparing the same keys in opposite orders, at once: the younger dies and runs again."""
    bank = Bank(namespace)
    keys = ["x", "y", "z"]
    rounds = 6
    async with helpers.running_sidecar(bank.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as c:
        plans = [dict.fromkeys(keys if i % 2 else keys[::-1], 1) for i in range(2 * rounds)]
        replies = await asyncio.gather(*(c.invoke(bank.teller, f"w{i}", "spread", plan=plan)
                                         for i, plan in enumerate(plans)))
        # Every transaction committed once: each saw its own deposits, and the balances add up exactly.
        assert all(isinstance(r, list) and len(r) == 3 for r in replies), replies
        final = await helpers.eventually_value(lambda: bank.balances(c, *keys),
                                               lambda b: b == dict.fromkeys(keys, 2 * rounds))
        assert final == dict.fromkeys(keys, 2 * rounds)
        for key in keys:  # the values voted on each key are distinct: no deposit applied twice
            seen = sorted(r[(keys if i % 2 else keys[::-1]).index(key)] for i, r in enumerate(replies))
            assert seen == list(range(1, 2 * rounds + 1)), (key, seen)
        await helpers.eventually(lambda: _unlocked(etcd_server, bank), timeout=5)
        print("coordinator runs by attempt:", sorted((k, v) for k, v in bank.runs.items() if k.startswith("spread")))
        assert sum(v for k, v in bank.runs.items() if k.startswith("spread") and k != "spread 1") > 0  # some died


async def _unlocked(etcd_server: devservers.EtcdServer, bank: Bank) -> bool:
    return not [k for f in (bank.account, bank.teller) for k in await helpers.locks_left(etcd_server, f, 4)]
