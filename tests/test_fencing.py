"""The fence and the commit marker, tested directly against etcd."""

from __future__ import annotations

import aetcd
import pytest

from statefn_core import layout
from statefn_sidecar import commit, faults


@pytest.fixture
async def etcd(etcd_server):
    host, port = etcd_server.endpoint.split(":")
    client = aetcd.Client(host=host, port=int(port))
    yield client
    await client.close()


async def _own(etcd: aetcd.Client, keys: layout.PartitionKeys, who: bytes) -> int:
    t = etcd.transactions
    ok, resp = await etcd.transaction(compare=[t.version(keys.owner) == 0],
                                      success=[t.put(keys.owner, who), t.get(keys.owner)], failure=[])
    assert ok
    return int(resp[1][0][1].create_revision)


def _committer(etcd: aetcd.Client, keys: layout.PartitionKeys, epoch: int, spec: str = "") -> commit.Committer:
    return commit.Committer(etcd, keys, epoch=epoch, marker=None, member_id="m", faults=faults.Faults(spec))


async def test_stale_owner_commit_is_refused(etcd, namespace) -> None:
    keys = layout.PartitionKeys(layout.FunctionType(namespace, "f"), 0)
    old_epoch = await _own(etcd, keys, b"old")
    zombie = _committer(etcd, keys, old_epoch)
    txn = commit.Txn()
    txn.put(b"/x/" + namespace.encode(), b"1")
    assert (await zombie.commit(txn)).ok
    # The old owner's lease expires (here: the key goes), a new owner takes the partition.
    await etcd.delete(keys.owner)
    await _own(etcd, keys, b"new")
    txn = commit.Txn()
    txn.put(b"/x/" + namespace.encode(), b"2")
    with pytest.raises(commit.Fenced):
        await zombie.commit(txn)
    got = await etcd.get(b"/x/" + namespace.encode())
    assert got.value == b"1"


async def test_lost_commit_reply_is_resolved_by_reading_back(etcd, namespace) -> None:
    """The commit lands but the reply is lost: re-sending finds the marker, applies nothing twice."""
    keys = layout.PartitionKeys(layout.FunctionType(namespace, "f"), 1)
    committer = _committer(etcd, keys, await _own(etcd, keys, b"me"), "commit_reply_lost=1.0,seed=1")
    counter_key = b"/x/" + namespace.encode() + b"/n"
    txn = commit.Txn()
    txn.put(counter_key, b"1")
    txn.require_absent(keys.idempotency("req"))
    txn.put(keys.idempotency("req"), b"reply")
    # The first attempt lands and "loses" its reply; the fault is then off for the re-send.
    original = committer._faults.maybe

    def once(name: str) -> None:
        try:
            original(name)
        finally:
            committer._faults.rates.clear()

    committer._faults.maybe = once  # type: ignore[method-assign]
    outcome = await committer.commit(txn)
    assert outcome.ok and committer.resolved_unknown == 1 and committer.commits == 1
    assert (await etcd.get(counter_key)).value == b"1"
    # The next commit chains on the marker the first one wrote.
    txn = commit.Txn()
    txn.put(counter_key, b"2")
    assert (await committer.commit(txn)).ok
    assert (await etcd.get(counter_key)).value == b"2"


async def test_idempotency_conflict_reports_existing_records(etcd, namespace) -> None:
    keys = layout.PartitionKeys(layout.FunctionType(namespace, "f"), 2)
    committer = _committer(etcd, keys, await _own(etcd, keys, b"me"))
    await etcd.put(keys.idempotency("seen"), b"the original reply")
    txn = commit.Txn()
    txn.require_absent(keys.idempotency("seen"))
    txn.require_absent(keys.idempotency("new"))
    txn.put(b"/x/" + namespace.encode() + b"/s", b"v")
    outcome = await committer.commit(txn)
    assert not outcome.ok
    assert outcome.existing == {keys.idempotency("seen"): b"the original reply"}
    assert await etcd.get(b"/x/" + namespace.encode() + b"/s") is None
