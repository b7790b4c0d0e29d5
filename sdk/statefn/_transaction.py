"""``ctx.transaction()``: two-phase commit across keys, serializable, with wait-die and presumed abort.

Each ``tx.call`` is a durable call whose message carries the transaction: the participant runs
its handler tentatively, stages the state changes and messages instead of applying them, locks
its key and votes with its reply. Leaving the block decides: commit if it ended normally and
nothing doomed the transaction, abort otherwise. The decision messages go out with the
coordinator's next commit (kept even when its handler then fails), so a decision, once made,
reaches every prepared participant exactly once.

Nothing here is written to etcd by the SDK: the votes are the call journal, so a replay reaches
the same decision, and the decision's messages are sends that a replay does not repeat.
"""

from __future__ import annotations

from collections.abc import Awaitable
from types import TracebackType
from typing import TYPE_CHECKING, Any

from statefn_core import constants, errors, wire

if TYPE_CHECKING:
    from statefn import _context

PREPARE = "tx.prepare"
COMMIT = "tx.commit"
ABORT = "tx.abort"
_ABORTED_KINDS = frozenset({errors.ErrorKind.TX_CONFLICT, errors.ErrorKind.TX_TIMEOUT})


class Transaction:
    """Returned by ``ctx.transaction()``; use it as ``async with``."""

    def __init__(self, ctx: _context.Context, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self._ctx = ctx
        self._timeout = timeout
        self._info: wire.TxInfo | None = None
        self._prepared: list[tuple[str, str]] = []  # participants that voted yes, in order, once each
        self._asked: list[tuple[str, str]] = []  # participants sent a prepare, in order, once each
        self._doomed: errors.TransactionAborted | None = None

    @property
    def id(self) -> str:
        assert self._info is not None, "use the transaction as `async with ctx.transaction() as tx`"
        return self._info.id

    @property
    def age(self) -> float:
        """Its timestamp under wait-die (seconds since the epoch): kept by every retry of the invocation."""
        assert self._info is not None, "use the transaction as `async with ctx.transaction() as tx`"
        return self._info.ts

    def call(self, function: str, key: str, handler: str, /, **args: Any) -> Awaitable[Any]:
        """Run ``handler`` on (function, key) as a participant; await it for its reply, its yes vote.

        Awaiting raises :class:`CallFailed` when the handler failed (it voted no and holds nothing),
        and :class:`TransactionAborted` when the transaction cannot go on (a conflict or a timeout).
        Like ``ctx.call``, the prepare is sent when ``call`` is called: prepares made before awaiting
        any run in parallel (``await asyncio.gather(tx.call(...), tx.call(...))``). Every prepare must
        be awaited before the transaction's block ends.
        """
        info = self._info
        assert info is not None, "use the transaction as `async with ctx.transaction() as tx`"
        if self._doomed is not None:
            raise errors.TransactionAborted(self._doomed.kind, f"the transaction is aborted already: "
                                             f"{self._doomed.message}", target=f"{function}({key!r}).{handler}")
        prepare = self._ctx._call(function, key, handler, args, PREPARE, tx=info, timeout=info.timeout)
        if (function, key) not in self._asked:
            self._asked.append((function, key))
        return self._vote(prepare, function, key)

    async def _vote(self, prepare: Awaitable[Any], function: str, key: str) -> Any:
        try:
            reply = await prepare
        except errors.CallFailed as err:
            if err.kind not in _ABORTED_KINDS:
                raise
            self._doomed = errors.TransactionAborted(err.kind, err.message, error_type=err.error_type,
                                                      target=err.target)
            raise self._doomed from None
        if (function, key) not in self._prepared:
            self._prepared.append((function, key))
        return reply

    async def __aenter__(self) -> Transaction:
        self._info = self._ctx._begin_transaction(self._timeout)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool:
        if exc is not None and not isinstance(exc, Exception):
            return False  # unwinding at a call still waiting for its reply: nothing is decided yet
        info = self._info
        assert info is not None
        commit = exc is None and self._doomed is None
        unawaited = [f"{f}({k!r})" for f, k in self._asked if (f, k) not in self._prepared]
        refused: errors.InvalidCall | None = None
        if commit and unawaited:  # a vote not counted: it cannot commit
            commit = False
            refused = errors.InvalidCall(f"transaction {info.id} ended with prepares not awaited "
                                         f"({', '.join(unawaited)}); it is aborted")
        # A commit goes to those that voted yes; an abort to every participant asked (a vote may still be in
        # flight, or journaled and not awaited when another's failure ended the block): one that did not prepare
        # ignores it.
        self._ctx._decide_transaction(info, commit, self._prepared if commit else self._asked)
        if refused is not None:
            raise refused
        if commit or exc is not None:
            return False
        assert self._doomed is not None
        raise self._doomed  # the block swallowed the abort: the transaction did not happen


def decision_handler(commit: bool) -> tuple[str, str]:
    """The handler and purpose of a decision message."""
    return (constants.COMMIT_HANDLER, COMMIT) if commit else (constants.ABORT_HANDLER, ABORT)
