"""Sans-I/O WebSocket connection, server side after the upgrade: the RFC 6455 rules.

Bytes in (:meth:`WsProtocol.receive_data`), events out one at a time
(:meth:`WsProtocol.next_event`), bytes out (:meth:`WsProtocol.data_to_send`),
in the spirit of python-websockets' ``protocol.py``. It owns the automatic
pong, the echo of a client's close, the inbound rate limit (per message, per
control frame) and the closing handshake: OPEN -> CLOSING (our close frame
sent; the peer's data is read and discarded until its close frame) -> CLOSED
(then the socket may close without a TCP reset eating our close frame). The
caller enforces :data:`CLOSE_TIMEOUT_S` from :attr:`WsProtocol.closing_since`.

Events are handed out one at a time, in order: the caller answers every
message that arrived before a malformed frame or a rate-limit trip before it
acts on the :class:`Closing` that reports it (by calling :meth:`WsProtocol.close`,
once the answers that are still owed have gone out). While the caller is busy
(a long batch of ops) it simply stops taking events; frames are still parsed
and charged as they arrive, so what waits is bounded by the rate limit.
"""

from __future__ import annotations

from typing import NamedTuple

from fanout.core.ratelimit import TokenBucket
from fanout.core.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    Frame,
    FrameParser,
    ProtocolViolation,
    close_frame,
    parse_close_payload,
    pong_frame,
)
from fanout.errors import Close

OPEN = 0
CLOSING = 1
CLOSED = 2

#: After our close frame, how long the peer has to answer with its own (then the socket is cut).
CLOSE_TIMEOUT_S = 2.0

RATE_LIMITED = "inbound rate limit"


class Closing(NamedTuple):
    """The connection closes with ``code``.

    ``by_peer``: the peer closed it; the echo is queued and the state is CLOSED.
    Otherwise the peer broke a rule: the caller answers with ``close(code, reason)``.
    """

    code: int
    reason: str
    by_peer: bool


#: What :meth:`WsProtocol.next_event` hands out: a complete text message, or the close.
Event = bytes | Closing


def _is_terminal(item: Frame | ProtocolViolation) -> bool:
    """After this item the connection closes: nothing but the peer's close frame matters."""
    return isinstance(item, ProtocolViolation) or item[0] in (OP_CLOSE, OP_BINARY)


def _close_frames(items: list[Frame | ProtocolViolation]) -> list[Frame | ProtocolViolation]:
    return [item for item in items if type(item) is Frame and item[0] == OP_CLOSE]


class WsProtocol(FrameParser):
    """One client connection's protocol state: the frame parser plus the connection's rules.

    A subclass rather than a parser attribute: one object per connection, not
    two (memory per idle connection decides how many clients a worker holds).
    ``__slots__`` only, no buffer while idle.
    """

    __slots__ = ("_ended", "_out", "_pending", "bucket", "closing_since", "state")

    def __init__(self, max_message_bytes: int, bucket: TokenBucket) -> None:
        super().__init__(max_message_bytes)
        self.bucket = bucket
        self.state = OPEN
        self.closing_since = 0.0
        #: Parsed, charged items not taken yet, last first (``pop()`` takes the next).
        self._pending: list[Frame | ProtocolViolation] | None = None
        #: A closing item is pending: later input only matters for the peer's close frame.
        self._ended = False
        self._out: list[bytes] | None = None

    # -- input --------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        """Parse ``data`` and charge the rate limit; take the results with :meth:`next_event`.

        A message counts once, however fragmented (non-final fragments under
        ``SHORT_FRAGMENT_BYTES`` count as one each); every control frame counts.
        """
        if self.state == CLOSED:
            return
        short = self.short_fragments
        items: list[Frame | ProtocolViolation]
        try:
            items = [*self.feed(data)]
        except ProtocolViolation as exc:
            items = [*exc.frames, exc]
            exc.frames = []
        if self.state == CLOSING:
            if _close_frames(items):
                self.state = CLOSED
            return
        if self._ended:
            items = _close_frames(items)
        else:
            short = self.short_fragments - short
            cost = len(items) + short
            if cost and not self.bucket.take(cost, now):
                keep = max(0, int(self.bucket.tokens) - short)
                items = [*items[:keep], ProtocolViolation(Close.POLICY, RATE_LIMITED)]
            for i, item in enumerate(items):
                if _is_terminal(item):
                    self._ended = True
                    items = [*items[: i + 1], *_close_frames(items[i + 1 :])]
                    break
        if not items:
            return
        items.reverse()
        pending = self._pending
        self._pending = items if pending is None else items + pending

    def receive_eof(self) -> None:
        """The transport is gone."""
        self.state = CLOSED
        self._pending = self._out = None

    def next_event(self, now: float) -> Event | None:
        """The next text message or :class:`Closing`; None when nothing more is ready.

        Pings are answered (:meth:`data_to_send`) and pongs dropped on the way.
        Once not OPEN nothing is pending (:meth:`close` drops it).
        """
        pending = self._pending
        while pending:
            item = pending.pop()
            if isinstance(item, ProtocolViolation):
                return Closing(item.close_code, item.reason, False)
            opcode, payload = item
            if opcode == OP_TEXT:
                if not pending:
                    self._pending = None
                return payload
            if opcode == OP_PING:
                self._send(pong_frame(payload))
            elif opcode == OP_BINARY:
                return Closing(Close.UNSUPPORTED_DATA, "binary frames are not supported", False)
            elif opcode == OP_CLOSE:
                code, _ = parse_close_payload(payload)
                code = Close.NORMAL if code is None else code
                self._send(close_frame(code))
                self.state = CLOSED
                self.closing_since = now
                self._pending = None
                return Closing(code, "", True)
        self._pending = None
        return None

    def charge(self, n: int, now: float) -> Closing | None:
        """Spend ``n`` more ops (the elements of a batch); the close when the budget is gone."""
        if self.state != OPEN or self.bucket.take(n, now):
            return None
        return Closing(Close.POLICY, RATE_LIMITED, False)

    # -- output -------------------------------------------------------------------
    def close(self, code: int, reason: str, now: float) -> None:
        """OPEN -> CLOSING: queue the close frame; data from the peer is discarded from now on.

        A close frame of the peer that already arrived (while the caller was busy)
        completes the handshake at once.
        """
        if self.state != OPEN:
            return
        self._send(close_frame(code, reason))
        self.state = CLOSING
        self.closing_since = now
        pending = self._pending
        self._pending = None
        if pending and _close_frames(pending):
            self.state = CLOSED

    def data_to_send(self) -> list[bytes]:
        """Pongs and the close frame queued since the last call, in order."""
        out = self._out
        self._out = None
        return out or []

    def _send(self, frame: bytes) -> None:
        if self._out is None:
            self._out = [frame]
        else:
            self._out.append(frame)
