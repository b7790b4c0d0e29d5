"""Creating a function's stream, its per-partition consumers and its registration, idempotently.

The partition count is fixed when a function is first registered: it decides which partition
every key lives in, so changing it later would move keys away from their state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any

import aetcd
import nats.js.errors
from nats.js import api
from nats.js.client import JetStreamContext

from statefn_core import constants, errors, layout, pendingwork

_log = logging.getLogger("statefn.topology")
DUPLICATE_WINDOW_S = 120.0


class PartitionMismatch(errors.StatefnError):
    pass


async def fixed_partitions(etcd: aetcd.Client, fn: layout.FunctionType) -> tuple[int, str] | None:
    """The partition count this function's data already uses, and where that comes from; None if free.

    A registered function's count is in its registration. A function deleted with its data kept
    (deletionPolicy Retain) left its count behind: its queued messages, timers and outbox sit in
    per-partition subjects and keys, so re-creating it with another count would strand them.
    """
    meta, retained = await etcd.get(fn.meta_key.encode()), await etcd.get(fn.retained_key.encode())
    if meta is not None:
        return int(json.loads(meta.value)["partitions"]), "was created with"
    if retained is not None:
        return int(json.loads(retained.value)["partitions"]), "kept its data (deleted with Retain) from"
    return None


def _check(fn: layout.FunctionType, fixed: tuple[int, str] | None, partitions: int) -> None:
    if fixed is not None and fixed[0] != partitions:
        raise PartitionMismatch(f"{fn} {fixed[1]} {fixed[0]} partitions; the partition count is fixed at creation "
                                f"(asked for {partitions})")


async def ensure_stream(js: JetStreamContext, fn: layout.FunctionType, *, replicas: int = 1) -> None:
    """WorkQueue retention: a message stays until its partition's owner acks it, then it is gone.

    Created if missing, never changed: in a cluster the operator creates it first, with as many
    replicas as the NATS cluster has servers.
    """
    cfg = api.StreamConfig(
        name=fn.stream,
        subjects=fn.stream_subjects,
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        allow_direct=True,
        duplicate_window=DUPLICATE_WINDOW_S,
        discard=api.DiscardPolicy.NEW,
        num_replicas=replicas,
    )
    try:
        await js.stream_info(fn.stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(cfg)
        _log.info("created stream %s", fn.stream)


async def ensure_dlq_stream(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Dead letters are kept until replayed, purged (``statefn dlq purge``) or past the retention limits.

    The limits bound each function's letters (its own subject) and their age, so one function
    failing everything cannot fill the disk under the rest; a stream made before the limits
    existed gets them.
    """
    per_function, max_age = constants.DEFAULT_DLQ_MAX_PER_FUNCTION, float(constants.DEFAULT_DLQ_MAX_AGE_S)
    try:
        info = await js.stream_info(constants.DLQ_STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(api.StreamConfig(
            name=constants.DLQ_STREAM,
            subjects=[f"{constants.SUBJECT_ROOT}.*.*.{constants.DLQ_TOKEN}"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            allow_direct=True,
            duplicate_window=DUPLICATE_WINDOW_S,
            num_replicas=replicas,
            max_msgs_per_subject=per_function,
            max_age=max_age,
        ))
        return
    config = info.config
    if config.max_msgs_per_subject in (None, -1, 0) or not config.max_age:
        await js.update_stream(dataclasses.replace(config, max_msgs_per_subject=per_function, max_age=max_age))


async def ensure_consumers(js: JetStreamContext, fn: layout.FunctionType, partitions: int,
                           *, ack_wait: float, max_ack_pending: int) -> None:
    for p in range(partitions):
        name = fn.consumer_name(p)
        await js.add_consumer(fn.stream, api.ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=fn.partition_filter(p),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
        ))


def max_ack_pending(batch_size: int) -> int:
    """Enough in flight for a few batches; the operator and the sidecar must agree on it."""
    return max(batch_size * 4, 256)


async def reserve(etcd: aetcd.Client, fn: layout.FunctionType, partitions: int) -> None:
    """Fix the partition count before any pod runs (the operator's registration).

    Creates the registration if absent and leaves an existing one alone, so a running sidecar's
    description (handlers, states) is never overwritten by this placeholder.
    """
    key = fn.meta_key.encode()
    t = etcd.transactions
    _check(fn, await fixed_partitions(etcd, fn), partitions)
    # "described": false until a sidecar publishes the handlers: callers must not take "no handlers" for an answer.
    placeholder = {"type": str(fn), "partitions": partitions, "handlers": {}, "states": [], "described": False}
    ok, resp = await etcd.transaction(
        compare=[t.version(key) == 0],
        success=[t.put(key, json.dumps(placeholder).encode())],
        failure=[t.get(key)],
    )
    if not ok:  # registered meanwhile
        _check(fn, (int(json.loads(resp[0][0][0])["partitions"]), "was created with"), partitions)


async def remove(js: JetStreamContext, etcd: aetcd.Client, fn: layout.FunctionType, *, delete_data: bool) -> None:
    """Deregister a function; with ``delete_data`` also drop its stream (queued messages) and state.

    Without, the partition count stays behind (``fixed_partitions``): the data kept is laid out by it.
    """
    meta = await etcd.get(fn.meta_key.encode())
    t = etcd.transactions
    success = [t.delete(fn.meta_key.encode())]
    if meta is not None and not delete_data:
        retained = {"partitions": int(json.loads(meta.value)["partitions"])}
        success.append(t.put(fn.retained_key.encode(), json.dumps(retained).encode()))
    await etcd.transaction(compare=[], success=success, failure=[])
    if delete_data:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(fn.stream)
        await etcd.delete_prefix(f"{fn.etcd_prefix}/".encode())
    _log.info("removed %s%s", fn, " with its stream and state" if delete_data else "")


async def lag(js: JetStreamContext, fn: layout.FunctionType) -> int:
    """Messages not yet processed: pending delivery plus delivered-but-unacked, over all partitions.

    One request per function (the consumer list), however many partitions it has.
    """
    total = 0
    offset = 0
    while True:
        page = await js.consumers_info(fn.stream, offset=offset)
        total += sum(int(c.num_pending or 0) + int(c.num_ack_pending or 0) for c in page)
        if len(page) < 256:
            return total
        offset += len(page)


async def pending_work(etcd: aetcd.Client, fn: layout.FunctionType) -> pendingwork.PendingWork:
    """Timers and inbox backlog over all partitions, from the owners' index entries: one range request.

    An entry that does not decode counts as a timer due now: the function is woken, and its owner
    rewrites the entry on its first commit.
    """
    entries: list[pendingwork.Entry] = []
    for kv in await etcd.get_prefix(fn.pending_prefix.encode()):
        try:
            entries.append(pendingwork.Entry.decode(kv.value))
        except errors.CodecError:
            _log.warning("%s: an undecodable pending-work entry; treated as due now", fn)
            entries.append(pendingwork.Entry(0, 0))
    return pendingwork.PendingWork.of(entries)


async def register(etcd: aetcd.Client, fn: layout.FunctionType, description: dict[str, Any],
                   partitions: int | None) -> int:
    """Publish the function's metadata; returns the partition count in force."""
    key = fn.meta_key.encode()
    t = etcd.transactions
    fixed = await fixed_partitions(etcd, fn)
    if partitions is not None:
        _check(fn, fixed, partitions)
    wanted = partitions or (fixed[0] if fixed else constants.DEFAULT_PARTITIONS)
    meta = dict(description, partitions=wanted)
    ok, resp = await etcd.transaction(
        compare=[t.version(key) == 0],
        success=[t.put(key, json.dumps(meta).encode())],
        failure=[t.get(key)],
    )
    if ok:
        _log.info("registered %s with %d partitions", fn, wanted)
        return wanted
    existing = json.loads(resp[0][0][0])
    count = int(existing["partitions"])
    if partitions is not None:  # registered meanwhile
        _check(fn, (count, "was created with"), partitions)
    if {k: v for k, v in existing.items() if k != "partitions"} != description:
        await etcd.put(key, json.dumps(dict(description, partitions=count)).encode())
    return count


async def provision(js: JetStreamContext, etcd: aetcd.Client, fn: layout.FunctionType,
                    description: dict[str, Any], partitions: int | None, *, ack_wait: float,
                    batch_size: int) -> int:
    """Stream and consumers first, then the registration that tells clients where to publish."""
    await ensure_stream(js, fn)
    await ensure_dlq_stream(js)
    fixed = await fixed_partitions(etcd, fn)
    count = fixed[0] if fixed else partitions or constants.DEFAULT_PARTITIONS
    await ensure_consumers(js, fn, count, ack_wait=ack_wait, max_ack_pending=max_ack_pending(batch_size))
    return await register(etcd, fn, description, partitions)


class Router:
    """Partition counts of other functions, read once from their registration."""

    def __init__(self, etcd: aetcd.Client) -> None:
        self._etcd = etcd
        self._counts: dict[str, int] = {}

    def known(self, function: str, partitions: int) -> None:
        self._counts[function] = partitions

    async def partitions(self, function: str) -> int:
        count = self._counts.get(function)
        if count is None:
            fn = layout.FunctionType.parse(function)
            got = await self._etcd.get(fn.meta_key.encode())
            if got is None:
                raise errors.UnknownFunction(f"unknown function {function}: no sidecar has registered it")
            count = self._counts[function] = int(json.loads(got.value)["partitions"])
        return count
