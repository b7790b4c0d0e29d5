"""Dead letters: a failed invocation lands in the DLQ; replay runs it once, even replayed twice."""

from __future__ import annotations

import asyncio

import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_sidecar import deadletters
from tests import helpers


def make_app(ns: str, broken: dict[str, bool]) -> statefn.App:
    orders = StatefulFunction(f"{ns}/orders", max_attempts=1)
    total = orders.state("total", int, default=0)

    @orders.handler
    async def add(ctx: Context, amount: int) -> int:
        if broken["yes"]:
            raise RuntimeError("payment service down")
        ctx[total] += amount
        return ctx[total]

    return statefn.App(orders)


async def _letters(c: statefn.Client, fn: str, n: int) -> list[deadletters.DeadLetter]:
    js = c.nats.jetstream()
    for _ in range(100):
        letters = await deadletters.list_dead_letters(js, function=fn)
        if len(letters) >= n:
            return letters
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {n} dead letters for {fn}")


async def test_dead_letter_then_replay_once(nats_server, etcd_server, namespace) -> None:
    fn = f"{namespace}/orders"
    broken = {"yes": True}
    async with helpers.running_sidecar(make_app(namespace, broken), nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        for amount in (3, 4):
            with pytest.raises(statefn.InvocationFailed) as err:
                await c.invoke(fn, "o1", "add", amount=amount)
            assert (err.value.kind, err.value.message) == ("handler_error", "payment service down")
        letters = await _letters(c, fn, 2)
        assert [(d.record["key"], d.record["handler"], d.record["args"], d.error["kind"]) for d in letters] == [
            ("o1", "add", {"amount": 3}, "handler_error"), ("o1", "add", {"amount": 4}, "handler_error")]
        broken["yes"] = False
        first = letters[0]
        assert await deadletters.replay(c, first) == f"dlq-replay:{first.seq}"
        # Replaying the same entry again (e.g. an operator ran the command twice) runs it once.
        await c.send(fn, "o1", "add", idempotency_key=f"dlq-replay:{first.seq}", amount=3)
        assert [d.seq for d in await deadletters.list_dead_letters(c.nats.jetstream(), function=fn)] == [
            letters[1].seq]
        await deadletters.replay(c, letters[1])
        for _ in range(50):
            if (await c.get_state(fn, "o1")).get("total") == 7:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        assert await c.get_state(fn, "o1") == {"total": 7}
        assert await deadletters.list_dead_letters(c.nats.jetstream(), function=fn) == []
        with pytest.raises(statefn.StatefnError, match="no dead letter with sequence 999999"):
            await deadletters.get_dead_letter(c.nats.jetstream(), 999999)
