"""Two answers to one durable call in one batch: exactly one of them resumes the caller.

A transaction's vote and its vote timeout (the timer's ``tx_timeout`` answer to the same call)
can both reach the coordinator's partition before it pulls again: the participant's owner was
killed, and its new owner voted just as the timer fired. This stages that batch on real servers,
deterministically: the coordinator's sidecar is stopped while it waits for the second vote, the
participant votes, the timer's own answer (read from etcd) is put on the coordinator's partition
beside it, in either order, and the coordinator's sidecar is started again, so that its first pull
holds both. The money must move exactly once, in the order the answers imply.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import codec, constants, envelope, layout
from statefn_sidecar import devservers, metrics, suspension
from tests import helpers

PARTITIONS = 4
TIMEOUT_S = 30.0  # never due by itself here: the test delivers the timer's answer when it wants it


class Ledger:
    """A coordinator function of its own (its sidecar can be stopped alone) and gated accounts."""

    def __init__(self, ns: str) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.runs: collections.Counter[str] = collections.Counter()
        account = StatefulFunction(f"{ns}/account")
        balance = account.state("balance", int, default=100)
        history = account.state("history", list[str], default=[])
        coord = StatefulFunction(f"{ns}/coord", max_attempts=10, backoff_max=0.2)
        self.account, self.coord = str(account.type), str(coord.type)

        @account.handler
        async def withdraw(ctx: Context, amount: int, ref: str) -> int:
            ctx[balance] -= amount
            ctx[history].append(f"{ref}:-{amount}")
            return ctx[balance]

        @account.handler
        async def deposit(ctx: Context, amount: int, ref: str) -> int:
            self.runs[f"deposit {ctx.key}"] += 1
            gate = self.gates.get(f"deposit {ctx.key}")
            if gate is not None:
                await gate.wait()
            ctx[balance] += amount
            ctx[history].append(f"{ref}:+{amount}")
            return ctx[balance]

        @coord.handler
        async def move(ctx: Context, source: str, target: str, amount: int) -> str:
            """The example's move with a separate coordinator: a transaction over two accounts."""
            self.runs[f"move {ctx.key}"] += 1
            async with ctx.transaction(timeout=TIMEOUT_S) as tx:
                await tx.call(self.account, source, "withdraw", amount=amount, ref=ctx.key)
                await tx.call(self.account, target, "deposit", amount=amount, ref=ctx.key)
            return "moved"

        @coord.handler
        async def pay(ctx: Context, source: str, target: str, amount: int) -> str:
            """Two durable calls with a timeout; what follows the second runs once, whichever answer came first."""
            self.runs[f"pay {ctx.key}"] += 1
            await ctx.call(self.account, source, "withdraw", timeout=TIMEOUT_S, amount=amount, ref=ctx.key)
            try:
                await ctx.call(self.account, target, "deposit", timeout=TIMEOUT_S, amount=amount, ref=ctx.key)
                outcome = "paid"
            except statefn.CallFailed as exc:
                outcome = exc.kind
            ctx.send(self.account, "c", "deposit", amount=1, ref=f"{ctx.key}:{outcome}")
            return outcome

        self.app = statefn.App(account, coord)


@contextlib.asynccontextmanager
async def hosting(ledger: Ledger, nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer,
                  function: str) -> AsyncIterator[None]:
    async with helpers.running_sidecar(ledger.app, nats_server, etcd_server, partitions=PARTITIONS,
                                       functions=(function,)):
        yield


async def waiting_record(etcd_server: devservers.EtcdServer, function: str, key: str) -> suspension.Suspension:
    fn = layout.FunctionType.parse(function)
    async with helpers.etcd(etcd_server) as raw:
        got = await raw.get(layout.PartitionKeys(fn, layout.partition_of(key, PARTITIONS)).suspended(key))
    assert got is not None, f"{function}({key!r}) is not suspended"
    return suspension.Suspension.decode(got.value)


async def timeout_answer(etcd_server: devservers.EtcdServer, record: suspension.Suspension) -> envelope.Message:
    """The message the awaited call's timeout timer would send when due: its ``tx_timeout`` answer."""
    async with helpers.etcd(etcd_server) as raw:
        got = await raw.get(record.calls[record.waiting].timer)
    assert got is not None
    kind, _, plain = codec.unpack(got.value)
    assert kind == "send"
    message = envelope.Message.from_plain(plain)
    assert message.is_response and message.args["call"] == record.waiting
    return message


async def put_on_channel(c: statefn.Client, function: str, message: envelope.Message) -> None:
    """Deliver a message to its key's partition as a channel bundle, as the timer's commit would."""
    fn = layout.FunctionType.parse(function)
    sender = layout.PartitionId(layout.FunctionType("test", "timer"), 0)
    body = envelope.encode_bundle(envelope.Bundle(sender=sender.token, seq=1, messages=[message]))
    subject = fn.channel_subject(layout.partition_of(message.key, PARTITIONS), sender)
    await c.nats.jetstream().publish(subject, body, headers={constants.HEADER_KIND: constants.KIND_BUNDLE})


async def pending_at(c: statefn.Client, function: str, key: str) -> int:
    fn = layout.FunctionType.parse(function)
    info = await c.nats.jetstream().consumer_info(fn.stream, fn.consumer_name(layout.partition_of(key, PARTITIONS)))
    return int(info.num_pending or 0)


def decisions(function: str, outcome: str) -> float:
    return float(metrics.TRANSACTIONS.labels(function, outcome)._value.get())


@pytest.mark.parametrize(("handler", "first"), [("move", "vote"), ("move", "timeout"), ("pay", "reply"),
                                                ("pay", "timeout")])
async def test_an_answer_and_its_timeout_in_one_batch_resume_once(nats_server, etcd_server, namespace, handler,
                                                                   first) -> None:
    """The coordinator's first pull after its restart holds the second call's answer and its timeout."""
    ledger = Ledger(namespace)
    ledger.gates["deposit b"] = asyncio.Event()
    committed, aborted = decisions(ledger.coord, "committed"), decisions(ledger.coord, "aborted")
    async with hosting(ledger, nats_server, etcd_server, ledger.account), \
            helpers.client(nats_server, etcd_server, timeout=60) as c:
        async with hosting(ledger, nats_server, etcd_server, ledger.coord):
            call = asyncio.create_task(c.invoke(ledger.coord, "m", handler, source="a", target="b", amount=10))

            async def deposit_running() -> bool:
                return ledger.runs["deposit b"] == 1
            await helpers.eventually(deposit_running)
        # The coordinator's sidecar is gone; it waits (in etcd) for b's answer.
        record = await waiting_record(etcd_server, ledger.coord, "m")
        timeout = await timeout_answer(etcd_server, record)
        before = await pending_at(c, ledger.coord, "m")
        if first == "timeout":
            await put_on_channel(c, ledger.coord, timeout)
        ledger.gates["deposit b"].set()  # b answers

        async def both_waiting() -> bool:
            return await pending_at(c, ledger.coord, "m") == before + (2 if first == "timeout" else 1)
        await helpers.eventually(both_waiting)
        if first != "timeout":
            await put_on_channel(c, ledger.coord, timeout)
        async with hosting(ledger, nats_server, etcd_server, ledger.coord):  # its first pull holds both
            reply = await call
            await helpers.eventually(lambda: no_locks(etcd_server, ledger), timeout=15)
        a, b = await c.get_state(ledger.account, "a"), await c.get_state(ledger.account, "b")
        noted = (await c.get_state(ledger.account, "c")).get("history")
    assert a == {"balance": 90, "history": ["m:-10"]} and b == {"balance": 110, "history": ["m:+10"]}
    if handler == "move":
        # The vote first: it resumes the coordinator (its third run), which commits; the timeout finds nothing
        # waiting. The timeout first: the third run aborts, b's yes vote finds nothing waiting and b is
        # released, and the move runs again from scratch (three more runs), then commits.
        assert reply == "moved"
        assert decisions(ledger.coord, "committed") == committed + 1
        assert decisions(ledger.coord, "aborted") == aborted + (1 if first == "timeout" else 0)
        assert ledger.runs["move m"] == (3 if first == "vote" else 6)
    else:
        # A call's timeout says only that the caller stopped waiting: b's deposit happened either way.
        assert reply == ("paid" if first == "reply" else "call_timeout")
        assert noted == [f"m:{reply}:+1"]  # what follows the call ran once
        assert ledger.runs["pay m"] == 3


async def test_a_call_timeout_due_beside_its_reply_is_never_sent(nats_server, etcd_server, namespace,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The reply and the due timer in one batch: the reply resumes, the timer is deleted without answering."""
    ledger = Ledger(namespace)
    ledger.gates["deposit b"] = asyncio.Event()
    async with hosting(ledger, nats_server, etcd_server, ledger.account), \
            helpers.client(nats_server, etcd_server, timeout=60) as c:
        async with hosting(ledger, nats_server, etcd_server, ledger.coord):
            call = asyncio.create_task(c.invoke(ledger.coord, "m", "pay", source="a", target="b", amount=10))

            async def deposit_running() -> bool:
                return ledger.runs["deposit b"] == 1
            await helpers.eventually(deposit_running)
        record = await waiting_record(etcd_server, ledger.coord, "m")
        await make_due(etcd_server, ledger.coord, "m", record.calls[record.waiting].timer)
        ledger.gates["deposit b"].set()

        async def replied() -> bool:
            return await pending_at(c, ledger.coord, "m") == 1
        await helpers.eventually(replied)
        async with hosting(ledger, nats_server, etcd_server, ledger.coord):
            assert await call == "paid"
            await helpers.eventually(lambda: no_locks(etcd_server, ledger), timeout=15)
            await asyncio.sleep(0.5)  # time for a timeout answer to come back, were one sent
    assert not [r for r in caplog.records if "nothing waits for it" in r.getMessage()]


async def make_due(etcd_server: devservers.EtcdServer, function: str, key: str, timer: bytes) -> None:
    """Move a timer's due time to now (its key names it), as if the sidecar had been away that long."""
    fn = layout.FunctionType.parse(function)
    keys = layout.PartitionKeys(fn, layout.partition_of(key, PARTITIONS))
    async with helpers.etcd(etcd_server) as raw:
        got = await raw.get(timer)
        assert got is not None
        due = keys.timer(int(time.time() * 1000) - 1, timer.rsplit(b"/", 1)[1].decode())
        record = suspension.Suspension.decode((await raw.get(keys.suspended(key))).value)
        (call,) = [c for c in record.calls.values() if c.timer == timer]  # the call that timer answers
        call.timer = due
        t = raw.transactions
        await raw.transaction(compare=[], success=[t.delete(timer), t.put(due, got.value),
                                                   t.put(keys.suspended(key), record.encode())], failure=[])


async def no_locks(etcd_server: devservers.EtcdServer, ledger: Ledger) -> bool:
    return not [k for f in (ledger.account, ledger.coord) for k in await helpers.locks_left(etcd_server, f, PARTITIONS)]
