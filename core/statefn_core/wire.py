"""The request/reply protocol between the sidecar and the code that runs handlers.

Embedded mode passes these objects in-process; remote mode sends them as msgpack over
localhost HTTP. One batch request carries, per key, the stored state and the ordered
invocations; the reply carries, per invocation, the state changes, outgoing messages and the
reply or error. Keeping one protocol for both modes keeps their semantics identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from statefn_core import codec, errors


@dataclasses.dataclass(frozen=True, slots=True)
class TxInfo:
    """A transaction as its messages carry it: who coordinates it, and its age for wait-die."""

    id: str
    ts: float               # when its invocation first began a transaction: older wins under wait-die
    function: str           # the coordinator's address
    key: str
    timeout: float

    def older_than(self, other: TxInfo) -> bool:
        return (self.ts, self.id) < (other.ts, other.id)

    def to_plain(self) -> list[Any]:
        return [self.id, self.ts, self.function, self.key, self.timeout]

    @classmethod
    def from_plain(cls, raw: Any) -> TxInfo | None:
        return cls(*raw) if raw else None


@dataclasses.dataclass(slots=True)
class Invocation:
    id: str
    handler: str
    args: dict[str, Any]
    attempt: int = 1
    origin: str = ""
    traceparent: str | None = None
    # A resumed invocation: the encoded replies of the calls it made so far, in order, and how
    # many of its sends were committed already (a replay does not send them again).
    journal: list[bytes] = dataclasses.field(default_factory=list)
    sends_done: int = 0
    # A transaction participant's prepare: its effects are staged, not applied, until the decision.
    prepare: bool = False
    # Run again after its transaction died: the age its transactions keep (wait-die); else its first one's time.
    tx_age: float | None = None
    # A durable call: the (function, key) pairs waiting on it (envelope.Message.chain).
    chain: list[list[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(slots=True)
class KeyRequest:
    function: str
    key: str
    state: dict[str, bytes]
    invocations: list[Invocation]


@dataclasses.dataclass(slots=True)
class Outgoing:
    """A message a handler sends; the sidecar routes it on a channel, exactly once."""

    function: str
    key: str
    handler: str
    args: dict[str, Any]
    delay: float | None = None
    traceparent: str | None = None
    # What a call is for, as its span says: "" (a plain call), "saga.step", "saga.compensate",
    # "tx.prepare"; or a transaction's decision: "tx.commit", "tx.abort".
    purpose: str = ""
    tx: TxInfo | None = None
    # A call's timeout in seconds: then the caller resumes with an error instead of the reply.
    timeout: float | None = None
    # A call's place in the invocation's journal, where its reply goes (calls may be answered in any order).
    index: int = -1

    def to_plain(self) -> list[Any]:
        return [self.function, self.key, self.handler, self.args, self.delay, self.traceparent, self.purpose,
                self.tx.to_plain() if self.tx else None, self.timeout, self.index]

    @classmethod
    def from_plain(cls, raw: list[Any]) -> Outgoing:
        function, key, handler, args, delay, traceparent, purpose, tx, timeout = raw[:9]
        index = raw[9] if len(raw) > 9 else -1
        return cls(function, key, handler, args, delay, traceparent, purpose, TxInfo.from_plain(tx), timeout, index)


_OUTSTANDING = "~call"


def outstanding_entry(function: str, key: str, handler: str) -> bytes:
    """A journal slot of a call made and not answered yet; its reply takes its place when it comes.

    It names the call, so a replay that makes another call at that place is caught as divergent.
    """
    return codec.pack([_OUTSTANDING, function, key, handler])


_REDO = "~redo"


def redo_entry() -> bytes:
    """A dead journal's slot of a call that failed or was still outstanding: a replay makes it again."""
    return codec.pack([_REDO])


def _tag(entry: bytes) -> list[Any] | None:
    """The entry as a tagged list, or None: an answer, a run's result, or bytes that are not msgpack at all
    (journal slots come from function servers too, so they are never trusted to decode)."""
    try:
        raw = codec.unpack(entry)
    except errors.CodecError:
        return None
    return raw if isinstance(raw, list) and raw and raw[0] in (_OUTSTANDING, _REDO) else None


def is_redo(entry: bytes) -> bool:
    return _tag(entry) == [_REDO]


def finished(entry: bytes) -> bool:
    """A slot of a finished step: a call's reply or a run's result (not an outstanding call or a redo)."""
    return _tag(entry) is None


def outstanding_call(entry: bytes) -> tuple[str, str, str] | None:
    """The (function, key, handler) an outstanding slot names; None for anything else."""
    raw = _tag(entry)
    if raw is not None and len(raw) == 4 and raw[0] == _OUTSTANDING:
        return raw[1], raw[2], raw[3]
    return None


@dataclasses.dataclass(slots=True)
class ErrorInfo:
    kind: str
    message: str
    type: str = ""
    retry: bool = False
    retry_after: float | None = None


@dataclasses.dataclass(slots=True)
class Result:
    id: str
    reply: bytes | None = None
    error: ErrorInfo | None = None
    # State names changed by this invocation -> new encoding, or None when reset to the default.
    state: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    sends: list[Outgoing] = dataclasses.field(default_factory=list)
    # Suspended (no reply, no state yet; ``sends`` are those made before): the calls this run made, each
    # with its journal index, and the index of the call it waits for (-1: it did not suspend).
    calls: list[Outgoing] = dataclasses.field(default_factory=list)
    waiting: int = -1
    # Not run: an earlier invocation of the same key suspended; it waits for that one to end.
    deferred: bool = False
    # Suspended: the journal's new slots, in order: ctx.run/ctx.now results, and the calls made (outstanding).
    journal_added: list[bytes] = dataclasses.field(default_factory=list)
    # Transactions this run decided, as [id, "committed" | "aborted"] (their decisions are in ``sends``).
    transactions: list[list[str]] = dataclasses.field(default_factory=list)
    # Failed: whether the run began any transaction (replayed ones included). Such a run is never resumed
    # from its journal: a resumed run would decide its transactions anew, under new ids, against
    # participants its failure already aborted.
    began_tx: bool = False


@dataclasses.dataclass(slots=True)
class BatchRequest:
    keys: list[KeyRequest]
    max_state_bytes: int
    handler_timeout: float | None = None  # the sidecar's (the spec's); None: each function's own


@dataclasses.dataclass(slots=True)
class BatchResponse:
    results: list[list[Result]]


def encode_request(req: BatchRequest) -> bytes:
    return codec.pack(
        {
            "max_state_bytes": req.max_state_bytes,
            "handler_timeout": req.handler_timeout,
            "keys": [
                [k.function, k.key, k.state, [dataclasses.astuple(i) for i in k.invocations]]
                for k in req.keys
            ],
        }
    )


def decode_request(data: bytes) -> BatchRequest:
    raw = codec.unpack(data)
    return BatchRequest(
        max_state_bytes=raw["max_state_bytes"],
        handler_timeout=raw.get("handler_timeout"),
        keys=[
            KeyRequest(function=f, key=k, state=s, invocations=[Invocation(*i) for i in invs])
            for f, k, s, invs in raw["keys"]
        ],
    )


def _result_to_plain(r: Result) -> list[Any]:
    return [
        r.id,
        r.reply,
        dataclasses.astuple(r.error) if r.error else None,
        r.state,
        [s.to_plain() for s in r.sends],
        [c.to_plain() for c in r.calls],
        r.deferred,
        r.journal_added,
        r.transactions,
        r.began_tx,
        r.waiting,
    ]


def _result_from_plain(raw: list[Any]) -> Result:
    rid, reply, err, state, sends, calls, deferred, journal_added, transactions = raw[:9]
    return Result(
        waiting=int(raw[10]) if len(raw) > 10 else -1,
        began_tx=bool(raw[9]) if len(raw) > 9 else True,  # unknown: as if it had (never resumed)
        id=rid,
        reply=reply,
        error=ErrorInfo(*err) if err else None,
        state=state,
        sends=[Outgoing.from_plain(s) for s in sends],
        calls=[Outgoing.from_plain(c) for c in calls or []],
        deferred=deferred,
        journal_added=journal_added,
        transactions=transactions,
    )


def encode_response(resp: BatchResponse) -> bytes:
    return codec.pack([[_result_to_plain(r) for r in rs] for rs in resp.results])


def decode_response(data: bytes) -> BatchResponse:
    return BatchResponse(results=[[_result_from_plain(r) for r in rs] for rs in codec.unpack(data)])
