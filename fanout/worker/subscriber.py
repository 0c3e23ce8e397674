"""The narrow interfaces between a client connection and the hub, so neither imports the other.

The hub delivers to a :class:`Subscriber`: a few fields it reads and writes on
the hot path (the outbox, the dirty flag, the backed-up flag) and the calls it
makes (flush, close, control frames). A connection asks the hub through
:class:`SubscriptionBroker`. :class:`fanout.worker.connection.WsConnection`
satisfies the first, :class:`fanout.worker.hub.Hub` the second; only the
gateway, which builds both, knows the concrete classes. The import graph
among ``fanout.worker`` modules stays acyclic (``tests/unit/test_layering.py``).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from fanout.core.history import Reason, Resume
from fanout.core.outbox import ClientQueue


class Subscriber(Protocol):
    """What the hub and recovery need of a client."""

    conn_id: str
    queue: ClientQueue
    subs: dict[str, None]
    #: Queued in the hub's dirty list for the next flush (set and cleared by the hub).
    dirty: bool
    #: The transport is above its high-water mark: nothing is written until it drains.
    paused: bool
    replies: Replies | None
    transport: asyncio.Transport

    def __hash__(self) -> int: ...

    @property
    def state(self) -> int: ...

    def flush(self) -> int: ...

    def close(self, code: int, reason: str) -> None: ...

    def send_control(self, frame: bytes) -> None: ...

    def send_replies(self, replies: list[bytes]) -> None: ...


class SubscriptionBroker(Protocol):
    """What a connection asks of the hub."""

    loop: asyncio.AbstractEventLoop

    def subscribe(
        self, conn: Subscriber, pattern: str, op_id: int, resume: Resume | Reason | None = None
    ) -> bytes | None: ...

    def unsubscribe(self, conn: Subscriber, pattern: str) -> None: ...

    def release_acks(self, conn: Subscriber) -> None: ...

    def cut_slow_consumer(self, conn: Subscriber, reason: str) -> None: ...

    def reply_after_queued(self, conn: Subscriber, frame: bytes) -> None: ...


class Replies:
    """The replies of one inbound frame, in op order, sent as one frame once complete.

    A ``sub`` whose pattern is not live yet reserves its slot (:meth:`defer`);
    the hub fills it when nats-server has confirmed the subscription.
    """

    __slots__ = ("conn", "open", "replies", "waiting")

    def __init__(self, conn: Subscriber) -> None:
        self.conn = conn
        self.replies: list[bytes] = []
        self.waiting = 0
        self.open = True

    def defer(self) -> int:
        self.waiting += 1
        self.replies.append(b"")
        return len(self.replies) - 1

    def fill(self, index: int, reply: bytes) -> None:
        self.replies[index] = reply
        self.waiting -= 1
        if not (self.open or self.waiting):
            self._send()

    def done(self) -> None:
        """Every op of the frame ran."""
        self.open = False
        if not self.waiting:
            self._send()

    def _send(self) -> None:
        replies, self.replies = self.replies, []
        if replies:
            self.conn.send_replies(replies)
