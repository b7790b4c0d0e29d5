"""Reading and replaying dead letters (the ``STATEFN_DLQ`` stream).

A replay is a new ingress invocation whose idempotency key is derived from the dead letter's
stream sequence (``dlq-replay:<seq>``): replaying the same entry twice runs it once. The
original key cannot be reused, because the terminal failure recorded its error under it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import nats.js.errors
from nats.js.client import JetStreamContext

import statefn
from statefn import _codec, _constants, _naming


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
        return f"{_constants.SUBJECT_ROOT}.*.*.{_constants.DLQ_TOKEN}"
    return _naming.FunctionType.parse(function).dlq_subject


async def list_dead_letters(js: JetStreamContext, *, function: str | None = None,
                            limit: int = 100) -> list[DeadLetter]:
    """Oldest first, at most ``limit``."""
    out: list[DeadLetter] = []
    seq = 1
    subject = _subject(function)
    while len(out) < limit:
        try:
            msg = await js.get_msg(_constants.DLQ_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            break
        assert msg.seq is not None
        out.append(DeadLetter(seq=msg.seq, record=_codec.unpack(msg.data or b"")))
        seq = msg.seq + 1
    return out


async def get_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter:
    try:
        msg = await js.get_msg(_constants.DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        raise statefn.StatefnError(f"no dead letter with sequence {seq}") from None
    return DeadLetter(seq=seq, record=_codec.unpack(msg.data or b""))


async def replay(client: statefn.Client, letter: DeadLetter) -> str:
    """Send the dead invocation again (as a new invocation), then delete the dead letter."""
    rec = letter.record
    if not rec.get("handler") or rec.get("key") is None:
        raise statefn.StatefnError(
            f"dead letter {letter.seq} cannot be replayed: its message was undecodable ({letter.error.get('message')})")
    idem = f"dlq-replay:{letter.seq}"
    await client.send(str(rec["function"]), str(rec["key"]), str(rec["handler"]), idempotency_key=idem,
                      **(rec.get("args") or {}))
    js = client.nats.jetstream()
    await js.delete_msg(_constants.DLQ_STREAM, letter.seq)
    return idem
