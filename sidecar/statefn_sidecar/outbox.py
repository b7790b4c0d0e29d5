"""Publishing committed outgoing messages: in order per channel, each at least once.

An outbox entry is committed to etcd with the effects that produced it; only then is it
published. Each channel (this partition -> one target partition, or the dead-letter subject)
has one publisher task that publishes strictly in sequence and waits for JetStream's ack
before the next, so the stream holds a channel's bundles in order and the receiver's dense
per-channel sequence check drops any duplicate. Published entries are trimmed by the next
commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from statefn_core import backoff, codec, constants
from statefn_sidecar import faults as faults_mod

_log = logging.getLogger("statefn.outbox")


def _publish_failed(exc: BaseException) -> bool:
    return isinstance(exc, nats.errors.Error | nats.js.errors.Error | TimeoutError)


@dataclasses.dataclass(slots=True)
class Entry:
    target: str
    seq: int
    subject: str
    msg_id: str
    headers: dict[str, str]
    body: bytes

    def encode(self) -> bytes:
        return codec.pack([self.subject, self.msg_id, self.headers, self.body])

    @classmethod
    def decode(cls, target: str, seq: int, data: bytes) -> Entry:
        subject, msg_id, headers, body = codec.unpack(data)
        return cls(target, seq, subject, msg_id, headers, body)


class ChannelPublisher:
    """One task per channel; ``on_published(target, seq)`` feeds outbox trimming."""

    def __init__(
        self,
        js: JetStreamContext,
        target: str,
        on_published: Callable[[str, int], None],
        faults: faults_mod.Faults,
    ) -> None:
        self._js = js
        self.target = target
        self._queue: asyncio.Queue[Entry] = asyncio.Queue()
        self._on_published = on_published
        self._faults = faults
        self._task = asyncio.create_task(self._run(), name=f"publish {target}")
        self.published = 0
        self._busy = False

    def enqueue(self, entry: Entry) -> None:
        self._queue.put_nowait(entry)

    @property
    def backlog(self) -> int:
        return self._queue.qsize() + (1 if self._busy else 0)

    async def drain(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            entry = await self._queue.get()
            self._busy = True
            # Stored or not, publishing again is safe: the message id and the receiver's channel
            # sequence both drop a second copy.
            await backoff.until_done(functools.partial(self._publish, entry), transient=_publish_failed,
                                     first=0.05, cap=2.0, log=_log,
                                     what=f"publish {self.target} seq {entry.seq} to {entry.subject}")
            self.published += 1
            self._busy = False
            self._on_published(entry.target, entry.seq)
            self._queue.task_done()

    async def _publish(self, entry: Entry) -> None:
        headers = dict(entry.headers)
        headers[constants.HEADER_MSG_ID] = entry.msg_id
        if self._faults.enabled:
            self._faults.maybe(faults_mod.PUBLISH_REFUSED)
        await self._js.publish(entry.subject, entry.body, headers=headers, timeout=5.0)
        if self._faults.enabled:
            self._faults.maybe(faults_mod.PUBLISH_ACK_LOST)
