"""JSON frame protocol: strict client-op decoding, server-frame encoding (fanout.core.protocol)."""

from __future__ import annotations

import base64
import json
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core import protocol
from fanout.core.protocol import (
    CUT_MARK,
    MAX_ECHO_BYTES,
    MAX_ID,
    Ack,
    Auth,
    ClientOp,
    FrameError,
    Limits,
    Ping,
    RequestOp,
    Since,
    Sub,
    Unsub,
    ack,
    batch,
    clip,
    decode_client_frame,
    dropped,
    encode_msg,
    encode_msg_seq,
    error,
    expiring,
    pong,
    recovery_ack,
    reply,
    status,
    unsubscribed,
    welcome,
)


def only_error(payload: bytes, max_batch: int = 1000) -> FrameError:
    (result,) = decode_client_frame(payload, max_batch)
    assert isinstance(result, FrameError)
    assert result.code == "XYW008"
    return result


def strict_json(frame: bytes) -> Any:
    """What a browser's JSON.parse would see: strict UTF-8, strict JSON."""
    return json.loads(frame.decode("utf-8"), parse_constant=pytest.fail)


# --------------------------------------------------------------------------- client ops


@pytest.mark.parametrize(
    ("payload", "op"),
    [
        (b'{"op":"sub","id":1,"subject":"xy.md.btc"}', Sub(1, "xy.md.btc")),
        (b'{"subject":"xy.md.*","op":"unsub","id":2}', Unsub(2, "xy.md.*")),
        (b'{"op":"ping","id":-3}', Ping(-3)),
        (b'{"op":"auth","id":4,"token":"a.b.c"}', Auth(4, "a.b.c")),
        (b' \n{"op": "ping", "id": 5}\t', Ping(5)),
    ],
)
def test_every_op_decodes(payload: bytes, op: ClientOp) -> None:
    assert decode_client_frame(payload) == [op]


def test_request_defaults_and_full() -> None:
    (minimal,) = decode_client_frame(b'{"op":"request","id":1,"subject":"svc.x"}')
    assert isinstance(minimal, RequestOp)
    assert (minimal.id, minimal.subject, bytes(minimal.data)) == (1, "svc.x", b"null")
    assert (minimal.timeout_ms, minimal.headers) == (None, {})
    (full,) = decode_client_frame(
        b'{"op":"request","id":2,"subject":"svc.y","data":{"a": [1, 2]},'
        b'"timeout_ms":1500,"headers":{"correlationId":"c-1"}}'
    )
    assert isinstance(full, RequestOp)
    assert bytes(full.data) == b'{"a": [1, 2]}'
    assert (full.timeout_ms, full.headers) == (1500, {"correlationId": "c-1"})


def test_request_defaults_are_not_shared() -> None:
    first, second = decode_client_frame(
        b'[{"op":"request","id":1,"subject":"s"},{"op":"request","id":2,"subject":"s"}]'
    )
    assert isinstance(first, RequestOp)
    assert isinstance(second, RequestOp)
    first.headers["x"] = "y"
    assert second.headers == {}


def test_batch_keeps_order_and_isolates_bad_elements() -> None:
    results = decode_client_frame(
        b'[{"op":"sub","id":1,"subject":"a"},{"op":"nope","id":2},{"op":"ping","id":3},'
        b'7,{"op":"ping","id":"4"},{"op":"unsub","id":5,"subject":"a","x":null}]'
    )
    assert results[0] == Sub(1, "a")
    assert results[2] == Ping(3)
    errors = [results[i] for i in (1, 3, 4, 5)]
    assert all(isinstance(e, FrameError) for e in errors)
    assert [e.id for e in errors if isinstance(e, FrameError)] == [2, None, None, 5]


@pytest.mark.parametrize(
    ("payload", "ident", "needle"),
    [
        (b'{"op":"subscribe","id":7,"subject":"a"}', 7, "`$.op`"),
        (b'{"id":7,"subject":"a"}', 7, "`op`"),
        (b'{"op":"sub","id":7,"subject":"a","extra":1}', 7, "`extra`"),
        (b'{"op":"sub","id":7,"subject":5}', 7, "`$.subject`"),
        (b'{"op":"sub","id":7}', 7, "`subject`"),
        (b'{"op":"auth","id":7,"token":null}', 7, "`$.token`"),
        (b'{"op":"request","id":7,"subject":"s","timeout_ms":0}', 7, "`$.timeout_ms`"),
        (b'{"op":"request","id":7,"subject":"s","headers":{"a":1}}', 7, "`$.headers[...]`"),
        (b'{"op":"sub","subject":"a"}', None, "`id`"),
        (b'{"op":"ping","id":"7"}', None, "`$.id`"),
        (b'{"op":"ping","id":7.0}', None, "`$.id`"),
        (b'{"op":"ping","id":true}', None, "`$.id`"),
        (b'{"op":"ping","id":null}', None, "`$.id`"),
        (b'{"op":"ping","id":%d}' % (MAX_ID + 1), None, "`$.id`"),
        (b'{"op":"ping","id":%d}' % -(MAX_ID + 1), None, "`$.id`"),
        (b'{"op":7,"id":7}', 7, "`$.op`"),
    ],
)
def test_invalid_op_names_the_field_and_keeps_the_id(
    payload: bytes, ident: int | None, needle: str
) -> None:
    for frame in (payload, b"[" + payload + b"]"):
        err = only_error(frame)
        assert err.id == ident
        assert needle in err.message


def test_id_at_the_safe_integer_bounds() -> None:
    assert decode_client_frame(b'{"op":"ping","id":%d}' % MAX_ID) == [Ping(MAX_ID)]
    assert decode_client_frame(b'{"op":"ping","id":%d}' % -MAX_ID) == [Ping(-MAX_ID)]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"", "object or an array"),
        (b"   ", "object or an array"),
        (b"null", "object or an array"),
        (b"42", "object or an array"),
        (b'"op"', "object or an array"),
        (b"\x00\xff\xfe garbage", "object or an array"),
        (b'{"op":"ping","id":1', "invalid JSON"),
        (b'{"op":"ping","id":1} trailing', "invalid JSON"),
        (b'{"op":"ping","id":1}{"op":"ping","id":2}', "invalid JSON"),
        (b'{"op":"nope", garbage', "invalid JSON"),
        (b'{"op":"ping","id":1,}', "invalid JSON"),
        (b'[{"op":"ping","id":1},]', "invalid JSON"),
        (b'[{"op":"ping","id":1}', "invalid JSON"),
        (b"[]", "empty batch"),
        (b" [ ] ", "empty batch"),
        (b"[" * 10_000, "nested too deeply"),
        (b"{" + b'"a":[' * 10_000, "invalid JSON"),
        (b'{"op":"nope","x":' + b"[" * 10_000, "nested too deeply"),
        (b'{"op":"ping","id":3,"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nested too deeply"),
        (b'[{"op":"ping","id":1}, ' + b"[" * 10_000 + b"]" * 10_000 + b"]", "nested too deeply"),
    ],
)
def test_whole_frame_failures(payload: bytes, needle: str) -> None:
    err = only_error(payload)
    assert err.id is None
    assert needle in err.message


def test_deep_nesting_inside_a_valid_element_keeps_the_batch() -> None:
    deep = b"[" * 200 + b"]" * 200
    results = decode_client_frame(b'[{"op":"ping","id":1,"x":' + deep + b'},{"op":"ping","id":2}]')
    assert isinstance(results[0], FrameError)
    assert results[0].id == 1
    assert results[1] == Ping(2)


def test_batch_limit() -> None:
    ping = b'{"op":"ping","id":1}'
    assert decode_client_frame(b"[" + b",".join([ping] * 3) + b"]", max_batch=3) == [Ping(1)] * 3
    err = only_error(b"[" + b",".join([ping] * 4) + b"]", max_batch=3)
    assert "3" in err.message


OPS = st.one_of(
    st.builds(Sub, st.integers(-MAX_ID, MAX_ID), st.text()),
    st.builds(Unsub, st.integers(-MAX_ID, MAX_ID), st.text()),
    st.builds(Ping, st.integers(-MAX_ID, MAX_ID)),
    st.builds(Auth, st.integers(-MAX_ID, MAX_ID), st.text()),
    st.builds(
        RequestOp,
        st.integers(-MAX_ID, MAX_ID),
        st.text(),
        timeout_ms=st.none() | st.integers(1, 10**9),
        headers=st.dictionaries(st.text(), st.text(), max_size=3),
    ),
)


@given(st.lists(OPS, min_size=1, max_size=8))
@settings(max_examples=150, deadline=None)
def test_ops_round_trip(ops: list[ClientOp]) -> None:
    if len(ops) == 1:
        frame = msgspec.json.encode(ops[0])
        assert frame.startswith(b'{"op":')
    else:
        frame = msgspec.json.encode(ops)
    decoded = decode_client_frame(frame)
    assert [msgspec.json.encode(op) for op in decoded] == [msgspec.json.encode(op) for op in ops]


@given(st.lists(OPS | st.builds(lambda: {"op": "nope"}) | st.just([1]), min_size=2, max_size=8))
@settings(max_examples=150, deadline=None)
def test_a_batch_decodes_as_its_elements_one_by_one(elements: list[object]) -> None:
    """A batch of valid ops is decoded in one go, any other element by element: the
    outcome is the same either way, also for a frame past the one-go size."""
    raw = [msgspec.json.encode(e) for e in elements]

    def outcome(results: list[ClientOp | FrameError]) -> list[object]:
        return [(r.message, r.id) if isinstance(r, FrameError) else r for r in results]

    def alone(element: bytes) -> ClientOp | FrameError:
        try:
            return protocol._op_decoder.decode(element)
        except msgspec.ValidationError as exc:
            return protocol._element_error(element, exc)

    one_by_one = outcome([alone(r) for r in raw])
    assert outcome(decode_client_frame(b"[" + b",".join(raw) + b"]")) == one_by_one
    padded = b"[" + b",".join(raw) + b"]" + b" " * 130 * 8  # past 128 bytes per allowed op
    assert outcome(decode_client_frame(padded, max_batch=8)) == one_by_one


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=300) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
@settings(max_examples=300, deadline=None)
def test_any_input_yields_ops_or_errors(payload: bytes) -> None:
    results = decode_client_frame(payload)
    assert results
    for result in results:
        assert isinstance(result, FrameError | Sub | Unsub | Ping | Auth | RequestOp)
        if isinstance(result, FrameError):
            assert result.code == "XYW008"
            assert result.id is None or abs(result.id) <= MAX_ID


# --------------------------------------------------------------------------- msg / reply


def test_msg_keeps_json_payload_verbatim() -> None:
    payload = b' {"bid": 1.50, "ask":2e0}\n'
    frame = encode_msg("xy.md.btc", payload, None)
    assert frame == b'{"op":"msg","subject":"xy.md.btc","data":' + payload + b"}"
    assert strict_json(frame) == {
        "op": "msg",
        "subject": "xy.md.btc",
        "data": {"bid": 1.5, "ask": 2},
    }


def test_msg_headers_and_key_order() -> None:
    headers = {"traceparent": "00-ab-cd-01", "X-Multi": "a, b"}
    frame = encode_msg("s", b"[1]", headers)
    assert (
        frame
        == b'{"op":"msg","subject":"s","data":[1],"hdr":' + msgspec.json.encode(headers) + b"}"
    )
    assert list(strict_json(frame)) == ["op", "subject", "data", "hdr"]
    assert encode_msg("s", b"[1]", MappingProxyType(headers)) == frame
    assert encode_msg("s", b"[1]", {}) == b'{"op":"msg","subject":"s","data":[1]}'


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"hello",
        b'"\xff"',
        b'{"a":"\xc3"}',
        b'{"a":"\xed\xa0\x80"}',
        b'"a\nb"',
        b"NaN",
        b"\xef\xbb\xbf{}",
        b"{} {}",
        b"\x00\x01\x02",
        b'"\\ud800"',
    ],
)
def test_msg_non_json_or_non_utf8_goes_b64(payload: bytes) -> None:
    frame = encode_msg("s", payload, {"h": "v"})
    decoded = strict_json(frame)
    assert list(decoded) == ["op", "subject", "b64", "hdr"]
    assert base64.b64decode(decoded["b64"]) == payload
    assert decoded["hdr"] == {"h": "v"}


def test_msg_empty_payload_is_empty_b64() -> None:
    assert encode_msg("s", b"", None) == b'{"op":"msg","subject":"s","b64":""}'


def test_msg_subject_is_escaped() -> None:
    frame = encode_msg('a"\\\u2028é', b"1", None)
    assert strict_json(frame)["subject"] == 'a"\\\u2028é'


@given(st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v, indent=1).encode()))
@settings(max_examples=300, deadline=None)
def test_msg_always_parses_and_recovers_the_payload(payload: bytes) -> None:
    frame = encode_msg("xy.md.t", payload, None)
    decoded = strict_json(frame)
    prefix = b'{"op":"msg","subject":"xy.md.t",'
    if "data" in decoded:
        assert frame == prefix + b'"data":' + payload + b"}"
        assert decoded["data"] == json.loads(payload)
    else:
        assert base64.b64decode(decoded["b64"]) == payload


def test_reply_uses_the_same_rules() -> None:
    assert reply(9, b'{"ok": true}', None) == b'{"op":"reply","id":9,"data":{"ok": true}}'
    frame = reply(9, b"\xff", {"traceparent": "t"})
    assert frame == b'{"op":"reply","id":9,"b64":"/w==","hdr":{"traceparent":"t"}}'


# --------------------------------------------------------------------------- server frames


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (
            welcome("w1-7", None, Limits(1000, 1 << 20, 100.0)),
            {
                "op": "welcome",
                "v": 1,
                "conn": "w1-7",
                "expires_at": None,
                "limits": {"max_subs": 1000, "max_frame_bytes": 1048576, "max_inbound_per_s": 100},
            },
        ),
        (ack(1), {"op": "ack", "id": 1}),
        (ack(2, 1_700_000_000), {"op": "ack", "id": 2, "expires_at": 1_700_000_000}),
        (
            error(1, "XYW002", "denied"),
            {"op": "error", "id": 1, "code": "XYW002", "message": "denied"},
        ),
        (
            error(None, "XYW008", "bad"),
            {"op": "error", "id": None, "code": "XYW008", "message": "bad"},
        ),
        (
            error(3, "XYW010", "wait", 250),
            {
                "op": "error",
                "id": 3,
                "code": "XYW010",
                "message": "wait",
                "retry_after_ms": 250,
            },
        ),
        (pong(4), {"op": "pong", "id": 4}),
        (status("down"), {"op": "status", "nats": "down", "code": "XYW004"}),
        (status("up"), {"op": "status", "nats": "up"}),
        (dropped("x", 3), {"op": "dropped", "subject": "x", "count": 3, "code": "XYW003"}),
        (expiring(1_700_000_060), {"op": "expiring", "expires_at": 1_700_000_060}),
        (unsubscribed("x"), {"op": "unsubscribed", "subject": "x", "code": "XYW002"}),
        (
            unsubscribed("y", "XYW005"),
            {"op": "unsubscribed", "subject": "y", "code": "XYW005"},
        ),
    ],
)
def test_server_frames_have_the_documented_shape(frame: bytes, expected: dict[str, Any]) -> None:
    decoded = strict_json(frame)
    assert decoded == expected
    assert list(decoded) == list(expected)
    assert frame.startswith(b'{"op":"')
    assert b'": ' not in frame and b", " not in frame


def test_welcome_exact_bytes() -> None:
    assert welcome("c", 1_700_000_000, Limits(5, 10, 2.5)) == (
        b'{"op":"welcome","v":1,"conn":"c","expires_at":1700000000,'
        b'"limits":{"max_subs":5,"max_frame_bytes":10,"max_inbound_per_s":2.5}}'
    )


def test_batch_joins_frames() -> None:
    frames = [pong(1), dropped("x", 2), encode_msg("x", b"{}", None)]
    joined = batch(frames)
    assert joined == b"[" + b",".join(frames) + b"]"
    assert [f["op"] for f in strict_json(joined)] == ["pong", "dropped", "msg"]
    assert batch([frames[0]]) is frames[0]
    with pytest.raises(ValueError):
        batch([])


# --- client text echoed back is bounded -------------------------------------------------------


def test_clip_cuts_at_the_byte_limit_on_a_character_boundary() -> None:
    assert clip("short") == "short"
    assert clip("x" * MAX_ECHO_BYTES) == "x" * MAX_ECHO_BYTES
    cut = clip("x" * (MAX_ECHO_BYTES + 1))
    assert cut == "x" * MAX_ECHO_BYTES + CUT_MARK
    wide = clip("é" * MAX_ECHO_BYTES)  # 2 bytes each: the cut never splits a character
    assert wide == "é" * (MAX_ECHO_BYTES // 2) + CUT_MARK


def test_a_one_mib_unknown_key_is_not_echoed_whole() -> None:
    """msgspec quotes the unknown field: the error must carry at most a marked start of it."""
    key = "k" * (1 << 20)
    (err,) = decode_client_frame(json.dumps({"op": "ping", "id": 7, key: 1}).encode())
    assert isinstance(err, FrameError) and err.id == 7
    assert err.message.startswith("Object contains unknown field `kkk")
    assert err.message.endswith(CUT_MARK)
    assert len(err.message.encode()) <= MAX_ECHO_BYTES + len(CUT_MARK.encode())
    frame = json.loads(error(7, "XYW008", "m" * (1 << 20)))
    assert frame["message"] == "m" * MAX_ECHO_BYTES + CUT_MARK


# --------------------------------------------------------------------------- v1.2 recovery


def test_sub_with_since_or_last_decodes() -> None:
    (op,) = decode_client_frame(
        b'{"op":"sub","id":1,"subject":"xy.md.a","since":{"seq":41,"epoch":"E"}}'
    )
    assert isinstance(op, Sub) and op.since == Since(seq=41, epoch="E") and op.last is None
    (op,) = decode_client_frame(
        b'{"op":"sub","id":1,"subject":"xy.md.a","since":{"time":"2026-12-01T10:00:00Z"}}'
    )
    assert isinstance(op, Sub) and op.since == Since(time="2026-12-01T10:00:00Z")
    (op,) = decode_client_frame(b'{"op":"sub","id":1,"subject":"xy.md.a","last":5}')
    assert isinstance(op, Sub) and op.last == 5 and op.since is None


@pytest.mark.parametrize(
    "since_or_last",
    [
        b'"since":{"seq":-1,"epoch":"E"}',
        b'"since":{"seq":9007199254740992,"epoch":"E"}',
        b'"since":{"seq":1e3,"epoch":"E"}',
        b'"since":{"seq":"1","epoch":"E"}',
        b'"since":{"seq":1,"epoch":"E","x":1}',
        b'"since":{"seq":1,"epoch":"' + b"e" * 65 + b'"}',
        b'"since":"2026-12-01T10:00:00Z"',
        b'"since":{"time":1764583200}',
        b'"last":0',
        b'"last":-5',
        b'"last":"5"',
    ],
)
def test_malformed_resume_fields_are_xyw008_keeping_the_id(since_or_last: bytes) -> None:
    (err,) = decode_client_frame(b'{"op":"sub","id":9,"subject":"xy.md.a",' + since_or_last + b"}")
    assert isinstance(err, FrameError) and err.code == "XYW008" and err.id == 9


@given(st.integers(-MAX_ID, MAX_ID), st.none() | st.integers(0, 2**40))
def test_ack_is_the_ack_struct_encoded(op_id: int, expires_at: int | None) -> None:
    expected = msgspec.json.encode(Ack(op_id) if expires_at is None else Ack(op_id, expires_at))
    assert (ack(op_id) if expires_at is None else ack(op_id, expires_at)) == expected


def test_msg_with_seq_and_the_recovery_acks() -> None:
    frame = encode_msg_seq("xy.md.a", 42, b'{"p":1}', {"traceparent": "t"})
    assert (
        frame
        == b'{"op":"msg","subject":"xy.md.a","seq":42,"data":{"p":1},"hdr":{"traceparent":"t"}}'
    )
    assert json.loads(encode_msg_seq("a", 1, b"\xff", None)) == {
        "op": "msg",
        "subject": "a",
        "seq": 1,
        "b64": "/w==",
    }
    assert recovery_ack(1, "E", True, seq=9) == (
        b'{"op":"ack","id":1,"recovered":true,"epoch":"E","seq":9}'
    )
    assert recovery_ack(1, "E", None) == b'{"op":"ack","id":1,"epoch":"E"}'
    assert (
        recovery_ack(2, "E", False, "gap")
        == b'{"op":"ack","id":2,"recovered":false,"epoch":"E","reason":"gap"}'
    )
    assert (
        recovery_ack(3, None, False, "no_history")
        == b'{"op":"ack","id":3,"recovered":false,"reason":"no_history"}'
    )
