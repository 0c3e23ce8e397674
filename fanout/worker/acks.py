"""Sub acks waiting for their NATS key to be live: an ack means nats-server has the SUB.

A ``sub`` whose key is not live yet reserves its reply slot; the ack fills it
when the link reports the key live (one coalesced PING/PONG per loop turn), or
at once when the client unsubscribes or closes first, or when NATS goes down
(the ``status`` down frame follows). A recoverable key's waiter is recovery's:
once live, recovery works out its answer (``recovered``, replay) and fills it.
"""

from __future__ import annotations

from fanout.core import history
from fanout.worker.channel import Resuming
from fanout.worker.recovery import Recovery
from fanout.worker.subscriber import Replies, Subscriber

#: (the client's replies, its slot, the ack, and for a recoverable key the sub recovery answers)
Waiter = tuple[Replies, int, bytes, Resuming | None]


class AckWaiters:
    """key → the sub acks waiting for it to be live."""

    __slots__ = ("by_key", "recovery")

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery
        self.by_key: dict[str, list[Waiter]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_key)

    def wait(self, key: str, waiter: Waiter) -> None:
        waiters = self.by_key.get(key)
        if waiters is None:
            self.by_key[key] = [waiter]
        else:
            waiters.append(waiter)

    def release(self, conn: Subscriber, key: str) -> None:
        """Plain acks of ``conn`` waiting for ``key`` go now (recovery fills its own)."""
        waiters = self.by_key.get(key)
        if waiters is not None:
            mine = [w for w in waiters if w[0].conn is conn]
            if mine:
                waiters[:] = [w for w in waiters if w[0].conn is not conn]
                for replies, index, ack, r in mine:
                    if r is None:
                        replies.fill(index, ack)

    def drop(self, key: str) -> None:
        """``key``'s NATS subscription goes (its last client left)."""
        self.by_key.pop(key, None)

    def live(self, keys: list[str]) -> None:
        """These keys are live: their acks go (recovery answers its own)."""
        for key in keys:
            for replies, index, ack, r in self.by_key.pop(key, ()):
                if r is None:
                    replies.fill(index, ack)
                else:
                    self.recovery.live(r)

    def release_all(self) -> None:
        """NATS went down: every waiting ack now; a resume cannot be served
        (``unavailable``), live delivery starts on reconnect."""
        for waiters in self.by_key.values():
            for replies, index, ack, r in waiters:
                if r is None:
                    replies.fill(index, ack)
                else:
                    self.recovery.answer(r, None, [], history.UNAVAILABLE if r.asked else None)
        self.by_key.clear()
