"""Transfers as two durable calls, as sagas, and as transactions, for the crash suite: money is conserved
only if each call (each compensation, each prepare and decision) runs exactly once.

``transfer`` instances are keyed by a small set of ids, so transfers queue behind one another in
the inbox of a locked key. The namespace comes from ``STATEFN_TEST_NS``.
"""

from __future__ import annotations

import os

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "bank")
OPENING_BALANCE = 1000

# Transactions that die under wait-die run again from scratch: allow many tries, with short waits.
account = StatefulFunction(f"{NAMESPACE}/account", max_attempts=40, backoff_max=1.0)
balance = account.state("balance", int, default=OPENING_BALANCE)
sent = account.state("sent", list[str], default=[])
transfer = StatefulFunction(f"{NAMESPACE}/transfer")
done = transfer.state("done", list[str], default=[])


@account.handler
async def withdraw(ctx: Context, amount: int) -> int:
    if amount > ctx[balance]:
        raise ValueError(f"{ctx.key} has only {ctx[balance]}")
    ctx[balance] -= amount
    return ctx[balance]


@account.handler
async def deposit(ctx: Context, amount: int) -> int:
    if ctx.key.startswith("closed"):
        raise ValueError(f"account {ctx.key} is closed")
    ctx[balance] += amount
    return ctx[balance]


@account.handler
async def refund(ctx: Context, amount: int) -> int:
    """The compensation of a withdrawal."""
    ctx[balance] += amount
    return ctx[balance]


@transfer.handler
async def run(ctx: Context, ref: str, source: str, target: str, amount: int) -> str:
    await ctx.call(str(account.type), source, "withdraw", amount=amount)
    await ctx.call(str(account.type), target, "deposit", amount=amount)
    ctx[done].append(ref)
    return ref


@transfer.handler
async def saga(ctx: Context, ref: str, source: str, target: str, amount: int) -> str:
    """Withdraw, then deposit; a deposit to a closed account fails and the withdrawal is refunded."""
    try:
        async with ctx.saga() as steps:
            await steps.call(str(account.type), source, "withdraw", amount=amount,
                             compensate=("refund", {"amount": amount}))
            await steps.call(str(account.type), target, "deposit", amount=amount)
    except statefn.CallFailed:
        ctx[done].append(f"{ref}:compensated")
        return "compensated"
    ctx[done].append(f"{ref}:done")
    return "done"


@account.handler
async def send_tx(ctx: Context, ref: str, target: str, amount: int) -> str:
    """One transaction coordinated by the source account, which takes part itself (docs/transactions.md's example).

    A deposit to a closed account votes no and everything aborts; a conflict (wait-die) or a
    timeout escapes and the platform runs the invocation again.
    """
    try:
        async with ctx.transaction(timeout=5.0) as tx:
            await tx.call(str(account.type), ctx.key, "withdraw", amount=amount)
            await tx.call(str(account.type), target, "deposit", amount=amount)
    except statefn.TransactionAborted:
        raise
    except statefn.CallFailed:
        ctx[sent].append(f"{ref}:aborted")
        return "aborted"
    ctx[sent].append(f"{ref}:done")
    return "done"


app = statefn.App(account, transfer)
