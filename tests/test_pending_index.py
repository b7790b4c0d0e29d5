"""The pending-work index: each partition's earliest due timer and inbox size, kept by its owner's commits.

The autoscaler wakes a function at zero replicas from this index alone, so it must never say a
timer is later than it is, and must clear once the work is done. On real nats-server and etcd: a
durable sleep, a delayed send, a retry backoff and a queued message each show in the index while
pending and leave it once done; a partition's next owner rewrites an entry that disagrees with
its timers; and the timer heap's look-ahead (what a commit will leave) matches a brute force.
"""

from __future__ import annotations

import random
import time

import hypothesis
from hypothesis import strategies as st

import statefn
from statefn import Context, StatefulFunction
from statefn_core import layout, pendingwork
from statefn_sidecar import devservers, timers, topology, twophase
from tests import helpers


def timer_app(ns: str) -> statefn.App:
    fn = StatefulFunction(f"{ns}/timers", backoff_initial=0.05)
    marks = fn.state("marks", list[str], default=[])

    @fn.handler
    async def nap(ctx: Context, seconds: float) -> str:
        await ctx.sleep(seconds)
        ctx[marks] = [*ctx[marks], "woke"]
        return "woke"

    @fn.handler
    async def later(ctx: Context, seconds: float) -> None:
        ctx.send(ctx.function, ctx.key, "mark", delay=seconds, what="delayed")

    @fn.handler
    async def flaky(ctx: Context, seconds: float) -> str:
        if ctx.attempt == 1:
            raise statefn.Retry("not yet", after=seconds)
        ctx[marks] = [*ctx[marks], "retried"]
        return "retried"

    @fn.handler
    async def mark(ctx: Context, what: str) -> None:
        ctx[marks] = [*ctx[marks], what]

    return statefn.App(fn)


async def pending(etcd_server: devservers.EtcdServer, function: str) -> pendingwork.PendingWork:
    async with helpers.etcd(etcd_server) as raw:
        return await topology.pending_work(raw, layout.FunctionType.parse(function))


def due_near(work: pendingwork.PendingWork, seconds: float, sent: float) -> bool:
    """The index's next timer is the one a handler set ``seconds`` after it got a message sent at ``sent``.

    Floored to the second, so up to 1 s before ``sent + seconds``; no later than ``seconds`` from now.
    """
    if work.next_due_ms is None:
        return False
    return (sent + seconds) * 1000 - 1000 <= work.next_due_ms <= (time.time() + seconds) * 1000


async def test_timers_and_inboxes_show_while_pending_and_clear_when_done(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    fn = f"{namespace}/timers"
    async with helpers.running_sidecar(timer_app(namespace), nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as client:
        assert await pending(etcd_server, fn) == pendingwork.PendingWork(None, 0)
        sent = time.time()
        for key, handler in (("sleeper", "nap"), ("sender", "later"), ("retrier", "flaky")):
            await client.send(fn, key, handler, seconds=4)
        # The sleeping key is locked: a message to it waits in its inbox, and counts.
        await client.send(fn, "sleeper", "mark", what="queued")
        work = await helpers.eventually_value(lambda: pending(etcd_server, fn),
                                              lambda w: w.inbox == 1 and due_near(w, 4, sent))
        assert work.inbox == 1 and due_near(work, 4, sent), work

        async def all_done() -> bool:
            states = [await client.get_state(fn, k) for k in ("sleeper", "sender", "retrier")]
            return [s.get("marks") for s in states] == [["woke", "queued"], ["delayed"], ["retried"]]
        await helpers.eventually(all_done, timeout=15)
        work = await helpers.eventually_value(lambda: pending(etcd_server, fn),
                                              lambda w: w == pendingwork.PendingWork(None, 0))
        assert work == pendingwork.PendingWork(None, 0)
        assert not await helpers.locks_left(etcd_server, fn, 4, timers=True)


async def test_the_next_owner_rewrites_an_entry_that_disagrees(
        nats_server: devservers.NatsServer, etcd_server: devservers.EtcdServer, namespace: str) -> None:
    fn = f"{namespace}/timers"
    app = timer_app(namespace)
    partition = layout.partition_of("sleeper", 4)
    entry_key = layout.PartitionKeys(layout.FunctionType.parse(fn), partition).pending
    async with helpers.running_sidecar(app, nats_server, etcd_server), \
            helpers.client(nats_server, etcd_server) as client:
        sent = time.time()
        await client.send(fn, "sleeper", "nap", seconds=60)
        work = await helpers.eventually_value(lambda: pending(etcd_server, fn), lambda w: due_near(w, 60, sent))
        assert due_near(work, 60, sent), work
    # A graceful stop leaves the entry: the timer is still there, and a function at zero is woken for it.
    assert due_near(await pending(etcd_server, fn), 60, sent)
    async with helpers.etcd(etcd_server) as raw:
        await raw.put(entry_key, b"\xc1 not msgpack")
    # Undecodable, it reads as due now (wake the function): never as nothing pending.
    assert (await pending(etcd_server, fn)).next_due_ms == 0
    async with helpers.running_sidecar(app, nats_server, etcd_server):
        work = await helpers.eventually_value(lambda: pending(etcd_server, fn), lambda w: due_near(w, 60, sent))
        assert due_near(work, 60, sent) and work.inbox == 0, work
    async with helpers.etcd(etcd_server) as raw:
        await raw.delete(entry_key)  # as if the timer had been written by a version without the index
    async with helpers.running_sidecar(app, nats_server, etcd_server):
        work = await helpers.eventually_value(lambda: pending(etcd_server, fn), lambda w: due_near(w, 60, sent))
        assert due_near(work, 60, sent), work


def test_earliest_looks_ahead_of_a_commit_exactly() -> None:
    heap = timers.TimerHeap()
    for due, key in ((50, b"a"), (10, b"b"), (30, b"c"), (20, b"d")):
        heap.add(due, key, b"")
    assert heap.earliest() == 10
    assert heap.earliest(without={b"b"}) == 20
    assert heap.earliest(without={b"b", b"d"}, plus=[40]) == 30
    assert heap.earliest(without={b"b", b"d", b"c", b"a"}) is None
    assert heap.earliest(without={b"b"}, plus=[5]) == 5
    heap.remove(b"b")
    assert heap.earliest() == 20


def test_earliest_counts_timers_popped_but_not_yet_deleted() -> None:
    """A due timer is popped into a batch but stays in etcd until the commit that applies it: until then it counts."""
    heap = timers.TimerHeap()
    heap.add(1, b"overdue", twophase.timer_payload_inquire("k", "tx"))
    heap.add(2**50, b"later", b"")
    assert [item.timer_key for item in heap.pop_due(10)] == [b"overdue"]
    assert heap.next_due_ms() == 2**50  # the loop's next wake-up: nothing more to pop before it
    assert heap.earliest() == 1 and heap.earliest(without={b"overdue"}) == 2**50
    heap.remove(b"overdue")  # its commit landed
    assert heap.earliest() == 2**50


@hypothesis.given(st.lists(st.integers(0, 50), max_size=40), st.integers(0, 2**32), st.lists(st.integers(0, 60),
                                                                                               max_size=3))
def test_earliest_matches_a_brute_force(dues: list[int], seed: int, plus: list[int]) -> None:
    rng = random.Random(seed)
    heap = timers.TimerHeap()
    live: dict[bytes, int] = {}
    for i, due in enumerate(dues):
        key = f"t{i}".encode()
        heap.add(due, key, b"")
        live[key] = due
    for key in rng.sample(sorted(live), k=len(live) // 3):  # deleted by earlier commits
        heap.remove(key)
        del live[key]
    without = set(rng.sample(sorted(live), k=len(live) // 2))  # deleted by this one
    expected = min([d for k, d in live.items() if k not in without] + plus, default=None)
    assert heap.earliest(without=without, plus=plus) == expected
