"""The sans-I/O WebSocket connection: bytes in, events and bytes out, no sockets, no clock.

Every rule of ``fanout.core.wsconnection``: automatic pong, the echo of a
client's close, the closing handshake, the inbound rate counted per message,
frames before a malformed one handed out first, UTF-8 failing on the first
fragment that proves it. The codec itself is tested in test_websocket.py.
"""

from __future__ import annotations

import pytest

from fanout.core.ratelimit import TokenBucket
from fanout.core.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    close_frame,
    pong_frame,
)
from fanout.core.wsconnection import CLOSED, CLOSING, OPEN, RATE_LIMITED, Closing, WsProtocol

MIB = 1 << 20
NOW = 100.0


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, masked: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 requires of clients)."""
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 1 << 16:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    mask = b"\x1f\x2e\x3d\x4c"
    key = (mask * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


def fragments(opcode: int, payload: bytes, parts: int) -> bytes:
    size = -(-len(payload) // parts)
    chunks = [payload[i : i + size] for i in range(0, len(payload), size)]
    return b"".join(
        frame(opcode if i == 0 else OP_CONT, c, fin=i == len(chunks) - 1)
        for i, c in enumerate(chunks)
    )


def proto(burst: float = 1000, max_bytes: int = MIB) -> WsProtocol:
    """A connection whose bucket refills at 1 op/s: tests run at a fixed ``NOW``."""
    return WsProtocol(max_bytes, TokenBucket(1.0, burst, NOW))


def events(ws: WsProtocol) -> list[bytes | Closing]:
    out: list[bytes | Closing] = []
    for _ in range(100_000):
        event = ws.next_event(NOW)
        if event is None:
            return out
        out.append(event)
    raise AssertionError("next_event never ran dry")


def feed(ws: WsProtocol, data: bytes) -> list[bytes | Closing]:
    ws.receive_data(data, NOW)
    return events(ws)


# -- messages and control frames ---------------------------------------------------------
def test_text_messages_in_order_and_nothing_to_send() -> None:
    ws = proto()
    assert feed(ws, frame(OP_TEXT, b"a") + frame(OP_TEXT, b"b")) == [b"a", b"b"]
    assert ws.data_to_send() == []
    assert ws.state == OPEN


def test_ping_is_answered_with_its_payload_and_pong_is_dropped() -> None:
    ws = proto()
    assert feed(ws, frame(OP_PING, b"hi") + frame(OP_PONG, b"x") + frame(OP_PING)) == []
    assert ws.data_to_send() == [pong_frame(b"hi"), pong_frame(b"")]
    assert ws.data_to_send() == []


def test_fragments_with_a_ping_between_make_one_message() -> None:
    ws = proto()
    data = frame(OP_TEXT, b"ab", fin=False) + frame(OP_PING, b"p") + frame(OP_CONT, b"cd")
    assert feed(ws, data) == [b"abcd"]
    assert ws.data_to_send() == [pong_frame(b"p")]


def test_chunk_boundaries_do_not_matter() -> None:
    ws = proto()
    data = frame(OP_TEXT, b"x" * 300) + frame(OP_PING, b"p") + fragments(OP_TEXT, b"y" * 50, 3)
    got: list[bytes | Closing] = []
    for i in range(len(data)):
        got += feed(ws, data[i : i + 1])
    assert got == [b"x" * 300, b"y" * 50]
    assert ws.data_to_send() == [pong_frame(b"p")]


def test_utf8_split_across_fragments_is_valid() -> None:
    ws = proto()
    word = "café €".encode()
    assert feed(ws, fragments(OP_TEXT, word, len(word))) == [word]


# -- closes the client starts ------------------------------------------------------------
@pytest.mark.parametrize("code", [1000, 1001, 4321])
def test_client_close_is_echoed_with_its_code(code: int) -> None:
    ws = proto()
    payload = code.to_bytes(2, "big") + b"bye"
    assert feed(ws, frame(OP_CLOSE, payload)) == [Closing(code, "", True)]
    assert ws.data_to_send() == [close_frame(code)]
    assert ws.state == CLOSED
    assert ws.closing_since == NOW


def test_client_close_without_code_is_answered_1000() -> None:
    ws = proto()
    assert feed(ws, frame(OP_CLOSE)) == [Closing(1000, "", True)]
    assert ws.data_to_send() == [close_frame(1000)]


def test_messages_before_the_client_close_come_first_and_nothing_after() -> None:
    ws = proto()
    data = frame(OP_TEXT, b"a") + frame(OP_CLOSE, b"\x03\xe8") + frame(OP_TEXT, b"late")
    assert feed(ws, data) == [b"a", Closing(1000, "", True)]
    assert feed(ws, frame(OP_TEXT, b"later")) == []


# -- closes the gateway starts: the closing handshake --------------------------------------
def test_close_sends_the_frame_then_discards_until_the_peer_answers() -> None:
    ws = proto()
    ws.close(1008, RATE_LIMITED, NOW)
    assert ws.state == CLOSING
    assert ws.closing_since == NOW
    assert ws.data_to_send() == [close_frame(1008, RATE_LIMITED)]
    assert feed(ws, frame(OP_TEXT, b"still sending") + frame(OP_PING, b"p")) == []
    assert ws.data_to_send() == []  # no pong once our close frame is out
    assert ws.state == CLOSING
    assert feed(ws, frame(OP_CLOSE, b"\x03\xf0")) == []
    assert ws.state == CLOSED
    assert ws.data_to_send() == []


def test_close_is_once() -> None:
    ws = proto()
    ws.close(1001, "draining", NOW)
    ws.close(1011, "again", NOW + 1)
    assert ws.data_to_send() == [close_frame(1001, "draining")]
    assert ws.closing_since == NOW


def test_peer_close_already_received_completes_the_handshake_at_once() -> None:
    """The caller was busy (a long batch) when the client's close arrived."""
    ws = proto()
    ws.receive_data(frame(OP_TEXT, b"a") + frame(OP_TEXT, b"b"), NOW)
    assert ws.next_event(NOW) == b"a"
    ws.receive_data(frame(OP_CLOSE, b"\x03\xe8"), NOW)
    ws.close(4003, "slow consumer", NOW)
    assert ws.state == CLOSED
    assert ws.data_to_send() == [close_frame(4003, "slow consumer")]
    assert ws.next_event(NOW) is None


def test_broken_stream_while_closing_is_discarded() -> None:
    ws = proto()
    ws.close(1001, "", NOW)
    ws.data_to_send()
    assert feed(ws, b"\xff\xff garbage") == []
    assert feed(ws, frame(OP_CLOSE, b"\x03\xe8")) == []  # the stream is dead: no close to find
    assert ws.state == CLOSING  # the caller's deadline (CLOSE_TIMEOUT_S) ends it


def test_eof_ends_everything() -> None:
    ws = proto()
    ws.receive_data(frame(OP_TEXT, b"a"), NOW)
    ws.receive_eof()
    assert ws.state == CLOSED
    assert feed(ws, frame(OP_TEXT, b"b")) == []


# -- violations: what came before is handed out first --------------------------------------
def test_frames_before_a_malformed_one_come_first() -> None:
    ws = proto()
    data = frame(OP_TEXT, b"sub") + frame(OP_PING, b"p") + b"\xc1\x80garbage"
    assert feed(ws, data) == [b"sub", Closing(1002, "reserved bits set", False)]
    assert ws.state == OPEN  # the caller closes once it has answered "sub"
    assert ws.data_to_send() == [pong_frame(b"p")]
    ws.close(1002, "reserved bits set", NOW)
    assert ws.data_to_send() == [close_frame(1002, "reserved bits set")]
    assert feed(ws, frame(OP_CLOSE)) == []
    assert ws.state == CLOSING  # after garbage nothing is parsed any more


def test_unmasked_frame_is_1002() -> None:
    ws = proto()
    assert feed(ws, frame(OP_TEXT, b"{}", masked=False)) == [
        Closing(1002, "client frame not masked", False)
    ]


def test_binary_frame_is_1003_after_the_text_before_it() -> None:
    ws = proto()
    data = frame(OP_TEXT, b"a") + frame(OP_BINARY, b"\x00") + frame(OP_TEXT, b"b")
    assert feed(ws, data) == [b"a", Closing(1003, "binary frames are not supported", False)]


def test_after_a_failure_later_input_only_matters_for_the_close_frame() -> None:
    ws = proto()
    ws.receive_data(frame(OP_TEXT, b"a") + frame(OP_BINARY, b"\x00"), NOW)
    assert ws.next_event(NOW) == b"a"  # the caller is busy with "a"
    ws.receive_data(frame(OP_TEXT, b"ignored") + frame(OP_CLOSE, b"\x03\xe8"), NOW)
    assert ws.next_event(NOW) == Closing(1003, "binary frames are not supported", False)
    ws.close(1003, "binary frames are not supported", NOW)
    assert ws.state == CLOSED
    assert ws.next_event(NOW) is None


def test_message_over_the_limit_is_1009() -> None:
    ws = proto(max_bytes=100)
    assert feed(ws, fragments(OP_TEXT, b"x" * 101, 2)) == [Closing(1009, "message too big", False)]


# -- UTF-8 ----------------------------------------------------------------------------------
def test_invalid_utf8_fails_on_the_first_fragment_that_proves_it() -> None:
    ws = proto()
    first = frame(OP_TEXT, b'{"x":"\xc3\x28', fin=False)
    assert feed(ws, first) == [Closing(1007, "invalid UTF-8", False)]


def test_invalid_utf8_in_a_later_fragment_fails_there() -> None:
    ws = proto()
    assert feed(ws, frame(OP_TEXT, b"ascii ", fin=False)) == []
    assert feed(ws, frame(OP_CONT, b"\xe2\x82", fin=False)) == []  # a prefix of "€" so far
    assert feed(ws, frame(OP_CONT, b"\x28", fin=False)) == [Closing(1007, "invalid UTF-8", False)]


def test_truncated_utf8_at_the_end_of_a_message_is_1007() -> None:
    ws = proto()
    assert feed(ws, frame(OP_TEXT, b"ok \xe2\x82", fin=False)) == []
    assert feed(ws, frame(OP_CONT, b"")) == [Closing(1007, "invalid UTF-8", False)]


def test_invalid_utf8_in_one_frame_is_1007() -> None:
    ws = proto()
    assert feed(ws, frame(OP_TEXT, b"\xff")) == [Closing(1007, "invalid UTF-8", False)]


# -- inbound rate -----------------------------------------------------------------------------
def test_rate_trips_at_the_frame_over_the_budget() -> None:
    ws = proto(burst=10)
    got = feed(ws, b"".join(frame(OP_PING, b"%d" % i) for i in range(12)))
    assert got == [Closing(1008, RATE_LIMITED, False)]
    assert ws.data_to_send() == [pong_frame(b"%d" % i) for i in range(10)]


def test_every_control_frame_counts() -> None:
    ws = proto(burst=3)
    data = frame(OP_PONG) + frame(OP_PING) + frame(OP_TEXT, b"a") + frame(OP_PONG)
    assert feed(ws, data) == [b"a", Closing(1008, RATE_LIMITED, False)]


def test_a_1_mib_message_in_1024_fragments_counts_once() -> None:
    ws = proto(burst=2)
    message = b"x" * MIB
    assert feed(ws, fragments(OP_TEXT, message, 1024)) == [message]
    assert feed(ws, frame(OP_TEXT, b"one more")) == [b"one more"]
    assert feed(ws, frame(OP_TEXT, b"over")) == [Closing(1008, RATE_LIMITED, False)]


def test_short_fragments_count_one_each() -> None:
    ws = proto(burst=10)
    assert feed(ws, fragments(OP_TEXT, b"x" * 20, 20)) == [Closing(1008, RATE_LIMITED, False)]


def test_empty_fragment_flood_trips_without_a_complete_message() -> None:
    ws = proto(burst=50)
    data = frame(OP_TEXT, b"", fin=False) + frame(OP_CONT, b"", fin=False) * 60
    assert feed(ws, data) == [Closing(1008, RATE_LIMITED, False)]


def test_batch_elements_are_charged_by_the_caller() -> None:
    ws = proto(burst=5)
    assert feed(ws, frame(OP_TEXT, b"[...]")) == [b"[...]"]
    assert ws.charge(4, NOW) is None
    assert ws.charge(1, NOW) == Closing(1008, RATE_LIMITED, False)


def test_charge_after_close_is_free() -> None:
    ws = proto(burst=1)
    ws.close(1000, "", NOW)
    assert ws.charge(5, NOW) is None
