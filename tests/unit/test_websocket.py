"""Sans-I/O WebSocket: upgrade request and answers, RFC 6455 frame codec (core.websocket)."""

from __future__ import annotations

import base64

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameParser,
    HandshakeError,
    ProtocolViolation,
    RequestHead,
    accept_value,
    check_upgrade,
    close_frame,
    frame_header,
    parse_close_payload,
    parse_request_head,
    ping_frame,
    pong_frame,
    response_101,
    response_error,
    subprotocols,
    text_frame,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MAX_HEAD = 16_384


def upgrade_request(*extra: str, target: str = "/ws?x=1", omit: tuple[str, ...] = ()) -> bytes:
    headers = {
        "Host": "127.0.0.1:8080",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    lines = [f"GET {target} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in omit]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def head_of(raw: bytes) -> RequestHead:
    parsed = parse_request_head(raw, MAX_HEAD)
    assert parsed is not None
    return parsed[0]


def handshake_error(raw: bytes) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        result = parse_request_head(raw, MAX_HEAD)
        assert result is not None
        check_upgrade(result[0])
    return info.value


def split_response(raw: bytes) -> tuple[str, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, _, value = line.partition(": ")
        headers.setdefault(name.lower(), []).append(value)
    return status, headers, body


# --------------------------------------------------------------------------- request head


def test_parse_request_head_fields_and_consumed_bytes() -> None:
    raw = upgrade_request("X-Dup: a", "x-dup:  b \t", target="/ws?token=a%2Bb&flag&n=1&n=2")
    parsed = parse_request_head(raw + b"\x81\x80rest", MAX_HEAD)
    assert parsed is not None
    head, consumed = parsed
    assert consumed == len(raw)
    assert head.method == "GET"
    assert head.path == "/ws"
    assert head.query == {"token": ["a+b"], "flag": [""], "n": ["1", "2"]}
    assert head.headers[0] == ("host", "127.0.0.1:8080")
    assert head.headers[-2:] == [("x-dup", "a"), ("x-dup", "b")]
    assert head.header("X-DUP") == "a"
    assert head.header_values("x-Dup") == ["a", "b"]
    assert head.header("absent") is None
    assert head.header_values("absent") == []


def test_path_without_query_and_latin1_values() -> None:
    head = head_of(b"GET /ws HTTP/1.1\r\nX-Obs: caf\xe9\r\nEmpty:\r\n\r\n")
    assert head.path == "/ws"
    assert head.query == {}
    assert head.header("x-obs") == "caf\xe9"
    assert head.header("empty") == ""


@given(st.data())
@settings(max_examples=60, deadline=None)
def test_chunked_head_parses_the_same(data: st.DataObject) -> None:
    raw = upgrade_request("Cookie: a=b", "Origin: http://127.0.0.1") + b"\x81"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    buf = bytearray()
    result = None
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        buf += raw[start:end]
        result = parse_request_head(buf, MAX_HEAD)
        if result is not None:
            break
        assert b"\r\n\r\n" not in buf
    assert result is not None
    head, consumed = result
    assert consumed == len(raw) - 1
    assert head.headers == head_of(raw).headers


def test_incomplete_head_needs_more_bytes() -> None:
    assert parse_request_head(b"", 100) is None
    assert parse_request_head(b"GET /ws HTTP/1.1\r\nHost: x\r\n", 100) is None


def test_head_size_limit() -> None:
    raw = b"GET / HTTP/1.1\r\nX: " + b"a" * 50 + b"\r\n\r\n"
    assert parse_request_head(raw, len(raw)) is not None
    for buf in (raw, raw[:-1]):
        with pytest.raises(HandshakeError) as info:
            parse_request_head(buf, len(raw) - 1)
        assert (info.value.status, info.value.code) == (431, "XYW008")
    with pytest.raises(HandshakeError) as info:
        parse_request_head(b"G" * 200, 100)
    assert info.value.status == 431


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /ws",
        b"GET /ws HTTP/1.0",
        b"GET /ws HTTP/2.0",
        b"GET  /ws HTTP/1.1",
        b"GET /ws  HTTP/1.1",
        b"GET ws HTTP/1.1",
        b"GET http://example.com/ws HTTP/1.1",
        b"GET /w\x00s HTTP/1.1",
        b"GET /w\xffs HTTP/1.1",
        b"G(T /ws HTTP/1.1",
        b"",
        b"\x16\x03\x01\x02\x00\x01",
    ],
)
def test_malformed_request_line_is_400(request_line: bytes) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_request_head(request_line + b"\r\nHost: x\r\n\r\n", MAX_HEAD)
    assert (info.value.status, info.value.code) == (400, "XYW008")


SECRET = "eyJhbGciOiJSUzI1NiJ9.secret"


@pytest.mark.parametrize(
    "line",
    [
        b"Authorization: Bearer " + SECRET.encode() + b"\x00",
        b"Authorization: Bearer " + SECRET.encode() + b"\rInjected: 1",
        b"Authorization: Bearer " + SECRET.encode() + b"\nInjected: 1",
        b"X-Ctl: a\x7fb",
        b"X-Ctl: a\x1bb",
        b"Host : example",
        b"Bad Name: x",
        b"Bad\x00Name: x",
        b": no-name",
        b"no colon " + SECRET.encode(),
        b" folded: " + SECRET.encode(),
        b"\tfolded",
        b"Caf\xe9: x",
    ],
)
def test_bad_header_lines_are_400_and_never_echoed(line: bytes) -> None:
    raw = b"GET /ws HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n"
    with pytest.raises(HandshakeError) as info:
        parse_request_head(raw, MAX_HEAD)
    error = info.value
    assert (error.status, error.code) == (400, "XYW008")
    assert SECRET not in error.message
    assert SECRET not in str(error)


def test_obs_fold_message_names_it() -> None:
    with pytest.raises(HandshakeError, match="folding"):
        parse_request_head(b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", MAX_HEAD)


@pytest.mark.timeout(10)  # linear parsing takes microseconds; a backtracking regex, minutes
def test_spaces_in_values_do_not_backtrack() -> None:
    raw = b"GET / HTTP/1.1\r\nX: a" + b" " * 12_000 + b"\x01\r\n\r\n"
    with pytest.raises(HandshakeError):
        parse_request_head(raw, MAX_HEAD)


# --------------------------------------------------------------------------- upgrade checks


def test_rfc_6455_accept_value() -> None:
    assert accept_value(KEY) == ACCEPT
    assert check_upgrade(head_of(upgrade_request())) == ACCEPT


def test_upgrade_and_connection_are_token_lists() -> None:
    raw = upgrade_request(
        "Upgrade: h2c, WebSocket",
        "Connection: keep-alive",
        "Connection: UPGRADE",
        omit=("Upgrade", "Connection"),
    )
    head = head_of(raw)
    assert head.is_websocket_upgrade()
    assert check_upgrade(head) == ACCEPT


def test_method_other_than_get_is_405() -> None:
    error = handshake_error(upgrade_request().replace(b"GET", b"POST", 1))
    assert (error.status, error.code, error.headers) == (405, "XYW008", (("Allow", "GET"),))


@pytest.mark.parametrize(
    "raw",
    [
        upgrade_request(omit=("Upgrade",)),
        upgrade_request(omit=("Connection",)),
        upgrade_request("Upgrade: h2c", omit=("Upgrade",)),
        upgrade_request("Upgrade: websocket/13", omit=("Upgrade",)),
        upgrade_request("Connection: keep-alive", omit=("Connection",)),
        b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
)
def test_plain_get_is_426(raw: bytes) -> None:
    assert not head_of(raw).is_websocket_upgrade()
    error = handshake_error(raw)
    assert (error.status, error.code) == (426, "XYW008")
    assert ("Upgrade", "websocket") in error.headers
    assert ("Sec-WebSocket-Version", "13") in error.headers


@pytest.mark.parametrize("versions", [[], ["8"], ["13, 8"], ["13", "13"], ["14"], ["13x"]])
def test_wrong_version_is_426_with_version_header(versions: list[str]) -> None:
    raw = upgrade_request(
        *(f"Sec-WebSocket-Version: {v}" for v in versions), omit=("Sec-WebSocket-Version",)
    )
    error = handshake_error(raw)
    assert (error.status, error.code) == (426, "XYW008")
    assert ("Sec-WebSocket-Version", "13") in error.headers


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [KEY, KEY],
        [f"{KEY}, {KEY}"],
        ["not base64!!!!!!!!!!!!=="],
        [base64.b64encode(b"x" * 15).decode()],
        [base64.b64encode(b"x" * 17).decode()],
        [KEY.rstrip("=")],
        [""],
    ],
)
def test_invalid_key_is_400(keys: list[str]) -> None:
    raw = upgrade_request(*(f"Sec-WebSocket-Key: {k}" for k in keys), omit=("Sec-WebSocket-Key",))
    error = handshake_error(raw)
    assert (error.status, error.code) == (400, "XYW008")


def test_missing_host_is_400() -> None:
    error = handshake_error(upgrade_request(omit=("Host",)))
    assert (error.status, error.message) == (400, "missing Host header")


def test_subprotocols_across_lines() -> None:
    head = head_of(
        upgrade_request("Sec-WebSocket-Protocol: bearer, a.b.c", "Sec-WebSocket-Protocol: x,,y ")
    )
    assert subprotocols(head) == ["bearer", "a.b.c", "x", "y"]
    assert subprotocols(head_of(upgrade_request())) == []


# --------------------------------------------------------------------------- responses


def test_response_101_exact_bytes() -> None:
    assert response_101(ACCEPT, None) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ACCEPT.encode() + b"\r\n\r\n"
    )
    with_proto = response_101(ACCEPT, "bearer")
    assert with_proto.endswith(b"\r\nSec-WebSocket-Protocol: bearer\r\n\r\n")
    assert b"Extensions" not in with_proto


@pytest.mark.parametrize("bad", ["bearer\r\nSet-Cookie: x", "a b", "", "a,b"])
def test_response_101_refuses_non_token_subprotocol(bad: str) -> None:
    with pytest.raises(ValueError):
        response_101(ACCEPT, bad)


def test_response_error_shape() -> None:
    raw = response_error(503, "XYW007", "worker full: ü", [("Retry-After", "5")])
    status, headers, body = split_response(raw)
    assert status == "HTTP/1.1 503 Service Unavailable"
    assert headers["content-type"] == ["application/json"]
    assert headers["connection"] == ["close"]
    assert headers["retry-after"] == ["5"]
    assert headers["content-length"] == [str(len(body))]
    assert msgspec.json.decode(body) == {"code": "XYW007", "message": "worker full: ü"}
    assert split_response(response_error(599, "XYW009", "x"))[0] == "HTTP/1.1 599 Error"


@pytest.mark.parametrize("header", [("X", "a\r\nSet-Cookie: y"), ("X Y", "a"), ("X", "a\x00")])
def test_response_error_refuses_header_injection(header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        response_error(400, "XYW008", "m", [header])


# --------------------------------------------------------------------------- frame parser

MASK = b"\x37\xfa\x21\x3d"


def client_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
) -> bytes:
    """An independent (byte-per-byte) encoder of client frames."""
    first = (0x80 if fin else 0) | rsv | opcode
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def violation(data: bytes, max_bytes: int = 1 << 20) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        FrameParser(max_bytes).feed(data)
    return info.value


def test_single_frames() -> None:
    parser = FrameParser(1 << 20)
    stream = (
        client_frame(OP_TEXT, b'{"op":"ping","id":1}')
        + client_frame(OP_BINARY, b"\x00\xff")
        + client_frame(OP_PING, b"p")
        + client_frame(OP_PONG, b"")
        + client_frame(OP_TEXT, b"")
        + client_frame(OP_TEXT, "žluťoučký".encode())
    )
    assert parser.feed(stream) == [
        Frame(OP_TEXT, b'{"op":"ping","id":1}'),
        Frame(OP_BINARY, b"\x00\xff"),
        Frame(OP_PING, b"p"),
        Frame(OP_PONG, b""),
        Frame(OP_TEXT, b""),
        Frame(OP_TEXT, "žluťoučký".encode()),
    ]
    assert parser.frames_seen == 6


def test_fragments_with_control_frames_between() -> None:
    parser = FrameParser(1 << 20)
    text = "a€b".encode()  # the euro sign is split across fragments
    frames = parser.feed(
        client_frame(OP_TEXT, text[:2], fin=False)
        + client_frame(OP_PING, b"1")
        + client_frame(OP_CONT, text[2:4], fin=False)
        + client_frame(OP_CONT, b"", fin=False)
        + client_frame(OP_PONG, b"2")
        + client_frame(OP_CONT, text[4:])
    )
    assert frames == [Frame(OP_PING, b"1"), Frame(OP_PONG, b"2"), Frame(OP_TEXT, text)]
    assert parser.frames_seen == 6
    assert parser.feed(client_frame(OP_BINARY, b"a", fin=False)) == []
    assert parser.feed(client_frame(OP_CONT, b"b")) == [Frame(OP_BINARY, b"ab")]


def test_zero_mask_and_byte_at_a_time() -> None:
    parser = FrameParser(1 << 20)
    stream = client_frame(OP_TEXT, b"x" * 300, mask=b"\0\0\0\0") + client_frame(OP_PING, b"!")
    frames: list[Frame] = []
    for i in range(len(stream)):
        frames += parser.feed(stream[i : i + 1])
    assert frames == [Frame(OP_TEXT, b"x" * 300), Frame(OP_PING, b"!")]
    assert parser.frames_seen == 2


SIZES = [0, 1, 124, 125, 126, 127, 1023, 1024, 1025, 65535, 65536, 65537]


@st.composite
def messages(draw: st.DrawFn) -> tuple[int, bytes]:
    opcode = draw(st.sampled_from([OP_TEXT, OP_BINARY]))
    size = draw(st.sampled_from(SIZES) | st.integers(0, 3000))
    if opcode == OP_BINARY:
        if size < 4096:
            return opcode, draw(st.binary(min_size=size, max_size=size))
        return opcode, (bytes(range(256)) * (size // 256 + 1))[:size]
    if size < 4096:
        text = draw(st.text(min_size=size // 3, max_size=size // 3 + 1))
        return opcode, text.encode()
    return opcode, ("é" * (size // 2) + "a" * (size % 2)).encode()


@given(
    st.lists(messages(), min_size=1, max_size=5),
    st.data(),
)
@settings(max_examples=80, deadline=None)
def test_round_trip_with_fragmentation_masks_and_chunking(
    msgs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = bytearray()
    expected: list[Frame] = []
    raw_frames = 0
    for opcode, payload in msgs:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=4)))
        pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
        for i, piece in enumerate(pieces):
            mask = data.draw(st.binary(min_size=4, max_size=4))
            op = opcode if i == 0 else OP_CONT
            stream += client_frame(op, piece, fin=i == len(pieces) - 1, mask=mask)
            raw_frames += 1
            if i < len(pieces) - 1 and data.draw(st.booleans()):
                ping = data.draw(st.binary(max_size=125))
                stream += client_frame(OP_PING, ping, mask=mask)
                expected.append(Frame(OP_PING, ping))
                raw_frames += 1
        expected.append(Frame(opcode, payload))
    chunk_cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    parser = FrameParser(70_000)
    got: list[Frame] = []
    for a, b in zip([0, *chunk_cuts], [*chunk_cuts, len(stream)], strict=True):
        got += parser.feed(bytes(stream[a:b]))
    assert got == expected
    assert parser.frames_seen == raw_frames


def test_unmasked_client_frame_is_1002() -> None:
    error = violation(client_frame(OP_TEXT, b"hi", mask=None))
    assert (error.close_code, error.reason) == (1002, "client frame not masked")


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_rsv_bits_are_1002(rsv: int) -> None:
    assert violation(client_frame(OP_TEXT, b"hi", rsv=rsv)).close_code == 1002


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_are_1002(opcode: int) -> None:
    assert violation(client_frame(opcode, b"")).reason == "unknown opcode"


@pytest.mark.parametrize("opcode", [OP_CLOSE, OP_PING, OP_PONG])
def test_control_frame_rules(opcode: int) -> None:
    assert violation(client_frame(opcode, b"", fin=False)).close_code == 1002
    too_long = violation(client_frame(opcode, b"x" * 126))
    assert (too_long.close_code, too_long.reason) == (1002, "control frame too long")
    # detected from the first two bytes: the payload need not arrive
    assert violation(client_frame(opcode, b"x" * 126)[:2]).close_code == 1002


def test_continuation_without_message_is_1002() -> None:
    assert violation(client_frame(OP_CONT, b"x")).reason == "unexpected continuation"


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_during_fragmented_one_is_1002(opcode: int) -> None:
    data = client_frame(OP_TEXT, b"a", fin=False) + client_frame(opcode, b"b")
    assert violation(data).reason == "expected continuation"


def test_message_over_limit_is_1009_from_the_header() -> None:
    parser = FrameParser(100)
    assert parser.feed(client_frame(OP_TEXT, b"x" * 100)) == [Frame(OP_TEXT, b"x" * 100)]
    for size in (101, 126, 70_000):
        header = client_frame(OP_TEXT, b"x" * size)[:14]
        error = violation(header, max_bytes=100)
        assert (error.close_code, error.reason) == (1009, "message too big")


def test_fragments_over_limit_are_1009() -> None:
    parser = FrameParser(100)
    assert parser.feed(client_frame(OP_TEXT, b"x" * 60, fin=False)) == []
    assert parser.feed(client_frame(OP_CONT, b"x" * 40, fin=False)) == []
    with pytest.raises(ProtocolViolation) as info:
        parser.feed(client_frame(OP_CONT, b"x")[:2])
    assert info.value.close_code == 1009


def test_control_frames_do_not_count_toward_message_limit() -> None:
    parser = FrameParser(10)
    data = client_frame(OP_TEXT, b"x" * 10, fin=False) + client_frame(OP_PING, b"y" * 125)
    assert parser.feed(data + client_frame(OP_CONT, b"")) == [
        Frame(OP_PING, b"y" * 125),
        Frame(OP_TEXT, b"x" * 10),
    ]


@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"\xc3", b"a\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"ok" + b"\x80"],
)
def test_invalid_utf8_text_is_1007(payload: bytes) -> None:
    assert violation(client_frame(OP_TEXT, payload)).close_code == 1007
    fragmented = client_frame(OP_TEXT, b"ok", fin=False) + client_frame(OP_CONT, payload)
    assert violation(fragmented).close_code == 1007
    assert FrameParser(100).feed(client_frame(OP_BINARY, payload)) == [Frame(OP_BINARY, payload)]


def test_64_bit_length_with_top_bit_is_1002() -> None:
    header = bytes((0x81, 0xFF)) + (1 << 63).to_bytes(8, "big") + MASK
    assert violation(header, max_bytes=1 << 62).reason == "invalid frame length"


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"", None, ""),
        ((1000).to_bytes(2, "big"), 1000, ""),
        ((1001).to_bytes(2, "big") + "bye ü".encode(), 1001, "bye ü"),
        ((1014).to_bytes(2, "big"), 1014, ""),
        ((3000).to_bytes(2, "big"), 3000, ""),
        ((4999).to_bytes(2, "big"), 4999, ""),
    ],
)
def test_valid_close_frames(payload: bytes, code: int | None, reason: str) -> None:
    parser = FrameParser(100)
    frames = parser.feed(client_frame(OP_CLOSE, payload) + client_frame(OP_TEXT, b"after"))
    assert frames == [Frame(OP_CLOSE, payload)]
    assert parse_close_payload(frames[0].payload) == (code, reason)
    assert parser.feed(client_frame(OP_TEXT, b"later")) == []
    assert parser.frames_seen == 1


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_1002(code: int) -> None:
    error = violation(client_frame(OP_CLOSE, code.to_bytes(2, "big")))
    assert (error.close_code, error.reason) == (1002, "invalid close code")


def test_one_byte_close_payload_is_1002() -> None:
    assert violation(client_frame(OP_CLOSE, b"\x03")).close_code == 1002


def test_close_reason_invalid_utf8_is_1007() -> None:
    error = violation(client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"))
    assert error.close_code == 1007


def test_violation_reason_fits_a_close_frame() -> None:
    error = violation(client_frame(OP_TEXT, b"x", mask=None))
    frame = close_frame(error.close_code, error.reason)
    assert frame[2:4] == (1002).to_bytes(2, "big")
    assert frame[4:] == error.reason.encode()


def test_parser_is_slotted() -> None:
    assert not hasattr(FrameParser(10), "__dict__")
    assert not hasattr(head_of(upgrade_request()), "__dict__")


# --------------------------------------------------------------------------- frame building


@pytest.mark.parametrize(
    ("length", "header"),
    [
        (0, b"\x81\x00"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
    ],
)
def test_frame_header_lengths(length: int, header: bytes) -> None:
    assert frame_header(OP_TEXT, length) == header
    assert text_frame(b"a" * length) == header + b"a" * length


def test_control_frame_builders() -> None:
    assert ping_frame() == b"\x89\x00"
    assert ping_frame(b"abc") == b"\x89\x03abc"
    assert pong_frame(b"abc") == b"\x8a\x03abc"
    assert close_frame(1000, "bye") == b"\x88\x05\x03\xe8bye"
    assert close_frame(4003) == b"\x88\x02\x0f\xa3"
    for build in (ping_frame, pong_frame):
        assert len(build(b"x" * 125)) == 127
        with pytest.raises(ValueError):
            build(b"x" * 126)


def test_close_reason_truncated_at_character_boundary() -> None:
    frame = close_frame(1001, "é" * 100)
    assert frame[1] == 2 + 122
    assert parse_close_payload(frame[2:]) == (1001, "é" * 61)
    assert close_frame(1000, "a" * 200)[1] == 125


def masked(server_frame: bytes, mask: bytes) -> bytes:
    """Turn an unmasked server frame into the client frame with the same content."""
    n = server_frame[1] & 0x7F
    size = {126: 4, 127: 10}.get(n, 2)
    header = bytes((server_frame[0], server_frame[1] | 0x80)) + server_frame[2:size]
    payload = server_frame[size:]
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@given(
    st.sampled_from([1000, 1001, 1011, 3000, 4003, 4999]),
    st.text(max_size=80),
    st.binary(min_size=4, max_size=4),
)
@settings(max_examples=100, deadline=None)
def test_close_frame_round_trip(code: int, reason: str, mask: bytes) -> None:
    frame = close_frame(code, reason)
    assert frame[1] <= 125
    (parsed,) = FrameParser(10).feed(masked(frame, mask))
    got_code, got_reason = parse_close_payload(parsed.payload)
    assert got_code == code
    assert reason.startswith(got_reason)
    if len(reason.encode()) <= 123:
        assert got_reason == reason
    else:
        assert 120 <= len(got_reason.encode()) <= 123


@given(st.sampled_from(SIZES) | st.integers(0, 5000), st.binary(min_size=4, max_size=4))
@settings(max_examples=60, deadline=None)
def test_text_frame_round_trip(size: int, mask: bytes) -> None:
    payload = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    assert FrameParser(1 << 20).feed(masked(text_frame(payload), mask)) == [Frame(OP_TEXT, payload)]
