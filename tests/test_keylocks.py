"""Which message of a locked key's inbox runs next once the key is free (in memory, no servers).

Plain messages run in arrival order. A transaction waiting in the inbox goes first, oldest first:
a waiting prepare (wait-die let an older transaction wait) unless an earlier message from its own
sender is still queued, and an invocation run again after its transaction died.
"""

from __future__ import annotations

from statefn import _envelope, _naming, _wire
from statefn_sidecar import items, keylocks, layout

KEY = "k"


def _tx(ts: float, name: str) -> _wire.TxInfo:
    return _wire.TxInfo(id=name, ts=ts, function="ns/coord", key=name, timeout=10.0)


def _locks(*messages: _envelope.Message) -> keylocks.KeyLocks:
    locks = keylocks.KeyLocks(layout.PartitionKeys(_naming.FunctionType.parse("ns/acct"), 0))
    entries = []
    for i, msg in enumerate(messages):
        item = items.Item(kind=items.Kind.CHANNEL, id=f"m{i}", message=msg)
        entries.append(locks.entry_for(item))
    locks.apply({}, entries, [], {})
    return locks


def _plain(origin: str, handler: str = "deposit") -> _envelope.Message:
    return _envelope.Message(key=KEY, handler=handler, args={}, origin=origin)


def _prepare(origin: str, tx: _wire.TxInfo) -> _envelope.Message:
    return _envelope.Message(key=KEY, handler="withdraw", args={}, origin=origin, tx=tx)


def _next_id(locks: keylocks.KeyLocks) -> str:
    (item,) = locks.ready(10)
    locks.release_taken()
    return item.id


def test_plain_messages_run_in_arrival_order() -> None:
    assert _next_id(_locks(_plain("client"), _plain("ns/a:x"))) == "m0"


def test_a_waiting_prepare_goes_before_other_senders_messages() -> None:
    locks = _locks(_plain("client"), _plain("ns/a:x"), _prepare("ns/coord:c", _tx(5.0, "t")))
    assert _next_id(locks) == "m2"


def test_a_prepare_never_overtakes_an_earlier_message_from_its_own_sender() -> None:
    locks = _locks(_plain("ns/coord:c"), _prepare("ns/coord:c", _tx(5.0, "t")))
    assert _next_id(locks) == "m0"


def test_the_oldest_waiting_transaction_goes_first() -> None:
    locks = _locks(_prepare("ns/coord:a", _tx(7.0, "young")), _prepare("ns/coord:b", _tx(3.0, "old")))
    assert _next_id(locks) == "m1"


def test_an_invocation_run_again_after_its_transaction_died_goes_first() -> None:
    restarted = _plain("client", "move")
    restarted.tx_age = 4.0
    locks = _locks(_plain("client", "move"), _prepare("ns/coord:b", _tx(6.0, "t")), restarted)
    assert _next_id(locks) == "m2"


def test_taking_an_entry_from_the_middle_keeps_the_rest_in_order() -> None:
    locks = _locks(_plain("client"), _prepare("ns/coord:c", _tx(5.0, "t")), _plain("ns/a:x"))
    (item,) = locks.ready(10)
    assert item.id == "m1" and item.inbox_key is not None
    locks.apply({}, [], [(KEY, item.inbox_key)], {})
    assert [_next_id(locks)] == ["m0"]
    (head,) = locks.ready(10)
    locks.apply({}, [], [(KEY, head.inbox_key)], {})  # type: ignore[list-item]
    assert _next_id(locks) == "m2"
