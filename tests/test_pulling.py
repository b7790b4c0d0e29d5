"""The partition's pull: at once what is stored, else the first message to arrive; refusals are errors."""

from __future__ import annotations

import asyncio
import importlib.metadata
import time

import nats
import pytest
from nats.js import api

from statefn_sidecar import pulling


@pytest.fixture
async def consumer(nats_server, namespace):
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    stream = f"PULL_{namespace}"
    await js.add_stream(api.StreamConfig(name=stream, subjects=[f"{namespace}.>"],
                                         retention=api.RetentionPolicy.WORK_QUEUE))
    await js.add_consumer(stream, api.ConsumerConfig(durable_name="p", ack_policy=api.AckPolicy.EXPLICIT))
    psub = await js.pull_subscribe_bind(durable="p", stream=stream)
    yield js, psub, f"{namespace}.x", stream
    await nc.close()


async def test_takes_what_is_stored_up_to_the_batch(consumer) -> None:
    js, psub, subject, _ = consumer
    for i in range(5):
        await js.publish(subject, str(i).encode())
    first = await pulling.fetch(psub, 3, timeout=2.0)
    rest = await pulling.fetch(psub, 10, timeout=2.0)
    assert [m.data for m in first] == [b"0", b"1", b"2"]
    assert [m.data for m in rest] == [b"3", b"4"]
    for m in first + rest:
        await m.ack()


async def test_nothing_stored_waits_for_the_first_message_or_the_timeout(consumer) -> None:
    js, psub, subject, _ = consumer
    t0 = time.monotonic()
    assert await pulling.fetch(psub, 10, timeout=0.3) == []
    assert time.monotonic() - t0 >= 0.25
    for n in range(3):  # each long poll ends with its message: the next one is not held behind it
        waiting = asyncio.create_task(pulling.fetch(psub, 10, timeout=5.0))
        await asyncio.sleep(0.05)
        # A late 404 and 408 of earlier requests (as a loaded machine delivers them) end nothing.
        for status in ("404", "408"):
            await psub._nc.publish(psub._deliver, b"", headers={"Status": status})
        await asyncio.sleep(0.05)
        await js.publish(subject, f"late{n}".encode())
        got = await asyncio.wait_for(waiting, 2.0)
        assert [m.data for m in got] == [f"late{n}".encode()]
        await got[0].ack()


async def test_a_deleted_consumer_is_an_error(consumer) -> None:
    js, psub, _, stream = consumer
    waiting = asyncio.create_task(pulling.fetch(psub, 10, timeout=5.0))
    await asyncio.sleep(0.1)
    await js.delete_consumer(stream, "p")
    with pytest.raises(pulling.PullFailed, match="409"):
        await asyncio.wait_for(waiting, 3.0)


def test_written_against_the_installed_nats_py() -> None:
    """pulling.py uses nats-py's private attributes: a new nats-py must be checked against it first."""
    installed = importlib.metadata.version("nats-py")
    assert installed == pulling.NATS_PY_VERSION, (
        f"nats-py {installed} is installed; statefn_sidecar/pulling.py was written against {pulling.NATS_PY_VERSION}. "
        "Check that a PullSubscription still has _sub, _nc, _nms and _deliver, and its subscription _pending_queue "
        "and _pending_size, with the same meaning; then update NATS_PY_VERSION.")


async def test_what_a_stopping_owner_hands_back_is_taken_from_the_buffer(consumer) -> None:
    js, psub, subject, _ = consumer
    for i in range(3):
        await js.publish(subject, str(i).encode())
    # A long poll for more than is stored leaves its late deliveries in the subscription's buffer.
    await psub._nc.publish(psub._nms, b'{"batch": 3, "no_wait": true}', psub._deliver)
    await asyncio.sleep(0.3)
    taken = pulling.take_buffered(psub)
    assert [m.data for m in taken] == [b"0", b"1", b"2"]
    assert psub.pending_msgs == 0
    for m in taken:
        await m.ack()
