"""The pending-work index: per partition, its earliest due timer and how many messages wait in its inboxes.

JetStream's lag cannot see what the platform keeps in etcd: timers (delayed sends, durable sleeps,
call and vote timeouts, retry backoffs, 2PC inquiries) and messages queued behind a locked key.
Each partition's owner keeps one entry here, written in the same fenced commit that changes its
timers or inboxes, and the autoscaler reads every entry of a function with one range request: so a
function at zero replicas is woken ahead of its next timer, and inbox backlog counts as lag.

Due times are floored to the second: never later than the timer itself (waking a little early is
harmless, late is not), and a stream of call timeouts, each due a little later than the last,
rewrites the entry about once a second rather than on every commit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from statefn_core import codec, errors


def floor_second(due_ms: int | None) -> int | None:
    return None if due_ms is None else due_ms - due_ms % 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """One partition's pending work, as its last commit left it."""

    due_ms: int | None  # the earliest timer's due time (epoch ms, floored to the second); None: no timer
    inbox: int = 0      # messages queued in the inboxes of its locked keys

    def encode(self) -> bytes:
        return codec.pack({"due": self.due_ms, "inbox": self.inbox})

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        raw = codec.unpack(data)
        if not isinstance(raw, dict):
            raise errors.CodecError(f"a pending-work entry is a map, not {type(raw).__name__}")
        due, inbox = raw.get("due"), raw.get("inbox", 0)
        if (due is not None and not isinstance(due, int)) or not isinstance(inbox, int):
            raise errors.CodecError(f"a malformed pending-work entry: {raw!r}")
        return cls(due, inbox)


@dataclasses.dataclass(frozen=True, slots=True)
class PendingWork:
    """A function's pending work over all its partitions."""

    next_due_ms: int | None  # the earliest due timer of any partition
    inbox: int               # queued messages in all partitions' inboxes

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> PendingWork:
        dues: list[int] = []
        inbox = 0
        for entry in entries:
            if entry.due_ms is not None:
                dues.append(entry.due_ms)
            inbox += entry.inbox
        return cls(min(dues, default=None), inbox)

    def due_in(self, now_ms: int) -> float | None:
        """Seconds until the next timer is due (negative when overdue); None without timers."""
        return None if self.next_due_ms is None else (self.next_due_ms - now_ms) / 1000
