"""The format of messages on NATS: ingress invocations, channel bundles and replies.

Routing data travels in the msgpack body; origin, attempt and W3C ``traceparent`` travel in
headers from the first version, so tracing needs no format change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from statefn_core import codec, constants, errors, layout, wire


@dataclasses.dataclass(slots=True)
class Message:
    """One logical invocation as it travels between partitions."""

    key: str
    handler: str
    args: dict[str, Any]
    origin: str = constants.ORIGIN_CLIENT
    traceparent: str | None = None
    reply_to: str | None = None
    idempotency_key: str | None = None
    attempt: int = 1
    # A durable call: where its reply goes, as a RESPONSE_HANDLER message on a channel.
    caller: CallerAddress | None = None
    # A transaction's prepare (runs tentatively), decision or inquiry: the transaction it belongs to.
    tx: wire.TxInfo | None = None
    # An invocation run again after its transaction died: that transaction's age, which its next
    # transactions keep, so under wait-die it only gets older and cannot starve.
    tx_age: float | None = None
    # A durable call: the (function, key) pairs waiting on it, outermost first; a call from it to any
    # of them could never run (their keys stay locked until it answers), so it fails at once.
    chain: list[list[str]] = dataclasses.field(default_factory=list)
    # A dead-letter replay that resumes: the etcd key of the failed run's journal (written by the fenced
    # commit that dead-lettered it; the message carries only where it is, never the journal itself).
    journal_ref: str | None = None

    def to_plain(self) -> list[Any]:
        return [self.key, self.handler, self.args, self.origin, self.traceparent, self.reply_to,
                self.idempotency_key, self.attempt, self.caller.to_plain() if self.caller else None,
                self.tx.to_plain() if self.tx else None, self.tx_age, self.chain or None, self.journal_ref]

    @property
    def is_response(self) -> bool:
        return self.handler == constants.RESPONSE_HANDLER

    @classmethod
    def from_plain(cls, raw: list[Any]) -> Message:
        """Raises TypeError or ValueError on a malformed message (a forged bundle, say).

        Older, shorter forms decode with the missing fields at their defaults.
        """
        if not isinstance(raw, list) or len(raw) < 3:
            raise TypeError("a message must be a list of at least its key, handler and arguments")
        defaults = cls(key="", handler="", args={})
        _check_message(raw[0], raw[1], raw[2], raw[6] if len(raw) > 6 else None,
                       raw[7] if len(raw) > 7 else defaults.attempt)
        if not all(v is None or isinstance(v, str) for v in raw[3:6]):
            raise TypeError("a message's origin, traceparent and reply address must be strings")
        msg = cls(*raw[:8])
        if len(raw) > 8 and raw[8]:
            msg.caller = CallerAddress(*raw[8])
        if len(raw) > 9:
            msg.tx = wire.TxInfo.from_plain(raw[9])
        if len(raw) > 10:
            msg.tx_age = raw[10]
        if len(raw) > 11 and raw[11]:
            msg.chain = [[str(function), str(key)] for function, key in raw[11]]
        if len(raw) > 12 and raw[12] is not None:
            if not isinstance(raw[12], str):
                raise TypeError("a message's journal reference must be a string")
            msg.journal_ref = raw[12]
        return msg

    @property
    def is_tx_control(self) -> bool:
        """A decision or an inquiry: handled by the sidecar itself, past any lock on the key.

        Only with its transaction: a ``~commit`` without one is nothing the sidecar acts on, and runs
        (and fails, as an unknown handler) like any message.
        """
        return self.tx is not None and self.handler in constants.TX_CONTROL_HANDLERS

    @property
    def is_prepare(self) -> bool:
        return self.tx is not None and not self.is_tx_control and not self.is_response


@dataclasses.dataclass(frozen=True, slots=True)
class CallerAddress:
    """The suspended invocation a durable call answers: its function, partition, key and call id.

    The partition travels along so the callee routes the reply without looking the caller's
    partition count up (a function's partition count is fixed for its lifetime).
    """

    function: str
    partition: int
    key: str
    call_id: str

    def to_plain(self) -> list[Any]:
        return [self.function, self.partition, self.key, self.call_id]


def response_message(caller: CallerAddress, reply: Reply, *, origin: str, traceparent: str | None,
                     prepared: tuple[str, str, wire.TxInfo] | None = None) -> Message:
    """The message that carries a call's reply (or error) back to the waiting caller.

    A participant's yes vote names the prepared participant (function, key, transaction), so a
    coordinator that no longer waits for it (it timed out, or ended) can release it with an abort.
    """
    args: dict[str, Any] = {"call": caller.call_id, "reply": reply.encode()}
    if prepared is not None:
        function, key, tx = prepared
        args["prepared"] = [function, key, tx.to_plain()]
    return Message(key=caller.key, handler=constants.RESPONSE_HANDLER, args=args, origin=origin,
                   traceparent=traceparent)


def tx_control_message(handler: str, tx: wire.TxInfo, key: str, *, origin: str, traceparent: str | None,
                       args: dict[str, Any] | None = None) -> Message:
    """A decision (``~commit``/``~abort``) to a participant's key, or an ``~inquire`` to the coordinator's."""
    return Message(key=key, handler=handler, args=args or {}, origin=origin, traceparent=traceparent, tx=tx)


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """An idempotency record: which request it is for, and its final reply (``None`` while it waits).

    A copy that arrives while the invocation waits (suspended at a call, or queued behind one) is
    a duplicate, answered when the invocation ends. A request under the same idempotency key with
    another ``fingerprint`` is not a copy: it is refused with ``idempotency_mismatch``.
    """

    fingerprint: bytes
    reply: bytes | None = None  # an encoded Reply

    @property
    def pending(self) -> bool:
        return self.reply is None

    def encode(self) -> bytes:
        return codec.pack([self.fingerprint, self.reply])

    @classmethod
    def decode(cls, data: bytes) -> Record:
        fingerprint, reply = codec.unpack(data)
        return cls(fingerprint, reply)


def fingerprint(msg: Message) -> bytes:
    """What makes two requests under one idempotency key the same request: their arguments, in canonical order."""
    return hashlib.blake2b(codec.pack(_canonical(msg.args)), digest_size=12).digest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[k, _canonical(v)] for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def idempotency_id(key: str, handler: str, idempotency_key: str) -> str:
    """An idempotency key names one request to one key's handler: the same key sent to another key
    or handler is another request, with its own record."""
    return f"{layout.escape_key(key)}/{layout.escape_key(handler)}/{layout.escape_key(idempotency_key)}"


def mismatch_reply(idempotency_key: str) -> Reply:
    return Reply(ok=False, error=wire.ErrorInfo(
        kind=errors.ErrorKind.IDEMPOTENCY_MISMATCH,
        message=f"the idempotency key {idempotency_key!r} was used for a request with other arguments; "
                "a retry must send the same request, and a new request needs a new key"))


def encode_invoke(msg: Message) -> tuple[bytes, dict[str, str]]:
    headers = {
        constants.HEADER_KIND: constants.KIND_INVOKE,
        constants.HEADER_ORIGIN: msg.origin,
        constants.HEADER_ATTEMPT: str(msg.attempt),
    }
    if msg.traceparent:
        headers[constants.HEADER_TRACEPARENT] = msg.traceparent
    if msg.reply_to:
        headers[constants.HEADER_REPLY_TO] = msg.reply_to
    body = {"k": msg.key, "h": msg.handler, "a": msg.args, "i": msg.idempotency_key}
    if msg.journal_ref:
        body["j"] = msg.journal_ref
    return codec.pack(body), headers


def _check_message(key: Any, handler: Any, args: Any, idempotency_key: Any, attempt: Any) -> None:
    """What every message must be before anything acts on it; raises TypeError or ValueError."""
    if not isinstance(key, str) or not isinstance(handler, str):
        raise TypeError("a message's key and handler must be strings")
    if not isinstance(args, dict):
        raise TypeError("invocation arguments must be a map of parameter name to value")
    if codec.too_deep(args):
        raise ValueError(f"invocation arguments nest deeper than {codec.MAX_DEPTH} levels")
    if idempotency_key is not None and not isinstance(idempotency_key, str):
        raise TypeError("an invocation's idempotency key must be a string")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= _MAX_ATTEMPT:
        raise ValueError(f"an invocation's attempt must be a number from 1 to {_MAX_ATTEMPT}, not {attempt!r}")


_MAX_ATTEMPT = 1_000_000
# A reply address is a NATS subject: dot-separated tokens without whitespace or wildcards.
_SUBJECT = re.compile(r"^[^.\s*>]+(\.[^.\s*>]+)*$")


def decode_invoke(body: bytes, headers: dict[str, str] | None) -> Message:
    """Raises CodecError (undecodable) or KeyError/TypeError/ValueError (malformed) on bad input."""
    headers = headers or {}
    raw = codec.unpack(body)
    if not isinstance(raw, dict) or not isinstance(raw.get("k"), str) or not isinstance(raw.get("h"), str):
        raise TypeError("invocation body must be a map with string 'k' (key) and 'h' (handler)")
    args = raw.get("a") or {}
    try:
        attempt = int(headers.get(constants.HEADER_ATTEMPT, "1"))
    except ValueError as exc:
        raise ValueError(f"the attempt header is not a number: {exc}") from None
    _check_message(raw.get("k"), raw.get("h"), args, raw.get("i"), attempt)
    journal_ref = raw.get("j")
    if journal_ref is not None and not isinstance(journal_ref, str):
        raise TypeError("a journal reference ('j') must be a string")
    reply_to = headers.get(constants.HEADER_REPLY_TO)
    if reply_to is not None and not _SUBJECT.match(reply_to):
        raise ValueError(f"the reply address is not a NATS subject: {reply_to!r}")
    return Message(
        key=raw["k"],
        handler=raw["h"],
        args=args,
        origin=headers.get(constants.HEADER_ORIGIN, constants.ORIGIN_CLIENT),
        traceparent=headers.get(constants.HEADER_TRACEPARENT),
        reply_to=reply_to,
        idempotency_key=raw.get("i"),
        attempt=attempt,
        journal_ref=journal_ref,
    )


@dataclasses.dataclass(slots=True)
class Bundle:
    """All messages one commit of a sender partition sends to one target partition.

    ``seq`` numbers bundles densely per channel (sender partition -> target partition); the
    receiver applies bundle n only after n-1, and drops any it has applied already.
    """

    sender: str
    seq: int
    messages: list[Message]


def encode_bundle(bundle: Bundle) -> bytes:
    return codec.pack({"c": bundle.sender, "n": bundle.seq, "m": [m.to_plain() for m in bundle.messages]})


def decode_bundle(body: bytes) -> Bundle:
    """Raises CodecError, KeyError, TypeError or ValueError on a malformed bundle."""
    raw = codec.unpack(body)
    sender, seq, messages = raw["c"], raw["n"], raw["m"]
    if not isinstance(sender, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 \
            or not isinstance(messages, list):
        raise TypeError("a bundle is a map of a string sender 'c', a sequence number 'n' and a list 'm'")
    return Bundle(sender=sender, seq=seq, messages=[Message.from_plain(m) for m in messages])


@dataclasses.dataclass(slots=True)
class Reply:
    """What a caller receives; also what an idempotency record stores."""

    ok: bool
    value: bytes | None = None
    error: wire.ErrorInfo | None = None

    def encode(self) -> bytes:
        return codec.pack([self.ok, self.value, dataclasses.astuple(self.error) if self.error else None])

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        ok, value, err = codec.unpack(data)
        return cls(ok=ok, value=value, error=wire.ErrorInfo(*err) if err else None)
