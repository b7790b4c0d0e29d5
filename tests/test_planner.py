"""Commits are split under etcd's limits without splitting an invocation's effects."""

from __future__ import annotations

import pytest

from statefn_core import envelope, layout
from statefn_sidecar import commit, items, planner

FN = layout.FunctionType("a", "b")


def _ingress(i: int, *, key: str, sends: int = 0, state_bytes: int = 1) -> planner.Outcome:
    it = items.Item(kind=items.Kind.INGRESS, id=f"i{i}",
                    message=envelope.Message(key=key, handler="h", args={}, idempotency_key=f"i{i}"))
    oc = planner.Outcome(item=it, state={(key, "count"): b"x" * state_bytes},
                         reply=envelope.Reply(ok=True, value=b"1"))
    for j in range(sends):
        oc.sends.append(planner.Send(layout.PartitionId(FN, j % 4), envelope.Message(key="t", handler="h", args={})))
    return oc


def _check_limits(plans: list[tuple[commit.Txn, planner.Effects]]) -> None:
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
    assert all(oc.dead_letter is None for _, e in plans for oc in e.outcomes)


def test_invocation_too_big_for_one_commit_fails_alone() -> None:
    big = _ingress(0, key="big")
    big.state = {("big", f"s{n}"): b"x" * 200_000 for n in range(10)}
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan([big, _ingress(1, key="ok")], {})
    _check_limits(plans)
    failed, fine = plans[0][1].outcomes[0], [oc for _, e in plans for oc in e.outcomes][1]
    assert failed.reply is not None and failed.reply.error is not None
    assert failed.reply.error.kind == "state_too_large"
    assert failed.dead_letter is not None and failed.state == {}
    assert fine.reply is not None and fine.reply.ok


def test_many_sends_to_few_partitions_fit_one_commit() -> None:
    """Sends are bundled per target partition: 200 sends to 4 partitions are 4 channels, not 200."""
    fan = _ingress(0, key="fan", sends=200)
    plans = planner.Planner(FN, layout.PartitionKeys(FN, 0), {}, None).plan([fan], {})
    _check_limits(plans)
    ((_, eff),) = plans
    assert fan.dead_letter is None and fan.reply is not None and fan.reply.ok
    assert sorted(e.target for e in eff.entries) == ["a.b.0", "a.b.1", "a.b.2", "a.b.3"]
    assert sum(len(envelope.decode_bundle(e.body).messages) for e in eff.entries) == 200
