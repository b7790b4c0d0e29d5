"""Reading and replaying dead letters (the ``STATEFN_DLQ`` stream).

A replay is a new ingress invocation whose idempotency key is derived from the dead letter's
stream sequence (``~dlq-replay:<seq>``, a key only the platform may use): replaying the same entry
twice runs it once. The original key cannot be reused, because the terminal failure recorded its
error under it.

A replay runs the invocation from the start, on its own. That is refused where it would apply
effects someone was told did not happen: a callee whose error answered a durable call (the caller
went on without it), and a transaction participant (its transaction aborted). An invocation that
had finished durable steps (call replies, ``ctx.run``) before failing would repeat them: that
needs ``repeat_steps``, which says the operator knows those steps may run twice.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import nats.js.errors
from nats.js.client import JetStreamContext

import statefn
from statefn_core import codec, constants, envelope, layout, wire
from statefn_sidecar import items

# A dead letter is one NATS message: what it keeps of a failed invocation stays well under max_payload.
_MAX_ARGS_BYTES = 512 * 1024
_MAX_TEXT = 8192


def record(fn: layout.FunctionType, partition: int, item: items.Item,
                       error: wire.ErrorInfo) -> dict[str, Any]:
    """What the dead-letter stream keeps of a failed invocation, with what a replay must know about it.

    ``caller`` and ``transaction`` name who was already told of the failure (a durable call's caller,
    or a transaction that aborted on it); ``journaled`` counts the durable steps (call replies,
    ``ctx.run`` results) it had finished. A replay runs the invocation again from the start, alone.
    """
    msg = item.message if isinstance(item, items.Invocation) else None
    args = msg.args if msg else None
    args_size = len(codec.pack(args)) if args else 0
    if args_size > _MAX_ARGS_BYTES:  # the letter must stay publishable; a replay then is refused
        args = None
    progress = item.progress() if isinstance(item, items.Invocation) else None
    journaled = sum(1 for entry in progress.journal if wire.finished(entry)) if progress is not None else 0
    return {
        "function": str(fn),
        "partition": partition,
        "key": msg.key if msg else None,
        "handler": msg.handler if msg else None,
        "args": args,
        "args_dropped": args_size if args is None and msg and msg.args else 0,
        "attempts": msg.attempt if msg else 0,
        "origin": msg.origin if msg else None,
        "idempotency_key": msg.idempotency_key if msg else None,
        "invocation_id": item.id,
        "caller": f"{msg.caller.function}({msg.caller.key!r})" if msg and msg.caller else None,
        "transaction": msg.tx.id if msg and msg.tx else None,
        "journaled": journaled,
        # A replay that was to resume from a journal: replayed again, only from the start (--repeat-steps).
        "resumed_from": msg.journal_ref if msg else None,
        "error": {"kind": error.kind, "message": error.message[:_MAX_TEXT], "type": error.type[:_MAX_TEXT]},
        "raw": item.raw if isinstance(item, items.Undecodable) else None,
        "failed_at": time.time(),
    }


# What JetStream answers when deleting a message that is gone: "sequence N not found", "no message found".
_NO_SUCH_MESSAGE = (10043, 10057)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    seq: int
    record: dict[str, Any]

    @property
    def function(self) -> str:
        return str(self.record.get("function", "?"))

    @property
    def error(self) -> dict[str, Any]:
        err: dict[str, Any] = self.record.get("error") or {}
        return err


def _subject(function: str | None) -> str:
    if function is None:
        return f"{constants.SUBJECT_ROOT}.*.*.{constants.DLQ_TOKEN}"
    return layout.FunctionType.parse(function).dlq_subject


async def list_dead_letters(js: JetStreamContext, *, function: str | None = None,
                            limit: int = 100) -> list[DeadLetter]:
    """Oldest first, at most ``limit``."""
    out: list[DeadLetter] = []
    seq = 1
    subject = _subject(function)
    while len(out) < limit:
        try:
            msg = await js.get_msg(constants.DLQ_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        assert msg.seq is not None
        out.append(DeadLetter(seq=msg.seq, record=codec.unpack(msg.data or b"")))
        seq = msg.seq + 1
    return out


async def purge(js: JetStreamContext, *, function: str | None = None, older_than: float | None = None,
                keep: int | None = None) -> int:
    """Delete dead letters, of one function or all, and return how many went.

    ``older_than`` (seconds): those that failed longer ago; ``keep``: all but the newest ``keep``;
    neither: all of them. Replay what you need first: a purged letter is gone.
    """
    subject = _subject(function)
    if older_than is not None and keep is not None:
        raise statefn.StatefnError("purge by age or by count, not both")
    before = await _count(js, subject)
    if older_than is not None:
        cutoff = time.time() - older_than
        upto: int | None = None  # the first letter young enough to stay
        seq = 1
        while True:
            try:
                msg = await js.get_msg(constants.DLQ_STREAM, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break
            assert msg.seq is not None
            if float(codec.unpack(msg.data or b"").get("failed_at", 0)) >= cutoff:
                upto = msg.seq
                break
            seq = msg.seq + 1
        if upto is None:
            await js.purge_stream(constants.DLQ_STREAM, subject=subject)
        elif upto > 1:
            await js.purge_stream(constants.DLQ_STREAM, subject=subject, seq=upto)
    elif keep is not None:
        if keep < 1:
            await js.purge_stream(constants.DLQ_STREAM, subject=subject)
        else:
            await js.purge_stream(constants.DLQ_STREAM, subject=subject, keep=keep)
    else:
        await js.purge_stream(constants.DLQ_STREAM, subject=subject)
    return max(0, before - await _count(js, subject))


async def _count(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(constants.DLQ_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def get_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    try:
        msg = await js.get_msg(constants.DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        raise statefn.StatefnError(f"no dead letter with sequence {seq}") from None
    return DeadLetter(seq=seq, record=codec.unpack(msg.data or b""))


def replay_refusal(letter: DeadLetter, *, repeat_steps: bool = False) -> str | None:
    """Why a replay of this dead letter would not be exactly-once, or None if it would be."""
    rec = letter.record
    if not rec.get("handler") or rec.get("key") is None:
        return f"its message was undecodable ({letter.error.get('message')})"
    if rec.get("args_dropped"):
        return f"its arguments ({rec['args_dropped']} bytes) were too large to keep in the dead letter"
    if rec.get("transaction"):
        return (f"it was a participant of transaction {rec['transaction']}, which aborted; run again alone, its "
                "effects would happen outside the transaction")
    if rec.get("caller"):
        return (f"it answered a durable call from {rec['caller']} with its error, and that caller went on without "
                "it; run again, its effects would happen after the caller was told they did not")
    if rec.get("resumed_from") and not rec.get("journal_ref") and not repeat_steps:
        return ("it was a replay that could not resume from its journal (expired); run from the start, its "
                "finished steps would run again (allow it with repeat_steps / --repeat-steps)")
    if rec.get("journaled") and not repeat_steps and not rec.get("journal_ref"):
        return (f"it had finished {rec['journaled']} durable step(s) (call replies, ctx.run results) before it "
                "failed, and a replay runs it from the start: those steps would run again (allow it with "
                "repeat_steps / --repeat-steps)")
    return None


async def replay(client: statefn.Client, letter: DeadLetter, *, repeat_steps: bool = False) -> str:
    """Send the dead invocation again (as a new invocation), then delete the dead letter."""
    refusal = replay_refusal(letter, repeat_steps=repeat_steps)
    if refusal is not None:
        raise statefn.StatefnError(f"dead letter {letter.seq} cannot be replayed: {refusal}")
    rec = letter.record
    # A reserved key (callers cannot claim it), scoped like any to the key and handler it replays.
    idem = f"{constants.RESERVED_IDEMPOTENCY_PREFIX}dlq-replay:{letter.seq}"
    function, key = str(rec["function"]), str(rec["key"])
    partitions = int((await client.describe(function))["partitions"])
    # With its journal (kept by the commit that dead-lettered it), it resumes: finished steps are not repeated.
    resume = rec.get("journal_ref") if rec.get("journaled") and not repeat_steps else None
    message = envelope.Message(key=key, handler=str(rec["handler"]), args=rec.get("args") or {},
                               idempotency_key=idem, journal_ref=resume)
    body, headers = envelope.encode_invoke(message)
    headers[constants.HEADER_MSG_ID] = idem  # a replay sent twice is stored once
    js = client.nats.jetstream()
    await js.publish(layout.FunctionType.parse(function).ingress_subject(layout.partition_of(key, partitions)),
                     body, headers=headers)
    try:
        await js.delete_msg(constants.DLQ_STREAM, letter.seq)
    except nats.js.errors.APIError as exc:
        if exc.err_code not in _NO_SUCH_MESSAGE:
            raise
        # An earlier replay of the same letter deleted it (and its invocation runs once).
    return idem
