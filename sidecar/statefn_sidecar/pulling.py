"""Pulling a batch from a partition's durable consumer without leaving a pull request behind.

nats-py's ``fetch(n)`` with nothing buffered sends one request for ``n`` messages with both
``no_wait`` and ``expires``, which nats-server treats as a long poll. When fewer than ``n``
messages come, that request stays open on the server until it expires, and a message stored
meanwhile is held back until then, even though the next fetch has asked for it. Measured with
``bench``'s relay (a durable call, whose reply arrives milliseconds after the request that made
it): a quarter of calls took the rest of the 1 s fetch timeout, up to 1,000 ms instead of 17 ms.

So this asks twice, each time for what the server can answer completely:
1. ``no_wait`` for up to ``n`` messages, without ``expires``: what is there now, then a 404
   status that ends the request (under load this is the only request a batch needs). Its answer
   is waited for even when the caller's timeout is shorter: a due timer's batch asks with 1 ms,
   and a stored message whose answer missed that millisecond would run after the timer, in the
   next batch;
2. only when that found nothing, a long poll for **one** message with ``expires``, which ends
   when its message is delivered; whatever else arrived by then is the next batch's.

Both use the subscription nats-py set up (its inbox and the consumer's next-message subject),
so messages a previous request delivered late still come from the same buffer first.

This is the one module that touches nats-py's private attributes (a pull subscription's
``_sub``, ``_nc``, ``_nms`` and ``_deliver``, and the subscription's ``_pending_queue`` and
``_pending_size``), written against the version pinned as ``NATS_PY_VERSION``;
``tests/test_pulling.py`` fails on any other version until this module is checked against it.
"""

from __future__ import annotations

import json
import time

import nats.errors
from nats.aio.msg import Msg
from nats.js import api
from nats.js.client import JetStreamContext

NATS_PY_VERSION = "2.16.0"
# A no_wait request ends with 404 (nothing more now); a long poll with 408 when it expires. A status of
# the other kind, or a 408 long before our own request could expire, answers an earlier request whose
# fetch had already returned: skipped, or it would end this one early.
_EARLY = 0.8
# The no_wait request is answered at once (its messages, then a 404); it is waited for this long even when
# the caller's timeout is shorter (a due timer asks for 1 ms), so a timer never overtakes a stored message.
_NO_WAIT_ANSWER = 0.25


class PullFailed(nats.errors.Error):
    """The server refused the pull request (consumer deleted, too many waiting requests, ...)."""


async def fetch(psub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to ``batch`` messages: at once if any are stored, else the first to arrive within ``timeout``."""
    msgs = _buffered(psub, batch)
    if len(msgs) < batch:
        msgs += await _request(psub, {"batch": batch - len(msgs), "no_wait": True}, batch - len(msgs),
                               max(timeout, _NO_WAIT_ANSWER))
    if not msgs:
        expires_ns = max(int(timeout * 1e9) - 100_000, 1_000_000)  # the server ends it just before we stop waiting
        msgs = await _request(psub, {"batch": 1, "expires": expires_ns}, 1, timeout)
    return msgs


def _ends(request: dict[str, object], status: str, elapsed: float, timeout: float) -> bool:
    if request.get("no_wait"):
        return status == api.StatusCode.NO_MESSAGES
    return status == api.StatusCode.REQUEST_TIMEOUT and elapsed >= timeout * _EARLY


def take_buffered(psub: JetStreamContext.PullSubscription) -> list[Msg]:
    """Everything already delivered to this subscription and not yet taken (a stopping owner hands it back)."""
    return _buffered(psub, psub.pending_msgs)


def _buffered(psub: JetStreamContext.PullSubscription, limit: int) -> list[Msg]:
    """Messages an earlier request delivered after its fetch had returned (status messages dropped)."""
    sub = psub._sub
    queue = sub._pending_queue
    out: list[Msg] = []
    while len(out) < limit and not queue.empty():
        msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        if not JetStreamContext.is_status_msg(msg):
            out.append(msg)
    return out


async def _request(psub: JetStreamContext.PullSubscription, request: dict[str, object], want: int,
                   timeout: float) -> list[Msg]:
    await psub._nc.publish(psub._nms, json.dumps(request).encode(), psub._deliver)
    started = time.monotonic()
    deadline = started + timeout
    out: list[Msg] = []
    while len(out) < want:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            msg = await psub._sub.next_msg(timeout=remaining)
        except nats.errors.TimeoutError:
            break
        status = JetStreamContext.is_status_msg(msg)
        if status is None:
            out.append(msg)
        elif status in (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT):
            if _ends(request, status, time.monotonic() - started, timeout):
                break
        elif status != api.StatusCode.CONTROL_MESSAGE:
            description = (msg.headers or {}).get(api.Header.DESCRIPTION, "")
            raise PullFailed(f"pull request refused: {status} {description}".strip())
    return out
