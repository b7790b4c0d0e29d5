"""How a partition routes what it pulled against its locked keys (in memory, no servers).

Which message of a locked key's inbox runs next once the key is free: plain messages run in arrival
order. A transaction waiting in the inbox goes first, oldest first: a waiting prepare (wait-die let an
older transaction wait) unless an earlier message from its own sender is still queued, and an
invocation run again after its transaction died. And at most one decision per key and round.
"""

from __future__ import annotations

import dataclasses

from statefn_core import envelope, layout, wire
from statefn_sidecar import items, keylocks, suspension, twophase

KEY = "k"


def _tx(ts: float, name: str) -> wire.TxInfo:
    return wire.TxInfo(id=name, ts=ts, function="ns/coord", key=name, timeout=10.0)


def _locks(*messages: envelope.Message) -> keylocks.KeyLocks:
    locks = keylocks.KeyLocks(layout.PartitionKeys(layout.FunctionType.parse("ns/acct"), 0))
    entries = []
    for i, msg in enumerate(messages):
        item = items.Delivered(id=f"m{i}", message=msg, sender="ns.x.0", bundle_seq=1, index=i, bundle_size=9)
        entries.append(locks.entry_for(item))
    locks.apply({}, entries, [], {})
    return locks


def _plain(origin: str, handler: str = "deposit") -> envelope.Message:
    return envelope.Message(key=KEY, handler=handler, args={}, origin=origin)


def _prepare(origin: str, tx: wire.TxInfo) -> envelope.Message:
    return envelope.Message(key=KEY, handler="withdraw", args={}, origin=origin, tx=tx)


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


# ---- one decision per key and round -------------------------------------------------------------
# Routing reads the records as they were before the batch: once an item of a round runs on a key
# (or decides its transaction), anything later in the round that depends on the key's records waits
# for the round's commit (LATER) and is then routed against what it wrote.

def _suspended(waiting: str, tx: wire.TxInfo | None = None) -> keylocks.KeyLocks:
    locks = keylocks.KeyLocks(layout.PartitionKeys(layout.FunctionType.parse("ns/acct"), 0))
    calls = {waiting: suspension.Outstanding(timeout=10.0, tx=tx, timer=b"t")} if waiting else {}
    record = suspension.Suspension("inv", envelope.Message(key=KEY, handler="move", args={}, idempotency_key="i"),
                                   waiting=waiting, tx=tx, calls=calls)
    locks.apply({KEY: record}, [], [], {})
    return locks


def _answer(call: str, ok: bool, i: int) -> items.Delivered:
    reply = envelope.Reply(ok=ok, value=b"\xc0") if ok else envelope.Reply(
        ok=False, error=wire.ErrorInfo(kind="tx_timeout", message="late"))
    caller = envelope.CallerAddress("ns/acct", 0, KEY, call)
    return items.Delivered(id=f"c{i}", sender="ns.x.0", bundle_seq=1, index=i, bundle_size=9,
                           message=envelope.response_message(caller, reply, origin="ns/x:y", traceparent=None))


def test_two_answers_to_one_call_in_one_round_resume_it_once() -> None:
    locks = _suspended("inv#2")
    vote, timeout = _answer("inv#2", True, 0), _answer("inv#2", False, 1)
    locks.start_round()
    assert locks.route(vote) is keylocks.Route.RUN
    assert vote.resume is not None and vote.message.handler == "move"
    assert locks.route(timeout) is keylocks.Route.LATER
    # The vote's commit: the invocation now waits for its next call (the answered one is in flight no more).
    locks.apply({KEY: dataclasses.replace(vote.resume.record, waiting="inv#3",
                                          calls={"inv#3": suspension.Outstanding()})}, [], [], {})
    locks.start_round()
    assert locks.route(timeout) is keylocks.Route.DROP  # it answers a call nothing waits for any more


def test_an_item_whose_round_did_not_commit_is_routed_afresh() -> None:
    locks = _suspended("inv#1")
    answer = _answer("inv#1", True, 0)
    locks.start_round()
    assert locks.route(answer) is keylocks.Route.RUN
    locks.start_round()  # its commit was refused (another item's idempotency record existed): run again
    assert locks.route(answer) is keylocks.Route.RUN
    assert answer.resume is not None and answer.resume.arrived.is_response and answer.response is not None
    locks.apply({KEY: None}, [], [], {})  # another round's commit ended the invocation meanwhile
    locks.start_round()
    assert locks.route(answer) is keylocks.Route.DROP
    assert answer.resume is None and answer.message.is_response


def test_a_prepare_after_a_run_on_its_key_waits_for_the_round() -> None:
    locks = _locks()
    locks.start_round()
    plain = items.Ingress(id="i", message=_plain("client"))
    prepare = items.Delivered(id="p", message=_prepare("ns/coord:c", _tx(5.0, "t")), sender="ns.coord.0",
                              bundle_seq=1, index=0, bundle_size=1)
    assert locks.route(plain) is keylocks.Route.RUN
    assert locks.route(prepare) is keylocks.Route.LATER  # the plain run may lock the key under a transaction


def test_a_decision_and_anything_else_about_its_key_take_one_round_each() -> None:
    tx = _tx(5.0, "t")
    locks = _locks()
    locks.apply({}, [], [], {KEY: twophase.Prepared(KEY, tx, {"balance": b"\x01"}, timer=b"timer")})
    decide = [items.Delivered(id=f"d{i}", message=envelope.tx_control_message(
        handler, tx, KEY, origin="ns/coord:c", traceparent=None), sender="ns.coord.0", bundle_seq=1, index=i,
        bundle_size=2) for i, handler in enumerate(("~commit", "~abort"))]
    inquire = items.InquiryTimer(id="timer", timer=b"timer", key=KEY, tx_id="t")
    locks.start_round()
    assert locks.route(decide[0]) is keylocks.Route.CONTROL
    assert locks.route(decide[1]) is keylocks.Route.LATER  # it must see whether the commit applied
    assert locks.route(inquire) is keylocks.Route.LATER   # and must not re-arm what was just decided


def test_a_reply_that_carries_no_reply_is_dropped_not_run() -> None:
    """A malformed answer (a forged or corrupted channel message) must not reach the replay, nor crash routing."""
    locks = _suspended("inv#1")
    broken = _answer("inv#1", True, 0)
    del broken.message.args["reply"]
    locks.start_round()
    assert locks.route(broken) is keylocks.Route.DROP
    assert locks.route(_answer("inv#1", True, 1)) is keylocks.Route.RUN  # the real answer still resumes


def test_a_reply_whose_call_id_is_not_a_string_is_dropped_not_a_crash() -> None:
    locks = _suspended("inv#1")
    forged = _answer("inv#1", True, 0)
    forged.message.args["call"] = ["inv#1"]  # unhashable: must not reach the lookup of the calls in flight
    locks.start_round()
    assert locks.route(forged) is keylocks.Route.DROP
    assert locks.route(_answer("inv#1", True, 1)) is keylocks.Route.RUN


def test_an_answer_to_a_call_in_flight_that_is_not_awaited_is_noted_once_per_round() -> None:
    locks = keylocks.KeyLocks(layout.PartitionKeys(layout.FunctionType.parse("ns/acct"), 0))
    record = suspension.Suspension("inv", envelope.Message(key=KEY, handler="move", args={}), waiting="inv#0",
                                   calls={"inv#0": suspension.Outstanding(), "inv#1": suspension.Outstanding()})
    locks.apply({KEY: record}, [], [], {})
    other, again, awaited = _answer("inv#1", True, 0), _answer("inv#1", False, 1), _answer("inv#0", True, 2)
    locks.start_round()
    assert locks.route(other) is keylocks.Route.NOTE  # journaled in its slot; nothing runs
    progress = other.progress()
    assert progress is not None and "inv#1" not in progress.calls and "inv#0" in progress.calls
    assert locks.route(again) is keylocks.Route.LATER  # the record changes in this round
    assert locks.route(awaited) is keylocks.Route.LATER
    locks.apply({KEY: dataclasses.replace(progress, waiting="inv#0")}, [], [], {})
    locks.start_round()
    assert locks.route(again) is keylocks.Route.DROP  # answered already
    assert locks.route(awaited) is keylocks.Route.RUN


def test_internal_handlers_from_outside_run_as_plain_messages() -> None:
    """A reply, decision or inquiry travels only on channels: sent from outside, it runs as any message does
    (and fails as an unknown handler: an error to its caller and a dead letter), never reaching 2PC or a
    suspended invocation's journal."""
    tx = _tx(5.0, "t")
    locks = _suspended("inv#1", tx)
    reply = envelope.response_message(envelope.CallerAddress("ns/acct", 0, KEY, "inv#1"),
                                      envelope.Reply(ok=True, value=b"\xc0"), origin="client", traceparent=None)
    decision = envelope.Message(key="other", handler="~commit", args={})  # no transaction: not a decision
    locks.start_round()
    forged = items.Ingress(id="i1", message=reply)
    assert locks.route(forged) is keylocks.Route.QUEUE and forged.resume is None  # the key is locked: it waits
    assert not decision.is_tx_control
    assert locks.route(items.Ingress(id="i2", message=decision)) is keylocks.Route.RUN
