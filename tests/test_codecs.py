"""The byte formats, in memory: statefn_core.codec, statefn_core.envelope and statefn_core.wire.

These bytes are what etcd stores and what travels on NATS and between sidecar and handler server,
so a value that does not round-trip, or a malformed body that is not refused with the documented
error, corrupts state or wedges a partition. Until now only the integration tests reached them.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import warnings
from typing import Any

import pydantic
import pytest

from statefn_core import codec, constants, envelope, errors, wire


@dataclasses.dataclass
class Point:
    x: int
    y: float = 0.5


class Order(pydantic.BaseModel):
    id: str
    lines: list[Point]
    note: str | None = None
    meta: dict[str, int] = {}


class Colour(enum.Enum):
    RED = "red"


class Opaque:
    pass


# ---- codec: plain values -------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 1.5, -0.0, float("inf"), "", "héllo 🙂", b"", b"\x00\xff",
    True, False, None, [1, "a", None], {"a": [1, {"b": b"x"}]}, {1: "int keys"},
])
def test_plain_values_round_trip_through_pack_and_unpack(value: Any) -> None:
    back = codec.unpack(codec.pack(value))
    assert back == value
    assert type(back) is type(value)


def test_bytes_and_str_stay_distinct_on_the_wire() -> None:
    assert codec.unpack(codec.pack([b"abc", "abc"])) == [b"abc", "abc"]
    assert codec.pack(b"abc") != codec.pack("abc")


def test_tuples_come_back_as_lists() -> None:
    assert codec.unpack(codec.pack((1, (2, 3)))) == [1, [2, 3]]


@pytest.mark.parametrize(("value", "named"), [
    (object(), "object"), ({1, 2}, "set"), (2**64, "int"), (-(2**63) - 1, "int"),
    (datetime.datetime(2024, 1, 1), "datetime"),
])
def test_pack_refuses_what_msgpack_cannot_hold_with_a_codec_error(value: Any, named: str) -> None:
    with pytest.raises(errors.CodecError, match=f"cannot encode {named} with msgpack"):
        codec.pack(value)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", codec.pack("hello")[:-2], codec.pack(1) + b"\x01", b"\x91" * 5000 + b"\x00",
])
def test_unpack_refuses_undecodable_bytes_with_a_codec_error(data: bytes) -> None:
    with pytest.raises(errors.CodecError, match="undecodable msgpack payload"):
        codec.unpack(data)


def test_codec_error_is_also_a_type_error() -> None:
    # Callers that predate CodecError catch TypeError; it must keep matching.
    assert issubclass(errors.CodecError, TypeError)
    assert issubclass(errors.CodecError, errors.StatefnError)


def test_to_plain_dumps_models_and_dataclasses_at_any_depth() -> None:
    order = Order(id="o1", lines=[Point(1), Point(2, 3.0)], meta={"n": 1})
    assert codec.to_plain({"order": order, "points": [Point(7)]}) == {
        "order": {"id": "o1", "lines": [{"x": 1, "y": 0.5}, {"x": 2, "y": 3.0}], "note": None, "meta": {"n": 1}},
        "points": [{"x": 7, "y": 0.5}],
    }
    assert codec.to_plain(Point(4)) == {"x": 4, "y": 0.5}


@pytest.mark.parametrize("value", [None, 3, 2.5, "s", b"b", True])
def test_to_plain_passes_scalars_through_unchanged(value: Any) -> None:
    assert codec.to_plain(value) is value


def test_to_plain_refuses_a_type_pydantic_cannot_describe() -> None:
    with pytest.raises(errors.CodecError, match="cannot encode values of type Opaque"):
        codec.to_plain(Opaque())


# ---- codec: declared types ---------------------------------------------------------------------

@pytest.mark.parametrize(("tp", "value"), [
    (int, 42), (int, -(2**63)), (float, 2.25), (str, "naïve"), (bytes, b"\x00\x01"), (bool, True), (bool, False),
    (type(None), None), (int | None, None), (int | None, 5), (list[int], [1, 2, 3]), (dict[str, float], {"a": 1.5}),
    (dict[int, str], {1: "one"}), (tuple[int, str], (1, "a")), (list[Point], [Point(1), Point(2, 2.5)]),
    (Point, Point(9, 9.5)), (dict[str, list[Point]], {"k": [Point(3)]}),
    (Order, Order(id="o", lines=[Point(1)], note="n", meta={"a": 2})), (list[Order], [Order(id="x", lines=[])]),
    (Any, {"free": ["form", 1]}),
])
def test_values_of_every_promised_type_round_trip_through_their_codec(tp: Any, value: Any) -> None:
    c = codec.Codec(tp)
    back = c.decode(c.encode(value))
    assert back == value
    assert type(back) is type(value)


def test_a_model_is_stored_as_a_plain_map_that_any_reader_can_decode() -> None:
    raw = codec.Codec(Order).encode(Order(id="o", lines=[Point(1)]))
    assert codec.unpack(raw) == {"id": "o", "lines": [{"x": 1, "y": 0.5}], "note": None, "meta": {}}


def test_codec_remembers_its_declared_type() -> None:
    assert codec.Codec(list[Point]).type == list[Point]


def test_a_type_that_cannot_be_described_is_a_definition_error_at_declaration() -> None:
    with pytest.raises(errors.DefinitionError, match="cannot be encoded"):
        codec.Codec(Opaque)


@pytest.mark.parametrize(("tp", "value", "named"), [
    (int, 2**70, "int"), (datetime.datetime, datetime.datetime(2024, 1, 1), "datetime"), (Colour, Colour.RED, "Colour"),
])
def test_a_value_whose_dump_msgpack_cannot_hold_is_a_codec_error(tp: Any, value: Any, named: str) -> None:
    with pytest.raises(errors.CodecError, match=f"cannot encode {named} with msgpack"):
        codec.Codec(tp).encode(value)


@pytest.mark.parametrize(("tp", "plain"), [
    (int, "x"), (str, 5), (list[int], {"a": 1}), (Point, {"x": "nope"}), (Order, {"lines": []}), (bool, "maybe"),
])
def test_a_stored_value_that_does_not_match_the_declared_type_is_a_codec_error(tp: Any, plain: Any) -> None:
    with pytest.raises(errors.CodecError, match="stored value does not match"):
        codec.Codec(tp).decode(codec.pack(plain))


def test_undecodable_bytes_are_a_codec_error_for_a_typed_codec_too() -> None:
    with pytest.raises(errors.CodecError, match="undecodable"):
        codec.Codec(int).decode(b"\xc1")


def test_decoding_is_lax_like_pydantic_coercing_compatible_values() -> None:
    # Documented by pydantic's lax mode: a stored "5" reads back as 5 for an int, 3 as 3.0 for a float.
    assert codec.Codec(int).decode(codec.pack("5")) == 5
    back = codec.Codec(float).decode(codec.pack(3))
    assert back == 3.0 and type(back) is float


def test_encoding_a_value_of_the_wrong_type_is_a_codec_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in production, where pydantic's warning is merely logged
        with pytest.raises(errors.CodecError):
            codec.Codec(int).encode("abc")  # type: ignore[arg-type]


# ---- envelope.Message --------------------------------------------------------------------------

TX = wire.TxInfo(id="inv-1~tx1", ts=1700000000.25, function="shop/order", key="o-1", timeout=10.0)


def full_message() -> envelope.Message:
    return envelope.Message(
        key="k-1", handler="reserve", args={"qty": 2, "item": "apple", "blob": b"\x00"}, origin="shop/order/3",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", reply_to="_INBOX.abc",
        idempotency_key="idem-1", attempt=3,
        caller=envelope.CallerAddress(function="shop/order", partition=5, key="o-1", call_id="inv-1/2"),
        tx=TX, tx_age=1699999999.5,
    )


def test_a_message_with_every_optional_field_round_trips_through_its_plain_form() -> None:
    msg = full_message()
    back = envelope.Message.from_plain(codec.unpack(codec.pack(msg.to_plain())))
    assert back == msg
    assert back.caller == msg.caller and back.tx == TX and back.tx_age == 1699999999.5


def test_a_message_with_defaults_only_round_trips() -> None:
    msg = envelope.Message(key="k", handler="h", args={})
    back = envelope.Message.from_plain(codec.unpack(codec.pack(msg.to_plain())))
    assert back == msg
    assert (back.origin, back.attempt, back.caller, back.tx, back.tx_age) == (constants.ORIGIN_CLIENT, 1, None, None,
                                                                             None)


@pytest.mark.parametrize("length", [3, 8, 9, 10])
def test_older_shorter_plain_forms_still_decode_with_the_missing_fields_at_their_defaults(length: int) -> None:
    # Messages written before caller (index 8), tx (9) and tx_age (10) existed are still in etcd and
    # on streams: they decode, and whatever they carry is kept.
    full = full_message()
    back = envelope.Message.from_plain(full.to_plain()[:length])
    if length == 3:
        assert back == envelope.Message(key=full.key, handler=full.handler, args=full.args)
        return
    assert back.to_plain()[:8] == full.to_plain()[:8]  # key .. attempt, as sent
    assert back.caller == (full.caller if length > 8 else None)
    assert back.tx == (TX if length > 9 else None)
    assert back.tx_age is None


def test_a_plain_form_without_args_is_refused() -> None:
    with pytest.raises(TypeError):
        envelope.Message.from_plain(["k", "h"])


def test_message_kinds_are_told_apart() -> None:
    plain = envelope.Message(key="k", handler="h", args={})
    prepare = envelope.Message(key="k", handler="h", args={}, tx=TX)
    decision = envelope.tx_control_message(constants.COMMIT_HANDLER, TX, "k", origin="o", traceparent=None)
    reply = envelope.response_message(envelope.CallerAddress("a/b", 1, "k", "c1"), envelope.Reply(ok=True),
                                      origin="o", traceparent=None)
    assert [m.is_prepare for m in (plain, prepare, decision, reply)] == [False, True, False, False]
    assert [m.is_tx_control for m in (plain, prepare, decision, reply)] == [False, False, True, False]
    assert [m.is_response for m in (plain, prepare, decision, reply)] == [False, False, False, True]


def test_a_response_message_carries_the_call_id_the_encoded_reply_and_a_prepared_vote() -> None:
    caller = envelope.CallerAddress("shop/order", 5, "o-1", "inv-1/2")
    reply = envelope.Reply(ok=True, value=codec.pack(7))
    msg = envelope.response_message(caller, reply, origin="shop/stock/1", traceparent="tp",
                                    prepared=("shop/stock", "apple", TX))
    assert (msg.key, msg.handler, msg.origin, msg.traceparent) == ("o-1", constants.RESPONSE_HANDLER,
                                                                   "shop/stock/1", "tp")
    assert msg.args == {"call": "inv-1/2", "reply": reply.encode(), "prepared": ["shop/stock", "apple", TX.to_plain()]}
    assert envelope.Reply.decode(msg.args["reply"]) == reply


def test_a_tx_control_message_defaults_to_empty_args() -> None:
    msg = envelope.tx_control_message(constants.INQUIRE_HANDLER, TX, "o-1", origin="o", traceparent=None)
    assert (msg.args, msg.tx, msg.key, msg.handler) == ({}, TX, "o-1", constants.INQUIRE_HANDLER)


# ---- envelope: ingress invocations ---------------------------------------------------------------

def test_an_invocation_round_trips_with_every_header() -> None:
    msg = envelope.Message(key="k-1", handler="add", args={"n": 2, "tags": ["a"]}, origin="gateway",
                           traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                           reply_to="_INBOX.x.y", idempotency_key="idem-9", attempt=4)
    body, headers = envelope.encode_invoke(msg)
    assert headers == {
        constants.HEADER_KIND: constants.KIND_INVOKE,
        constants.HEADER_ORIGIN: "gateway",
        constants.HEADER_ATTEMPT: "4",
        constants.HEADER_TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        constants.HEADER_REPLY_TO: "_INBOX.x.y",
    }
    assert codec.unpack(body) == {"k": "k-1", "h": "add", "a": {"n": 2, "tags": ["a"]}, "i": "idem-9"}
    assert envelope.decode_invoke(body, headers) == msg


def test_an_invocation_without_trace_or_reply_subject_sends_no_such_headers() -> None:
    body, headers = envelope.encode_invoke(envelope.Message(key="k", handler="h", args={}))
    assert set(headers) == {constants.HEADER_KIND, constants.HEADER_ORIGIN, constants.HEADER_ATTEMPT}
    back = envelope.decode_invoke(body, headers)
    assert (back.traceparent, back.reply_to, back.idempotency_key) == (None, None, None)


def test_an_invocation_without_headers_gets_the_client_origin_and_first_attempt() -> None:
    back = envelope.decode_invoke(codec.pack({"k": "k", "h": "h"}), None)
    assert back == envelope.Message(key="k", handler="h", args={}, origin=constants.ORIGIN_CLIENT, attempt=1)


def test_the_durable_fields_do_not_travel_on_ingress() -> None:
    # Ingress is for clients: caller, tx and tx_age only travel in bundles between partitions.
    body, headers = envelope.encode_invoke(full_message())
    back = envelope.decode_invoke(body, headers)
    assert (back.caller, back.tx, back.tx_age) == (None, None, None)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x92\x01"])
def test_an_undecodable_invocation_body_is_a_codec_error(body: bytes) -> None:
    with pytest.raises(errors.CodecError):
        envelope.decode_invoke(body, {})


@pytest.mark.parametrize("raw", [
    [1, 2], "k", None, {"h": "h"}, {"k": "k"}, {"k": 1, "h": "h"}, {"k": "k", "h": None},
])
def test_an_invocation_body_that_is_not_a_map_with_string_key_and_handler_is_a_type_error(raw: Any) -> None:
    with pytest.raises(TypeError, match="must be a map with string 'k'"):
        envelope.decode_invoke(codec.pack(raw), {})


@pytest.mark.parametrize("args", [[1, 2], "x", 5, True])
def test_invocation_arguments_that_are_not_a_map_are_a_type_error(args: Any) -> None:
    with pytest.raises(TypeError, match="arguments must be a map"):
        envelope.decode_invoke(codec.pack({"k": "k", "h": "h", "a": args}), {})


@pytest.mark.parametrize("args", [None, [], {}, ""])
def test_empty_invocation_arguments_of_any_shape_mean_no_arguments(args: Any) -> None:
    assert envelope.decode_invoke(codec.pack({"k": "k", "h": "h", "a": args}), {}).args == {}


def test_a_non_numeric_attempt_header_is_a_value_error() -> None:
    # Not among the errors decode_invoke's docstring lists (CodecError, KeyError, TypeError); the intake
    # dead-letters on any Exception, so it is still refused, as a ValueError.
    with pytest.raises(ValueError, match="invalid literal for int"):
        envelope.decode_invoke(codec.pack({"k": "k", "h": "h"}), {constants.HEADER_ATTEMPT: "second"})


@pytest.mark.parametrize("idem", [[1], {"a": 1}])
def test_an_idempotency_key_that_is_not_a_string_is_refused_as_malformed(idem: Any) -> None:
    with pytest.raises(TypeError):
        envelope.decode_invoke(codec.pack({"k": "k", "h": "h", "i": idem}), {})


# ---- envelope: bundles and replies --------------------------------------------------------------

def test_a_bundle_round_trips_with_every_kind_of_message() -> None:
    messages = [
        full_message(),
        envelope.Message(key="k", handler="h", args={}),
        envelope.tx_control_message(constants.ABORT_HANDLER, TX, "k2", origin="o", traceparent="tp"),
        envelope.response_message(envelope.CallerAddress("a/b", 0, "k3", "c"), envelope.Reply(ok=False, error=wire
                                  .ErrorInfo("handler_error", "boom", "ValueError")), origin="o", traceparent=None),
    ]
    bundle = envelope.Bundle(sender="shop.order.3", seq=41, messages=messages)
    assert envelope.decode_bundle(envelope.encode_bundle(bundle)) == bundle


def test_an_empty_bundle_round_trips() -> None:
    bundle = envelope.Bundle(sender="s", seq=0, messages=[])
    assert envelope.decode_bundle(envelope.encode_bundle(bundle)) == bundle


@pytest.mark.parametrize(("body", "error"), [
    (b"\xc1", errors.CodecError), (codec.pack({"c": "s", "m": []}), KeyError), (codec.pack([1]), TypeError),
    (codec.pack({"c": "s", "n": 1, "m": [["k"]]}), TypeError),
])
def test_a_malformed_bundle_is_refused(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        envelope.decode_bundle(body)


@pytest.mark.parametrize("reply", [
    envelope.Reply(ok=True),
    envelope.Reply(ok=True, value=codec.pack({"total": 5})),
    envelope.Reply(ok=False, error=wire.ErrorInfo(kind="handler_error", message="boom", type="ValueError")),
    envelope.Reply(ok=False, error=wire.ErrorInfo(kind="handler_error", message="again", type="Retry", retry=True,
                                                  retry_after=2.5)),
])
def test_a_reply_round_trips_with_and_without_an_error(reply: envelope.Reply) -> None:
    assert envelope.Reply.decode(reply.encode()) == reply


def test_a_reply_error_keeps_every_field() -> None:
    err = wire.ErrorInfo(kind=errors.ErrorKind.CALL_TIMEOUT, message="no reply in 2s", type="Timeout", retry=True,
                         retry_after=0.25)
    back = envelope.Reply.decode(envelope.Reply(ok=False, error=err).encode())
    assert dataclasses.astuple(back.error) == ("call_timeout", "no reply in 2s", "Timeout", True, 0.25)  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "error"), [(b"\xc1", errors.CodecError), (codec.pack([True, None]), ValueError)])
def test_a_malformed_reply_is_refused(data: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        envelope.Reply.decode(data)


def test_an_idempotency_record_round_trips_and_says_when_it_is_pending() -> None:
    done = envelope.Record(b"fp", envelope.Reply(ok=True).encode())
    assert envelope.Record.decode(done.encode()) == done and not done.pending
    assert envelope.Record.decode(envelope.Record(b"fp").encode()).pending


def test_idempotency_ids_cannot_run_into_each_other() -> None:
    """Key, handler and idempotency key are escaped, so no choice of them makes another's id."""
    assert envelope.idempotency_id("a/b", "h", "i") != envelope.idempotency_id("a", "b/h", "i")
    assert envelope.idempotency_id("k", "h", "x/y") != envelope.idempotency_id("k", "h/x", "y")
    assert "@" not in envelope.idempotency_id("k@1", "h", "i@2")  # '@' separates a restart's attempt


# ---- wire: the batch protocol ------------------------------------------------------------------

def test_a_batch_request_round_trips_with_several_keys_and_invocations() -> None:
    journal = [envelope.Reply(ok=True, value=codec.pack(5)).encode(), codec.pack(["~run", "~now", 1.5])]
    req = wire.BatchRequest(max_state_bytes=4096, keys=[
        wire.KeyRequest(function="shop/order", key="o-1", state={"status": codec.pack("new"), "n": codec.pack(2)},
                        invocations=[
                            wire.Invocation(id="i1", handler="place", args={"items": ["a", "b"], "qty": 2}, attempt=2,
                                            origin="client", traceparent="tp-1", journal=journal, sends_done=3,
                                            prepare=False, tx_age=12.5),
                            wire.Invocation(id="i2", handler="cancel", args={}),
                        ]),
        wire.KeyRequest(function="shop/stock", key="apple", state={}, invocations=[
            wire.Invocation(id="i3", handler="reserve", args={"qty": 1}, prepare=True, tx_age=3.0),
        ]),
        wire.KeyRequest(function="shop/stock", key="pear", state={}, invocations=[]),
    ])
    back = wire.decode_request(wire.encode_request(req))
    assert back == req
    assert back.keys[0].invocations[0].journal == journal
    assert back.keys[1].invocations[0].prepare is True


def test_a_batch_response_round_trips_with_every_result_field_set() -> None:
    tx = wire.TxInfo("i1~tx1", 12.5, "shop/order", "o-1", 10.0)
    full = wire.Result(
        id="i1",
        reply=codec.pack({"ok": True}),
        error=wire.ErrorInfo("handler_error", "boom", "ValueError", True, 0.5),
        state={"status": codec.pack("paid"), "cart": None},
        sends=[
            wire.Outgoing("shop/mail", "u-1", "notify", {"text": "hi"}, delay=1.5, traceparent="tp", purpose="",
                          tx=None, timeout=None),
            wire.Outgoing("shop/stock", "apple", "~commit", {}, purpose="tx.commit", tx=tx),
        ],
        calls=[
            wire.Outgoing("shop/pay", "o-1", "charge", {"amount": 5}, purpose="saga.step", tx=tx, timeout=2.0,
                          index=2),
            wire.Outgoing("shop/mail", "u-2", "verify", {}, traceparent="tp2", timeout=None, index=3),
        ],
        waiting=2,
        deferred=True,
        journal_added=[codec.pack(["~run", "~now", 1.5]), codec.pack(["~run", "fetch", {"a": 1}]),
                       wire.outstanding_entry("shop/pay", "o-1", "charge"),
                       wire.outstanding_entry("shop/mail", "u-2", "verify")],
        transactions=[["i1~tx1", "committed"], ["i1~tx2", "aborted"]],
        began_tx=True,
    )
    resp = wire.BatchResponse(results=[[full, wire.Result(id="i2", deferred=True)], [], [wire.Result(id="i3")]])
    back = wire.decode_response(wire.encode_response(resp))
    assert back == resp
    assert [c.tx for c in back.results[0][0].calls] == [tx, None]
    assert [c.index for c in back.results[0][0].calls] == [2, 3] and back.results[0][0].waiting == 2
    assert back.results[0][0].began_tx is True
    assert wire.outstanding_call(back.results[0][0].journal_added[2]) == ("shop/pay", "o-1", "charge")


def test_an_outgoing_message_round_trips_through_its_plain_form() -> None:
    out = wire.Outgoing("a/b", "k", "h", {"x": [1]}, delay=0.0, traceparent="tp", purpose="tx.prepare",
                        tx=wire.TxInfo("t", 1.0, "c/d", "k2", 5.0), timeout=3.0)
    assert wire.Outgoing.from_plain(codec.unpack(codec.pack(out.to_plain()))) == out


def test_an_older_transaction_wins_and_ties_break_on_the_id() -> None:
    a, b = wire.TxInfo("a", 1.0, "f/g", "k", 1.0), wire.TxInfo("b", 1.0, "f/g", "k", 1.0)
    older = wire.TxInfo("z", 0.5, "f/g", "k", 1.0)
    assert older.older_than(a) and not a.older_than(older)
    assert a.older_than(b) and not b.older_than(a) and not a.older_than(a)
    assert wire.TxInfo.from_plain(None) is None and wire.TxInfo.from_plain(a.to_plain()) == a
