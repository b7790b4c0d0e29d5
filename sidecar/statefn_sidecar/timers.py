"""The owner's in-memory view of its partition's timers (retries and delayed sends).

The timers themselves are etcd keys written and deleted in fenced commits; this heap is only
the owner's index of them, rebuilt from etcd when a partition is taken.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Collection, Iterable

from statefn_core import codec, envelope
from statefn_sidecar import items


def now_ms() -> int:
    return int(time.time() * 1000)


class TimerHeap:
    def __init__(self) -> None:
        self._heap: list[tuple[int, bytes]] = []
        self._payloads: dict[bytes, bytes] = {}
        # Popped as due, still in etcd until the commit that applies them deletes them: a commit before
        # that one (an earlier round or plan of the batch) leaves them in place, and must say so.
        self._inflight: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._payloads)

    def add(self, due_ms: int, key: bytes, payload: bytes) -> None:
        self._payloads[key] = payload
        self._inflight.pop(key, None)
        heapq.heappush(self._heap, (due_ms, key))

    def scheduled(self, key: bytes) -> bool:
        """Whether the timer is still in etcd (due or not): no commit has deleted it yet."""
        return key in self._payloads

    def remove(self, key: bytes) -> None:
        self._payloads.pop(key, None)  # its heap entry is skipped when it comes up
        self._inflight.pop(key, None)

    def next_due_ms(self) -> int | None:
        """The next timer to pop (the loop's wake-up); timers popped already are not counted."""
        while self._heap and self._heap[0][1] not in self._payloads:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def earliest(self, *, without: Collection[bytes] = (), plus: Iterable[int] = ()) -> int | None:
        """The earliest due time in etcd once a commit deletes the timers ``without`` and adds ones due at ``plus``.

        Timers popped but not yet deleted count. A best-first walk down the heap: it visits only
        entries due before the answer (the ones the commit deletes, and deleted ones not yet
        popped), not the whole heap.
        """
        best = min([*plus, *(due for key, due in self._inflight.items() if key not in without)], default=None)
        heap = self._heap
        frontier = [(heap[0][0], 0)] if heap else []
        while frontier:
            due, i = heapq.heappop(frontier)
            if best is not None and due >= best:
                break
            key = heap[i][1]
            if key in self._payloads and key not in without:
                return due
            for child in (2 * i + 1, 2 * i + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child][0], child))
        return best

    def pop_due(self, limit: int) -> list[items.Item]:
        """Due timers as items; each stays in etcd until the commit that applies it deletes it."""
        now = now_ms()
        out: list[items.Item] = []
        while self._heap and self._heap[0][0] <= now and len(out) < limit:
            due, key = heapq.heappop(self._heap)
            payload = self._payloads.get(key)
            if payload is None:
                continue
            self._inflight[key] = due
            raw = codec.unpack(payload)
            if raw[0] == "retry":
                _, inv_id, plain, *pending = raw
                out.append(items.Retry(id=inv_id, message=envelope.Message.from_plain(plain), timer=key,
                                       idem_pending=bool(pending and pending[0])))
            elif raw[0] == "resume":  # the suspended invocation of that key, at this attempt
                _, target_key, attempt = raw
                out.append(items.ResumeTimer(id=key.decode(), timer=key, message=envelope.Message(
                    key=target_key, handler="", args={}, attempt=attempt)))
            elif raw[0] == "inquire":  # the key may still be prepared for that transaction
                _, target_key, tx_id = raw
                out.append(items.InquiryTimer(id=key.decode(), timer=key, key=target_key, tx_id=tx_id))
            else:
                _, function, plain = raw
                out.append(items.DelayedSend(id=key.decode(), message=envelope.Message.from_plain(plain), timer=key,
                                             target_function=function))
        return out
