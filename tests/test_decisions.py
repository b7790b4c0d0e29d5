"""What the planner writes for each kind of decision: the one place a decision becomes etcd writes.

Integration tests see these writes only through their consequences (a reply, a redelivery that is
a no-op, a key unlocked); here each decision's share is read directly, so a write that goes
missing or lands for the wrong decision fails by name.
"""

from __future__ import annotations

import pytest

from statefn_core import codec, constants, envelope, errors, layout, wire
from statefn_sidecar import assembly, deadletters, decisions, items, keylocks, planner, suspension, twophase

FN = layout.FunctionType("ns", "f")
KEYS = layout.PartitionKeys(FN, 3)
CALLER = envelope.CallerAddress("ns/caller", 1, "ck", "inv-c#0")
IKEY = KEYS.idempotency(envelope.idempotency_id("k", "h", "idem-1"))
TX = wire.TxInfo(id="tx1", ts=1.0, function="ns/coord", key="c", timeout=5.0)


def share_of(item: items.Item, decision: decisions.Decision) -> assembly.Share:
    return planner.Planner(FN, KEYS, {}, idem_lease=7)._share(decisions.Outcome(item=item, decision=decision))


def ingress(key: str = "k", idem: str = "idem-1", **fields: object) -> items.Ingress:
    return items.Ingress(id=idem, message=envelope.Message(key=key, handler="h", args={}, idempotency_key=idem,
                                                           **fields))  # type: ignore[arg-type]


def replied(**state: bytes | None) -> decisions.Replied:
    return decisions.Replied(envelope.Reply(ok=True, value=codec.pack(1)),
                             decisions.Changes(state={("k", name): v for name, v in state.items()}))


def sent_to(share: assembly.Share) -> list[tuple[str, str]]:
    return [(s.target.token, s.message.handler) for s, _ in share.sends]


def timers_of(share: assembly.Share) -> list[list[object]]:
    return [codec.unpack(payload) for _, _, payload in share.eff.timers_added]


def test_a_reply_commits_its_state_and_its_idempotency_record_once() -> None:
    share = share_of(ingress(), replied(count=b"\x01", gone=None))
    record = envelope.Record(envelope.fingerprint(ingress().message),
                             envelope.Reply(ok=True, value=codec.pack(1)).encode())
    assert share.txn.puts[IKEY] == (record.encode(), 7)
    assert share.txn.absent == [IKEY]  # a second copy's commit is refused
    assert share.txn.puts[KEYS.state("k", "count")][0] == b"\x01"
    assert KEYS.state("k", "gone") in share.txn.deletes
    assert share.eff.state == {"k": {"count": b"\x01", "gone": None}}


def test_a_channel_message_moves_its_watermark_and_answers_its_caller() -> None:
    item = items.Delivered(id="d", message=envelope.Message(key="k", handler="h", args={}, caller=CALLER),
                           sender="ns.caller.1", bundle_seq=4, index=2, bundle_size=5)
    share = share_of(item, replied())
    assert codec.unpack(share.txn.puts[KEYS.chan_in("ns.caller.1")][0]) == [4, 3, 5]
    assert sent_to(share) == [("ns.caller.1", constants.RESPONSE_HANDLER)]
    assert share.txn.absent == []  # no idempotency key on a channel message: its watermark is the record


def test_a_suspension_records_where_it_waits_and_arms_its_call_timeout() -> None:
    record = suspension.Suspension("inv", envelope.Message(key="k", handler="h", args={}), waiting="inv#0",
                                   calls={"inv#0": suspension.Outstanding(timeout=2.5)})
    call = assembly.Send(layout.PartitionId(layout.FunctionType("ns", "g"), 0),
                         envelope.Message(key="x", handler="work", args={}))
    share = share_of(ingress(), decisions.Suspended(record, decisions.Changes(sends=[call])))
    written = suspension.Suspension.decode(share.txn.puts[KEYS.suspended("k")][0])
    assert written.waiting == "inv#0"
    assert envelope.Record.decode(share.txn.puts[IKEY][0]).pending
    assert sent_to(share) == [("ns.g.0", "work")]
    ((kind, _, answer),) = timers_of(share)
    timer = record.calls[record.waiting].timer
    assert kind == "send" and timer  # armed, and remembered in the record
    assert written.calls["inv#0"].timer == timer
    assert envelope.Message.from_plain(answer).args["reply"]  # the timeout's answer to the call
    assert envelope.Message.from_plain(answer).args["call"] == "inv#0"


def test_a_queued_message_joins_the_inbox_and_writes_nothing_else() -> None:
    entry = keylocks.Queued(0, KEYS.inbox("k", 0), "idem-1", ingress().message)
    share = share_of(ingress(), decisions.Enqueued(entry))
    assert set(share.txn.puts) == {KEYS.inbox("k", 0), IKEY}
    assert envelope.Record.decode(share.txn.puts[IKEY][0]).pending
    assert share.eff.queued == [entry] and not share.sends


def test_a_fresh_retry_is_a_timer_and_no_record() -> None:
    share = share_of(ingress(), decisions.Retrying(at_ms=123_000))
    ((kind, inv_id, message, idem_pending),) = timers_of(share)
    assert (kind, inv_id, idem_pending) == ("retry", "idem-1", False)
    assert envelope.Message.from_plain(message).attempt == 2
    assert share.eff.timers_added[0][0] == 123_000
    assert not share.txn.absent and IKEY not in share.txn.puts


def _resumed(reply: bytes = b"r") -> items.Delivered:
    original = envelope.Message(key="k", handler="h", args={}, idempotency_key="idem-1")
    record = suspension.Suspension("idem-1", original, [wire.outstanding_entry("ns/p", "p", "withdraw")],
                                   waiting="idem-1#0", tx=TX,
                                   calls={"idem-1#0": suspension.Outstanding(timeout=5.0, tx=TX, timer=b"old-timer")})
    item = items.Delivered(id="d", message=envelope.Message(
        key="k", handler=constants.RESPONSE_HANDLER, args={"call": "idem-1#0", "reply": reply}), sender="s",
        bundle_seq=1, index=0, bundle_size=1)
    item.resume_with(record, original)
    return item


def test_a_retry_from_the_journal_keeps_the_suspension_record() -> None:
    item = _resumed()
    journal = suspension.Suspension("idem-1", item.message, [b"r"])
    share = share_of(item, decisions.Retrying(at_ms=5, journal=journal))
    assert suspension.Suspension.decode(share.txn.puts[KEYS.suspended("k")][0]).journal == [b"r"]
    assert timers_of(share) == [["resume", "k", 2]]
    assert b"old-timer" in share.txn.deletes  # the call was answered: its timeout is moot


def test_a_restart_unlocks_the_key_and_starts_a_new_invocation_with_the_old_age() -> None:
    commit_msg = envelope.tx_control_message(constants.COMMIT_HANDLER, TX, "p", origin="o", traceparent=None)
    abort = assembly.Send(layout.PartitionId(layout.FunctionType("ns", "p"), 0), commit_msg)
    share = share_of(_resumed(), decisions.Retrying(at_ms=5, restart=True,
                                                    effects=decisions.Changes(sends=[abort])))
    assert KEYS.suspended("k") in share.txn.deletes
    ((kind, inv_id, message, _),) = timers_of(share)
    assert kind == "retry" and inv_id == "idem-1@2"
    assert envelope.Message.from_plain(message).tx_age == TX.ts
    assert sent_to(share) == [("ns.p.0", constants.COMMIT_HANDLER)]


def test_a_failure_is_answered_dead_lettered_and_keeps_only_its_decisions() -> None:
    item = ingress(caller=CALLER)
    decision_msg = envelope.tx_control_message(constants.ABORT_HANDLER, TX, "p", origin="o", traceparent=None)
    ran = decisions.Replied(envelope.Reply(ok=True), decisions.Changes(
        state={("k", "s"): b"1"},
        sends=[assembly.Send(layout.PartitionId(FN, 0), envelope.Message(key="x", handler="h", args={})),
               assembly.Send(layout.PartitionId(FN, 1), decision_msg)]))
    err = wire.ErrorInfo(kind="handler_error", message="boom")
    failed = decisions.failed(ran, err, deadletters.record(FN, -1, item, err))
    share = share_of(item, failed)
    assert not any(k.startswith(KEYS.state("k", "")) for k in share.txn.puts)
    assert sent_to(share) == [("ns.f.1", constants.ABORT_HANDLER), ("ns.caller.1", constants.RESPONSE_HANDLER)]
    (dead,) = share.dead
    assert codec.unpack(dead)["partition"] == 3 and codec.unpack(dead)["error"]["message"] == "boom"
    reply = envelope.Record.decode(share.txn.puts[IKEY][0]).reply
    assert reply is not None and envelope.Reply.decode(reply).error == err


def test_a_yes_vote_stages_the_prepared_record_with_its_inquiry_timer() -> None:
    item = ingress(caller=CALLER, tx=TX)  # a message with its transaction: a prepare
    staged = twophase.Prepared("k", TX, {"s": b"1"})
    share = share_of(item, decisions.Voted(envelope.Reply(ok=True), staged))
    assert twophase.Prepared.decode(share.txn.puts[KEYS.prepared("k")][0]).state == {"s": b"1"}
    assert timers_of(share)[0][0] != "send" and staged.timer  # the inquiry timer, remembered
    assert not any(k.startswith(KEYS.state("k", "")) for k in share.txn.puts)  # staged, not applied
    ((response, _),) = share.sends
    assert response.message.args["prepared"] == [str(FN), "k", TX.to_plain()]  # the vote names the prepared key


def test_a_commit_decision_applies_what_was_staged_and_unlocks_the_key() -> None:
    staged = twophase.Prepared("k", TX, {"s": b"1"}, timer=b"inquiry")
    item = items.Delivered(id="d", message=envelope.tx_control_message(constants.COMMIT_HANDLER, TX, "k",
                                                                       origin="o", traceparent=None),
                           sender="s", bundle_seq=1, index=0, bundle_size=1)
    share = share_of(item, decisions.Decided(staged, "committed",
                                             decisions.Changes(state={("k", "s"): b"1"})))
    assert KEYS.prepared("k") in share.txn.deletes and b"inquiry" in share.txn.deletes
    assert share.txn.puts[KEYS.state("k", "s")][0] == b"1"
    assert share.eff.prepared == {"k": None}


def test_timer_decisions_delete_their_timer() -> None:
    fired = items.DelayedSend(id="t", message=envelope.Message(key="x", handler="h", args={}),
                              target_function="ns/g", timer=b"t1")
    target = layout.PartitionId(layout.FunctionType("ns", "g"), 2)
    share = share_of(fired, decisions.Fired(decisions.Changes(sends=[assembly.Send(target, fired.message)])))
    assert b"t1" in share.txn.deletes and sent_to(share) == [("ns.g.2", "h")]
    nothing = share_of(items.InquiryTimer(id="i", key="k", tx_id="tx1", timer=b"t2"), decisions.Consumed())
    assert nothing.txn.deletes == {b"t2"} and not nothing.txn.puts and not nothing.sends


def test_labels_are_the_decision_types() -> None:
    assert decisions.Outcome(item=ingress(), decision=decisions.Retrying(at_ms=1)).label == "retry"
    assert decisions.Refused(envelope.Reply(ok=False)).tx_event() == "died"
    assert decisions.Dropped().label == "dropped" and decisions.Dropped().tx_event() is None


def test_a_dead_journal_makes_failed_and_outstanding_calls_again_and_keeps_finished_steps() -> None:
    """Parallel calls: slot 0 still in flight, slot 1 answered ok, slot 2 (awaited) answered with the error that
    ended the run. A replay must answer slot 1 from the journal and make calls 0 and 2 again."""
    original = envelope.Message(key="k", handler="h", args={})  # no caller, no transaction: resumable
    ok = envelope.Reply(ok=True, value=codec.pack(1)).encode()
    err = envelope.Reply(ok=False, error=wire.ErrorInfo(kind="handler_error", message="no")).encode()
    record = suspension.Suspension(
        "inv", original, [wire.outstanding_entry("ns/a", "a", "h"), ok, wire.outstanding_entry("ns/c", "c", "h")],
        waiting="inv#2", calls={"inv#0": suspension.Outstanding(timeout=5.0, timer=b"t0"),
                                "inv#2": suspension.Outstanding(timeout=5.0, timer=b"t2")})
    item = items.Delivered(id="d", message=envelope.Message(
        key="k", handler=constants.RESPONSE_HANDLER, args={"call": "inv#2", "reply": err}), sender="s",
        bundle_seq=1, index=0, bundle_size=1)
    item.resume_with(record, original)
    error = wire.ErrorInfo(kind="handler_error", message="c failed")
    share = share_of(item, decisions.Failed(error, deadletters.record(FN, -1, item, error), resumable=True))
    (dead,) = share.dead
    letter = codec.unpack(dead)
    assert letter["journaled"] == 2  # finished steps: the ok reply and the error (not the call in flight)
    (ref,) = [k for k in share.txn.puts if k.startswith(KEYS.dead_journal_prefix)]
    assert letter["journal_ref"] == ref.decode()
    journal = suspension.Suspension.decode(share.txn.puts[ref][0])
    assert journal.journal == [wire.redo_entry(), ok] and journal.calls == {}
    assert {b"t0", b"t2"} <= share.txn.deletes  # the record is gone: no timer of its calls fires


def test_a_replay_makes_a_redo_slots_call_again_and_answers_finished_ones() -> None:
    from statefn import _context
    ok = envelope.Reply(ok=True, value=codec.pack(7)).encode()
    ctx = _context.Context(function="ns/f", key="k", specs={}, stored={}, invocation_id="inv",
                           journal=[wire.redo_entry(), ok])
    again = ctx.call("ns/a", "a", "h")
    answered = ctx.call("ns/b", "b", "h")
    assert not again.done and answered.done
    assert [(c.function, c.index) for c in ctx._calls] == [("ns/a", 0)]
    assert ctx._recorded == []  # the slot exists: the sidecar turns it into the call's outstanding slot


def test_a_call_from_a_function_server_must_name_its_own_slot() -> None:
    """Over HTTP a function server says where each call goes: nowhere but a slot naming that call, or a redo."""
    from statefn_sidecar import execution
    ok = envelope.Reply(ok=True).encode()
    journal = [ok, wire.outstanding_entry("ns/a", "a", "h"), wire.redo_entry()]

    def call(index: int, key: str = "a") -> wire.Outgoing:
        return wire.Outgoing("ns/a", key, "h", {}, index=index)
    assert execution._slot_of(journal, call(1)) == 1
    assert execution._slot_of(journal, call(2, key="z")) == 2  # a dead journal's redo slot, made again
    journal.append(b"\xc1 not msgpack")  # a function server's journal slot is not trusted to decode
    assert wire.finished(journal[3]) and not wire.is_redo(journal[3]) and wire.outstanding_call(journal[3]) is None
    odd = call(1)
    odd.index = "1"  # type: ignore[assignment]  # msgpack from a function server: any type
    for bad in (call(0), call(-1), call(4), call(1, key="b"), call(3), odd):  # finished, out of range, another's
        with pytest.raises(errors.InvalidCall):
            execution._slot_of(journal, bad)
