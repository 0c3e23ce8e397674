"""One client's WebSocket after the upgrade: a lean ``asyncio.Protocol``.

No task and no timer per connection (the worker's sweep does pings, idle and
write-stall deadlines), ``__slots__`` everywhere: memory per idle connection
decides how many clients a worker holds. Frame parsing, the JSON protocol,
ACL and outbox rules live in ``fanout.core``; this class only wires them to
the transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from fanout import logs, metrics
from fanout.core import protocol, subjects, websocket
from fanout.core.acl import SubjectAcl
from fanout.core.auth import Principal
from fanout.core.outbox import ClientQueue
from fanout.core.ratelimit import TokenBucket
from fanout.errors import CLOSE_REASON_CODE, Close

if TYPE_CHECKING:
    from fanout.worker.gateway import Gateway
    from fanout.worker.hub import Hub

log = logging.getLogger("fanout.conn")

OPEN = 0
CLOSING = 1
CLOSED = 2


class WsConnection(asyncio.Protocol):
    __slots__ = (
        "acl",
        "bucket",
        "closing_since",
        "conn_id",
        "dirty",
        "gateway",
        "hub",
        "last_rx",
        "opened_at",
        "overlapping",
        "parser",
        "paused",
        "paused_since",
        "peer",
        "principal",
        "queue",
        "state",
        "subs",
        "token",
        "transport",
        "warned",
    )

    def __init__(
        self,
        hub: Hub,
        gateway: Gateway,
        transport: asyncio.Transport,
        conn_id: str,
        peer: str,
        principal: Principal | None,
        acl: SubjectAcl,
    ) -> None:
        settings = hub.settings
        self.hub = hub
        self.gateway = gateway
        self.transport = transport
        self.conn_id = conn_id
        self.peer = peer
        self.principal = principal
        self.acl = acl
        self.parser = websocket.FrameParser(settings.ws.max_frame_bytes)
        self.queue = ClientQueue(settings.outbox.max_messages, settings.outbox.max_bytes)
        self.bucket = TokenBucket(settings.ws.inbound_rate, settings.ws.inbound_burst)
        self.subs: dict[str, None] = {}
        #: The verified raw JWT, kept only for ``requests.forward_token``.
        self.token: str | None = None
        self.overlapping = False
        self.dirty = False
        self.paused = False
        self.paused_since = 0.0
        self.closing_since = 0.0
        self.last_rx = self.opened_at = time.monotonic()
        self.state = OPEN
        self.warned = False
        transport.set_write_buffer_limits(high=settings.outbox.write_buffer_high)

    # -- asyncio.Protocol -------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.state != OPEN:
            return
        self.last_rx = time.monotonic()
        parser = self.parser
        before = parser.frames_seen
        try:
            frames = parser.feed(data)
        except websocket.ProtocolViolation as exc:
            self.close(exc.close_code, exc.reason)
            return
        if not self.bucket.take(parser.frames_seen - before, self.last_rx):
            self.close(Close.POLICY, "inbound rate limit")
            return
        for opcode, payload in frames:
            if self.state != OPEN:
                return
            if opcode == websocket.OP_TEXT:
                self.on_text(payload)
            elif opcode == websocket.OP_BINARY:
                self.close(Close.UNSUPPORTED_DATA, "binary frames are not supported")
            elif opcode == websocket.OP_PING:
                self.send_control(websocket.pong_frame(payload))
            elif opcode == websocket.OP_CLOSE:
                code, _ = websocket.parse_close_payload(payload)
                self.close(Close.NORMAL if code is None else code, "", by_client=True)

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        queue = self.queue
        if self.state == OPEN and (len(queue) or queue.dropped):
            self.hub.mark_dirty(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSED:
            if self.state == OPEN:
                metrics.DISCONNECTS.labels("1006").inc()
                logs.connection_event(log, "connection closed", self, 1006, str(exc or "peer gone"))
            self.state = CLOSED
            self.gateway.forget(self)

    # -- inbound ops ------------------------------------------------------
    def on_text(self, payload: bytes) -> None:
        ops = protocol.decode_client_frame(payload)
        if len(ops) > 1 and not self.bucket.take(len(ops) - 1, self.last_rx):
            self.close(Close.POLICY, "inbound rate limit")
            return
        replies: list[bytes] = []
        for op in ops:
            reply = self.gateway.handle(self, op)
            if reply is not None:
                replies.append(reply)
            if self.state != OPEN:
                return
        if replies:
            self.send_control(
                websocket.text_frame(replies[0] if len(replies) == 1 else protocol.batch(replies))
            )

    def add_sub(self, pattern: str) -> None:
        if not self.overlapping:
            self.overlapping = any(subjects.intersects(pattern, p) for p in self.subs)
        self.subs[pattern] = None
        self.hub.subscribe(self, pattern)

    def remove_sub(self, pattern: str) -> None:
        del self.subs[pattern]
        self.hub.unsubscribe(self, pattern)
        if self.overlapping:
            pats = list(self.subs)
            self.overlapping = any(
                subjects.intersects(a, b) for i, a in enumerate(pats) for b in pats[i + 1 :]
            )

    def canonical_pattern(self, subject: str) -> str | None:
        """The one subscription that delivers ``subject`` when several match (sorted first)."""
        return min((p for p in self.subs if subjects.matches(p, subject)), default=None)

    # -- outbound ---------------------------------------------------------
    def flush(self) -> int:
        """Write everything pending in one write; returns the number of messages written.

        While the transport is backed up nothing is written, and a shared part of
        a batch becomes this client's own (under its caps): the batch is reused
        after this flush cycle.
        """
        if self.state != OPEN:
            return 0
        queue = self.queue
        if self.paused:
            if queue.shared is not None:
                self.hub.settle(self)
            return 0
        n = len(queue)
        if n or queue.dropped:
            self.transport.write(queue.drain(_drop_notice))
        return n

    def send_control(self, frame: bytes) -> None:
        """Replies and notices: written at once (bounded by the inbound rate limit)."""
        if self.state == OPEN:
            self.transport.write(frame)

    def close(self, code: int, reason: str, *, by_client: bool = False) -> None:
        """Send a close frame and let the transport flush; the sweep aborts laggards.

        ``by_client``: the client closed with ``code`` (echoed back, as RFC 6455
        asks). Its code is its own choice (any of 1000-4999): one metric label
        (``client``) for all of them keeps the series bounded, and it is never
        logged as the gateway's error.
        """
        if self.state != OPEN:
            return
        self.state = CLOSING
        self.closing_since = time.monotonic()
        logs.connection_event(
            log, "connection closed", self, code, "by client" if by_client else reason
        )
        if by_client:
            metrics.DISCONNECTS.labels("client").inc()
        else:
            metrics.DISCONNECTS.labels(str(code)).inc()
            err = CLOSE_REASON_CODE.get(Close(code)) if code in Close._value2member_map_ else None
            if err is not None or code >= 4000:
                self.gateway.client_log.log(
                    log,
                    "closing connection",
                    conn=self.conn_id,
                    close_code=code,
                    code=err,
                    reason=reason,
                )
        self.transport.write(websocket.close_frame(code, reason))
        self.transport.close()
        self.gateway.forget(self, closing=True)


def _drop_notice(subject: str, count: int) -> bytes:
    return websocket.text_frame(protocol.dropped(subject, count))
