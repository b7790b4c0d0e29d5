"""Exactly-once through kill -9, zombies (SIGSTOP past the lease) and rebalancing.

Meanwhile the pending-work index, sampled in the background, must never say a partition's next
timer is later than it is (the autoscaler would wake a function at zero too late), and once the
work is done it must say exactly what is left.

Each test runs its own nats-server and etcd (it restarts them) and real sidecar processes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import nats.errors
import pytest

import statefn
from statefn_core import layout
from statefn_sidecar import devservers
from tests import helpers, procs
from tests.apps import bank

pytestmark = pytest.mark.crash
APP = "tests.apps.ordered:app"
_log = logging.getLogger("test.crash")


async def invoke_until_answered(c: statefn.Client, fn: str, key: str, idem: str, **args: object) -> object:
    """What a careful caller does: re-send with the same idempotency key until answered."""
    while True:
        try:
            return await c.invoke(fn, key, "increment", idempotency_key=idem, **args)
        except (statefn.InvocationTimeout, nats.errors.Error, OSError, TimeoutError) as exc:
            _log.info("retrying %s after %s", idem, type(exc).__name__)
            await asyncio.sleep(0.2)


async def run_load(jobs: list[Callable[[], Awaitable[object]]], concurrency: int) -> None:
    queue: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            await queue.get_nowait()()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


@contextlib.asynccontextmanager
async def client(servers: tuple[devservers.NatsServer, devservers.EtcdServer]) -> AsyncIterator[statefn.Client]:
    async with statefn.Client(nats=servers[0].url, etcd=servers[1].endpoint, retry_interval=3.0, timeout=20) as c:
        yield c


async def wait_for_partitions(sc: procs.SidecarProcess, want: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while sorted(sc.partitions()) != want:
        assert time.monotonic() < deadline, f"owns {sc.partitions()}, expected {want}"
        await asyncio.sleep(0.1)


async def counts(c: statefn.Client, fn: str, keys: list[str]) -> dict[str, int]:
    out = {}
    for k in keys:
        out[k] = (await c.get_state(fn, k)).get("count", 0)
    return out


async def test_exactly_once_under_crashes(servers, namespace) -> None:
    fn = f"{namespace}/counter"
    keys = [f"k{i}" for i in range(500)]
    plan = [(keys[i % len(keys)], f"inc-{i}") for i in range(20_000)]
    random.Random(1).shuffle(plan)
    expected = collections.Counter(k for k, _ in plan)
    nats_s, etcd_s = servers
    with procs.group(3, namespace, servers, APP) as group:
        async with client(servers) as c:
            done = asyncio.Event()
            faults = collections.Counter()

            async def chaos() -> None:
                rng = random.Random(7)
                start = time.monotonic()
                restarted = set()
                while not done.is_set():
                    await asyncio.sleep(2.0)
                    if done.is_set():
                        break
                    victim = rng.choice(group)
                    await asyncio.to_thread(victim.kill)
                    victim.start()
                    faults["sidecar_kill9"] += 1
                    elapsed = time.monotonic() - start
                    if elapsed > 5 and "nats" not in restarted:
                        await asyncio.to_thread(nats_s.restart)
                        restarted.add("nats")
                        faults["nats_restart"] += 1
                    elif elapsed > 10 and "etcd" not in restarted:
                        await asyncio.to_thread(etcd_s.restart)
                        restarted.add("etcd")
                        faults["etcd_restart"] += 1

            async with helpers.watching_pending_index(etcd_s, [fn], 8) as watch:
                chaos_task = asyncio.create_task(chaos())
                t0 = time.monotonic()
                await run_load([lambda k=k, i=i: invoke_until_answered(c, fn, k, i) for k, i in plan], concurrency=64)
                elapsed = time.monotonic() - t0
                done.set()
                await chaos_task
            got = await counts(c, fn, keys)
            inexact = await helpers.settled_pending_index(etcd_s, [fn])
    _log.warning("20,000 increments in %.1fs under %s", elapsed, dict(faults))
    assert faults["sidecar_kill9"] >= 3 and faults["nats_restart"] == 1 and faults["etcd_restart"] == 1
    wrong = {k: (got[k], expected[k]) for k in keys if got[k] != expected[k]}
    assert wrong == {}, f"{len(wrong)} counters differ (got, expected): {dict(list(wrong.items())[:10])}"
    helpers.assert_pending_index_safe(watch)
    assert inexact == [], f"pending-work index not settled: {inexact}"


@pytest.mark.parametrize("handler", ["run", "saga", "send_tx"])
async def test_durable_calls_conserve_money_under_crashes(servers, namespace, handler) -> None:
    """Transfers are two durable calls each; kill -9 sidecars meanwhile: every call ran exactly once.

    Transfers share 40 transfer keys, so most of them wait in a locked key's inbox at some point. As
    sagas, one in ten goes to a closed account: its deposit fails and the withdrawal is refunded, so
    every saga ends complete or fully compensated, and the money is still all there. As transactions
    (``send_tx``, coordinated by the source account itself), one in ten aborts the same way, many
    die under wait-die and run again, and afterwards no key is left prepared or locked.
    """
    accounts, transfers = [f"a{i}" for i in range(30)], 600
    rng = random.Random(3)
    plan = []
    for i in range(transfers):
        source, target = rng.sample(accounts, 2)
        if handler != "run" and i % 10 == 9:
            target = f"closed{i % 3}"
        plan.append((f"t{i % 40}", f"x{i}", source, target, rng.randint(1, 5)))
    expected = collections.Counter({a: bank.OPENING_BALANCE for a in accounts})
    outcomes = {}
    for _, ref, source, target, amount in plan:
        if target.startswith("closed"):
            outcomes[ref] = "compensated" if handler == "saga" else "aborted"
            continue
        outcomes[ref] = "done"
        expected[source] -= amount
        expected[target] += amount
    with procs.group(3, namespace, servers, "tests.apps.bank:app") as group:
        async with client(servers) as c:
            done = asyncio.Event()
            kills = 0

            async def chaos() -> None:
                nonlocal kills
                while not done.is_set():
                    await asyncio.sleep(2.5)
                    if not done.is_set():
                        victim = group[kills % len(group)]
                        await asyncio.to_thread(victim.kill)
                        victim.start()
                        kills += 1

            async def one(key: str, ref: str, source: str, target: str, amount: int) -> None:
                want = ref if handler == "run" else outcomes[ref]
                fn, args = f"{namespace}/transfer", {"source": source}
                if handler == "send_tx":
                    fn, key, args = f"{namespace}/account", source, {}
                while True:
                    try:
                        assert await c.invoke(fn, key, handler, idempotency_key=ref, ref=ref,
                                              target=target, amount=amount, **args) == want
                        return
                    except (statefn.InvocationTimeout, nats.errors.Error, OSError, TimeoutError):
                        await asyncio.sleep(0.2)

            functions = [f"{namespace}/transfer", f"{namespace}/account"]
            async with helpers.watching_pending_index(servers[1], functions, 8) as watch:
                chaos_task = asyncio.create_task(chaos())
                t0 = time.monotonic()
                try:  # ~30 s here; a transfer stuck for good (a lost reply) must fail, not hang
                    await asyncio.wait_for(run_load([lambda p=p: one(*p) for p in plan], concurrency=32), 180)
                except TimeoutError:
                    pytest.fail("transfers stopped completing: a call or its reply was lost")
                elapsed = time.monotonic() - t0
                done.set()
                await chaos_task
            # A transaction's reply comes with its decision; the participants apply it just after.
            locked = await helpers.locks_left(servers[1], f"{namespace}/account", 8)
            for _ in range(100):
                if not locked:
                    break
                await asyncio.sleep(0.2)
                locked = await helpers.locks_left(servers[1], f"{namespace}/account", 8)
            balances = {a: (await c.get_state(f"{namespace}/account", a)).get("balance", bank.OPENING_BALANCE)
                        for a in accounts}
            closed = [(await c.get_state(f"{namespace}/account", f"closed{i}")).get("balance") for i in range(3)]
            refs = collections.Counter()
            for i in range(40):
                refs.update((await c.get_state(f"{namespace}/transfer", f"t{i}")).get("done", []))
            for a in accounts:
                refs.update((await c.get_state(f"{namespace}/account", a)).get("sent", []))
            inexact = await helpers.settled_pending_index(servers[1], functions)
    _log.warning("%d transfers (%s, 2 durable calls each) in %.1fs with %d kill -9", transfers, handler, elapsed,
                 kills)
    assert kills >= 2
    assert sum(balances.values()) == bank.OPENING_BALANCE * len(accounts)
    assert balances == dict(expected)
    assert closed == [None, None, None]  # nothing was ever deposited to a closed account
    recorded = {ref for _, ref, *_ in plan} if handler == "run" else {f"{r}:{o}" for r, o in outcomes.items()}
    assert set(refs) == recorded and max(refs.values()) == 1
    assert locked == []  # no key left prepared, suspended or with messages waiting in its inbox
    helpers.assert_pending_index_safe(watch, timers=True)
    assert inexact == [], f"pending-work index not settled: {inexact}"


async def test_zombie_is_fenced(servers, namespace) -> None:
    """SIGSTOP an owner mid-invocation past its lease; on SIGCONT its commit is refused, nothing doubles."""
    fn = f"{namespace}/counter"
    keys = [f"z{i}" for i in range(50)]
    plan = [(keys[i % len(keys)], f"z-{i}") for i in range(2_000)]
    expected = collections.Counter(k for k, _ in plan)
    with procs.group(2, namespace, servers, APP) as (zombie, survivor):
        async with client(servers) as c:
            for _ in range(100):
                if len(zombie.partitions()) == 4 and len(survivor.partitions()) == 4:
                    break
                await asyncio.sleep(0.1)
            held = zombie.partitions()
            assert len(held) == 4
            victim = next(k for k in (f"slow{i}" for i in range(1000)) if layout.partition_of(k, 8) in held)
            load = asyncio.create_task(
                run_load([lambda k=k, i=i: invoke_until_answered(c, fn, k, i) for k, i in plan], concurrency=32))
            slow = asyncio.create_task(c.invoke(fn, victim, "slow_increment", seconds=1.5, idempotency_key="slow-1",
                                                timeout=60))
            await asyncio.sleep(0.7)       # the zombie is inside the slow handler, its batch uncommitted
            zombie.pause()
            await wait_for_partitions(survivor, list(range(8)), timeout=20)  # past the lease TTL (2 s)
            await asyncio.sleep(0.5)
            zombie.resume()
            await load
            assert await slow == 1        # run again by the new owner, once
            got = await counts(c, fn, [*keys, victim])
            deadline = time.monotonic() + 10
            while "partition lost" not in zombie.log_text():
                assert time.monotonic() < deadline, zombie.log_text()[-3000:]
                await asyncio.sleep(0.1)
            log = zombie.log_text()
    assert "owner changed (epoch" in log and "is stale" in log, log[-3000:]
    assert got == dict(expected, **{victim: 1})


async def test_rebalancing_keeps_order_and_counts(servers, namespace) -> None:
    fn = f"{namespace}/counter"
    keys = [f"r{i}" for i in range(40)]
    per_key = 60
    with procs.group(1, namespace, servers, APP) as (first,):
        async with client(servers) as c:
            await wait_for_partitions(first, list(range(8)))

            async def send_key(k: str) -> None:
                for seq in range(1, per_key + 1):
                    await c.send(fn, k, "ordered", idempotency_key=f"{k}-{seq}", seq=seq)
                    await asyncio.sleep(0.01)

            load = asyncio.create_task(run_load([lambda k=k: send_key(k) for k in keys], concurrency=len(keys)))
            await asyncio.sleep(0.5)
            others = [procs.SidecarProcess(APP, namespace, *servers).start() for _ in range(2)]
            try:
                for o in others:
                    o.wait_ready()
                deadline = time.monotonic() + 30
                spread: list[int] = []
                while not (sum(spread) == 8 and max(spread) <= 3):
                    assert time.monotonic() < deadline, f"partitions did not spread: {spread}"
                    await asyncio.sleep(0.2)
                    spread = [len(first.partitions())] + [len(o.partitions()) for o in others]
                await asyncio.sleep(1.0)
                for o in others:
                    assert await asyncio.to_thread(o.terminate) == 0
                assert "released partition" in others[0].log_text()
            finally:
                for o in others:
                    o.cleanup()
            await load
            await wait_for_partitions(first, list(range(8)))
            states = {}
            for _ in range(100):
                states = {k: await c.get_state(fn, k) for k in keys}
                if all(s.get("count") == per_key for s in states.values()):
                    break
                await asyncio.sleep(0.2)
    assert {k: s.get("count") for k, s in states.items()} == dict.fromkeys(keys, per_key)
    assert {k: s.get("violations", []) for k, s in states.items()} == {k: [] for k in keys}


async def test_not_ready_while_etcd_or_nats_is_down_and_nothing_lost(servers, namespace) -> None:
    fn = f"{namespace}/counter"
    nats_s, etcd_s = servers
    with procs.group(1, namespace, servers, APP) as (sc,):
        async with client(servers) as c:
            assert await invoke_until_answered(c, fn, "k", "before") == 1
            etcd_s.stop()
            deadline = time.monotonic() + 15
            while sc.status()["ready"]:
                assert time.monotonic() < deadline, "still ready with etcd down"
                await asyncio.sleep(0.2)
            # Sent while etcd is down: stored by JetStream, committed once etcd is back.
            await c.send(fn, "k", "increment", idempotency_key="during-etcd-outage")
            etcd_s.start()
            nats_s.restart()
            assert await invoke_until_answered(c, fn, "k", "after") == 3
            deadline = time.monotonic() + 15
            while not sc.status()["ready"]:
                assert time.monotonic() < deadline, "not ready again after the outage"
                await asyncio.sleep(0.2)
            assert (await c.get_state(fn, "k"))["count"] == 3


async def test_new_owner_finishes_the_outbox(servers, namespace) -> None:
    """Sends committed by a sidecar that never published them are delivered, once, by the next owner."""
    fn = f"{namespace}/counter"
    targets = [f"t{i}" for i in range(12)]
    stuck = procs.SidecarProcess(APP, namespace, *servers, faults="publish_refused=1.0").start()
    try:
        stuck.wait_ready()
        async with client(servers) as c:
            for i in range(10):
                await c.invoke(fn, f"src{i}", "fan_out", keys=targets, idempotency_key=f"fan-{i}")
            await asyncio.sleep(1.0)
            assert (await counts(c, fn, targets)) == dict.fromkeys(targets, 0)  # committed, never published
            assert "injected fault: publish_refused" in stuck.log_text()
            stuck.kill()
            with procs.group(1, namespace, servers, APP) as (heir,):
                deadline = time.monotonic() + 30
                got: dict[str, int] = {}
                while got != dict.fromkeys(targets, 10):
                    assert time.monotonic() < deadline, got
                    await asyncio.sleep(0.2)
                    got = await counts(c, fn, targets)
                assert "resuming" in heir.log_text() and "unpublished outbox entries" in heir.log_text()
                await asyncio.sleep(1.0)
                assert await counts(c, fn, targets) == dict.fromkeys(targets, 10)
                assert await counts(c, fn, [f"src{i}" for i in range(10)]) == {f"src{i}": 1 for i in range(10)}
    finally:
        stuck.cleanup()


async def test_timers_survive_the_owner(servers, namespace) -> None:
    """Delayed sends committed by an owner killed before they fire are fired once by the next owner."""
    fn = f"{namespace}/counter"
    first = procs.SidecarProcess(APP, namespace, *servers).start()
    try:
        first.wait_ready()
        async with client(servers) as c, helpers.watching_pending_index(servers[1], [fn], 8) as watch:
            await wait_for_partitions(first, list(range(8)))
            for i in range(20):
                await c.invoke(fn, f"sender{i}", "increment_later", target=f"late{i % 5}", after=4.0,
                               idempotency_key=f"later-{i}")
            first.kill()  # the timers are only in etcd now
            with procs.group(1, namespace, servers, APP) as (heir,):
                await wait_for_partitions(heir, list(range(8)))
                targets = [f"late{i}" for i in range(5)]
                deadline = time.monotonic() + 30
                got: dict[str, int] = {}
                while got != dict.fromkeys(targets, 4):
                    assert time.monotonic() < deadline, got
                    await asyncio.sleep(0.2)
                    got = await counts(c, fn, targets)
                await asyncio.sleep(1.0)
                assert await counts(c, fn, targets) == dict.fromkeys(targets, 4)
                assert await helpers.settled_pending_index(servers[1], [fn]) == []
        helpers.assert_pending_index_safe(watch, timers=True)
    finally:
        first.cleanup()
