"""The owner's entry in its function's pending-work index, written by the commits that change it.

Every commit that adds or deletes a timer, or queues or dequeues an inbox message, carries the
entry as that commit leaves the partition (computed from the owner's exact views of its timers
and inboxes), so the index can never say a timer is later than it is, whatever crashes. The
owner's views are rebuilt from etcd on takeover; an entry that disagrees with them (written by an
older version, or predicted wrong) is rewritten by the next commit, or by an idle loop's own.
"""

from __future__ import annotations

from statefn_core import errors, pendingwork
from statefn_sidecar import assembly, commit, timers

_NOTHING = pendingwork.Entry(None, 0)


def after(heap: timers.TimerHeap, inbox: int, eff: assembly.Effects) -> pendingwork.Entry:
    """The entry once a commit with these effects lands (``inbox``: the messages queued before it)."""
    due = heap.earliest(without=set(eff.timers_removed), plus=(due for due, _, _ in eff.timers_added))
    return pendingwork.Entry(pendingwork.floor_second(due), max(0, inbox + len(eff.queued) - len(eff.dequeued)))


def current(heap: timers.TimerHeap, inbox: int) -> pendingwork.Entry:
    """The entry as the partition is now."""
    return pendingwork.Entry(pendingwork.floor_second(heap.earliest()), inbox)


class PendingIndex:
    def __init__(self, key: bytes) -> None:
        self._key = key
        self._published = _NOTHING  # what etcd holds (no entry at all reads as nothing pending)

    def loaded(self, stored: bytes | None) -> None:
        """What etcd held when the partition was taken (an entry that does not decode is rewritten)."""
        try:
            self._published = pendingwork.Entry.decode(stored) if stored is not None else _NOTHING
        except errors.CodecError:
            self._published = pendingwork.Entry(-1, -1)  # matches nothing: the first commit rewrites it

    def stale(self, entry: pendingwork.Entry) -> bool:
        return entry != self._published

    def stage(self, txn: commit.Txn, entry: pendingwork.Entry) -> pendingwork.Entry | None:
        """Add the entry to a commit if etcd holds another; returns it, for ``landed`` once the commit has."""
        if entry == self._published:
            return None
        txn.put(self._key, entry.encode())
        return entry

    def landed(self, entry: pendingwork.Entry | None) -> None:
        if entry is not None:
            self._published = entry
