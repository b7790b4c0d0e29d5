"""Serializable transactions: ``async with ctx.transaction() as tx`` commits or aborts every participant together.

Against a real nats-server and etcd: participants stage their effects under a key lock and apply
them only on commit; an abort (a participant refusing, the block raising) leaves no trace; the
coordinator's own key can take part; wait-die refuses a younger transaction; a vote that comes
too late aborts; a participant whose coordinator failed asks and is released (presumed abort).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import layout
from statefn_sidecar import metrics
from tests import helpers


class Bank:
    def __init__(self, ns: str) -> None:
        self.runs: collections.Counter[str] = collections.Counter()
        self.gates: dict[str, asyncio.Event] = {}
        self.ages: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        account = StatefulFunction(f"{ns}/account", max_attempts=10, backoff_initial=0.05, backoff_max=0.5)
        balance = account.state("balance", int, default=100)
        history = account.state("history", list[str], default=[])
        audit = StatefulFunction(f"{ns}/audit")
        slow = StatefulFunction(f"{ns}/slow")  # its own partitions: a nap blocks no account
        lines = audit.state("lines", list[str], default=[])
        self.account, self.audit, self.slow = str(account.type), str(audit.type), str(slow.type)
        self.balance = balance

        async def gate(name: str) -> None:
            event = self.gates.get(name)
            if event is not None:
                await event.wait()

        @account.handler
        async def withdraw(ctx: Context, amount: int, ref: str = "") -> int:
            self.runs[f"withdraw {ctx.key}"] += 1
            await gate(f"withdraw {ctx.key}")
            if amount > ctx[balance]:
                raise ValueError(f"{ctx.key} has only {ctx[balance]}")
            ctx[balance] -= amount
            ctx[history].append(f"-{amount}")
            ctx.send(self.audit, ctx.key, "note", line=f"{ref} -{amount}")
            return ctx[balance]

        @account.handler
        async def deposit(ctx: Context, amount: int, ref: str = "") -> int:
            self.runs[f"deposit {ctx.key}"] += 1
            await gate(f"deposit {ctx.key}")
            if ctx.key.startswith("closed"):
                raise ValueError(f"account {ctx.key} is closed")
            ctx[balance] += amount
            ctx[history].append(f"+{amount}")
            return ctx[balance]

        @account.handler
        async def transfer(ctx: Context, to: str, amount: int, ref: str = "", tx_timeout: float = 10.0) -> list[int]:
            """The transfer of docs/transactions.md: the coordinator's own key takes part."""
            self.runs[f"transfer {ctx.key}"] += 1
            async with ctx.transaction(timeout=tx_timeout) as tx:
                self.ages[ctx.key].append(tx.age)
                left = await tx.call(self.account, ctx.key, "withdraw", amount=amount, ref=ref)
                now = await tx.call(self.account, to, "deposit", amount=amount, ref=ref)
            return [left, now]

        @account.handler
        async def move_twice(ctx: Context, source: str, target: str) -> int:
            """The same participant twice in one transaction: its second prepare reads what its first staged."""
            async with ctx.transaction() as tx:
                await tx.call(self.account, source, "withdraw", amount=10)
                await tx.call(self.account, source, "withdraw", amount=5)
                return int(await tx.call(self.account, target, "deposit", amount=15))

        @account.handler
        async def change_mind(ctx: Context, source: str, target: str) -> str:
            """Everything votes yes, then the block raises: all of it aborts."""
            try:
                async with ctx.transaction() as tx:
                    await tx.call(self.account, source, "withdraw", amount=1)
                    await tx.call(self.account, target, "deposit", amount=1)
                    raise RuntimeError("changed my mind")
            except RuntimeError as exc:
                return str(exc)

        @account.handler
        async def steps(ctx: Context, steps: list[list[object]], tx_timeout: float = 10.0) -> object:
            """A transaction over the given steps ([function, key, handler, args]); an abort is returned, not raised."""
            try:
                async with ctx.transaction(timeout=tx_timeout) as tx:
                    return [await tx.call(str(f), str(k), str(h), **dict(a)) for f, k, h, a in steps]  # type: ignore
            except statefn.TransactionAborted as exc:
                return f"aborted: {exc.kind}"

        @slow.handler
        async def nap(ctx: Context, seconds: float) -> str:
            self.runs[f"nap {ctx.key}"] += 1
            await asyncio.sleep(seconds)
            return "rested"

        @account.handler
        async def read(ctx: Context) -> list[object]:
            return [ctx[balance], ctx[history]]

        @audit.handler
        async def note(ctx: Context, line: str) -> None:
            ctx[lines].append(line)

        self.app = statefn.App(account, audit, slow)


@pytest.fixture
def bank(namespace: str) -> Bank:
    return Bank(namespace)


@contextlib.asynccontextmanager
async def platform(bank: Bank, nats_server, etcd_server) -> AsyncIterator[statefn.Client]:
    async with helpers.running_sidecar(bank.app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=30) as c:
        yield c


def deposit(bank: Bank, key: str, amount: int) -> list[object]:
    return [bank.account, key, "deposit", {"amount": amount}]


def nap(bank: Bank, key: str, seconds: float) -> list[object]:
    return [bank.slow, key, "nap", {"seconds": seconds}]


def decided(bank: Bank, outcome: str) -> float:
    return float(metrics.TRANSACTIONS.labels(bank.account, outcome)._value.get())


def events(bank: Bank, event: str, function: str = "") -> float:
    value = metrics.TRANSACTION_PARTICIPANTS.labels(function or bank.account, event)._value.get()
    return float(value)


async def stored_locks(etcd_server, function: str) -> dict[str, list[bytes]]:
    """Prepared and suspended records left in etcd, by kind: nothing may stay locked."""
    found: dict[str, list[bytes]] = {"prepared": [], "suspended": []}
    async with helpers.etcd(etcd_server) as raw:
        fn = layout.FunctionType.parse(function)
        for p in range(4):
            keys = layout.PartitionKeys(fn, p)
            for kind, prefix in (("prepared", keys.prepared_prefix), ("suspended", keys.suspended_prefix)):
                found[kind] += [kv.key for kv in await raw.get_prefix(prefix)]
    return found


async def balances(c: statefn.Client, bank: Bank, *keys: str) -> dict[str, int]:
    return {k: (await c.get_state(bank.account, k)).get("balance", 100) for k in keys}


async def settled(etcd_server, bank: Bank, timeout: float = 10.0) -> None:
    async def no_locks() -> bool:
        for function in (bank.account, bank.slow):
            if await stored_locks(etcd_server, function) != {"prepared": [], "suspended": []}:
                return False
        return True
    await helpers.eventually(no_locks, timeout)


async def test_a_transaction_commits_every_participant_including_its_own_key(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        committed, applied = decided(bank, "committed"), events(bank, "committed")
        assert await c.invoke(bank.account, "alice", "transfer", to="bob", amount=30, ref="t1") == [70, 130]
        await settled(etcd_server, bank)
        assert decided(bank, "committed") == committed + 1
        assert events(bank, "committed") == applied + 2  # alice's and bob's prepared effects applied
        assert await balances(c, bank, "alice", "bob") == {"alice": 70, "bob": 130}
        assert bank.runs["withdraw alice"] == 1 and bank.runs["deposit bob"] == 1
        # A participant's messages are staged too, and go out once, on commit.
        async def audited() -> bool:
            return await c.get_state(bank.audit, "alice") == {"lines": ["t1 -30"]}
        await helpers.eventually(audited)


async def test_a_participant_voting_no_aborts_the_others(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        aborted, dropped = decided(bank, "aborted"), events(bank, "aborted")
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(bank.account, "carol", "transfer", to="closed-1", amount=30, ref="t2")
        assert "closed-1 is closed" in err.value.message
        # The abort goes out with the failed run's commit: well before the participant would ask (10 s).
        await settled(etcd_server, bank, timeout=3)
        assert decided(bank, "aborted") == aborted + 1
        assert events(bank, "aborted") == dropped + 1  # carol's prepared withdrawal (closed-1 voted no)
        # carol's withdrawal was prepared (it ran, and voted yes), then aborted: nothing of it remains.
        assert bank.runs["withdraw carol"] == 1
        assert await c.invoke(bank.account, "carol", "read") == [100, []]
        await asyncio.sleep(0.3)
        assert await c.get_state(bank.audit, "carol") == {}  # its staged message was dropped too


async def test_a_block_that_raises_aborts_everything_it_prepared(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        assert await c.invoke(bank.account, "dan", "change_mind", source="erin", target="fay") == "changed my mind"
        await settled(etcd_server, bank)
        assert await balances(c, bank, "erin", "fay") == {"erin": 100, "fay": 100}


async def test_one_participant_twice_reads_its_own_staged_state(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        assert await c.invoke(bank.account, "gus", "move_twice", source="hal", target="ida") == 115
        await settled(etcd_server, bank)
        assert await c.invoke(bank.account, "hal", "read") == [85, ["-10", "-5"]]


async def test_wait_die_a_younger_transaction_dies_at_a_key_an_older_one_holds(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        died = events(bank, "died")
        older = asyncio.create_task(c.invoke(bank.account, "old", "steps",
                                             steps=[deposit(bank, "x", 1), nap(bank, "s", 1.0)]))

        async def x_prepared() -> bool:
            return bool((await stored_locks(etcd_server, bank.account))["prepared"])
        await helpers.eventually(x_prepared)
        assert await c.invoke(bank.account, "young", "steps", steps=[deposit(bank, "x", 2)]) == "aborted: tx_conflict"
        assert await older == [101, "rested"]
        await settled(etcd_server, bank)
        assert await balances(c, bank, "x") == {"x": 101}
        assert events(bank, "died") == died + 1


async def test_wait_die_an_older_transaction_waits_for_a_younger_one(bank, nats_server, etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        died = events(bank, "died")
        older = asyncio.create_task(c.invoke(bank.account, "old", "steps",
                                             steps=[nap(bank, "s1", 0.8), deposit(bank, "x", 1)]))
        await asyncio.sleep(0.2)
        younger = asyncio.create_task(c.invoke(bank.account, "young", "steps",
                                               steps=[deposit(bank, "x", 2), nap(bank, "s2", 1.5)]))
        # The younger holds x when the older reaches it: the older waits in x's inbox, then commits too.
        assert await younger == [102, "rested"]
        assert await older == ["rested", 103]
        await settled(etcd_server, bank)
        assert await balances(c, bank, "x") == {"x": 103}
        assert events(bank, "died") == died


async def test_a_vote_later_than_the_timeout_aborts_and_releases_its_participant(bank, nats_server,
                                                                                etcd_server) -> None:
    async with platform(bank, nats_server, etcd_server) as c:
        orphans = events(bank, "orphan_abort")
        got = await c.invoke(bank.account, "impatient", "steps", tx_timeout=0.5,
                             steps=[deposit(bank, "y", 5), nap(bank, "s3", 1.5)])
        assert got == "aborted: tx_timeout"
        assert await balances(c, bank, "y") == {"y": 100}  # y was prepared, and aborted at once

        async def released() -> bool:  # s3 votes yes a second later, to nobody: it is told to abort
            return events(bank, "orphan_abort") == orphans + 1 and events(bank, "aborted", bank.slow) >= 1
        await helpers.eventually(released)
        await settled(etcd_server, bank)
        assert bank.runs["nap s3"] == 1


async def test_a_prepared_participant_whose_coordinator_failed_asks_and_is_released(bank, nats_server,
                                                                                    etcd_server) -> None:
    """The coordinator's invocation fails without deciding (its next participant does not exist): presumed abort."""
    async with platform(bank, nats_server, etcd_server) as c:
        inquired = events(bank, "inquired")
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(bank.account, "lost", "steps", tx_timeout=0.5,
                           steps=[deposit(bank, "z", 7), ["nowhere/missing", "k", "h", {}]])
        assert err.value.kind == "unknown_function"
        assert (await stored_locks(etcd_server, bank.account))["prepared"]  # z waits for a decision...
        await settled(etcd_server, bank)  # ...asks the coordinator after its timeout, and is told to abort
        assert events(bank, "inquired") >= inquired + 1
        assert await balances(c, bank, "z") == {"z": 100}


async def test_a_transaction_that_died_runs_again_from_scratch_once_its_key_is_free(bank, nats_server,
                                                                                    etcd_server) -> None:
    """The transfer of docs/transactions.md lets TransactionAborted escape: the invocation ends and runs again."""
    async with platform(bank, nats_server, etcd_server) as c:
        older = asyncio.create_task(c.invoke(bank.account, "old", "steps",
                                             steps=[deposit(bank, "x", 1), nap(bank, "s", 1.0)]))

        async def x_prepared() -> bool:
            return bool((await stored_locks(etcd_server, bank.account))["prepared"])
        await helpers.eventually(x_prepared)
        assert await c.invoke(bank.account, "young", "transfer", to="x", amount=2, ref="r") == [98, 103]
        assert await older == [101, "rested"]
        assert bank.runs["transfer young"] >= 3  # died at x (run, replayed with the refusal), then ran again
        # Each run's transaction has the first one's age: a restarted transaction only gets older (no starvation).
        ages = bank.ages["young"]
        assert len(ages) == bank.runs["transfer young"] and len(set(ages)) == 1
        await settled(etcd_server, bank)
        assert await balances(c, bank, "young", "x") == {"young": 98, "x": 103}
        assert await c.invoke(bank.account, "young", "read") == [98, ["-2"]]  # the aborted try left nothing
