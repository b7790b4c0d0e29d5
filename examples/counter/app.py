"""A keyed counter and a bank account: the smallest useful stateful functions.

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


account = StatefulFunction("bank/account")
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


app = statefn.App(counter, account)
