"""Accounts that remember every operation applied to them, for the crash suite's per-reply check.

Money moves three ways: ``move`` is the example's transaction (two-phase commit, the source account
taking part itself), ``payment.saga`` withdraws and deposits as saga steps (refunded when the
deposit fails), and ``payment.calls`` as two plain durable calls. Every withdrawal, deposit and
refund appends ``<ref>:<signed amount>`` to the account's ``history``, so a test can compare each
key's final state with what each reply said happened: an effect applied twice shows as a repeated
entry, not only as a wrong sum. The namespace comes from ``STATEFN_TEST_NS``; a transaction's vote
timeout from ``STATEFN_TEST_TX_TIMEOUT`` (seconds).
"""

from __future__ import annotations

import os

import statefn
from statefn import Context, StatefulFunction

NAMESPACE = os.environ.get("STATEFN_TEST_NS", "ledger")
TX_TIMEOUT = float(os.environ.get("STATEFN_TEST_TX_TIMEOUT", "10"))
OPENING_BALANCE = 1000

# Transactions that die under wait-die or time out run again from scratch: allow many tries.
account = StatefulFunction(f"{NAMESPACE}/account", max_attempts=50, backoff_max=1.0)
balance = account.state("balance", int, default=OPENING_BALANCE)
history = account.state("history", list[str], default=[])
payment = StatefulFunction(f"{NAMESPACE}/payment")


@account.handler
async def withdraw(ctx: Context, amount: int, ref: str) -> int:
    if amount > ctx[balance]:
        raise ValueError(f"insufficient funds: balance {ctx[balance]}, withdrawal {amount}")
    ctx[balance] -= amount
    ctx[history].append(f"{ref}:-{amount}")
    return ctx[balance]


@account.handler
async def deposit(ctx: Context, amount: int, ref: str) -> int:
    if ctx.key.startswith("closed"):
        raise ValueError(f"account {ctx.key} is closed")
    ctx[balance] += amount
    ctx[history].append(f"{ref}:+{amount}")
    return ctx[balance]


@account.handler
async def refund(ctx: Context, amount: int, ref: str) -> int:
    """The compensation of a withdrawal."""
    ctx[balance] += amount
    ctx[history].append(f"{ref}:+{amount}:refund")
    return ctx[balance]


@account.handler
async def move(ctx: Context, to: str, amount: int, ref: str) -> str:
    """The example's ``bank/account.move``: withdraw here and deposit at ``to`` in one transaction."""
    try:
        async with ctx.transaction(timeout=TX_TIMEOUT) as tx:
            await tx.call(str(account.type), ctx.key, "withdraw", amount=amount, ref=ref)
            await tx.call(str(account.type), to, "deposit", amount=amount, ref=ref)
    except statefn.TransactionAborted:
        raise
    except statefn.CallFailed as exc:
        return f"declined: {exc.message}"
    return "moved"


@payment.handler
async def saga(ctx: Context, source: str, target: str, amount: int, ref: str) -> str:
    """Withdraw, then deposit; a deposit that fails (a closed account) is compensated by a refund."""
    try:
        async with ctx.saga() as steps:
            await steps.call(str(account.type), source, "withdraw", amount=amount, ref=ref,
                             compensate=("refund", {"amount": amount, "ref": ref}))
            await steps.call(str(account.type), target, "deposit", amount=amount, ref=ref)
    except statefn.CallFailed as exc:
        return "compensated" if exc.target and exc.target.endswith(".deposit") else f"declined: {exc.message}"
    return "paid"


@payment.handler
async def calls(ctx: Context, source: str, target: str, amount: int, ref: str) -> str:
    """Withdraw, then deposit, as two durable calls (the target is always open)."""
    try:
        await ctx.call(str(account.type), source, "withdraw", amount=amount, ref=ref)
    except statefn.CallFailed as exc:
        return f"declined: {exc.message}"
    await ctx.call(str(account.type), target, "deposit", amount=amount, ref=ref)
    return "paid"


app = statefn.App(account, payment)
