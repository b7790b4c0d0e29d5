"""Transfers as two durable calls, and as sagas, for the crash suite: money is conserved only if each call
(and each compensation) runs exactly once.

``transfer`` instances are keyed by a small set of ids, so transfers queue behind one another in
the inbox of a locked key. The namespace comes from ``STATEFN_TEST_NS``.
"""

from __future__ import annotations

import os

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "bank")
OPENING_BALANCE = 1000

account = StatefulFunction(f"{NAMESPACE}/account")
balance = account.state("balance", int, default=OPENING_BALANCE)
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


app = statefn.App(account, transfer)
