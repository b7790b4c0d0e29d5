"""Commits are split under etcd's limits without splitting an invocation's effects."""

from __future__ import annotations

import itertools
import random

import pytest

from statefn_core import envelope, layout, wire
from statefn_sidecar import assembly, commit, deadletters, decisions, faults, items, planner
from tests import helpers

FN = layout.FunctionType("a", "b")


def _ingress(i: int, *, key: str, sends: int = 0, state_bytes: int = 1) -> decisions.Outcome:
    it = items.Ingress(id=f"i{i}",
                    message=envelope.Message(key=key, handler="h", args={}, idempotency_key=f"i{i}"))
    changes = decisions.Changes(state={(key, "count"): b"x" * state_bytes})
    for j in range(sends):
        changes.sends.append(
            assembly.Send(layout.PartitionId(FN, j % 4), envelope.Message(key="t", handler="h", args={})))
    return decisions.Outcome(item=it, decision=decisions.Replied(envelope.Reply(ok=True, value=b"1"), changes))


def _changes(oc: decisions.Outcome) -> decisions.Changes:
    changes = oc.decision.changes()
    assert changes is not None
    return changes


def _check_limits(plans: list[tuple[commit.Txn, assembly.Effects]]) -> None:
    for txn, _ in plans:
        assert txn.op_count <= commit.MAX_OPS
        assert len(txn.absent) <= commit.MAX_OPS
        assert txn.size <= commit.MAX_BYTES


@pytest.mark.parametrize("sends", [0, 5], ids=["state-only", "with-bundles"])
def test_split_under_op_limit(sends: int) -> None:
    outcomes = [_ingress(i, key=f"k{i % 20}", sends=sends if i % 4 == 0 else 0) for i in range(300)]
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan(outcomes, {"a.b.1": 3})
    _check_limits(plans)
    assert len(plans) >= 3
    assert [oc.item.id for _, e in plans for oc in e.outcomes] == [f"i{i}" for i in range(300)]
    # Bundles are numbered densely across the split commits.
    seqs = sorted(e.seq for _, eff in plans for e in eff.entries if e.target == "a.b.1")
    assert seqs == list(range(4, 4 + len(seqs))) or seqs == list(range(1, 1 + len(seqs)))


def test_split_under_byte_limit() -> None:
    outcomes = [_ingress(i, key=f"k{i}", state_bytes=200_000) for i in range(20)]
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan(outcomes, {})
    _check_limits(plans)
    assert sum(len(e.outcomes) for _, e in plans) == 20
    assert all(isinstance(oc.decision, decisions.Replied) for _, e in plans for oc in e.outcomes)


def test_invocation_too_big_for_one_commit_fails_alone() -> None:
    big = _ingress(0, key="big")
    _changes(big).state = {("big", f"s{n}"): b"x" * 200_000 for n in range(10)}
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan([big, _ingress(1, key="ok")], {})
    _check_limits(plans)
    failed, fine = plans[0][1].outcomes[0], [oc for _, e in plans for oc in e.outcomes][1]
    assert isinstance(failed.decision, decisions.Failed) and failed.decision.error.kind == "state_too_large"
    assert failed.decision.dead_letter["key"] == "big" and _changes(failed).state == {}
    assert isinstance(fine.decision, decisions.Replied) and fine.decision.reply.ok


def test_many_sends_to_few_partitions_fit_one_commit() -> None:
    """Sends are bundled per target partition: 200 sends to 4 partitions are 4 channels, not 200."""
    fan = _ingress(0, key="fan", sends=200)
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan([fan], {})
    _check_limits(plans)
    ((_, eff),) = plans
    assert isinstance(fan.decision, decisions.Replied) and fan.decision.reply.ok
    assert sorted(e.target for e in eff.entries) == ["a.b.0", "a.b.1", "a.b.2", "a.b.3"]
    assert sum(len(envelope.decode_bundle(e.body).messages) for e in eff.entries) == 200


def _sender(i: int, *, key: str, sends: list[tuple[int, int]], state_bytes: int = 1,
            dead: int = 0) -> decisions.Outcome:
    """An outcome that sends ``(partition, bytes)`` messages, and optionally fails with a big dead letter."""
    oc = _ingress(i, key=key, state_bytes=state_bytes)
    for partition, size in sends:
        _changes(oc).sends.append(assembly.Send(layout.PartitionId(FN, partition),
                                      envelope.Message(key="t", handler="h", args={"pad": "x" * size})))
    if dead:
        err = wire.ErrorInfo(kind="handler_error", message="x" * dead)
        oc.decision = decisions.failed(oc.decision, err, deadletters.record(FN, 0, oc.item, err))
    return oc


def test_large_messages_are_chunked_the_way_they_are_counted() -> None:
    """Three 500 KB messages to one channel make three bundles (two do not fit one): each is a write."""
    oc = _sender(0, key="big", sends=[(1, 500_000)] * 3)
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan([oc], {})
    _check_limits(plans)
    assert [len(eff.entries) for _, eff in plans] == [3] and isinstance(oc.decision, decisions.Replied)
    assert [e.seq for _, eff in plans for e in eff.entries] == [1, 2, 3]


def test_the_cost_of_a_commit_is_what_it_writes() -> None:
    """For mixed outcomes (state, fan-outs, chunked messages, dead letters), every finished commit is
    within etcd's limits, and splitting happened only when the next outcome would not have fitted."""
    rng = random.Random(5)
    outcomes = []
    for i in range(400):
        sends = [(rng.randrange(8), rng.choice([10, 1_000, 60_000, 300_000])) for _ in range(rng.randrange(4))]
        outcomes.append(_sender(i, key=f"k{rng.randrange(50)}", sends=sends,
                                state_bytes=rng.choice([1, 1_000, 100_000]), dead=rng.choice([0, 0, 0, 20_000])))
    keys = layout.PartitionKeys(FN, 0)
    plans = planner.Planner(FN, keys, {}, None).plan(outcomes, {})
    _check_limits(plans)
    assert [oc.item.id for _, eff in plans for oc in eff.outcomes] == [f"i{i}" for i in range(400)]
    # Each commit but the last was closed because the next outcome did not fit it.
    for (_, eff), (_, after) in itertools.pairwise(plans):
        grown = assembly.Assembly(FN, keys, {})
        for oc in [*eff.outcomes, after.outcomes[0]]:
            grown.absorb(planner.Planner(FN, keys, {}, None)._share(oc))
        assert not commit.fits(*grown.cost_with(assembly.Share())), "a commit was split early"
    # Sequence numbers stay dense per channel across the commits.
    for target in {e.target for _, eff in plans for e in eff.entries}:
        seqs = [e.seq for _, eff in plans for e in eff.entries if e.target == target]
        assert seqs == list(range(1, len(seqs) + 1))


async def test_the_largest_commits_are_accepted_by_etcd(etcd_server, namespace) -> None:
    """The limits the planner plans against are etcd's own: commits planned full to them go through."""
    fn = layout.FunctionType(namespace, "f")
    keys = layout.PartitionKeys(fn, 0)
    outcomes = [_sender(i, key=f"k{i}", sends=[(i % 8, 200_000)], state_bytes=150_000) for i in range(20)]
    outcomes += [_ingress(100 + i, key=f"n{i}", sends=6) for i in range(60)]
    plans = planner.Planner(fn, keys, {}, None).plan(outcomes, {})
    _check_limits(plans)
    assert len(plans) >= 3 and max(txn.size for txn, _ in plans) > commit.MAX_BYTES * 0.8
    assert max(txn.op_count for txn, _ in plans) > commit.MAX_OPS * 0.8
    async with helpers.etcd(etcd_server) as client:
        t = client.transactions
        _, resp = await client.transaction(compare=[], success=[t.put(keys.owner, b"me"), t.get(keys.owner)],
                                           failure=[])
        epoch = int(resp[1][0][1].create_revision)
        committer = commit.Committer(client, keys, epoch=epoch, marker=None, member_id="m", faults=faults.Faults())
        for txn, _ in plans:
            assert (await committer.commit(txn)).ok
