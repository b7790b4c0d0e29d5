"""Which live sidecar owns which partition (statefn_sidecar.balance.assign), in memory.

Every sidecar computes the assignment on its own from the member list in etcd and acts on its
share, so the function must be total (every partition owned exactly once), balanced (nobody over
ceil(P / members)), a pure function of the member *set* (order and process must not matter, or two
sidecars would both take, or both skip, a partition) and sticky (a membership change moves few
partitions: each move is a release and an acquire, a pause for that partition). Until now only the
integration tests with live sidecars reached it.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import math
import random
import statistics

import pytest

from statefn_sidecar import balance


def members(n: int, seed: int = 0) -> list[str]:
    """Member ids shaped as the sidecar makes them (12 hex characters), reproducible per seed."""
    return [hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[:12] for i in range(n)]


def loads(assignment: dict[int, str], among: list[str]) -> dict[str, int]:
    counted = collections.Counter(assignment.values())
    return {m: counted.get(m, 0) for m in among}


def moved(before: dict[int, str], after: dict[int, str]) -> int:
    return sum(1 for p in before.keys() | after.keys() if before.get(p) != after.get(p))


# ---- total and balanced --------------------------------------------------------------------------

SHAPES = [(1, 1), (16, 1), (16, 2), (16, 3), (16, 4), (16, 5), (16, 7), (16, 15), (16, 16), (3, 8), (64, 6),
          (1024, 10)]


@pytest.mark.parametrize(("partitions", "n"), SHAPES)
def test_every_partition_is_assigned_exactly_once_to_a_listed_member(partitions: int, n: int) -> None:
    ms = members(n)
    got = balance.assign(ms, partitions)
    assert sorted(got) == list(range(partitions))
    assert set(got.values()) <= set(ms)


@pytest.mark.parametrize(("partitions", "n"), SHAPES)
def test_no_member_holds_more_than_ceil_partitions_over_members(partitions: int, n: int) -> None:
    cap = math.ceil(partitions / n)
    for seed in range(20):
        ms = members(n, seed)
        got = loads(balance.assign(ms, partitions), ms)
        assert max(got.values()) <= cap, (seed, got)
        assert sum(got.values()) == partitions


def test_when_members_divide_the_partitions_every_member_gets_exactly_its_share() -> None:
    # The cap times the member count is exactly P: the only way to place every partition is evenly.
    for n in (1, 2, 4, 8, 16):
        for seed in range(10):
            ms = members(n, seed)
            assert set(loads(balance.assign(ms, 16), ms).values()) == {16 // n}, (n, seed)


# ---- deterministic ---------------------------------------------------------------------------------

def test_the_same_members_always_give_the_same_assignment() -> None:
    ms = members(5)
    first = balance.assign(ms, 64)
    assert all(balance.assign(list(ms), 64) == first for _ in range(3))


def test_the_order_of_the_member_list_does_not_matter() -> None:
    # etcd lists members sorted, but nothing may depend on that: every permutation gives one answer.
    ms = members(4, seed=7)
    expected = balance.assign(ms, 16)
    assert all(balance.assign(list(perm), 16) == expected for perm in itertools.permutations(ms))
    shuffled = members(9, seed=3)
    reference = balance.assign(shuffled, 100)
    rng = random.Random(1)
    for _ in range(20):
        rng.shuffle(shuffled)
        assert balance.assign(shuffled, 100) == reference


def test_the_assignment_is_pinned_so_sidecars_of_different_processes_and_builds_agree() -> None:
    # blake2b of "member/partition", not Python's salted hash(): a changed value here is a protocol
    # change (during a rolling upgrade old and new sidecars would disagree on who owns what).
    assert balance.assign(["alpha", "bravo", "charlie"], 8) == {
        0: "charlie", 1: "alpha", 2: "bravo", 3: "alpha", 4: "charlie", 5: "bravo", 6: "alpha", 7: "charlie",
    }


# ---- sticky ------------------------------------------------------------------------------------------

def test_adding_a_fourth_member_to_16_partitions_moves_about_a_quarter_of_them() -> None:
    # At least ceil(16/4) = 4 must move (the newcomer's share); the cap's greedy pass may cascade a
    # few more. Measured over 50 member sets: never more than 8, on average ~5. Reassigning
    # round-robin would move ~12.
    ideal = math.ceil(16 / 4)
    counts = []
    for seed in range(50):
        ms = members(4, seed)
        before, after = balance.assign(ms[:3], 16), balance.assign(ms, 16)
        counts.append(moved(before, after))
        assert loads(after, ms)[ms[3]] == ideal, seed  # the newcomer gets its full share, no more
        assert moved(before, after) <= ideal + 4, seed
    assert statistics.mean(counts) <= ideal + 1.5, counts


def test_removing_one_of_four_members_moves_its_partitions_and_few_others() -> None:
    for seed in range(50):
        ms = members(4, seed)
        before = balance.assign(ms, 16)
        for gone in ms:
            rest = [m for m in ms if m != gone]
            after = balance.assign(rest, 16)
            orphans = {p for p, m in before.items() if m == gone}
            assert all(after[p] != gone for p in orphans)
            collateral = [p for p in before if p not in orphans and before[p] != after[p]]
            assert len(collateral) <= 4, (seed, gone, collateral)


def test_a_membership_change_with_many_partitions_moves_close_to_the_minimum() -> None:
    # Rendezvous hashing: 256 partitions, 8 -> 9 members; the minimum is the newcomer's share (29).
    counts = []
    for seed in range(20):
        ms = members(9, seed)
        counts.append(moved(balance.assign(ms[:8], 256), balance.assign(ms, 256)))
    minimum = math.ceil(256 / 9)
    assert min(counts) >= 256 // 9
    assert statistics.mean(counts) <= 1.5 * minimum, counts
    assert max(counts) <= 2 * minimum, counts


@pytest.mark.xfail(strict=True, reason=(
    "stickiness collapses when the member count nears the partition count: going from 15 to 16 members "
    "of 16 partitions drops the cap from 2 to 1, and the greedy pass in partition order then reshuffles "
    "most partitions (up to 12 of 16, ~7 on average) though moving 1 would do; the module docstring "
    "promises a membership change moves few partitions"))
def test_adding_a_sixteenth_member_to_16_partitions_moves_few_partitions() -> None:
    for seed in range(20):
        ms = members(16, seed)
        assert moved(balance.assign(ms[:15], 16), balance.assign(ms, 16)) <= 1 + 4, seed


# ---- degenerate inputs ---------------------------------------------------------------------------

def test_a_single_member_owns_every_partition() -> None:
    assert balance.assign(["solo"], 16) == dict.fromkeys(range(16), "solo")


def test_no_members_means_no_owner_for_any_partition() -> None:
    assert balance.assign([], 16) == {}


def test_zero_partitions_assign_nothing() -> None:
    assert balance.assign(members(3), 0) == {}


def test_with_more_members_than_partitions_each_partition_gets_its_own_member() -> None:
    ms = members(10)
    got = balance.assign(ms, 4)
    assert sorted(got) == [0, 1, 2, 3]
    assert len(set(got.values())) == 4  # cap 1: no member holds two while six sit idle


def test_with_as_many_members_as_partitions_everyone_owns_exactly_one() -> None:
    ms = members(16, seed=5)
    assert sorted(balance.assign(ms, 16).values()) == sorted(ms)
