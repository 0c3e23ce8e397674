"""Replays written at their clients' pace (protocol v1.2 recovery).

A replay of up to ``max_replay`` messages need not fit in a client's outbox: it
goes in while the client's transport takes it and waits whenever the transport
backs up (the connection reports the drain), then the live messages held for
the client meanwhile go out the same way, then the ack. A client that stops
reading is cut by the write stall (``outbox.write_timeout_s``, 4003) or by its
held live messages overflowing, so the worker never holds more for it than the
read it already has, half an outbox and the held messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fanout.core import outbox
from fanout.core.history import Seam
from fanout.core.wsconnection import OPEN
from fanout.worker.channel import Channel, Resuming
from fanout.worker.subscriber import Subscriber


class Outlet(Protocol):
    """What a replay needs of the hub: the general delivery path and the slow-consumer cut."""

    def enqueue(self, conn: Subscriber, item: outbox.Pending, policy: int) -> bool: ...

    def cut_slow_consumer(self, conn: Subscriber, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class Replay:
    """A resume's replay being written at the client's pace; its ack waits for the end."""

    r: Resuming
    channel: Channel
    messages: list[tuple[int, outbox.Pending]]
    epoch: str
    top: int | None
    #: The live messages held meanwhile (None: none were, the sub was plain).
    seam: Seam[outbox.Pending] | None
    #: The next message to write, and the last sequence written.
    index: int = 0
    last: int = 0
    #: The replay goes under ``disconnect``; the held live messages after it under
    #: their subscription's policy.
    policy: int = outbox.DISCONNECT


class Replays:
    """The replays waiting for their clients' transports to drain, by client."""

    def __init__(
        self,
        hub: Outlet,
        current: Callable[[Replay], bool],
        finished: Callable[[Replay], None],
    ) -> None:
        self.hub = hub
        #: Whether a replay's subscription still waits for it (not unsubscribed meanwhile).
        self._current = current
        #: Everything of a replay is written: its ack goes out.
        self._finished = finished
        self.waiting: dict[Subscriber, list[Replay]] = {}

    def start(self, p: Replay) -> None:
        self.waiting.setdefault(p.r.conn, []).append(p)
        self._pace(p)

    def stop(self, r: Resuming) -> None:
        """``r``'s subscription went before its replay was written."""
        for p in list(self.waiting.get(r.conn, ())):
            if p.r is r:
                self._paced(p)

    def running(self, r: Resuming) -> bool:
        """``r``'s replay is being written (its answer is under way)."""
        return any(p.r is r for p in self.waiting.get(r.conn, ()))

    def writable(self, conn: Subscriber) -> None:
        """``conn``'s transport drained: its replays go on."""
        for p in list(self.waiting.get(conn, ())):
            self._pace(p)

    def _pace(self, p: Replay) -> None:
        """Write ``p``'s replay, then the live messages held meanwhile, until the client's
        transport backs up (then wait for :meth:`writable`); the ack once all of it is
        written. The outbox is flushed whenever it holds half its caps."""
        r, channel = p.r, p.channel
        conn = r.conn
        if not self._current(p) or conn.state != OPEN:
            self._paced(p)  # unsubscribed or gone meanwhile (its ack went with forget)
            return
        hub, queue = self.hub, conn.queue
        while True:
            messages = p.messages
            while p.index < len(messages):
                if conn.paused:
                    return
                seq, item = messages[p.index]
                p.index += 1
                if hub.enqueue(conn, item, p.policy):
                    self._paced(p)
                    hub.cut_slow_consumer(conn, "outbox full during replay")
                    return
                p.last = seq
                if 2 * len(queue) >= queue.max_messages or 2 * queue.nbytes >= queue.max_bytes:
                    conn.flush()
            conn.flush()
            if conn.paused:
                return  # the ack follows what is written: wait for the drain
            held = p.seam.release(p.last) if p.seam is not None else []
            if not held:
                break
            p.messages, p.index, p.policy = held, 0, channel.policy
        self._paced(p)
        self._finished(p)

    def _paced(self, p: Replay) -> None:
        """``p`` is over (written, or its client left or was cut)."""
        conn = p.r.conn
        replays = self.waiting.get(conn)
        if replays is not None and p in replays:
            replays.remove(p)
            if not replays:
                del self.waiting[conn]
