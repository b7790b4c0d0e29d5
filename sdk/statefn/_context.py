"""The context a handler gets: its address, its state, and the messages it sends.

State reads and writes are local and staged: nothing reaches etcd unless the invocation
succeeds, and then together with everything else the invocation did (one commit).
"""

from __future__ import annotations

import inspect
import random
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar, cast

from statefn import _saga, _state, _transaction
from statefn_core import codec, constants, envelope, errors, layout, wire

T = TypeVar("T")
_MISSING: Any = object()


class Context:
    """Passed as the first argument to every handler."""

    __slots__ = ("_assigned", "_attempt", "_call_timeout", "_calls", "_chain", "_decided", "_deleted", "_function",
                 "_in_tx", "_invocation_id", "_journal", "_key", "_ops", "_participant", "_random", "_recorded",
                 "_sends", "_sends_at_wait", "_specs", "_stored", "_tx_count", "_tx_ts", "_values", "_waiting",
                 "_worked")

    def __init__(
        self,
        *,
        function: str,
        key: str,
        specs: dict[str, _state.StateSpec[Any]],
        stored: dict[str, bytes],
        invocation_id: str = "",
        attempt: int = 1,
        journal: list[bytes] | None = None,
        participant: bool = False,
        tx_age: float | None = None,
        chain: list[list[str]] | None = None,
        call_timeout: float = constants.DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        self._function = function
        self._key = key
        self._specs = specs
        self._stored = stored
        self._values: dict[str, Any] = {}
        self._assigned: set[str] = set()  # set with ``ctx[spec] = ...`` (since its last delete)
        self._deleted: set[str] = set()   # reset with ``del ctx[spec]``
        self._sends: list[wire.Outgoing] = []
        self._invocation_id = invocation_id
        self._chain = chain or []  # the (function, key) pairs waiting on this invocation's own reply
        self._call_timeout = call_timeout
        self._attempt = attempt
        self._journal = journal or []
        self._ops = 0  # journaled operations (calls and runs) so far, in order
        self._recorded: list[bytes] = []  # new journal slots (runs, calls made): journaled if this run suspends
        self._calls: list[wire.Outgoing] = []  # calls made in this run (past the journal): sent if it suspends
        self._waiting: int | None = None  # the journal index of the call this run suspended at
        self._sends_at_wait = 0  # the sends made before it: any after (a handler that caught the unwinding) are not
        self._random: random.Random | None = None
        self._participant = participant  # runs tentatively as a transaction's participant
        self._tx_count = 0
        self._tx_ts: float | None = tx_age
        self._in_tx = False
        self._decided: list[list[str]] = []  # transactions decided past the journal: [id, outcome]
        self._worked = False  # made a durable call or ran a side effect outside a transaction

    @property
    def key(self) -> str:
        """The key this instance is addressed by."""
        return self._key

    @property
    def function(self) -> str:
        """The function type, ``namespace/name``."""
        return self._function

    @property
    def attempt(self) -> int:
        """1 on the first try; grows with each retry after :class:`statefn.Retry`."""
        return self._attempt

    @property
    def invocation_id(self) -> str:
        """Unique across functions and keys, the same in every attempt and replay.

        For a request from outside: ``<function>/<key>/<handler>/<idempotency key>`` (parts escaped).
        Transaction ids and ``random()`` derive from it.
        """
        return self._invocation_id

    def _spec(self, spec: _state.StateSpec[Any]) -> _state.StateSpec[Any]:
        own = self._specs.get(spec.name)
        if own is not spec:
            raise KeyError(
                f"state {spec.function}:{spec.name} is not declared by {self._function}; "
                f"declared: {sorted(self._specs) or 'none'}"
            )
        return own

    def __getitem__(self, spec: _state.StateSpec[T]) -> T:
        s = self._spec(spec)
        value = self._values.get(s.name, _MISSING)
        if value is _MISSING:
            raw = self._stored.get(s.name)
            value = s.fresh_default() if raw is None else s.codec.decode(raw)
            self._values[s.name] = value
        return value  # type: ignore[no-any-return]

    def __setitem__(self, spec: _state.StateSpec[T], value: T) -> None:
        name = self._spec(spec).name
        self._values[name] = value
        self._assigned.add(name)

    def __delitem__(self, spec: _state.StateSpec[Any]) -> None:
        """Reset to the default; the stored value is removed (unless set again before the handler ends)."""
        s = self._spec(spec)
        self._values[s.name] = s.fresh_default()
        self._deleted.add(s.name)
        self._assigned.discard(s.name)

    def send(
        self,
        function: str,
        key: str,
        handler: str,
        /,
        *,
        delay: float | None = None,
        **args: Any,
    ) -> None:
        """Send a one-way message; delivered exactly once after this invocation commits."""
        layout.FunctionType.parse(function)
        if delay is not None and delay < 0:
            raise ValueError("delay must be >= 0 seconds")
        plain = {k: codec.to_plain(v) for k, v in args.items()}
        self._sends.append(wire.Outgoing(function=function, key=key, handler=handler, args=plain, delay=delay))

    def call(self, function: str, key: str, handler: str, /, *, timeout: float | None = None,
             **args: Any) -> DurableCall:
        """Invoke another function's handler, durably; await the result for its reply.

        The call is committed with this invocation's progress and delivered exactly once; this
        key is locked until the invocation ends (later messages to it wait, in order). While a
        reply is outstanding the handler is unwound and later replayed from the start with the
        replies so far: code between calls must be deterministic. Awaiting raises
        :class:`CallFailed` when the callee ended in an error, or with kind ``call_timeout`` when
        ``timeout`` seconds passed without a reply (the callee may still run; its late reply is dropped).

        The call is made when ``call`` is called, not when it is awaited: several calls made before
        awaiting any run in parallel (``await asyncio.gather(ctx.call(...), ctx.call(...))``, or
        :meth:`call_all`), their replies journaled in whatever order they come. A call not awaited
        when the handler returns is not made if this run made it; one an earlier run sent already
        runs, and its reply is dropped.
        """
        return self._call(function, key, handler, args, "", timeout=timeout)

    async def call_all(self, *calls: DurableCall, return_exceptions: bool = False) -> list[Any]:
        """Await calls made in parallel; their replies in the order given.

        Like ``asyncio.gather`` without tasks: the first failed call (in the order given) raises its
        :class:`CallFailed`, or, with ``return_exceptions``, takes its place in the list.
        """
        out: list[Any] = []
        for call in calls:
            try:
                out.append(await call)
            except errors.CallFailed as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def _cycle(self, function: str, key: str) -> errors.CallFailed | None:
        """A call to a key that waits (through its calls) on this invocation could never run: it fails at once."""
        for i, (waiting_function, waiting_key) in enumerate(self._chain):
            if (waiting_function, waiting_key) == (function, key):
                path = [f"{f}({k!r})" for f, k in self._chain[i:]] + [f"{self._function}({self._key!r})",
                                                                     f"{function}({key!r})"]
                return errors.CallFailed(
                    errors.ErrorKind.CALL_CYCLE,
                    f"a call cycle: {' -> '.join(path)}; {function}({key!r}) waits for this call's caller, "
                    "so its key stays locked and the call could never run", target=f"{function}({key!r})")
        return None

    async def sleep(self, seconds: float) -> None:
        """Wait durably: the invocation suspends, its key stays locked, and a timer in etcd resumes it.

        Unlike ``asyncio.sleep``, it survives crashes and moves of its partition, and holds no
        worker meanwhile. The handler is replayed after it, like after a call.
        """
        if seconds < 0:
            raise ValueError("sleep needs seconds >= 0")
        await self._call(self._function, self._key, constants.SLEEP_HANDLER, {}, SLEEP,
                         timeout=max(seconds, _MIN_SLEEP_S))

    def saga(self, *, compensation_rounds: int = 5, compensation_backoff: float = 0.0) -> _saga.Saga:
        """Steps that each commit on their own, undone in reverse order if the block fails.

        ``async with ctx.saga() as saga: await saga.call(..., compensate=("cancel", {...}))``.
        Each compensation is a durable call, tried up to ``compensation_rounds`` times (each try
        includes the callee's own retries), with a durable sleep of ``compensation_backoff``
        seconds, doubling, between tries; what still fails is reported in :class:`SagaFailed`.
        """
        return _saga.Saga(self, compensation_rounds, compensation_backoff)

    def transaction(self, *, timeout: float = constants.DEFAULT_TX_TIMEOUT_S) -> _transaction.Transaction:
        """Serializable two-phase commit: ``async with ctx.transaction() as tx: await tx.call(...)``.

        Participants run tentatively under a lock on their key and vote with their reply; the
        block's end commits them all, or aborts them all if it raised. Deadlocks are avoided by
        wait-die (the younger transaction gets :class:`TransactionAborted`); a participant that
        does not vote within ``timeout`` seconds aborts the transaction. The coordinator's own
        key may take part (``tx.call(ctx.function, ctx.key, ...)``): it then commits with the others.
        """
        if self._participant:
            raise errors.InvalidCall(f"{self._function}({self._key!r}) runs as a transaction participant and "
                                      "cannot start a transaction")
        if self._in_tx:
            raise errors.InvalidCall("transactions do not nest: end the current `async with ctx.transaction()` first")
        return _transaction.Transaction(self, timeout)

    def _begin_transaction(self, timeout: float) -> wire.TxInfo:
        if self._tx_ts is None:  # one timestamp per invocation: a retried transaction keeps its age (wait-die)
            self._tx_ts = self.now()
        self._tx_count += 1
        self._in_tx = True
        return wire.TxInfo(f"{self._invocation_id}~tx{self._tx_count}", self._tx_ts, self._function, self._key,
                            timeout)

    def _decide_transaction(self, info: wire.TxInfo, commit: bool, participants: list[tuple[str, str]]) -> None:
        """Send the decision to every prepared participant; a replay that passes it again sends nothing new."""
        self._in_tx = False
        handler, purpose = _transaction.decision_handler(commit)
        for function, key in participants:
            self._sends.append(wire.Outgoing(function=function, key=key, handler=handler, args={},
                                              purpose=purpose, tx=info))
        if self._ops >= len(self._journal):  # past the journal: decided in this run, not in an earlier one
            self._decided.append([info.id, "committed" if commit else "aborted"])

    def _call(self, function: str, key: str, handler: str, args: dict[str, Any], purpose: str,
              tx: wire.TxInfo | None = None, timeout: float | None = None) -> DurableCall:
        layout.FunctionType.parse(function)
        if timeout is not None and timeout <= 0:
            raise ValueError("a call's timeout must be > 0 seconds")
        if self._participant:
            raise errors.InvalidCall(
                f"{self._function}({self._key!r}) runs as a transaction participant and cannot call "
                f"{function}({key!r}): a participant only stages its own effects until the decision")
        self._worked = self._worked or tx is None
        if function == self._function and key == self._key and tx is None and purpose != SLEEP:
            raise errors.InvalidCall(
                f"{function}({key!r}) cannot call its own key: the key stays locked until this invocation "
                "ends, so the call could never run; use ctx.send for a message to self")
        if purpose != SLEEP:
            cycle = self._cycle(function, key)
            if cycle is not None:  # the same in every replay (the chain is the invocation's): nothing journaled
                raise cycle
            if timeout is None:
                timeout = self._call_timeout
        index = self._ops
        entry = self._next_entry()
        target = f"{function}({key!r}).{handler}"
        redo = entry is not None and wire.is_redo(entry)  # a dead-letter replay makes this call again
        if entry is None or redo:  # a new call, sent if this run suspends
            plain = {k: codec.to_plain(v) for k, v in args.items()}
            self._calls.append(wire.Outgoing(function=function, key=key, handler=handler, args=plain,
                                             purpose=purpose, tx=tx, timeout=timeout, index=index))
            if not redo:  # past the journal: a new slot
                self._recorded.append(wire.outstanding_entry(function, key, handler))
            return DurableCall(self, index, None, target)
        raw = codec.unpack(entry)
        if _is_run(raw):
            raise self._diverged(f"call {function}.{handler}", raw)
        made = wire.outstanding_call(entry)
        if made is not None:  # made by an earlier run, not answered yet
            if made != (function, key, handler):
                raise self._diverged(f"call {function}({key!r}).{handler}", raw)
            return DurableCall(self, index, None, target)
        return DurableCall(self, index, entry, target)

    def _sends_before_wait(self, done: int) -> list[wire.Outgoing]:
        """The sends of a suspended run not committed before: those made before the call it waits at."""
        return self._sends[done:self._sends_at_wait]

    def _suspend_at(self, index: int) -> errors.Suspended:
        """The handler awaits a call not answered yet: this run ends; that call's answer resumes it."""
        if self._waiting is None:
            self._waiting = index
            self._sends_at_wait = len(self._sends)
        return errors.Suspended()

    async def run(self, name: str, fn: Callable[[], T | Awaitable[T]]) -> Any:
        """Run a side effect (or anything non-deterministic) once; replays return its journaled result.

        The result must be msgpack-encodable; it is returned in its plain form (as a replay gets
        it), so the first run and the replays see the same value. It is journaled when the
        invocation next suspends at a call: a run whose invocation ends without a call, or is
        retried, may run again on the next attempt.
        """
        self._worked = True
        found, value = self._replay_run(name)
        if found:
            return value
        out = fn()
        if inspect.isawaitable(out):
            out = await out
        return self._record_run(name, out)

    def now(self) -> float:
        """The wall-clock time (seconds since the epoch), the same in every replay of this invocation."""
        found, value = self._replay_run("~now")
        return cast(float, value) if found else cast(float, self._record_run("~now", time.time()))

    def random(self) -> random.Random:
        """A random generator seeded by the invocation id: the same numbers in every replay."""
        if self._random is None:
            self._random = random.Random(self._invocation_id)
        return self._random

    def _next_entry(self) -> bytes | None:
        if self._waiting is not None:  # it awaited an unanswered call (and caught the unwinding): nothing more
            raise errors.Suspended()
        index = self._ops
        self._ops += 1
        return self._journal[index] if index < len(self._journal) else None

    def _replay_run(self, name: str) -> tuple[bool, Any]:
        entry = self._next_entry()
        if entry is None:
            return False, None
        raw = codec.unpack(entry)
        if not _is_run(raw) or raw[1] != name:
            raise self._diverged(f"run {name!r}", raw)
        return True, raw[2]

    def _record_run(self, name: str, value: Any) -> Any:
        entry = codec.pack([_RUN, name, codec.to_plain(value)])
        self._recorded.append(entry)
        return codec.unpack(entry)[2]

    def _diverged(self, doing: str, raw: Any) -> errors.ReplayDiverged:
        had = "a call's reply"
        if _is_run(raw):
            had = f"run {raw[1]!r}"
        elif isinstance(raw, list) and len(raw) == 4 and raw[0] == "~call":
            had = f"call {raw[1]}({raw[2]!r}).{raw[3]}"
        return errors.ReplayDiverged(
            f"{self._function}({self._key!r}) replayed differently: step {self._ops} is now a {doing}, "
            f"its journal holds {had}; code between calls must be deterministic (use ctx.now, ctx.random, ctx.run)")

    # ---- used by the runtime ----
    def _restartable(self, exc: BaseException) -> bool:
        """Whether an escaping TransactionAborted may run the invocation again from scratch.

        Only if the aborted transactions were all it did durably: no call or side effect outside
        them, and no message but their decisions (which stay sent). Run again, it starts afresh.
        """
        return (isinstance(exc, errors.TransactionAborted) and not self._worked
                and all(s.tx is not None and s.purpose != _transaction.PREPARE for s in self._sends))

    def _changes(self, max_state_bytes: int) -> dict[str, bytes | None]:
        """Re-encode every value the handler touched; mutations in place count as writes.

        A value that is still its default, never assigned, is not written: a read of a key never
        stored writes nothing, and a deleted value read since is removed.
        """
        changes: dict[str, bytes | None] = {}
        for name, value in self._values.items():
            spec = self._specs[name]
            old = self._stored.get(name)
            if name not in self._assigned and value == spec.default and (old is None or name in self._deleted):
                if old is not None:
                    changes[name] = None
                continue
            encoded = spec.codec.encode(value)
            if len(encoded) > max_state_bytes:
                raise errors.StateTooLarge(
                    f"state {self._function}:{name} of key {self._key!r} would be {len(encoded)} bytes; "
                    f"the limit is {max_state_bytes} bytes"
                )
            if encoded != old:
                changes[name] = encoded
        return changes


_RUN = "~run"
SLEEP = "sleep"  # the purpose of the pending "call" a sleep waits for
_MIN_SLEEP_S = 0.001  # a sleep's timer is its call's timeout, which must be > 0


class DurableCall:
    """A durable call made by :meth:`Context.call`: await it for the callee's reply.

    Awaited before its reply is in, it unwinds the handler (which suspends; the reply resumes it).
    """

    __slots__ = ("_ctx", "_entry", "_index", "_target")

    def __init__(self, ctx: Context, index: int, entry: bytes | None, target: str) -> None:
        self._ctx = ctx
        self._index = index
        self._entry = entry  # its journaled reply; None while it is outstanding
        self._target = target

    @property
    def done(self) -> bool:
        """Whether its reply is in (awaiting it returns or raises at once)."""
        return self._entry is not None

    def __repr__(self) -> str:
        return f"<DurableCall #{self._index} {self._target} {'done' if self.done else 'outstanding'}>"

    def __await__(self) -> Generator[Any, None, Any]:
        if self._entry is None:
            raise self._ctx._suspend_at(self._index)
        reply = envelope.Reply.decode(self._entry)
        if not reply.ok:
            err = reply.error
            assert err is not None
            raise errors.CallFailed(err.kind, err.message, error_type=err.type, target=self._target)
        return codec.unpack(reply.value) if reply.value is not None else None
        yield  # a generator: ``await`` gets the value above; never reached


def _is_run(raw: Any) -> bool:
    return isinstance(raw, list) and len(raw) == 3 and raw[0] == _RUN
