"""Exactly-once as a user sees it: money moved through the HTTP gateway under kill -9.

Transactions (the example's ``move``), saga payments and payments by two durable calls are
posted to the gateway, each with its own ``Idempotency-Key``, and re-sent with the same key after
a 502/503/504 or a dropped connection until a definite answer comes back, while one of three
sidecars is killed with SIGKILL every few seconds and started again. Then every account's final
state is compared with every reply: its balance, and its history, in which each withdrawal,
deposit and refund appears once per operation that the replies say happened. A total alone
cannot see a move applied twice; the history names it. Afterwards no key may stay prepared,
suspended or queued, and no timer scheduled. Throughout, the pending-work index the autoscaler
wakes functions by must never say a timer is later than it is, and afterwards say exactly nothing.
``STATEFN_CRASH_SEED`` picks the run's plan and fault schedule.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import random
import time
from typing import Any

import aiohttp
import pytest

import statefn
from statefn_sidecar import devservers, gateway
from tests import helpers, procs
from tests.apps import ledger

pytestmark = pytest.mark.crash
_log = logging.getLogger("test.crash_gateway")
SEED = int(os.environ.get("STATEFN_CRASH_SEED", "1"))
ACCOUNTS = [f"a{i}" for i in range(30)]
CLOSED = ["closed0", "closed1"]
FUNCTIONS = ["account", "payment"]
KILL_EVERY_S = 3.0
IN_FLIGHT = 48
# Short leases and a vote timeout as long as the stall a kill causes: votes then arrive about when
# their timeout fires, and replies reach coordinators whose partitions have just moved. The
# defaults (10 s and 10 s) make the same race, at a third of the rate: STATEFN_CRASH_LEASE_TTL=10
# STATEFN_CRASH_TX_TIMEOUT=10 run it so.
LEASE_TTL_S = int(os.environ.get("STATEFN_CRASH_LEASE_TTL", "3"))
SIDECAR_SETTINGS = {"lease_ttl": LEASE_TTL_S, "ack_wait": LEASE_TTL_S + 1.0}
TX_TIMEOUT_S = os.environ.get("STATEFN_CRASH_TX_TIMEOUT", "3")
# Every kill stalls the victim's partitions for a lease TTL: longer leases, slower progress.
DEADLINE_S = max(420, 150 * LEASE_TTL_S)
# The gateway gives up waiting after this, answering 504; the caller re-sends with the same key.
GATEWAY_TIMEOUT_S = 6.0


@dataclasses.dataclass(frozen=True)
class Op:
    ref: str
    kind: str  # move | saga | calls
    source: str
    target: str
    amount: int

    def request(self, namespace: str) -> tuple[str, dict[str, Any]]:
        if self.kind == "move":
            return (f"/v1/functions/{namespace}/account/{self.source}/move",
                    {"to": self.target, "amount": self.amount, "ref": self.ref})
        return (f"/v1/functions/{namespace}/payment/{self.ref}/{self.kind}",
                {"source": self.source, "target": self.target, "amount": self.amount, "ref": self.ref})

    def effects(self, status: int, body: dict[str, Any]) -> list[tuple[str, str]]:
        """The history entries the answer says this operation left, per account."""
        result = body.get("result") if status == 200 else None
        moved = [(self.source, f"{self.ref}:-{self.amount}"), (self.target, f"{self.ref}:+{self.amount}")]
        if result in ("moved", "paid"):
            return moved
        if result == "compensated" and self.kind == "saga":
            return [(self.source, f"{self.ref}:-{self.amount}"), (self.source, f"{self.ref}:+{self.amount}:refund")]
        if isinstance(result, str) and result.startswith("declined"):
            return []
        if status == 500 and self.kind == "move":  # gave up after its attempts: the transaction aborted
            return []
        raise AssertionError(f"{self}: unexpected answer {status} {body}")


def plan(rng: random.Random, count: int, kinds: list[str]) -> list[Op]:
    ops = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        source, target = rng.sample(ACCOUNTS, 2)
        if kind != "calls" and rng.random() < 0.08:  # a "no" vote, or a saga's compensation
            target = rng.choice(CLOSED)
        ops.append(Op(f"{kind[0]}{i}", kind, source, target, rng.randint(1, 399)))
    rng.shuffle(ops)
    return ops


async def post_until_answered(session: aiohttp.ClientSession, base: str, namespace: str, op: Op,
                              resends: collections.Counter[str]) -> tuple[int, dict[str, Any]]:
    """What a careful caller does: re-send with the same key until the answer is definite."""
    path, body = op.request(namespace)
    while True:
        try:
            async with session.post(base + path, json=body, headers={"Idempotency-Key": op.ref}) as r:
                if r.status in (502, 503, 504):
                    resends[str(r.status)] += 1
                    continue
                return r.status, await r.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            resends[type(exc).__name__] += 1
            await asyncio.sleep(0.2)


@pytest.mark.timeout(DEADLINE_S + 120)
@pytest.mark.parametrize("kinds", [["move"], ["move", "saga", "calls"]], ids=["tx", "mixed"])
async def test_every_reply_matches_every_key_under_kills(servers, namespace, kinds) -> None:
    rng = random.Random(SEED)
    ops = plan(rng, 800, kinds)
    env = {"STATEFN_TEST_TX_TIMEOUT": TX_TIMEOUT_S}
    answers: dict[str, tuple[int, dict[str, Any]]] = {}
    resends: collections.Counter[str] = collections.Counter()
    kept = ""
    with procs.group(3, namespace, servers, "tests.apps.ledger:app", env=env, **SIDECAR_SETTINGS) as group:
        nats_s, etcd_s = servers
        async with statefn.Client(nats=nats_s.url, etcd=etcd_s.endpoint, retry_interval=2.0,
                                  timeout=GATEWAY_TIMEOUT_S) as client:
            port = devservers.free_port()
            runner = await gateway.start_gateway(client, "127.0.0.1", port)
            done = asyncio.Event()
            kills = 0

            async def chaos() -> None:
                nonlocal kills
                faults = random.Random(SEED * 7919)
                while not done.is_set():
                    await asyncio.sleep(KILL_EVERY_S * faults.uniform(0.7, 1.3))
                    if not done.is_set():
                        victim = faults.choice(group)
                        await asyncio.to_thread(victim.kill)
                        victim.start()
                        kills += 1

            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=GATEWAY_TIMEOUT_S + 5)) as session:
                    queue = list(reversed(ops))

                    async def worker() -> None:
                        while queue:
                            op = queue.pop()
                            answers[op.ref] = await post_until_answered(
                                session, f"http://127.0.0.1:{port}", namespace, op, resends)

                    functions = [f"{namespace}/{fn}" for fn in FUNCTIONS]
                    async with helpers.watching_pending_index(etcd_s, functions, 8) as watch:
                        chaos_task = asyncio.create_task(chaos())
                        t0 = time.monotonic()
                        try:
                            await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(IN_FLIGHT))), DEADLINE_S)
                        except TimeoutError:
                            pytest.fail(f"operations stopped completing: {len(answers)} of {len(ops)} answered")
                        elapsed = time.monotonic() - t0
                        done.set()
                        await chaos_task
            finally:
                await runner.cleanup()
            held = await helpers.eventually_value(
                lambda: held_keys(etcd_s, namespace), lambda found: not found, timeout=30)
            states = {a: await client.get_state(f"{namespace}/account", a) for a in ACCOUNTS + CLOSED}
            inexact = await helpers.settled_pending_index(etcd_s, functions)
            kept = procs.keep_logs(group, f"crash-gateway-{namespace}")
    outcomes = collections.Counter(f"{op.kind}:{summary(*answers[op.ref])}" for op in ops)
    _log.warning("seed %d: %d operations (%s) in %.1fs, %d kill -9, re-sends %s; outcomes %s", SEED, len(ops),
                 "+".join(kinds), elapsed, kills, dict(resends), dict(outcomes))
    assert kills >= 3
    expected: dict[str, collections.Counter[str]] = {a: collections.Counter() for a in ACCOUNTS + CLOSED}
    for op in ops:
        for account, entry in op.effects(*answers[op.ref]):
            expected[account][entry] += 1
    wrong = {}
    for account in ACCOUNTS + CLOSED:
        got = collections.Counter(states[account].get("history", []))
        money = sum(int(e.split(":")[1]) for e in expected[account].elements())
        want_balance = ledger.OPENING_BALANCE + money if expected[account] else None
        have_balance = states[account].get("balance")
        if got != expected[account] or have_balance != want_balance:
            wrong[account] = {"balance": (have_balance, want_balance),
                              "extra": sorted((got - expected[account]).elements()),
                              "missing": sorted((expected[account] - got).elements())}
    refs = {e.split(":")[0] for w in wrong.values() for e in w["extra"] + w["missing"]}
    told = {ref: answers[ref] for ref in sorted(refs)}
    assert wrong == {}, f"seed {SEED}: state differs from the replies: {wrong}; their answers: {told}; logs: {kept}"
    assert held == [], f"left prepared, suspended, queued or scheduled: {held[:10]}"
    helpers.assert_pending_index_safe(watch, timers=True)  # the autoscaler never saw a timer later than it was
    assert inexact == [], f"pending-work index not settled: {inexact}"


def summary(status: int, body: dict[str, Any]) -> str:
    result = body.get("result")
    return str(result).split(":")[0] if status == 200 else f"{status} {body.get('error', {}).get('kind')}"


async def held_keys(etcd_s: devservers.EtcdServer, namespace: str) -> list[bytes]:
    return [k for fn in FUNCTIONS
            for k in await helpers.locks_left(etcd_s, f"{namespace}/{fn}", 8, timers=True)]
