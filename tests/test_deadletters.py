"""Dead letters: a failed invocation lands in the DLQ; replay runs it once, even replayed twice."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest

import statefn
from statefn import Context, StatefulFunction
from statefn_core import codec, constants, envelope, layout
from statefn_sidecar import config, deadletters, faults, invoker, sidecar, topology
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


async def _letters(c: statefn.Client, fn: str | None, n: int) -> list[deadletters.DeadLetter]:
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
        assert await deadletters.replay(c, first) == f"~dlq-replay:{first.seq}"
        # Replaying the same entry again (e.g. an operator ran the command twice) runs it once.
        assert await deadletters.replay(c, first) == f"~dlq-replay:{first.seq}"
        # A caller cannot claim a replay's key (it would pre-empt the replay).
        with pytest.raises(ValueError, match="reserved for the platform"):
            await c.send(fn, "o1", "add", idempotency_key=f"~dlq-replay:{letters[1].seq}", amount=4)
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


async def test_purge_by_age_count_and_function(nats_server, etcd_server, namespace) -> None:
    fn, other = f"{namespace}/orders", f"{namespace}/other"
    async with helpers.client(nats_server, etcd_server) as c:
        js = c.nats.jetstream()
        await topology.ensure_dlq_stream(js)
        now = time.time()
        for function, ages in ((fn, (300, 200, 100, 0)), (other, (300,))):
            for age in ages:
                await js.publish(layout.FunctionType.parse(function).dlq_subject,
                                 codec.pack({"function": function, "key": "k", "failed_at": now - age}))
        assert await deadletters.purge(js, function=fn, older_than=150) == 2
        assert [round(now - d.record["failed_at"]) for d in await deadletters.list_dead_letters(js, function=fn)] \
            == [100, 0]
        assert await deadletters.purge(js, function=fn, keep=1) == 1
        assert len(await deadletters.list_dead_letters(js, function=fn)) == 1
        assert await deadletters.purge(js, function=fn) == 1
        assert await deadletters.list_dead_letters(js, function=fn) == []
        assert len(await deadletters.list_dead_letters(js, function=other)) == 1  # another function's stay
        info = await js.stream_info(constants.DLQ_STREAM)
        assert info.config.max_msgs_per_subject == constants.DEFAULT_DLQ_MAX_PER_FUNCTION
        assert info.config.max_age == constants.DEFAULT_DLQ_MAX_AGE_S


@pytest.mark.parametrize("new_owner", [False, True], ids=["same-owner", "new-owner"])
async def test_a_lost_ack_never_dead_letters_twice(nats_server, etcd_server, namespace, new_owner: bool) -> None:
    """An undecodable message is dead-lettered and its ack lost; it comes back after ack_wait: still one letter.

    The same owner knows it from memory; a new owner (the first one gone) from the record committed with the letter.
    """
    fn = f"{namespace}/orders"
    app = make_app(namespace, {"yes": False})
    cfg = config.SidecarConfig(nats_url=nats_server.url, etcd_endpoint=etcd_server.endpoint, partitions=1,
                               lease_ttl=3, fetch_timeout=0.2, rebalance_interval=0.1, ack_wait=1.0)
    injected = faults.Faults("ack_lost=1")
    owner = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(app), injected)
    await owner.start()
    ftype = layout.FunctionType.parse(fn)
    nc = await nats.connect(nats_server.url)
    try:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.jetstream().publish(ftype.ingress_subject(0), b"\xc1 not msgpack",
                                     headers={constants.HEADER_REPLY_TO: inbox})
        reply = envelope.Reply.decode((await sub.next_msg(timeout=10)).data)
        assert reply.error is not None and reply.error.kind == "undecodable"
        assert injected.fired == {"ack_lost": 1}
        injected.rates.clear()  # one lost ack
        if new_owner:
            await owner.stop()
            owner = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(app))
            await owner.start()
        # Redelivered after ack_wait: answered with the same reply, acked, not dead-lettered again.
        again = envelope.Reply.decode((await sub.next_msg(timeout=10)).data)
        assert again == reply
        js = nc.jetstream()
        for _ in range(50):
            info = await js.consumer_info(ftype.stream, ftype.consumer_name(0))
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            await asyncio.sleep(0.1)
        assert (info.num_ack_pending, info.num_pending) == (0, 0), info
        await asyncio.sleep(0.5)  # a second letter, if any, would be published by now
        letters = await deadletters.list_dead_letters(js, function=fn)
        assert [letter.record["error"]["kind"] for letter in letters] == ["undecodable"]
        # Known from memory (dropped at intake), or from the record (the commit's idempotency compare refused it).
        stats = owner.status()["stats"]
        assert stats.get("idempotency_conflicts" if new_owner else "duplicates") == 1, stats
    finally:
        await owner.stop()
        await nc.close()


def make_shop(ns: str, broken: set[str]) -> statefn.App:
    stock = StatefulFunction(f"{ns}/stock", max_attempts=1)
    left = stock.state("left", int, default=5)
    order = StatefulFunction(f"{ns}/order", max_attempts=1)
    stock_fn = str(stock.type)

    @stock.handler
    async def take(ctx: Context, qty: int) -> int:
        if ctx.key in broken:
            raise RuntimeError(f"{ctx.key}: scale offline")
        ctx[left] -= qty
        return ctx[left]

    @order.handler
    async def place(ctx: Context, items: list[str]) -> str:
        for item in items:
            await ctx.call(stock_fn, item, "take", qty=1)
        return "placed"

    @order.handler
    async def place_all_or_nothing(ctx: Context, items: list[str]) -> str:
        async with ctx.transaction() as tx:
            for item in items:
                await tx.call(stock_fn, item, "take", qty=1)
        return "placed"

    return statefn.App(stock, order)


async def test_a_replay_that_would_not_be_exactly_once_is_refused(nats_server, etcd_server, namespace) -> None:
    """A callee's error answered its caller, a participant's aborted its transaction: neither may run again alone.

    An invocation that failed after finished calls resumes from its journal (its successful calls are not
    made again); one that ran a transaction would repeat its steps: only with ``repeat_steps``.
    """
    broken = {"bolts"}
    async with helpers.running_sidecar(make_shop(namespace, broken), nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        with pytest.raises(statefn.InvocationFailed):
            await c.invoke(f"{namespace}/order", "o1", "place", items=["nuts", "bolts"])
        with pytest.raises(statefn.InvocationFailed):
            await c.invoke(f"{namespace}/order", "o2", "place_all_or_nothing", items=["nuts", "bolts"])
        letters = {(d.function.rsplit("/", 1)[1], d.record["key"], bool(d.record["transaction"])): d
                   for d in await _letters(c, f"{namespace}/order", 2) + await _letters(c, f"{namespace}/stock", 2)}
        callee, participant = letters["stock", "bolts", False], letters["stock", "bolts", True]
        caller, coordinator = letters["order", "o1", False], letters["order", "o2", False]
        assert callee.record["caller"] == f"{namespace}/order('o1')"
        assert (caller.record["journaled"], caller.record["caller"], caller.record["transaction"]) == (2, None, None)
        broken.clear()
        assert caller.record["journal_ref"] and not coordinator.record.get("journal_ref")
        assert deadletters.replay_refusal(caller) is None
        for letter, reason in ((callee, "answered a durable call from"), (participant, "participant of transaction"),
                               (coordinator, "durable step")):
            with pytest.raises(statefn.StatefnError, match=reason):
                await deadletters.replay(c, letter)
        for letter in (participant, callee):  # never, whatever the operator says
            with pytest.raises(statefn.StatefnError):
                await deadletters.replay(c, letter, repeat_steps=True)
        await deadletters.replay(c, caller)  # resumes from its journal: nuts is not taken again, bolts is taken

        async def placed() -> bool:
            return (await c.get_state(f"{namespace}/stock", "bolts")).get("left") == 4
        await helpers.eventually(placed)
        assert await c.get_state(f"{namespace}/stock", "nuts") == {"left": 4}
        remaining = {d.seq for d in await deadletters.list_dead_letters(c.nats.jetstream())}
        assert caller.seq not in remaining and {callee.seq, participant.seq, coordinator.seq} <= remaining


async def test_a_malformed_idempotency_key_is_dead_lettered_and_the_partition_goes_on(nats_server, etcd_server,
                                                                                    namespace) -> None:
    """An idempotency key that is not a string once reached lookups that crashed the partition loop, again
    on every redelivery; now it is an undecodable message: an error to its caller and a dead letter."""
    fn = f"{namespace}/orders"
    async with helpers.running_sidecar(make_app(namespace, {"yes": False}), nats_server, etcd_server,
                                       partitions=1), helpers.client(nats_server, etcd_server, timeout=20) as c:
        ftype = layout.FunctionType.parse(fn)
        inbox = c.nats.new_inbox()
        sub = await c.nats.subscribe(inbox)
        body = codec.pack({"k": "o1", "h": "add", "a": {"amount": 1}, "i": ["not", "a", "string"]})
        await c.nats.jetstream().publish(ftype.ingress_subject(0), body,
                                         headers={constants.HEADER_REPLY_TO: inbox})
        reply = envelope.Reply.decode((await sub.next_msg(timeout=10)).data)
        assert reply.error is not None and reply.error.kind == "undecodable"
        assert "idempotency key" in reply.error.message
        assert await c.invoke(fn, "o1", "add", amount=2) == 2  # the partition still serves
        (letter,) = await _letters(c, fn, 1)
        assert letter.error["kind"] == "undecodable"


@pytest.mark.parametrize("handler", ["~commit", "~abort", "~inquire", "~response"])
async def test_an_internal_handler_sent_from_outside_is_an_unknown_handler(nats_server, etcd_server, namespace,
                                                                         handler: str) -> None:
    """Decisions, inquiries and replies travel only on channels; from a client they once reached an assert in
    2PC (the partition loop crashed on every redelivery). Now: an error to the caller, a dead letter, and the
    partition goes on."""
    fn = f"{namespace}/orders"
    async with helpers.running_sidecar(make_app(namespace, {"yes": False}), nats_server, etcd_server,
                                       partitions=1), helpers.client(nats_server, etcd_server, timeout=20) as c:
        with pytest.raises(statefn.InvocationFailed) as err:
            await c.invoke(fn, "o1", handler)
        assert err.value.kind == "unknown_handler" and repr(handler) in err.value.message
        assert await c.invoke(fn, "o1", "add", amount=2) == 2
        (letter,) = await _letters(c, fn, 1)
        assert letter.record["handler"] == handler


async def test_a_functions_own_retention_is_enforced_by_the_operator(nats_server, etcd_server, namespace) -> None:
    """spec.deadLetters: the operator's tick purges this function's letters past its own age and count, at most
    once a minute, and leaves other functions' alone."""
    from statefn_operator import dataplane, functions

    fn, other = layout.FunctionType(namespace, "orders"), layout.FunctionType(namespace, "other")
    plane = await dataplane.DataPlane.connect(nats_server.url, etcd_server.endpoint)
    try:
        await topology.ensure_dlq_stream(plane.js)
        now = time.time()
        for function, ages in ((fn, (7200, 5000, 30, 20, 10)), (other, (7200,))):
            for age in ages:
                await plane.js.publish(function.dlq_subject, codec.pack({"function": str(function), "key": "k",
                                                                         "failed_at": now - age}))
        rt = type("Rt", (), {"dataplane": plane})()
        memo: dict[str, object] = {}
        spec = {"deadLetters": {"maxAgeSeconds": 3600, "maxMessages": 2}}
        await functions._trim_dead_letters(fn, spec, memo, rt, 1000.0)  # type: ignore[arg-type]
        left = [round(now - d.record["failed_at"]) for d in await deadletters.list_dead_letters(plane.js,
                                                                                                 function=str(fn))]
        assert left == [20, 10]  # the two past an hour by age, then all but the newest two
        assert len(await deadletters.list_dead_letters(plane.js, function=str(other))) == 1
        await plane.js.publish(fn.dlq_subject, codec.pack({"function": str(fn), "key": "k", "failed_at": now}))
        await functions._trim_dead_letters(fn, spec, memo, rt, 1030.0)  # type: ignore[arg-type]
        assert len(await deadletters.list_dead_letters(plane.js, function=str(fn))) == 3  # not yet a minute on
        await functions._trim_dead_letters(fn, spec, memo, rt, 1061.0)  # type: ignore[arg-type]
        assert len(await deadletters.list_dead_letters(plane.js, function=str(fn))) == 2
    finally:
        await plane.close()


def make_trip(ns: str, broken: dict[str, bool]) -> tuple[statefn.App, dict[str, int]]:
    runs = {"hotel": 0, "flight": 0}
    trip = StatefulFunction(f"{ns}/trip", max_attempts=1)
    hotel = StatefulFunction(f"{ns}/hotel", max_attempts=1)
    flight = StatefulFunction(f"{ns}/flight", max_attempts=1)
    booked = hotel.state("booked", int, default=0)

    @trip.handler
    async def book(ctx: Context, nights: int) -> str:
        room = await ctx.call(f"{ns}/hotel", "h1", "reserve", nights=nights)
        seat = await ctx.call(f"{ns}/flight", "f1", "seat")
        return f"room {room}, seat {seat}"

    @hotel.handler
    async def reserve(ctx: Context, nights: int) -> int:
        runs["hotel"] += 1
        ctx[booked] += nights
        return ctx[booked]

    @flight.handler
    async def seat(ctx: Context) -> str:
        runs["flight"] += 1
        if broken["yes"]:
            raise RuntimeError("no seats")
        return "12A"

    return statefn.App(trip, hotel, flight), runs


async def test_a_replay_resumes_from_the_failed_runs_journal(nats_server, etcd_server, namespace) -> None:
    """The trip reserved a hotel, then its flight failed: a replay from the start would reserve the hotel again.
    It resumes from the journal the dead-lettering commit kept: the hotel call is answered from it."""
    broken = {"yes": True}
    app, runs = make_trip(namespace, broken)
    async with helpers.running_sidecar(app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server, timeout=20) as c:
        with pytest.raises(statefn.InvocationFailed):
            await c.invoke(f"{namespace}/trip", "t1", "book", nights=3)
        (letter,) = [d for d in await _letters(c, f"{namespace}/trip", 1)]
        assert letter.record["journaled"] == 2 and letter.record["journal_ref"]  # the hotel's reply, the flight's error
        assert deadletters.replay_refusal(letter) is None  # resumable: no --repeat-steps needed
        broken["yes"] = False
        idem = await deadletters.replay(c, letter)

        async def done() -> bool:
            return runs["flight"] == 2
        await helpers.eventually(done)
        await asyncio.sleep(0.5)
        assert runs == {"hotel": 1, "flight": 2}  # the hotel reserved once, the flight tried twice
        assert await c.get_state(f"{namespace}/hotel", "h1") == {"booked": 3}
        # The journal is gone with the replay that used it; a second replay of the letter is answered from the
        # first's record (same idempotency key), and runs nothing.
        assert idem == f"~dlq-replay:{letter.seq}"
        async with helpers.etcd(etcd_server) as raw:
            assert await raw.get(letter.record["journal_ref"].encode()) is None


def test_a_replay_that_could_not_resume_is_not_run_from_the_start_unasked() -> None:
    """Its journal expired: the replay failed (a new letter, without a journal). Replayed again, it would run from
    the start and repeat the steps the first run finished: only with repeat_steps."""
    letter = deadletters.DeadLetter(seq=7, record={
        "function": "ns/trip", "key": "t1", "handler": "book", "journaled": 0, "resumed_from": "/statefn/x",
        "error": {"kind": "invalid_argument", "message": "the journal this replay resumes from is gone"}})
    assert "could not resume from its journal" in str(deadletters.replay_refusal(letter))
    assert deadletters.replay_refusal(letter, repeat_steps=True) is None
