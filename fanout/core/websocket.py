"""Sans-I/O WebSocket: the HTTP upgrade request and answers, and the RFC 6455 frame codec.

The worker's lean ``asyncio.Protocol`` owns the socket after accept and drives
these functions: bytes in (``parse_request_head``, ``FrameParser.feed``) and
bytes out (``response_101``, ``response_error``, ``text_frame``, ...). Nothing
here does I/O, so every rule is tested without a socket, and a connection costs
one small parser object instead of an aiohttp ``WebSocketResponse``.

Server side only: client frames must be masked, ours are not; no extension is
ever negotiated, so every RSV bit is a protocol error.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import parse_qs

import msgspec

from fanout.errors import Close, Code, FanoutError, close_reason_code

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(rb"(" + _TCHAR + rb"+) ([\x21-\x7e]+) HTTP/(\d\.\d)")
#: Greedy value, stripped afterwards: a lazy group before trailing spaces backtracks quadratically.
_HEADER_LINE = re.compile(rb"(" + _TCHAR + rb"+):([\t\x20-\x7e\x80-\xff]*)")
_TOKEN = re.compile(_TCHAR.decode() + "+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
#: Close codes a peer may send (RFC 6455 §7.4 and the IANA registry); 3000-4999 are open.
_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))
_MAX_CLOSE_REASON = 123


class HandshakeError(FanoutError):
    """The upgrade request is refused; ``status``, ``code``, ``message`` and ``headers``
    are the HTTP answer (:func:`response_error` writes it).

    ``message`` never quotes the request: header values may hold a token.
    ``limit`` names the connection limit that refused (``metrics.LIMITS``), for
    the handshake outcome metric; empty for every other refusal.
    """

    def __init__(
        self,
        status: int,
        code: Code,
        message: str,
        headers: Sequence[tuple[str, str]] = (),
        limit: str = "",
    ) -> None:
        super().__init__(code, message, f"{status} {code}: {message}")
        self.status = status
        self.headers = tuple(headers)
        self.limit = limit


def _bad(message: str) -> HandshakeError:
    return HandshakeError(400, Code.MALFORMED, message)


def _tokens(values: list[str]) -> list[str]:
    """Comma-separated list header values (possibly on several lines), stripped, non-empty."""
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


class RequestHead:
    """One parsed HTTP/1.1 request head: method, raw path, decoded query, headers in order."""

    __slots__ = ("headers", "method", "path", "query")

    def __init__(
        self, method: str, path: str, query: dict[str, list[str]], headers: list[tuple[str, str]]
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (any case), in order."""
        name = name.lower()
        return [value for key, value in self.headers if key == name]

    def is_websocket_upgrade(self) -> bool:
        """``Upgrade: websocket`` together with ``Connection: upgrade`` (tokens, any case)."""
        upgrade = {t.lower() for t in _tokens(self.header_values("upgrade"))}
        connection = {t.lower() for t in _tokens(self.header_values("connection"))}
        return "websocket" in upgrade and "upgrade" in connection


def parse_request_head(buf: bytes | bytearray, max_bytes: int) -> tuple[RequestHead, int] | None:
    """Parse a request head from the start of ``buf``; None while it is incomplete.

    Returns the head and the number of bytes it took (bytes after it belong to
    the next protocol). A head, blank line included, longer than ``max_bytes``
    is refused with 431 as soon as it cannot fit; anything not strictly
    HTTP/1.1 with CRLF lines, token names and visible-character values is 400:
    lenient parsing is how request smuggling and header injection get in.
    """
    end = buf.find(b"\r\n\r\n", 0, max_bytes)
    if end < 0:
        if len(buf) >= max_bytes:
            raise HandshakeError(431, Code.MALFORMED, "request head too large")
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    request = _REQUEST_LINE.fullmatch(lines[0])
    if request is None:
        raise _bad("malformed request line")
    method, target, version = request.groups()
    if version != b"1.1":
        raise _bad("HTTP/1.1 required")
    if not target.startswith(b"/"):
        raise _bad("malformed request target")
    raw_path, _, raw_query = target.decode("ascii").partition("?")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        field = _HEADER_LINE.fullmatch(line)
        if field is None:
            if line[:1] in (b" ", b"\t"):
                raise _bad("obsolete header line folding")
            raise _bad("malformed header line")
        name, value = field.groups()
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    query = parse_qs(raw_query, keep_blank_values=True)
    return RequestHead(method.decode("ascii"), raw_path, query, headers), end + 4


def check_upgrade(head: RequestHead) -> str:
    """Validate an RFC 6455 opening handshake; return the ``Sec-WebSocket-Accept`` value."""
    if head.method != "GET":
        raise HandshakeError(405, Code.MALFORMED, "method not allowed", [("Allow", "GET")])
    if not head.is_websocket_upgrade():
        raise HandshakeError(
            426,
            Code.MALFORMED,
            "WebSocket upgrade required",
            [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        )
    if head.header_values("sec-websocket-version") != ["13"]:
        raise HandshakeError(
            426,
            Code.MALFORMED,
            "unsupported WebSocket version",
            [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")],
        )
    if head.header("host") is None:
        raise _bad("missing Host header")
    keys = head.header_values("sec-websocket-key")
    if len(keys) != 1:
        raise _bad("exactly one Sec-WebSocket-Key required")
    try:
        nonce = base64.b64decode(keys[0], validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        raise _bad("invalid Sec-WebSocket-Key")
    return accept_value(keys[0])


def accept_value(key: str) -> str:
    """RFC 6455 §4.2.2: base64(SHA-1(key + GUID))."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def subprotocols(head: RequestHead) -> list[str]:
    """The offered ``Sec-WebSocket-Protocol`` values, in order (the token may be one of them)."""
    return _tokens(head.header_values("sec-websocket-protocol"))


def response_101(accept: str, subprotocol: str | None) -> bytes:
    """The 101 answer. Never negotiates an extension (no permessage-deflate)."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept}",
    ]
    if subprotocol is not None:
        if not _TOKEN.fullmatch(subprotocol):
            raise ValueError("subprotocol must be an HTTP token")
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def response_error(
    status: int, code: str, message: str, extra_headers: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A complete refusal: JSON body ``{"code","message"}``, then the connection closes."""
    body = msgspec.json.encode({"code": code, "message": message})
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Cache-Control: no-store",
    ]
    for name, value in extra_headers:
        if not _TOKEN.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise ValueError("invalid response header")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class ProtocolViolation(FanoutError):
    """The peer broke RFC 6455 (or a limit); close with ``close_code`` and ``reason``.

    ``code`` is the error code logs and metrics carry for that close code.

    ``reason`` is short ASCII, ready for ``close_frame``. ``frames`` are the
    complete frames of the same ``feed`` call that came before the violation:
    they are answered before the close.
    """

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_reason_code(close_code), reason, f"{close_code}: {reason}")
        self.close_code = close_code
        self.reason = reason
        self.frames: list[Frame] = []


class Frame(NamedTuple):
    """A complete message (text/binary, reassembled) or a control frame."""

    opcode: int
    payload: bytes


#: ``_XOR[k]`` maps each byte to itself XOR ``k``: a translate table (64 KiB per process).
_XOR = [bytes([i ^ k for i in range(256)]) for k in range(256)]
_UNMASK_TRANSLATE_FROM = 1024
#: A non-final fragment smaller than this is counted as an op by the inbound rate limit:
#: a message split into fragments at least this big counts once, an empty-fragment flood does not.
SHORT_FRAGMENT_BYTES = 1024
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _unmask(mask: bytes | bytearray, data: bytes | bytearray) -> bytes:
    """XOR ``data`` with the repeating 4-byte ``mask`` at C speed, never a Python loop per byte.

    Small payloads: one big-int XOR. From 1 KiB on, translating each of the
    four byte lanes (``[i::4]``) through an XOR table is 2-3x faster (1 MiB:
    ~1.2 ms instead of ~2.8 ms): int conversion of a large buffer is slow.
    """
    n = len(data)
    if n < _UNMASK_TRANSLATE_FROM:
        key = (mask * ((n + 3) >> 2))[:n]
        return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    out = bytearray(data)
    out[0::4] = out[0::4].translate(_XOR[mask[0]])
    out[1::4] = out[1::4].translate(_XOR[mask[1]])
    out[2::4] = out[2::4].translate(_XOR[mask[2]])
    out[3::4] = out[3::4].translate(_XOR[mask[3]])
    return bytes(out)


class FrameParser:
    """Incremental parser of client frames for one connection.

    Holds only the unparsed tail of the stream (at most one frame header plus
    ``max_message_bytes``) and the fragments of an unfinished message; the
    message limit is enforced from the frame header, before the payload is
    buffered. Text is checked for UTF-8 fragment by fragment, so invalid bytes
    fail on the first fragment that proves them. After a close frame, later
    bytes are ignored. After a ``ProtocolViolation`` the stream is dead (later
    bytes are ignored); the frames earlier in the same ``feed`` call are on the
    exception.
    """

    __slots__ = (
        "_buf",
        "_closed",
        "_decoder",
        "_max",
        "_msg",
        "_msg_op",
        "frames_seen",
        "short_fragments",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._max = max_message_bytes
        self._buf: bytearray | None = None
        self._msg: bytearray | None = None
        self._msg_op = 0
        #: The UTF-8 state of a fragmented text message once a fragment was not ASCII.
        self._decoder: codecs.IncrementalDecoder | None = None
        self._closed = False
        #: Raw frames parsed so far (continuation and control frames included).
        self.frames_seen = 0
        #: Non-final fragments under ``SHORT_FRAGMENT_BYTES`` parsed so far.
        self.short_fragments = 0

    def feed(self, data: bytes | bytearray) -> list[Frame]:
        """Consume ``data``; return the messages and control frames it completes, in order."""
        if self._closed:
            return []
        frames: list[Frame] = []
        try:
            self._parse(data, frames)
        except ProtocolViolation as exc:
            self._closed = True
            self._buf = self._msg = self._decoder = None
            exc.frames = frames
            raise
        return frames

    def _parse(self, data: bytes | bytearray, frames: list[Frame]) -> None:
        pending = self._buf
        buf: bytes | bytearray
        if pending is None:
            buf = data
        else:
            pending += data
            buf = pending
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            op = b0 & 0x0F
            if b0 & 0x70:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "reserved bits set")
            if not b1 & 0x80:
                raise ProtocolViolation(Close.PROTOCOL_ERROR, "client frame not masked")
            length = b1 & 0x7F
            hlen = 6
            if op >= OP_CLOSE:
                if op > OP_PONG:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "unknown opcode")
                if not b0 & 0x80:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "fragmented control frame")
                if length > 125:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "control frame too long")
            else:
                if op > OP_BINARY:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "unknown opcode")
                if op == OP_CONT:
                    if self._msg is None:
                        raise ProtocolViolation(Close.PROTOCOL_ERROR, "unexpected continuation")
                elif self._msg is not None:
                    raise ProtocolViolation(Close.PROTOCOL_ERROR, "expected continuation")
                if length == 126:
                    if n - pos < 4:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                    hlen = 8
                elif length == 127:
                    if n - pos < 10:
                        break
                    length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                    if length >> 63:
                        raise ProtocolViolation(Close.PROTOCOL_ERROR, "invalid frame length")
                    hlen = 14
                if length + (0 if self._msg is None else len(self._msg)) > self._max:
                    raise ProtocolViolation(Close.TOO_BIG, "message too big")
            end = pos + hlen + length
            if end > n:
                break
            payload = _unmask(buf[pos + hlen - 4 : pos + hlen], buf[pos + hlen : end])
            pos = end
            self.frames_seen += 1
            if op >= OP_CLOSE:
                if op == OP_CLOSE:
                    parse_close_payload(payload)
                    frames.append(Frame(op, payload))
                    self._closed = True
                    self._buf = None
                    return
                frames.append(Frame(op, payload))
                continue
            fin = b0 & 0x80
            if not fin and length < SHORT_FRAGMENT_BYTES:
                self.short_fragments += 1
            if op == OP_CONT:
                msg = self._msg
                assert msg is not None
                msg += payload
                if self._msg_op == OP_TEXT:
                    self._check_fragment(payload, fin)
                if not fin:
                    continue
                op = self._msg_op
                payload = bytes(msg)
                self._msg = self._decoder = None
            elif not fin:
                self._msg = bytearray(payload)
                self._msg_op = op
                if op == OP_TEXT:
                    self._check_fragment(payload, fin)
                continue
            elif op == OP_TEXT and not payload.isascii():
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise ProtocolViolation(Close.INVALID_DATA, "invalid UTF-8") from None
            frames.append(Frame(op, payload))
        if pos == n:
            self._buf = None
        elif buf is pending:
            del pending[:pos]
        else:
            self._buf = bytearray(memoryview(buf)[pos:])

    def _check_fragment(self, payload: bytes, fin: int) -> None:
        """UTF-8 of one text fragment, continuing the message's state (ASCII costs no decoder)."""
        decoder = self._decoder
        if decoder is None:
            if payload.isascii():
                return
            decoder = self._decoder = _utf8_decoder()
        try:
            decoder.decode(payload, bool(fin))
        except UnicodeDecodeError:
            raise ProtocolViolation(Close.INVALID_DATA, "invalid UTF-8") from None


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame; (None, "") when it carries no code."""
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolViolation(Close.PROTOCOL_ERROR, "close payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if code not in _CLOSE_CODES and not 3000 <= code <= 4999:
        raise ProtocolViolation(Close.PROTOCOL_ERROR, "invalid close code")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(Close.INVALID_DATA, "invalid UTF-8 in close reason") from None
    return code, reason


def frame_header(opcode: int, length: int) -> bytes:
    """Header of an unmasked, final (FIN) server frame."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    return frame_header(OP_TEXT, len(payload)) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; ``reason`` is cut at a character boundary to fit 123 bytes of UTF-8."""
    raw = reason.encode("utf-8")
    if len(raw) > _MAX_CLOSE_REASON:
        raw = raw[:_MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    payload = code.to_bytes(2, "big") + raw
    return frame_header(OP_CLOSE, len(payload)) + payload


def _control(opcode: int, payload: bytes) -> bytes:
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    return frame_header(opcode, len(payload)) + payload


def ping_frame(payload: bytes = b"") -> bytes:
    return _control(OP_PING, payload)


def pong_frame(payload: bytes) -> bytes:
    return _control(OP_PONG, payload)
