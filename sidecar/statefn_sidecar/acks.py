"""Telling NATS and callers what became of a batch's items: replies, acks, in-progress reports, hand-backs.

A pulled message is acked only once every item it carried is committed (or found to be a
duplicate), and its caller's reply is published only after that commit: this module is that
order, kept apart from the partition loop that decides when an item is settled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterator

import nats.errors
from nats.aio.client import Client as NatsClient

from statefn_sidecar import faults, items

_log = logging.getLogger("statefn.acks")


def pulled_sources(batch: list[items.Item]) -> list[items.Source]:
    """The NATS messages of a batch that still have uncommitted items (each once)."""
    return list({id(i.source): i.source for i in batch if i.source is not None and i.source.pending > 0}.values())


class Acks:
    """Replies and acks for one partition's items."""

    def __init__(self, nc: NatsClient, faults: faults.Faults, stats: collections.Counter[str],
                 ack_wait: float) -> None:
        self._nc = nc
        self._faults = faults
        self._stats = stats
        self._ack_wait = ack_wait

    async def answer(self, item: items.Item, reply: bytes | None) -> None:
        """Publish the reply (an encoded ``envelope.Reply``) to the item's reply address and its copies'."""
        if reply is None:
            return  # still running (suspended or queued): its end answers the original reply address
        if isinstance(item, items.Invocation):
            reply_to = item.message.reply_to
        else:
            reply_to = item.reply_to if isinstance(item, items.Undecodable) else None
        targets = [reply_to] if reply_to else []
        if isinstance(item, items.Ingress):
            targets += [dup_reply_to for _, dup_reply_to in item.dups if dup_reply_to]
        for target in targets:
            try:
                await self._nc.publish(target, reply)
            except nats.errors.Error as exc:  # the reply is in the record too: a waiting client finds it there
                _log.warning("could not publish a reply to %r (%s)", target, exc)

    async def done(self, item: items.Item) -> None:
        """The item is settled: ack its message once all of that message's items are, and its copies now."""
        if item.source is not None:
            item.source.pending -= 1
            if item.source.pending == 0:
                if self._faults.enabled:
                    try:
                        self._faults.maybe(faults.ACK_LOST)
                    except faults.InjectedTimeout:
                        return  # as if the ack never arrived: JetStream redelivers after ack_wait
                await item.source.msg.ack()
        if isinstance(item, items.Ingress):
            for msg, _ in item.dups:
                await msg.ack()
            item.dups.clear()

    async def hand_back(self, batch: list[items.Item]) -> None:
        """NAK what is still pending, so the partition's next owner gets it at once instead of after ack_wait."""
        for source in pulled_sources(batch):
            await source.msg.nak()

    @contextlib.contextmanager
    def in_progress(self, batch: list[items.Item]) -> Iterator[None]:
        """While the batch runs past half of ack_wait, report it in progress (+WPI) every half ack_wait.

        A batch that outlasts ack_wait would otherwise be redelivered (and answered as a duplicate).
        """
        task: asyncio.Task[None] | None = None

        async def report() -> None:
            while True:
                sources = pulled_sources(batch)
                for source in sources:
                    with contextlib.suppress(nats.errors.Error):
                        await source.msg.in_progress()
                self._stats["in_progress_reports"] += len(sources)
                await asyncio.sleep(self._ack_wait / 2)

        def start() -> None:
            nonlocal task
            task = asyncio.create_task(report(), name="in progress reports")

        timer = asyncio.get_running_loop().call_later(self._ack_wait / 2, start)
        try:
            yield
        finally:
            timer.cancel()
            if task is not None:
                task.cancel()
