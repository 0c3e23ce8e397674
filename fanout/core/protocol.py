"""The JSON frame protocol (wire contract v1): decode client ops strictly, encode server frames.

Client frames are one object or a batch (array of objects); every element is
decoded on its own, so one bad element costs an ``error`` frame for that
element and the rest still work. Server frames are compact JSON with a fixed
key order; a NATS message's ``msg`` frame is built once by byte concatenation
and shared by every recipient.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Annotated, Literal, cast

import msgspec

from fanout.errors import Code, FanoutError

#: The protocol this server speaks, "major.minor": a minor version only adds. The
#: ``welcome`` frame's ``v`` is the major, which changes only for something incompatible.
PROTOCOL_VERSION = "1.2"
_WIRE_MAJOR = int(PROTOCOL_VERSION.partition(".")[0])


#: Client ids are echoed to JavaScript: keep them exact there (Number.MAX_SAFE_INTEGER).
MAX_ID = 2**53 - 1
Id = Annotated[int, msgspec.Meta(ge=-MAX_ID, le=MAX_ID)]


class _Op(msgspec.Struct, tag_field="op", forbid_unknown_fields=True):
    pass


#: Stream sequences are uint64 in JetStream; beyond 2^53-1 JavaScript cannot hold them exactly.
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]


class Since(msgspec.Struct, forbid_unknown_fields=True):
    """v1.2 resume position: ``seq`` + ``epoch`` (as the gateway sent them), or ``time``."""

    seq: Seq | None = None
    epoch: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    time: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class Sub(_Op, tag="sub"):
    id: Id
    subject: str
    since: Since | None = None
    last: Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)] | None = None


class Unsub(_Op, tag="unsub"):
    id: Id
    subject: str


class Ping(_Op, tag="ping"):
    id: Id


class Auth(_Op, tag="auth"):
    id: Id
    token: str


_JSON_NULL = msgspec.Raw(b"null")


class RequestOp(_Op, tag="request"):
    """``data`` is the client's JSON value, raw (``null`` when absent): it becomes the payload."""

    id: Id
    subject: str
    data: msgspec.Raw = _JSON_NULL
    timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    headers: dict[str, str] = {}


ClientOp = Sub | Unsub | Ping | Auth | RequestOp

_op_decoder = msgspec.json.Decoder(ClientOp)
_ops_decoder = msgspec.json.Decoder(list[ClientOp])
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder()
_WHITESPACE = b" \t\r\n"
#: A batch is decoded in one go (no call per element) up to this many bytes per allowed op;
#: a longer frame, likely too long a batch, is split into raw elements first (cheaper to refuse).
_TYPED_BYTES_PER_OP = 128


#: Client-controlled text quoted in an error frame or a log line is cut to this many bytes.
MAX_ECHO_BYTES = 200
CUT_MARK = "…(cut)"


def clip(text: str, limit: int = MAX_ECHO_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes (on a character boundary) and marked as cut.

    Error messages quote the client (msgspec names an unknown field, however
    long): unbounded, a 1 MiB key would become a 1 MiB error frame and log line.
    """
    if len(text) <= limit // 4:
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= limit:
        return text
    return raw[:limit].decode("utf-8", "ignore") + CUT_MARK


class FrameError(FanoutError):
    """A malformed client frame or batch element; answer with an ``error`` frame, keep going."""

    def __init__(self, message: str, id: int | None = None) -> None:
        message = clip(message)
        super().__init__(Code.MALFORMED, message, message)
        self.id = id


def _element_error(raw: bytes, exc: msgspec.ValidationError) -> FrameError:
    """Not a valid op: recover its ``id`` when the element is a JSON object with an int ``id``.

    msgspec may reject the op (say, an unknown ``op``) before it reaches a JSON
    syntax error further on, so the element is not known to be valid JSON here.
    """
    try:
        obj = _any_decoder.decode(raw)
    except msgspec.DecodeError as syntax:
        return FrameError(f"invalid JSON: {syntax}")
    except RecursionError:
        return FrameError("invalid JSON: nested too deeply")
    ident = obj.get("id") if isinstance(obj, dict) else None
    if type(ident) is not int or abs(ident) > MAX_ID:
        ident = None
    return FrameError(str(exc), ident)


def decode_client_frame(payload: bytes, max_batch: int = 1000) -> list[ClientOp | FrameError]:
    """Decode one text frame into its ops, in order; a bad element yields a ``FrameError``.

    Failures of the frame as a whole (not JSON, not an object or array, an
    empty or too long batch, nesting too deep) give ``[FrameError(id=None)]``.
    """
    first = payload[:1]
    if first and first in _WHITESPACE:
        first = payload.lstrip(_WHITESPACE)[:1]
    try:
        if first == b"{":
            try:
                return [_op_decoder.decode(payload)]
            except msgspec.ValidationError as exc:
                return [_element_error(payload, exc)]
        if first != b"[":
            return [FrameError("frame must be a JSON object or an array of objects")]
        if len(payload) <= max_batch * _TYPED_BYTES_PER_OP:
            try:  # the usual batch, every op valid: one decode, no call per element
                valid = _ops_decoder.decode(payload)
            except (msgspec.DecodeError, RecursionError):
                pass  # some element is not a valid op: each on its own, below
            else:
                if valid and len(valid) <= max_batch:
                    return cast("list[ClientOp | FrameError]", valid)
        elements = _batch_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        return [FrameError(f"invalid JSON: {exc}")]
    except RecursionError:
        return [FrameError("invalid JSON: nested too deeply")]
    if not elements:
        return [FrameError("empty batch")]
    if len(elements) > max_batch:
        return [FrameError(f"batch longer than {max_batch} ops")]
    ops: list[ClientOp | FrameError] = []
    for element in elements:
        try:
            ops.append(_op_decoder.decode(element))
        except msgspec.ValidationError as exc:
            ops.append(_element_error(bytes(element), exc))
    return ops


# --- server → client -------------------------------------------------------------------------

_encode = msgspec.json.encode
_json_check = msgspec.json.Decoder(msgspec.Raw)


def _is_json_text(payload: bytes) -> bool:
    """True when ``payload`` can be embedded verbatim: valid JSON and valid UTF-8.

    msgspec does not check UTF-8 inside strings when it only skips over them,
    hence the explicit check (``isascii`` makes the common case nearly free).
    """
    try:
        _json_check.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return False
    if payload.isascii():
        return True
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _body(payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    """``,"data":…`` or ``,"b64":"…"``, then ``,"hdr":{…}`` when there are headers, then ``}``."""
    if _is_json_text(payload):
        out = b',"data":' + payload
    else:
        out = b',"b64":"' + base64.b64encode(payload) + b'"'
    if headers:
        out += b',"hdr":' + _encode(headers if type(headers) is dict else dict(headers))
    return out + b"}"


def encode_msg(subject: str, payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The ``msg`` frame for one NATS message (built once, shared by all recipients)."""
    return b'{"op":"msg","subject":' + _encode(subject) + _body(payload, headers)


def encode_msg_seq(
    subject: str, seq: int, payload: bytes, headers: Mapping[str, str] | None
) -> bytes:
    """The ``msg`` frame of a recoverable subject: with its stream sequence (v1.2)."""
    return (
        b'{"op":"msg","subject":'
        + _encode(subject)
        + b',"seq":'
        + str(seq).encode()
        + _body(payload, headers)
    )


def reply(id: int, payload: bytes, headers: Mapping[str, str] | None) -> bytes:
    """The ``reply`` frame to a ``request``: same data/b64/hdr rule as ``msg``."""
    return b'{"op":"reply","id":' + _encode(id) + _body(payload, headers)


class _Frame(msgspec.Struct, tag_field="op"):
    pass


class Limits(msgspec.Struct):
    max_subs: int
    max_frame_bytes: int
    max_inbound_per_s: float


class Welcome(_Frame, tag="welcome"):
    v: int
    conn: str
    expires_at: int | None
    limits: Limits


class Ack(_Frame, tag="ack"):
    id: int
    expires_at: int | msgspec.UnsetType = msgspec.UNSET
    #: v1.2, the sub of a recoverable subject: how its resume went, the stream's epoch.
    recovered: bool | msgspec.UnsetType = msgspec.UNSET
    epoch: str | msgspec.UnsetType = msgspec.UNSET
    #: The stream position the subscription continues from (resume from here next time).
    seq: int | msgspec.UnsetType = msgspec.UNSET
    reason: str | msgspec.UnsetType = msgspec.UNSET


class Error(_Frame, tag="error"):
    id: int | None
    code: str
    message: str
    retry_after_ms: int | msgspec.UnsetType = msgspec.UNSET


class Pong(_Frame, tag="pong"):
    id: int


class Status(_Frame, tag="status"):
    nats: Literal["up", "down"]
    code: str | msgspec.UnsetType = msgspec.UNSET


class Dropped(_Frame, tag="dropped"):
    subject: str
    count: int
    code: str = Code.BACKPRESSURE


class Expiring(_Frame, tag="expiring"):
    expires_at: int


class Unsubscribed(_Frame, tag="unsubscribed"):
    subject: str
    code: str


def welcome(conn: str, expires_at: int | None, limits: Limits) -> bytes:
    return _encode(Welcome(_WIRE_MAJOR, conn, expires_at, limits))


def ack(id: int, expires_at: int | msgspec.UnsetType = msgspec.UNSET) -> bytes:
    if expires_at is msgspec.UNSET:  # every sub and unsub: the bytes Ack(id) encodes to
        return b'{"op":"ack","id":%d}' % id
    return _encode(Ack(id, expires_at))


def recovery_ack(
    id: int,
    epoch: str | None,
    recovered: bool | None,
    reason: str | None = None,
    seq: int | None = None,
) -> bytes:
    """The ack of a ``sub`` on a recoverable subject (v1.2).

    ``epoch`` and ``seq`` whenever the stream's state is known; ``recovered`` only
    when the sub asked to resume (``since``/``last``); ``reason`` when not recovered.
    """
    unset = msgspec.UNSET
    return _encode(
        Ack(
            id,
            recovered=unset if recovered is None else recovered,
            epoch=unset if epoch is None else epoch,
            seq=unset if seq is None else seq,
            reason=unset if reason is None else reason,
        )
    )


def error(
    id: int | None,
    code: str,
    message: str,
    retry_after_ms: int | msgspec.UnsetType = msgspec.UNSET,
) -> bytes:
    return _encode(Error(id, code, clip(message), retry_after_ms))


def pong(id: int) -> bytes:
    return _encode(Pong(id))


def status(nats: Literal["up", "down"]) -> bytes:
    """``down`` carries ``XYW004``; ``up`` carries no code."""
    return _encode(Status(nats, Code.NATS_DOWN if nats == "down" else msgspec.UNSET))


def dropped(subject: str, count: int) -> bytes:
    return _encode(Dropped(subject, count))


def expiring(expires_at: int) -> bytes:
    return _encode(Expiring(expires_at))


def unsubscribed(subject: str, code: str = Code.SUBJECT_DENIED) -> bytes:
    return _encode(Unsubscribed(subject, code))


def batch(frames: Sequence[bytes]) -> bytes:
    """Join encoded frames into one JSON array body; a single frame is returned as is."""
    if not frames:
        raise ValueError("empty batch")
    if len(frames) == 1:
        return frames[0]
    return b"[" + b",".join(frames) + b"]"
