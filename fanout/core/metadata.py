"""Request metadata shared by both halves: the gateway that sends, ``fanout.service`` that answers.

Owns the NATS header names of protocol v1.1, the msgspec Structs for
``MessageMetadata`` (docs/requests.md, Metadata headers) (message id, timestamp, correlation block,
authentication block), strict decoding from headers, and the small pure
helpers behind them: ULIDs, ISO 8601 timestamps, W3C ``traceparent`` /
``tracestate``. Callers pass time and randomness in, so everything here is
plain arithmetic; :func:`new_ulid` and :func:`new_traceparent` read the clock
and ``os.urandom`` only when they are not given.

ULIDs are written here (20 lines) rather than taken from ``python-ulid``:
the gateway needs encoding only, and a dependency for it would be one more
thing to pin in a sans-I/O core.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, NamedTuple

import msgspec

from fanout.errors import Code, FanoutError

# -- header names (protocol v1.1, "Requests") --------------------------------------------------
MSG_ID = "Fanout-Msg-Id"
TIMESTAMP = "Fanout-Timestamp"
CORRELATION_ID = "Fanout-Correlation-Id"
CAUSATION_ID = "Fanout-Causation-Id"
PRINCIPAL = "Fanout-Principal"
CONN = "Fanout-Conn"
AUTHORIZATION = "Authorization"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Header names no client may set (compared case-insensitively; plus every ``Fanout-*``).
RESERVED_PREFIX = "fanout-"
RESERVED = frozenset({AUTHORIZATION.lower()})

#: Keys of the request op's ``headers`` object that always pass (docs/requests.md, The op).
CLIENT_CORRELATION_ID = "correlationId"
CLIENT_CAUSATION_ID = "causationId"

MAX_ID_CHARS = 128
MAX_HEADER_VALUE_CHARS = 1024
MAX_TRACESTATE_CHARS = 512

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_INDEX = {c: i for i, c in enumerate(_CROCKFORD)}
ULID_PATTERN = "^[0-7][0-9A-HJKMNP-TV-Z]{25}$"
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"
#: Correlation and causation ids: visible ASCII, no spaces (they end up in logs and headers).
ID_PATTERN = f"^[!-~]{{1,{MAX_ID_CHARS}}}$"
#: A header name: an RFC 9110 token (what nats-py and the server accept). ``\Z``, not ``$``:
#: msgspec searches, and ``$`` would let a trailing newline through into a NATS header.
HEADER_NAME_PATTERN = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z"
#: A header value nats-py sends unchanged: no control characters, no outer whitespace.
VALUE_PATTERN = r"^(?:[^\x00-\x1f\x7f\s]|[^\x00-\x1f\x7f\s][^\x00-\x1f\x7f]*[^\x00-\x1f\x7f\s])$"
_VALUE_RE = re.compile(VALUE_PATTERN)
_ID_RE = re.compile(ID_PATTERN)
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_TRACESTATE_MEMBER_RE = re.compile(
    r"[a-z0-9][a-z0-9_\-*/]{0,255}(?:@[a-z][a-z0-9_\-*/]{0,13})?=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)

Ulid = Annotated[str, msgspec.Meta(pattern=ULID_PATTERN)]
Timestamp = Annotated[str, msgspec.Meta(pattern=TIMESTAMP_PATTERN)]
Ident = Annotated[str, msgspec.Meta(pattern=ID_PATTERN)]
HeaderText = Annotated[str, msgspec.Meta(pattern=VALUE_PATTERN, max_length=MAX_HEADER_VALUE_CHARS)]


class MetadataError(FanoutError, ValueError):
    """Metadata headers present but malformed; ``str(exc)`` is safe to return to the sender."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.MALFORMED, message, message)


# -- the Structs --------------------------------------------------------------------------------
class Correlation(msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True):
    """Which conversation a message belongs to, and which message caused it."""

    correlation_id: Ident
    causation_id: Ident | None = None


class JwtAuthentication(
    msgspec.Struct, tag_field="type", tag="jwt", forbid_unknown_fields=True, frozen=True
):
    """A bearer JWT the service verifies itself (sent only when the gateway forwards tokens)."""

    token: HeaderText

    def __repr__(self) -> str:
        return "JwtAuthentication(token=<redacted>)"


#: A tagged union by design: later authentication types add members here.
Authentication = JwtAuthentication


class MessageMetadata(
    msgspec.Struct, rename="camel", forbid_unknown_fields=True, frozen=True, kw_only=True
):
    """The metadata of docs/requests.md plus what a gateway asserts about its client.

    ``principal`` and ``conn`` are the gateway's word (the verified ``sub`` and
    its connection id): trust them as far as NATS permissions let only the
    gateway publish on the subject.
    """

    message_id: Ulid
    timestamp: Timestamp
    correlation: Correlation | None = None
    authentication: Authentication | None = None
    principal: HeaderText | None = None
    conn: HeaderText | None = None
    traceparent: str | None = None
    tracestate: str | None = None


# -- ULID ---------------------------------------------------------------------------------------
def encode_ulid(ms: int, entropy: bytes) -> str:
    """The 26-character ULID for a millisecond timestamp and 10 bytes of randomness."""
    if not 0 <= ms < 1 << 48:
        raise ValueError("ULID time must fit in 48 bits")
    if len(entropy) != 10:
        raise ValueError("ULID entropy must be 10 bytes")
    value = (ms << 80) | int.from_bytes(entropy, "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def decode_ulid(ulid: str) -> tuple[int, bytes]:
    """``(ms, entropy)`` of a ULID; ValueError when it is not one (upper case only)."""
    if re.fullmatch(ULID_PATTERN, ulid) is None:
        raise ValueError(f"not a ULID: {ulid!r}")
    value = 0
    for ch in ulid:
        value = (value << 5) | _CROCKFORD_INDEX[ch]
    return value >> 80, (value & ((1 << 80) - 1)).to_bytes(10, "big")


def new_ulid(now_s: float | None = None, entropy: bytes | None = None) -> str:
    """A fresh ULID (random within a millisecond: unique, not monotonic)."""
    ms = int((time.time() if now_s is None else now_s) * 1000)
    return encode_ulid(ms, os.urandom(10) if entropy is None else entropy)


# -- timestamps ---------------------------------------------------------------------------------
def iso_timestamp(epoch_s: float) -> str:
    """ISO 8601 UTC with milliseconds: ``2024-05-01T12:00:00.123Z``."""
    ms = round(epoch_s * 1000)
    whole = time.gmtime(ms // 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", whole) + f".{ms % 1000:03d}Z"


def parse_timestamp(text: str) -> float:
    """Epoch seconds of an :func:`iso_timestamp` string; ValueError otherwise."""
    if re.fullmatch(TIMESTAMP_PATTERN, text) is None:
        raise ValueError(f"not an ISO 8601 UTC timestamp with milliseconds: {text!r}")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# -- W3C trace context --------------------------------------------------------------------------
class TraceParent(NamedTuple):
    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def __str__(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags:02x}"


def parse_traceparent(value: str) -> TraceParent | None:
    """The parsed header, or ``None`` when invalid (W3C: then start a new trace).

    Version ``00`` must be exactly 55 characters; a higher version may carry
    more fields after a ``-``, which are ignored; ``ff`` is never valid.
    """
    match = _TRACEPARENT_RE.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return TraceParent(trace_id, parent_id, int(flags, 16))


def new_traceparent(entropy: bytes | None = None, sampled: bool = True) -> TraceParent:
    """A new trace: 16 bytes of trace id and 8 of parent id from ``entropy`` (24 bytes)."""
    raw = os.urandom(24) if entropy is None else entropy
    if len(raw) != 24:
        raise ValueError("traceparent entropy must be 24 bytes")
    trace_id, parent_id = raw[:16].hex(), raw[16:].hex()
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        raise ValueError("all-zero trace or parent id")
    return TraceParent(trace_id, parent_id, 1 if sampled else 0)


def valid_tracestate(value: str) -> bool:
    """W3C ``tracestate``: up to 32 ``key=value`` members, at most 512 characters."""
    if not value or len(value) > MAX_TRACESTATE_CHARS:
        return False
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m]
    if not members or len(members) > 32:
        return False
    keys = set()
    for member in members:
        if _TRACESTATE_MEMBER_RE.fullmatch(member) is None:
            return False
        keys.add(member.partition("=")[0])
    return len(keys) == len(members)


# -- header values ------------------------------------------------------------------------------
def valid_header_value(value: str) -> bool:
    """Sent unchanged by nats-py: no control characters, no outer whitespace, bounded."""
    return len(value) <= MAX_HEADER_VALUE_CHARS and _VALUE_RE.fullmatch(value) is not None


def valid_id(value: str) -> bool:
    """A correlation or causation id: 1..128 visible ASCII characters."""
    return _ID_RE.fullmatch(value) is not None


def is_reserved(name: str) -> bool:
    """``Fanout-*`` and ``Authorization``: set by the gateway only, never by a client."""
    low = name.lower()
    return low.startswith(RESERVED_PREFIX) or low in RESERVED


# -- headers <-> metadata -----------------------------------------------------------------------
def to_headers(meta: MessageMetadata) -> dict[str, str]:
    """The NATS headers for ``meta`` (names as in the protocol's table)."""
    out = {MSG_ID: meta.message_id, TIMESTAMP: meta.timestamp}
    if meta.correlation is not None:
        out[CORRELATION_ID] = meta.correlation.correlation_id
        if meta.correlation.causation_id is not None:
            out[CAUSATION_ID] = meta.correlation.causation_id
    if meta.principal is not None:
        out[PRINCIPAL] = meta.principal
    if meta.conn is not None:
        out[CONN] = meta.conn
    if meta.authentication is not None:
        out[AUTHORIZATION] = f"Bearer {meta.authentication.token}"
    if meta.traceparent is not None:
        out[TRACEPARENT] = meta.traceparent
        if meta.tracestate is not None:
            out[TRACESTATE] = meta.tracestate
    return out


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """``headers[name]``, else a case-insensitive match (some clients change the case)."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    low = name.lower()
    for key, val in headers.items():
        if key.lower() == low:
            return val
    return None


def bearer_token(headers: Mapping[str, str] | None) -> JwtAuthentication | None:
    """The ``Authorization: Bearer`` token, if any; MetadataError for another scheme."""
    raw = header(headers, AUTHORIZATION)
    if raw is None:
        return None
    scheme, _, token = raw.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise MetadataError("Authorization must be 'Bearer <jwt>'")
    return JwtAuthentication(token)


def from_headers(headers: Mapping[str, str] | None) -> MessageMetadata | None:
    """Strictly decode the metadata; ``None`` when the message carries none (no message id).

    A malformed id, timestamp, correlation block or Authorization header raises
    :class:`MetadataError`. An invalid ``traceparent`` is dropped with its
    ``tracestate`` instead (W3C: the receiver starts a new trace).
    """
    message_id = header(headers, MSG_ID)
    if message_id is None:
        return None
    tree: dict[str, object] = {
        "messageId": message_id,
        "timestamp": header(headers, TIMESTAMP),
    }
    correlation = header(headers, CORRELATION_ID)
    causation = header(headers, CAUSATION_ID)
    if correlation is not None:
        tree["correlation"] = {"correlationId": correlation, "causationId": causation}
    elif causation is not None:
        raise MetadataError(f"{CAUSATION_ID} without {CORRELATION_ID}")
    for key, name in (("principal", PRINCIPAL), ("conn", CONN)):
        value = header(headers, name)
        if value is not None:
            tree[key] = value
    auth = bearer_token(headers)
    if auth is not None:
        tree["authentication"] = {"type": "jwt", "token": auth.token}
    traceparent = header(headers, TRACEPARENT)
    if traceparent is not None and parse_traceparent(traceparent) is not None:
        tree["traceparent"] = traceparent
        tracestate = header(headers, TRACESTATE)
        if tracestate is not None and valid_tracestate(tracestate):
            tree["tracestate"] = tracestate
    try:
        meta = msgspec.convert(tree, MessageMetadata, strict=True)
        parse_timestamp(meta.timestamp)
    except (msgspec.ValidationError, ValueError) as exc:
        raise MetadataError(f"invalid metadata: {exc}") from None
    return meta
