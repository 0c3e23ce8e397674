"""NATS messages → client outboxes → one write per dirty client per loop iteration.

The hot path: a NATS message is encoded once (JSON body and WebSocket frame
header), the shared bytes are appended to every recipient's outbox, and a
single flush callback per loop iteration writes each dirty client's pending
frames with one ``transport.write``. No await per client, no per-recipient
encoding. Counts are plain ints, moved into Prometheus once per sweep.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from fanout import metrics
from fanout.core import outbox, protocol, subjects, websocket
from fanout.core.interest import SubjectRouter
from fanout.errors import Close, Code
from fanout.settings import Settings

if TYPE_CHECKING:
    from fanout.worker.connection import WsConnection
    from fanout.worker.nats_link import NatsLink

log = logging.getLogger("fanout.hub")


class Hub:
    """Owns the worker's clients, their subscriptions and the flush schedule."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.router: SubjectRouter[WsConnection] = SubjectRouter()
        self.connections: set[WsConnection] = set()
        self.link: NatsLink | None = None
        self.dirty: list[WsConnection] = []
        self.flush_scheduled = False
        self.write_delay_s = settings.outbox.write_delay_ms / 1000.0
        self.max_batch = settings.outbox.max_batch
        self._policies: dict[str, int] = {}
        self.subscription_count = 0
        self.nats_up = False
        self.forwarded = 0
        self.nats_messages = 0
        self.dropped = [0, 0, 0]
        self.slow_consumers = 0
        self._status_up = websocket.text_frame(protocol.status("up"))
        self._status_down = websocket.text_frame(protocol.status("down"))

    def policy_for(self, pattern: str) -> int:
        """The outbox policy for a NATS subscription: first configured pattern covering it."""
        policy = self._policies.get(pattern)
        if policy is None:
            name = self.settings.outbox.policy
            for configured, configured_policy in self.settings.outbox.policies.items():
                if subjects.is_subset(pattern, configured):
                    name = configured_policy
                    break
            policy = self._policies[pattern] = outbox.POLICIES[name]
        return policy

    def subscribe(self, conn: WsConnection, pattern: str) -> None:
        self.subscription_count += 1
        if self.router.add(conn, pattern) and self.link is not None:
            self.link.want(pattern)

    def unsubscribe(self, conn: WsConnection, pattern: str) -> None:
        self.subscription_count -= 1
        if self.router.remove(conn, pattern):
            self._policies.pop(pattern, None)
            if self.link is not None:
                self.link.unwant(pattern)

    def add(self, conn: WsConnection) -> None:
        self.connections.add(conn)

    def remove(self, conn: WsConnection) -> None:
        self.connections.discard(conn)
        for pattern in list(conn.subs):
            self.unsubscribe(conn, pattern)
        conn.subs.clear()

    def on_nats_message(self, pattern: str, msg: Msg) -> None:
        """NATS callback: O(recipients) appends of one shared frame, then one scheduled flush."""
        self.nats_messages += 1
        subscribers = self.router.subscribers(pattern)
        if not subscribers:
            return
        subject = msg.subject
        item = (subject, websocket.text_frame(protocol.encode_msg(subject, msg.data, msg.headers)))
        policy = self.policy_for(pattern)
        dirty = self.dirty
        max_batch = self.max_batch
        for conn in subscribers:
            if conn.overlapping and conn.canonical_pattern(subject) != pattern:
                continue
            queue = conn.queue
            result = queue.push(item, policy, conn.paused)
            if result:
                if result == outbox.CUT:
                    self.cut_slow_consumer(conn, "outbox full")
                    continue
                self.dropped[policy] += 1
            if not conn.dirty:
                conn.dirty = True
                dirty.append(conn)
            elif len(queue) >= max_batch and not conn.paused:
                conn.flush()
        if not self.flush_scheduled:
            self.flush_scheduled = True
            if self.write_delay_s:
                self.loop.call_later(self.write_delay_s, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty client's pending frames, one write each."""
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        forwarded = 0
        for conn in dirty:
            conn.dirty = False
            forwarded += conn.flush()
        self.forwarded += forwarded

    def cut_slow_consumer(self, conn: WsConnection, reason: str) -> None:
        self.slow_consumers += 1
        log.warning(
            "slow consumer disconnected",
            extra={"code": Code.BACKPRESSURE, "conn": conn.conn_id, "reason": reason},
        )
        conn.close(Close.SLOW_CONSUMER, "slow consumer")

    def on_nats_status(self, up: bool) -> None:
        if up == self.nats_up:
            return
        self.nats_up = up
        frame = self._status_up if up else self._status_down
        close_when_down = self.settings.nats.disconnect_clients_when_down
        for conn in list(self.connections):
            if not up and close_when_down:
                conn.close(Close.NATS_UNAVAILABLE, "NATS unavailable")
            else:
                conn.send_control(frame)

    def publish_counts(self) -> None:
        """Move the hot-path counters into Prometheus (called once per sweep)."""
        if self.forwarded:
            metrics.FORWARDED.inc(self.forwarded)
            self.forwarded = 0
        if self.nats_messages:
            metrics.NATS_MESSAGES.inc(self.nats_messages)
            self.nats_messages = 0
        for policy, count in enumerate(self.dropped):
            if count:
                metrics.DROPPED.labels(outbox.POLICY_NAMES[policy]).inc(count)
                self.dropped[policy] = 0
        if self.slow_consumers:
            metrics.SLOW_CONSUMERS.inc(self.slow_consumers)
            self.slow_consumers = 0
        queued = [len(c.queue) for c in self.connections]
        metrics.SEND_QUEUE.set(sum(queued))
        metrics.SEND_QUEUE_MAX.set(max(queued, default=0))
        metrics.ACTIVE_CONNECTIONS.set(len(self.connections))
        metrics.SUBSCRIPTIONS.set(self.subscription_count)
        metrics.NATS_SUBSCRIPTIONS.set(len(self.router))
