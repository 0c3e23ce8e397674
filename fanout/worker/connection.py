"""One client's WebSocket after the upgrade: a lean ``asyncio.Protocol``.

No task and no timer per connection (the worker's sweep does pings, idle,
write-stall and closing-handshake deadlines), ``__slots__`` everywhere: memory
per idle connection decides how many clients a worker holds. The WebSocket
rules (:class:`fanout.core.wsconnection.WsProtocol`), the JSON protocol, ACL
and outbox rules live in ``fanout.core``; this class only wires them to the
transport, the hub (:class:`~fanout.worker.subscriber.SubscriptionBroker`) and the
callbacks it is given (:class:`Events`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from fanout import logs, metrics
from fanout.core import protocol, websocket
from fanout.core.acl import SubjectAcl
from fanout.core.auth import Principal
from fanout.core.history import Reason, Resume
from fanout.core.outbox import ClientQueue
from fanout.core.protocol import FrameError
from fanout.core.ratelimit import TokenBucket
from fanout.core.wsconnection import CLOSED, OPEN, Closing, WsProtocol
from fanout.errors import CLOSE_REASON_CODE, Close
from fanout.logs import ClientEventLog
from fanout.settings import Settings
from fanout.worker.subscriber import Replies, SubscriptionBroker

log = logging.getLogger("fanout.conn")

#: Ops run per loop turn: a 1000-op frame must not hold the loop (other clients wait).
OPS_PER_TURN = 64

__all__ = ["OPEN", "Events", "WsConnection"]


@dataclass(frozen=True, slots=True)
class Events:
    """Where a connection hands its ops and reports what happens to it.

    Built once per worker and shared by every connection (one slot each): the
    connection imports neither the gateway nor the hub.
    """

    #: Run one client op; its reply, or None (sent later or not at all).
    handle: Callable[[WsConnection, protocol.ClientOp | FrameError], bytes | None]
    #: The transport drained below its low-water mark (frames may be pending, or a replay).
    writable: Callable[[WsConnection], None]
    #: The closing handshake started (True) or the socket is gone (False).
    closed: Callable[[WsConnection, bool], None]
    #: Rate-limited log of what the gateway did to a client.
    client_log: ClientEventLog


class WsConnection(asyncio.Protocol):
    __slots__ = (
        "acl",
        "backlog",
        "conn_id",
        "dirty",
        "events",
        "hub",
        "last_rx",
        "opened_at",
        "paused",
        "paused_since",
        "peer",
        "principal",
        "queue",
        "replies",
        "subs",
        "token",
        "transport",
        "warned",
        "ws",
    )

    def __init__(
        self,
        settings: Settings,
        hub: SubscriptionBroker,
        events: Events,
        transport: asyncio.Transport,
        conn_id: str,
        peer: str,
        principal: Principal | None,
        acl: SubjectAcl,
    ) -> None:
        self.hub = hub
        self.events = events
        self.transport = transport
        self.conn_id = conn_id
        self.peer = peer
        self.principal = principal
        self.acl = acl
        self.ws = WsProtocol(
            settings.ws.max_frame_bytes,
            TokenBucket(settings.ws.inbound_rate, settings.ws.inbound_burst),
        )
        self.queue = ClientQueue(settings.outbox.max_messages, settings.outbox.max_bytes)
        self.subs: dict[str, None] = {}
        #: The verified raw JWT, kept only for ``requests.forward_token``.
        self.token: str | None = None
        #: Frames whose ops still have to run, a slice per loop turn (see ``on_text``);
        #: while there are any, no further event is taken from ``ws``.
        self.backlog: deque[deque[protocol.ClientOp | FrameError]] | None = None
        #: The replies of the frame whose ops are running.
        self.replies: Replies | None = None
        self.dirty = False
        self.paused = False
        self.paused_since = 0.0
        self.last_rx = self.opened_at = time.monotonic()
        self.warned = False
        transport.set_write_buffer_limits(high=settings.outbox.write_buffer_high)

    @property
    def state(self) -> int:
        """``OPEN``, ``CLOSING`` or ``CLOSED`` (:mod:`fanout.core.wsconnection`)."""
        return self.ws.state

    @property
    def closing_since(self) -> float:
        return self.ws.closing_since

    # -- asyncio.Protocol -------------------------------------------------
    def data_received(self, data: bytes) -> None:
        """Also while CLOSING: the peer's data is read (and discarded) until its close frame."""
        ws = self.ws
        if ws.state == CLOSED:
            return
        self.last_rx = now = time.monotonic()
        ws.receive_data(data, now)
        self._take_events(now)

    def _take_events(self, now: float) -> None:
        """Handle the events in order while no ops wait, then write what the protocol queued."""
        ws = self.ws
        while self.backlog is None:
            event = ws.next_event(now)
            if event is None:
                break
            if type(event) is bytes:
                self.on_text(event)
            else:
                assert isinstance(event, Closing)
                if event.by_peer:
                    self._closed(event.code, "", by_client=True)
                else:
                    self.close(event.code, event.reason)
        self._write_out()

    def _write_out(self) -> None:
        ws = self.ws
        out = ws.data_to_send()
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if ws.state == CLOSED:
            self.transport.close()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_since = time.monotonic()

    def resume_writing(self) -> None:
        self.paused = False
        if self.ws.state == OPEN:
            self.events.writable(self)

    def connection_lost(self, exc: Exception | None) -> None:
        ws = self.ws
        if ws.state == OPEN:
            metrics.DISCONNECTS.labels("1006").inc()
            logs.connection_event(log, "connection closed", self, 1006, str(exc or "peer gone"))
        ws.receive_eof()
        self.backlog = None
        self.events.closed(self, False)

    # -- inbound ops ------------------------------------------------------
    def on_text(self, payload: bytes) -> None:
        """Run a frame's ops in order; a long frame runs in slices that yield to the loop.

        The replies of one frame go out together, in op order, in one frame; a
        ``sub`` ack that waits for its pattern to be live holds them back until
        it is released (see :class:`Replies`).
        """
        ops = protocol.decode_client_frame(payload)
        if len(ops) > 1:
            closing = self.ws.charge(len(ops) - 1, self.last_rx)
            if closing is not None:
                self.close(closing.code, closing.reason)
                return
        if len(ops) > OPS_PER_TURN:
            self.backlog = deque([deque(ops)])
            self._work()
            return
        group = self.replies = Replies(self)
        handle = self.events.handle
        for op in ops:
            reply = handle(self, op)
            if reply is not None:
                group.replies.append(reply)
            if self.ws.state != OPEN:
                return
        self.replies = None
        group.done()

    def _work(self) -> None:
        """Up to OPS_PER_TURN ops of the backlog, then yield (``call_soon``) until it is done;
        then the events that arrived meanwhile."""
        backlog = self.backlog
        if backlog is None:
            return
        budget = OPS_PER_TURN
        handle = self.events.handle
        while budget and backlog:
            if self.ws.state != OPEN:
                self.backlog = None
                return
            ops = backlog[0]
            group = self.replies
            if group is None:
                group = self.replies = Replies(self)
            while ops and budget:
                budget -= 1
                reply = handle(self, ops.popleft())
                if reply is not None:
                    group.replies.append(reply)
                if self.ws.state != OPEN:
                    self.backlog = None
                    return
            if not ops:
                backlog.popleft()
                self.replies = None
                group.done()
        if backlog:
            self.hub.loop.call_soon(self._work)
        else:
            self.backlog = None
            self._take_events(time.monotonic())

    def send_replies(self, replies: list[bytes]) -> None:
        """Replies follow the messages queued before them (after an ``unsub`` ack nothing of
        that pattern may come): at once when nothing is queued, else behind the queue."""
        if self.ws.state != OPEN:
            return
        frame = websocket.text_frame(replies[0] if len(replies) == 1 else protocol.batch(replies))
        if self.queue.idle():
            self.transport.write(frame)
        else:
            self.hub.reply_after_queued(self, frame)

    def add_sub(
        self, pattern: str, op_id: int, resume: Resume | Reason | None = None
    ) -> bytes | None:
        """Subscribe; the ack when live at once, else None (the hub sends it later)."""
        self.subs[pattern] = None
        return self.hub.subscribe(self, pattern, op_id, resume)

    def remove_sub(self, pattern: str) -> None:
        del self.subs[pattern]
        self.hub.unsubscribe(self, pattern)

    # -- outbound ---------------------------------------------------------
    def flush(self) -> int:
        """Write everything pending in one write; returns the number of messages written.

        While the transport is backed up nothing is written (the hub settles a
        shared part of a batch before it reuses the batch).
        """
        if self.ws.state != OPEN or self.paused:
            return 0
        queue = self.queue
        n = len(queue)
        if n or queue.dropped:
            self.transport.write(queue.drain(_drop_notice))
        return n

    def send_control(self, frame: bytes) -> None:
        """Replies and notices: written at once (bounded by the inbound rate limit)."""
        if self.ws.state == OPEN:
            self.transport.write(frame)

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake: the close frame goes out, the socket stays open
        (reading and discarding) until the client's close frame; the sweep cuts it
        after ``CLOSE_TIMEOUT_S``. Sub acks still waiting for NATS go out first: the
        client gets an answer to every op it sent before the close."""
        ws = self.ws
        if ws.state != OPEN:
            return
        self.hub.release_acks(self)
        # the queued messages are never sent now; the replies held behind them are
        held = self.queue.take_held()
        if held:
            self.transport.write(b"".join(held))
        ws.close(code, reason, time.monotonic())
        self._closed(code, reason, by_client=False)
        self._write_out()

    def _closed(self, code: int, reason: str, *, by_client: bool) -> None:
        """Count and log a close the protocol has just started.

        ``by_client``: the client closed with ``code`` (echoed back). Its code is
        its own choice (any of 1000-4999): one metric label (``client``) for all
        of them keeps the series bounded, and it is never logged as the
        gateway's error.
        """
        self.backlog = None
        logs.connection_event(
            log, "connection closed", self, code, "by client" if by_client else reason
        )
        if by_client:
            metrics.DISCONNECTS.labels("client").inc()
        else:
            metrics.DISCONNECTS.labels(str(code)).inc()
            err = CLOSE_REASON_CODE.get(Close(code)) if code in Close._value2member_map_ else None
            if err is not None or code >= 4000:
                self.events.client_log.log(
                    log,
                    "closing connection",
                    conn=self.conn_id,
                    close_code=code,
                    code=err,
                    reason=reason,
                )
        self.events.closed(self, True)


def _drop_notice(subject: str, count: int) -> bytes:
    return websocket.text_frame(protocol.dropped(subject, count))
