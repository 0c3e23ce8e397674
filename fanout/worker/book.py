"""Who holds which pattern: the worker's subscription bookkeeping, apart from the hot path.

A client's ``sub`` and ``unsub`` land here (the hub hands a connection's calls
straight over): the reference-counted router entry per NATS key and its
batch, the NATS interest the link is asked for (``want``/``unwant``), the sub
acks that wait for their key to be live (:mod:`fanout.worker.acks`), the
clients whose recoverable and plain patterns cross (:mod:`fanout.worker.mixing`),
and which outbox policy and NATS key a pattern gets. The hub reads the same
router, batches and mixes per message; it never changes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from fanout.core import history, outbox, protocol, subjects
from fanout.core.history import Reason, Resume
from fanout.core.interest import SubjectRouter
from fanout.core.wsconnection import OPEN
from fanout.settings import Settings
from fanout.worker.acks import AckWaiters
from fanout.worker.channel import Resuming
from fanout.worker.mixing import Mixes
from fanout.worker.recovery import Recovery
from fanout.worker.replay import Outlet
from fanout.worker.subscriber import Subscriber

if TYPE_CHECKING:
    from fanout.worker.nats_link import NatsLink


class Outboxes(Outlet, Protocol):
    """What the book needs of the hub: the link and its state, and the client outboxes
    (a shared batch part settled, the general delivery path, a flush)."""

    link: NatsLink | None
    nats_up: bool

    def settle(self, conn: Subscriber) -> bool: ...

    def schedule_flush(self) -> None: ...


class SubscriptionBook:
    """The worker's subscriptions: router, batches, NATS interest, waiting acks, mixes."""

    def __init__(self, settings: Settings, hub: Outboxes, recovery: Recovery) -> None:
        self.hub = hub
        self.recovery = recovery
        self.router: SubjectRouter[Subscriber] = SubjectRouter()
        self.batches: dict[str, outbox.Batch] = {}
        self.subscription_count = 0
        #: The sub acks waiting for their key to be live (an ack means live).
        self.waiting = AckWaiters(recovery)
        #: Clients holding crossing recoverable and plain patterns (:mod:`fanout.core.mixed`):
        #: their mixes, and the NATS keys they hold (those take the general path).
        self.mixed = Mixes(recovery)
        self.mixes = self.mixed.mixes
        #: Read on every sub and unsub: the configuration, resolved once.
        self._recoverable = bool(recovery.streams)
        self._policies = [(p, outbox.POLICIES[n]) for p, n in settings.outbox.policies.items()]
        self._default_policy = outbox.POLICIES[settings.outbox.policy]

    def policy_for(self, pattern: str) -> int:
        """The outbox policy for a NATS subscription: first configured pattern covering it."""
        for configured, policy in self._policies:
            if subjects.is_subset(pattern, configured):
                return policy
        return self._default_policy

    def key_of(self, pattern: str) -> str:
        """The NATS subject for a client pattern: its republished subject when recoverable."""
        return self.recovery.key_of(pattern) if self._recoverable else pattern

    def subscribe(
        self, conn: Subscriber, pattern: str, op_id: int, resume: Resume | Reason | None = None
    ) -> bytes | None:
        """Add a subscription; its ack when it is live now, else None (sent later).

        The ack waits until the link reports the pattern live (``Hub.became_live``):
        an ack means nats-server has the subscription. While NATS is down the ack
        is immediate (the client has the ``status`` down frame; delivery starts on
        reconnect). ``resume``: the sub's ``since``/``last`` (v1.2), or the reason it
        cannot be recovered whatever the stream holds.
        """
        key = self.key_of(pattern)
        if key != pattern:
            return self._subscribe_history(conn, pattern, key, op_id, resume)
        ack = protocol.ack(op_id) if resume is None else self.recovery.no_history(op_id)
        self.subscription_count += 1
        hub = self.hub
        link = hub.link
        if self.router.add(conn, pattern):
            self.batches[pattern] = outbox.Batch(self.policy_for(pattern))
            live = link is None or link.want(pattern)
        else:
            live = link is None or link.is_live(pattern)
        if conn.queue.shared is not None:
            hub.settle(conn)
        self.mixed.added_plain(conn, pattern)
        replies = conn.replies
        if live or not hub.nats_up or replies is None:
            return ack
        self.waiting.wait(pattern, (replies, replies.defer(), ack, None))
        return None

    def _subscribe_history(
        self, conn: Subscriber, pattern: str, key: str, op_id: int, resume: Resume | Reason | None
    ) -> bytes | None:
        """A recoverable pattern: subscribed under ``key``; recovery answers once it is live."""
        self.subscription_count += 1
        hub = self.hub
        link = hub.link
        if self.router.add(conn, key):
            self.recovery.open(key, pattern, self.policy_for(pattern))
            live = link is None or link.want(key)
        else:
            live = link is None or link.is_live(key)
        hub.settle(conn)
        replies = conn.replies
        if replies is None:
            self.mixed.added_recoverable(conn, pattern, True)
            return protocol.ack(op_id)
        slot = replies.defer()
        if isinstance(resume, str):
            r = Resuming(conn, key, op_id, replies, slot, None, resume)
        else:
            r = Resuming(conn, key, op_id, replies, slot, resume)
        self.recovery.begin(r)
        self.mixed.added_recoverable(conn, pattern, r.resume is not None)
        if live:
            self.recovery.live(r)
        elif not hub.nats_up:
            self.recovery.answer(r, None, [], history.UNAVAILABLE if r.asked else None)
        else:
            self.waiting.wait(key, (replies, r.slot, protocol.ack(op_id), r))
        return None

    def unsubscribe(self, conn: Subscriber, pattern: str) -> None:
        """Nothing more for ``pattern`` reaches ``conn`` after this (its sub ack goes first)."""
        key = self.key_of(pattern)
        self.waiting.release(conn, key)
        self._drop(conn, pattern, key)
        if conn.queue.shared is not None:
            self.hub.settle(conn)

    def release_acks(self, conn: Subscriber) -> None:
        """``conn`` is closing: its acks waiting for a pattern (or for recovery's answer)
        go now, before its close frame."""
        if not (self.waiting or self.recovery.channels):
            return
        for pattern in conn.subs:
            key = self.key_of(pattern)
            if self.waiting:
                self.waiting.release(conn, key)
            if key != pattern:
                self.recovery.forget(conn, key)

    def remove(self, conn: Subscriber) -> None:
        """``conn`` is closing or gone: its subscriptions go, its shared batch part too."""
        conn.queue.shared = None
        for pattern in list(conn.subs):
            self._drop(conn, pattern, self.key_of(pattern))
        conn.subs.clear()
        self.mixed.gone(conn)

    def _drop(self, conn: Subscriber, pattern: str, key: str) -> None:
        """One subscription of ``conn`` goes; the NATS one (``key``) too when it was the last."""
        self.subscription_count -= 1
        if key != pattern:
            self.recovery.forget(conn, key)
        if key != pattern or self.mixes:
            self._released(conn, self.mixed.dropped(conn, pattern, key != pattern))
        if self.router.remove(conn, key):
            self.batches.pop(key, None)
            self.waiting.drop(key)
            if key != pattern:
                self.recovery.close(key)
            link = self.hub.link
            if link is not None:
                link.unwant(key)

    def _released(self, conn: Subscriber, items: list[outbox.Pending]) -> None:
        """Plain copies ``conn`` skipped for a recoverable pattern it just left: delivered now."""
        if items and conn.state == OPEN:
            hub = self.hub
            for item in items:
                if hub.enqueue(conn, item, self.policy_for(item[0])):
                    hub.cut_slow_consumer(conn, "outbox full")
                    return
            hub.schedule_flush()
