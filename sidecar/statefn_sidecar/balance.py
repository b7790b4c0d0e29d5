"""Which live sidecar should own which partition: deterministic, balanced, and sticky.

Every sidecar computes the same assignment from the same member list, so they agree without
talking to each other. Each partition ranks members by a hash of (member, partition)
(rendezvous hashing, so a membership change moves few partitions); a greedy pass then caps
every member at ceil(P / members) so the load is even.
"""

from __future__ import annotations

import hashlib
import math


def _rank(member: str, partition: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest(), "big")


def assign(members: list[str], partitions: int) -> dict[int, str]:
    if not members:
        return {}
    cap = math.ceil(partitions / len(members))
    load = dict.fromkeys(members, 0)
    out: dict[int, str] = {}
    for p in range(partitions):
        for m in sorted(members, key=lambda m: _rank(m, p), reverse=True):
            if load[m] < cap:
                out[p] = m
                load[m] += 1
                break
    return out
