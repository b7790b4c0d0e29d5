"""A keyed counter, a bank account, and money moved between accounts by durable calls and by transactions.

Run them with ``statefn dev examples.counter.app:app`` or ``make demo``.
"""

from __future__ import annotations

import statefn
from statefn import Context, StatefulFunction

counter = StatefulFunction("demo/counter")
count = counter.state("count", int, default=0)


@counter.handler
async def increment(ctx: Context, by: int = 1) -> int:
    ctx[count] += by
    return ctx[count]


@counter.handler
async def get(ctx: Context) -> int:
    return ctx[count]


# A transaction that dies under wait-die is run again (with its age kept): allow it a few tries.
account = StatefulFunction("bank/account", max_attempts=20)
balance = account.state("balance", int, default=0)


@account.handler
async def deposit(ctx: Context, amount: int) -> int:
    if amount <= 0:
        raise ValueError(f"deposit must be positive, got {amount}")
    ctx[balance] += amount
    return ctx[balance]


@account.handler
async def withdraw(ctx: Context, amount: int) -> int:
    if amount > ctx[balance]:
        raise ValueError(f"insufficient funds: balance {ctx[balance]}, withdrawal {amount}")
    ctx[balance] -= amount
    return ctx[balance]


@account.handler
async def transfer(ctx: Context, to: str, amount: int) -> int:
    """Withdraw here and deposit at ``to`` (a one-way message, delivered exactly once)."""
    if amount > ctx[balance]:
        raise ValueError(f"insufficient funds: balance {ctx[balance]}, transfer {amount}")
    ctx[balance] -= amount
    ctx.send("bank/account", to, "deposit", amount=amount)
    return ctx[balance]


@account.handler
async def move(ctx: Context, to: str, amount: int) -> str:
    """Withdraw here and deposit at ``to`` in one transaction (two-phase commit): both happen, or neither.

    This account takes part itself. A withdrawal that fails votes no and nothing moves. A conflict
    with another transaction (wait-die) propagates, and the platform runs the move again.
    """
    try:
        async with ctx.transaction() as tx:
            await tx.call("bank/account", ctx.key, "withdraw", amount=amount)
            await tx.call("bank/account", to, "deposit", amount=amount)
    except statefn.TransactionAborted:
        raise
    except statefn.CallFailed as exc:
        return f"declined: {exc.message}"
    return "moved"


payment = StatefulFunction("bank/payment")
outcome = payment.state("outcome", str, default="")


@payment.handler
async def pay(ctx: Context, source: str, target: str, amount: int) -> str:
    """Withdraw at ``source``, then deposit at ``target``: two durable calls, each run exactly once.

    The payment waits for each reply; meanwhile this payment's key is locked. A withdrawal that
    fails (insufficient funds) comes back as ``CallFailed``, and nothing was moved.
    """
    try:
        await ctx.call("bank/account", source, "withdraw", amount=amount)
    except statefn.CallFailed as exc:
        ctx[outcome] = f"declined: {exc.message}"
        return ctx[outcome]
    await ctx.call("bank/account", target, "deposit", amount=amount)
    ctx[outcome] = "paid"
    return ctx[outcome]


app = statefn.App(counter, account, payment)
