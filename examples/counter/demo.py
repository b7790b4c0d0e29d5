"""``make demo``: the counter and bank examples through the real sidecar, on real nats-server and etcd.

Starts both servers locally, runs a sidecar with ``examples.counter.app:app`` in-process,
sends a few thousand invocations, then reads every key back and checks it against what was
sent. Exits non-zero if any value is wrong.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import statefn
from examples.counter import app as example
from statefn_sidecar import config, devservers, invoker, sidecar

COUNTERS = 20
INCREMENTS = 3000
ACCOUNTS = 5
TRANSFERS_PER_ACCOUNT = 50
PAYMENTS = 200
MOVES = 100
IN_FLIGHT = 64
console = Console()


async def _run_all(jobs: list[Callable[[], Awaitable[object]]], progress: Progress, label: str) -> float:
    task = progress.add_task(label, total=len(jobs))
    queue = collections.deque(jobs)
    start = time.perf_counter()

    async def worker() -> None:
        while queue:
            await queue.popleft()()
            progress.advance(task)

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - start


async def main() -> int:
    # The declined payments' withdrawals fail on purpose; each is logged with its traceback by default.
    logging.getLogger("statefn.runtime").setLevel(logging.ERROR)
    with console.status("starting nats-server (JetStream) and etcd on free loopback ports..."):
        nats_s, etcd_s = devservers.NatsServer(), devservers.EtcdServer()
        await asyncio.to_thread(nats_s.start)
        await asyncio.to_thread(etcd_s.start)
    console.print(f"nats-server {nats_s.url}   etcd {etcd_s.endpoint}")
    try:
        cfg = config.SidecarConfig(nats_url=nats_s.url, etcd_endpoint=etcd_s.endpoint, partitions=8)
        sc = sidecar.Sidecar(cfg, invoker.EmbeddedInvoker(example.app))
        await sc.start()
        console.print(f"sidecar {cfg.member_id} serving {', '.join(example.app.functions)}")
        try:
            async with statefn.Client(nats=nats_s.url, etcd=etcd_s.endpoint) as c:
                return await _exercise(c)
        finally:
            await sc.stop()
    finally:
        nats_s.cleanup()
        etcd_s.cleanup()


async def _exercise(c: statefn.Client) -> int:
    expected: collections.Counter[str] = collections.Counter()
    increments = []
    for i in range(INCREMENTS):
        key = f"counter-{i % COUNTERS:02d}"
        expected[key] += 1
        increments.append(lambda key=key, i=i: c.invoke("demo/counter", key, "increment", idempotency_key=f"inc-{i}"))
    accounts = [f"acct-{i}" for i in range(ACCOUNTS)]
    balances = dict.fromkeys(accounts, 1000)
    deposits = [lambda a=a: c.invoke("bank/account", a, "deposit", amount=1000) for a in accounts]
    transfers = []
    for i, a in enumerate(accounts):
        to = accounts[(i + 1) % ACCOUNTS]
        for _ in range(TRANSFERS_PER_ACCOUNT):
            balances[a] -= i + 1
            balances[to] += i + 1
            transfers.append(lambda a=a, to=to, n=i + 1: c.invoke("bank/account", a, "transfer", to=to, amount=n))

    # Payments: two durable calls each (withdraw, then deposit); every 20th asks too much and is declined.
    payments = []
    declined_expected = 0
    for i in range(PAYMENTS):
        source, target = accounts[i % ACCOUNTS], accounts[(i + 2) % ACCOUNTS]
        amount = 10**6 if i % 20 == 19 else 1 + i % 7
        if amount < 10**6:
            balances[source] -= amount
            balances[target] += amount
        else:
            declined_expected += 1
        payments.append(lambda i=i, s=source, t=target, n=amount: c.invoke(
            "bank/payment", f"pay-{i}", "pay", source=s, target=t, amount=n, idempotency_key=f"pay-{i}"))

    # Moves: one transaction each (this account's withdrawal and the other's deposit commit together);
    # every 10th asks too much: its withdrawal votes no and neither side changes.
    moves = []
    move_replies: collections.Counter[str] = collections.Counter()
    refused_expected = 0
    for i in range(MOVES):
        source, target = accounts[i % ACCOUNTS], accounts[(i + 3) % ACCOUNTS]
        amount = 10**6 if i % 10 == 9 else 1 + i % 5
        if amount < 10**6:
            balances[source] -= amount
            balances[target] += amount
        else:
            refused_expected += 1

        async def one_move(s: str = source, t: str = target, n: int = amount, i: int = i) -> None:
            reply = await c.invoke("bank/account", s, "move", to=t, amount=n, idempotency_key=f"move-{i}")
            move_replies[str(reply).split(":")[0]] += 1
        moves.append(one_move)

    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        t_inc = await _run_all(increments, progress, "counter increments")
        await _run_all(deposits, progress, "bank deposits")
        t_tr = await _run_all(transfers, progress, "bank transfers")
        t_pay = await _run_all(payments, progress, "payments (durable calls)")
        t_move = await _run_all(moves, progress, "moves (transactions)")
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(PAYMENTS):
        outcomes[(await c.get_state("bank/payment", f"pay-{i}")).get("outcome", "?").split(":")[0]] += 1

    # Transfers deposit on the receiving side through a one-way message, and a transaction's participants
    # apply its commit just after its reply: wait until delivered.
    got_accounts: dict[str, int] = {}
    for _ in range(100):
        got_accounts = {a: (await c.get_state("bank/account", a)).get("balance", 0) for a in accounts}
        if got_accounts == balances:
            break
        await asyncio.sleep(0.1)
    got_counters = {k: (await c.get_state("demo/counter", k)).get("count", 0) for k in sorted(expected)}

    table = Table(title="final state, read back from etcd")
    for col in ("key", "value", "expected", ""):
        table.add_column(col)
    wrong = 0
    for key, value in [*got_counters.items(), *got_accounts.items()]:
        want = expected[key] if key in expected else balances[key]
        ok = value == want
        wrong += not ok
        table.add_row(key, str(value), str(want), "[green]ok[/]" if ok else "[red]WRONG[/]")
    console.print(table)
    total = sum(got_accounts.values())
    console.print(f"bank total {total} (deposited {1000 * ACCOUNTS}): "
                  + ("[green]conserved[/]" if total == 1000 * ACCOUNTS else "[red]NOT conserved[/]"))
    console.print(f"{INCREMENTS} increments in {t_inc:.2f}s: [bold]{INCREMENTS / t_inc:,.0f} invocations/s[/] "
                  f"({IN_FLIGHT} in flight); {len(transfers)} transfers in {t_tr:.2f}s")
    paid_ok = outcomes == collections.Counter(paid=PAYMENTS - declined_expected, declined=declined_expected)
    wrong += not paid_ok
    console.print(f"{PAYMENTS} payments by durable calls in {t_pay:.2f}s: {outcomes['paid']} paid, "
                  f"{outcomes['declined']} declined (insufficient funds) "
                  + ("[green]as expected[/]" if paid_ok else f"[red]expected {declined_expected} declined[/]"))
    moved_ok = move_replies == collections.Counter(moved=MOVES - refused_expected, declined=refused_expected)
    wrong += not moved_ok
    console.print(f"{MOVES} moves by transactions in {t_move:.2f}s: {move_replies['moved']} moved, "
                  f"{move_replies['declined']} declined (insufficient funds, nothing moved) "
                  + ("[green]as expected[/]" if moved_ok else f"[red]expected {refused_expected} declined[/]"))
    if wrong:
        console.print(f"[red]{wrong} value(s) wrong[/]")
        return 1
    console.print("[green]every value is exact[/]")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
