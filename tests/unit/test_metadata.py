"""Request metadata (fanout.core.metadata): ULIDs, timestamps, trace context, strict headers."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fanout.core import metadata as md

ULID_TIME = st.integers(min_value=0, max_value=(1 << 48) - 1)
ENTROPY = st.binary(min_size=10, max_size=10)
IDS = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=128
)


# -- ULID -----------------------------------------------------------------------------------------
def test_ulid_known_vector() -> None:
    # python-ulid's documented example: 2016-07-30T23:54:10.259Z
    ms, entropy = md.decode_ulid("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert ms == 1_469_922_850_259
    assert md.encode_ulid(ms, entropy) == "01ARZ3NDEKTSV4RRFFQ69G5FAV"


@given(ULID_TIME, ENTROPY)
def test_ulid_round_trip(ms: int, entropy: bytes) -> None:
    ulid = md.encode_ulid(ms, entropy)
    assert len(ulid) == 26
    assert md.decode_ulid(ulid) == (ms, entropy)


@given(ULID_TIME, ULID_TIME, ENTROPY, ENTROPY)
def test_ulids_sort_by_time(a: int, b: int, ea: bytes, eb: bytes) -> None:
    if a < b:
        assert md.encode_ulid(a, ea) < md.encode_ulid(b, eb)


def test_ulid_limits() -> None:
    assert md.encode_ulid(0, bytes(10)) == "0" * 26
    assert md.encode_ulid((1 << 48) - 1, b"\xff" * 10) == "7" + "Z" * 25
    with pytest.raises(ValueError):
        md.encode_ulid(1 << 48, bytes(10))
    with pytest.raises(ValueError):
        md.encode_ulid(0, bytes(9))
    for bad in ("8" + "0" * 25, "0" * 25, "0" * 25 + "U", "0" * 25 + "a"):
        with pytest.raises(ValueError):
            md.decode_ulid(bad)


def test_new_ulid_uses_the_given_clock() -> None:
    ulid = md.new_ulid(1_700_000_000.5, bytes(10))
    assert md.decode_ulid(ulid) == (1_700_000_000_500, bytes(10))
    assert md.new_ulid() != md.new_ulid()


# -- timestamps ---------------------------------------------------------------------------------
def test_iso_timestamp() -> None:
    assert md.iso_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert md.iso_timestamp(1_714_564_800.123) == "2024-05-01T12:00:00.123Z"
    assert md.parse_timestamp("2024-05-01T12:00:00.123Z") == pytest.approx(1_714_564_800.123)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_timestamp_round_trip_to_the_millisecond(ms: int) -> None:
    text = md.iso_timestamp(ms / 1000)
    assert round(md.parse_timestamp(text) * 1000) == ms


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01 12:00:00.123Z",
        "2024-05-01T12:00:00.123+00:00",
        "2024-02-30T12:00:00.000Z",
        "2024-05-01T25:00:00.000Z",
        "",
    ],
)
def test_parse_timestamp_is_strict(text: str) -> None:
    with pytest.raises(ValueError):
        md.parse_timestamp(text)


# -- trace context ------------------------------------------------------------------------------
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parse_traceparent() -> None:
    parsed = md.parse_traceparent(TP)
    assert parsed == md.TraceParent("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1)
    assert parsed is not None and parsed.sampled and str(parsed) == TP
    unsampled = md.parse_traceparent(TP[:-2] + "00")
    assert unsampled is not None and not unsampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        TP.upper(),
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "ff" + TP[2:],
        TP + "-extra",
        TP[:-1],
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "",
    ],
)
def test_invalid_traceparents(value: str) -> None:
    assert md.parse_traceparent(value) is None


def test_future_traceparent_version_keeps_its_ids() -> None:
    parsed = md.parse_traceparent("01" + TP[2:] + "-what-comes-next")
    assert parsed is not None and str(parsed) == TP


def test_new_traceparent() -> None:
    tp = md.new_traceparent(bytes(range(1, 25)))
    assert str(tp) == "00-0102030405060708090a0b0c0d0e0f10-1112131415161718-01"
    assert str(md.new_traceparent(bytes(range(1, 25)), sampled=False)).endswith("-00")
    assert md.parse_traceparent(str(md.new_traceparent())) is not None
    with pytest.raises(ValueError):
        md.new_traceparent(bytes(24))
    with pytest.raises(ValueError):
        md.new_traceparent(bytes(23))


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("congo=t61rcWkgMzE", True),
        ("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", True),
        ("tenant@vendor=x, other=y", True),
        ("a=1,a=2", False),
        ("UPPER=x", False),
        ("k=v=w,", False),
        ("k=\x01", False),
        (",".join(f"k{i}=v" for i in range(33)), False),
        ("k=" + "v" * 600, False),
        ("", False),
    ],
)
def test_tracestate(value: str, ok: bool) -> None:
    assert md.valid_tracestate(value) is ok


# -- header values ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("alice", True),
        ("auth0|1234", True),
        ("John Doe", True),
        ("Zoë", True),
        (" alice", False),
        ("alice ", False),
        ("a\r\nPUB x 1", False),
        ("a\x00b", False),
        ("", False),
        ("x" * 1025, False),
    ],
)
def test_header_values(value: str, ok: bool) -> None:
    assert md.valid_header_value(value) is ok


def test_header_names_and_reserved() -> None:
    """msgspec ``search``es a ``Meta`` pattern: a trailing newline must not slip through."""
    assert re.search(md.HEADER_NAME_PATTERN, "X-Tenant")
    for bad in ("X Tenant", "X:Tenant", "", "X-Tenant\n", "X-Tenant\r\nPUB x 1"):
        assert not re.search(md.HEADER_NAME_PATTERN, bad), bad
    for name in ("Fanout-Principal", "fanout-anything", "AUTHORIZATION", "Authorization"):
        assert md.is_reserved(name)
    for name in ("X-Fanout", "traceparent", "Authorization-Hint"):
        assert not md.is_reserved(name)


def test_ids() -> None:
    assert md.valid_id("order-42:retry#1")
    assert not md.valid_id("has space")
    assert not md.valid_id("x" * 129)
    assert not md.valid_id("")


# -- headers <-> metadata -----------------------------------------------------------------------
def full_meta() -> md.MessageMetadata:
    return md.MessageMetadata(
        message_id=md.encode_ulid(1_700_000_000_000, bytes(10)),
        timestamp="2023-11-14T22:13:20.000Z",
        correlation=md.Correlation("corr-1", "cause-1"),
        authentication=md.JwtAuthentication("aaa.bbb.ccc"),
        principal="alice",
        conn="1f-2",
        traceparent=TP,
        tracestate="congo=t61rcWkgMzE",
    )


def test_headers_use_the_protocol_names() -> None:
    assert md.to_headers(full_meta()) == {
        "Fanout-Msg-Id": "01HF7YAT000000000000000000",
        "Fanout-Timestamp": "2023-11-14T22:13:20.000Z",
        "Fanout-Correlation-Id": "corr-1",
        "Fanout-Causation-Id": "cause-1",
        "Fanout-Principal": "alice",
        "Fanout-Conn": "1f-2",
        "Authorization": "Bearer aaa.bbb.ccc",
        "traceparent": TP,
        "tracestate": "congo=t61rcWkgMzE",
    }


def test_round_trip_and_case_insensitive_names() -> None:
    meta = full_meta()
    assert md.from_headers(md.to_headers(meta)) == meta
    lowered = {k.lower(): v for k, v in md.to_headers(meta).items()}
    assert md.from_headers(lowered) == meta


@given(IDS, st.none() | IDS, ULID_TIME, ENTROPY)
def test_round_trip_property(corr: str, cause: str | None, ms: int, entropy: bytes) -> None:
    meta = md.MessageMetadata(
        message_id=md.encode_ulid(ms, entropy),
        timestamp=md.iso_timestamp(min(ms, 253_402_300_799_999) / 1000),
        correlation=md.Correlation(corr, cause),
    )
    assert md.from_headers(md.to_headers(meta)) == meta


def test_no_message_id_means_no_metadata() -> None:
    assert md.from_headers(None) is None
    assert md.from_headers({"traceparent": TP, "Authorization": "Bearer x"}) is None


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"Fanout-Msg-Id": "not-a-ulid"}, "messageId"),
        ({"Fanout-Timestamp": "yesterday"}, "timestamp"),
        ({"Fanout-Timestamp": "2024-02-30T00:00:00.000Z"}, "day is out of range"),
        ({"Fanout-Correlation-Id": "has space"}, "correlationId"),
        ({"Fanout-Principal": "a\r\nb"}, "principal"),
        ({"Authorization": "Basic dXNlcg=="}, "Bearer"),
        ({"Authorization": "Bearer "}, "Bearer"),
    ],
)
def test_strict_decoding(change: dict[str, str], fragment: str) -> None:
    headers = md.to_headers(full_meta()) | change
    with pytest.raises(md.MetadataError) as err:
        md.from_headers(headers)
    assert fragment in str(err.value)
    assert "aaa.bbb.ccc" not in str(err.value)


def test_timestamp_is_required_with_an_id() -> None:
    headers = md.to_headers(full_meta())
    del headers["Fanout-Timestamp"]
    with pytest.raises(md.MetadataError):
        md.from_headers(headers)


def test_causation_needs_correlation() -> None:
    headers = md.to_headers(full_meta())
    del headers["Fanout-Correlation-Id"]
    with pytest.raises(md.MetadataError, match="without"):
        md.from_headers(headers)


def test_invalid_trace_context_is_dropped_not_fatal() -> None:
    headers = md.to_headers(full_meta()) | {"traceparent": "garbage"}
    meta = md.from_headers(headers)
    assert meta is not None and meta.traceparent is None and meta.tracestate is None
    headers = md.to_headers(full_meta()) | {"tracestate": "BAD=x"}
    meta = md.from_headers(headers)
    assert meta is not None and meta.traceparent == TP and meta.tracestate is None


def test_bearer_token() -> None:
    assert md.bearer_token({"authorization": "bearer  t.o.k "}) == md.JwtAuthentication("t.o.k")
    assert md.bearer_token({"X": "y"}) is None
    assert "t.o.k" not in repr(md.JwtAuthentication("t.o.k"))


def test_json_shape_is_the_origin_plans() -> None:
    meta = full_meta()
    tree = msgspec.to_builtins(meta)
    assert tree["messageId"] == meta.message_id
    assert tree["correlation"] == {"correlationId": "corr-1", "causationId": "cause-1"}
    assert tree["authentication"] == {"type": "jwt", "token": "aaa.bbb.ccc"}
    assert msgspec.json.decode(msgspec.json.encode(meta), type=md.MessageMetadata) == meta
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(tree | {"extra": 1}, md.MessageMetadata)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(
            tree | {"authentication": {"type": "basic", "token": "x"}}, md.MessageMetadata
        )
