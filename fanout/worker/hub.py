"""NATS messages → client outboxes → one write per dirty client per loop iteration.

The hot path: a NATS message is encoded once (JSON body and WebSocket frame
header) into its subscription's :class:`~fanout.core.outbox.Batch`. Idle,
writable recipients share the batch (no per-client append); the others get
the shared bytes appended to their own outbox. A single flush callback per loop
iteration writes each dirty client's pending frames with one
``transport.write`` — the same joined bytes object for every client sharing a
batch from its start. No await per client, no per-recipient encoding. Counts
are plain ints, moved into Prometheus once per sweep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

from fanout import metrics
from fanout.core import history, outbox, protocol, websocket
from fanout.core.history import Seam
from fanout.core.overlap import Overlaps, Route
from fanout.errors import Close, Code
from fanout.settings import Settings
from fanout.worker.book import SubscriptionBook
from fanout.worker.channel import Channel
from fanout.worker.history import HistoryReader
from fanout.worker.recovery import JS_TIMEOUT_S, Recovery
from fanout.worker.subscriber import Subscriber

if TYPE_CHECKING:
    from fanout.worker.nats_link import NatsLink

log = logging.getLogger("fanout.hub")


class Hub:
    """Owns the delivery of NATS messages to the worker's clients and the flush schedule."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        #: Every open client of the worker: the gateway's set, which it admits to and
        #: removes from (read here for status frames and counts).
        self.connections: AbstractSet[Subscriber] = frozenset()
        self.link: NatsLink | None = None
        self.active: list[outbox.Batch] = []
        self.dirty: list[Subscriber] = []
        self.flush_scheduled = False
        self.write_delay_s = settings.outbox.write_delay_ms / 1000.0
        self.max_batch = settings.outbox.max_batch
        self.max_batch_bytes = settings.outbox.max_bytes
        self.overlaps = Overlaps()
        #: Recoverable subscriptions (v1.2) live under the key ``<prefix>.<pattern>``.
        self.recovery = Recovery(settings, self, HistoryReader(self._nats_client, JS_TIMEOUT_S))
        #: Who holds which pattern is the book's (:mod:`fanout.worker.book`); the hub reads
        #: the same router, batches and mixes per message, and a connection's sub, unsub
        #: and close go straight to the book's methods (no extra call per op).
        self.book = book = SubscriptionBook(settings, self, self.recovery)
        self.router = book.router
        self.batches = book.batches
        self.waiting = book.waiting
        self.mixes = book.mixes
        self.crossing = book.mixed.crossing
        self.subscribe = book.subscribe
        self.unsubscribe = book.unsubscribe
        self.release_acks = book.release_acks
        self.remove = book.remove
        self.answered = book.mixed.answered
        self.settled = book.mixed.settled
        self.nats_up = False
        self.forwarded = 0
        self.nats_messages = 0
        self.dropped = [0, 0, 0]
        self.slow_consumers = 0
        #: Running totals and the largest outbox at the last publish, for the live view.
        self.forwarded_total = 0
        self.dropped_total = 0
        self.outbox_max = 0
        self._status_up = websocket.text_frame(protocol.status("up"))
        self._status_down = websocket.text_frame(protocol.status("down"))

    def _nats_client(self) -> Any:
        return None if self.link is None else self.link.nc

    # -- reports from the NATS link ------------------------------------------
    def subscribed(self, sid: int, pattern: str) -> Route:
        return self.overlaps.add(sid, pattern)

    def unsubscribing(self, route: Route) -> None:
        self.overlaps.drain(route)

    def removed(self, route: Route) -> None:
        self.overlaps.remove(route)

    def routes_lost(self) -> None:
        self.overlaps.clear()

    def became_live(self, patterns: list[str]) -> None:
        self.waiting.live(patterns)

    def settle(self, conn: Subscriber) -> bool:
        """A client's shared part of a batch becomes its own (its subscriptions changed,
        it got another subscription's frame, or it backed up); False when that cut it."""
        queue = conn.queue
        if queue.shared is None:
            return True
        policy = queue.shared.policy
        result = queue.settle(conn.paused)
        if result == outbox.CUT:
            self.cut_slow_consumer(conn, "outbox full")
            return False
        self.dropped[policy] += result
        return True

    def reply_after_queued(self, conn: Subscriber, frame: bytes) -> None:
        """``frame`` (replies) goes after the messages already queued for ``conn``: written
        with them now when its transport takes it, else when it drains."""
        if not self.settle(conn):
            return
        conn.queue.hold(frame)
        if not conn.paused:
            self.forwarded += conn.flush()

    def on_nats_message(
        self, route: Route, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """NATS callback: the frame is built once and shared; idle clients share the batch.

        Per recipient this is one attribute test when the client already shares
        the batch, a few when it starts to, and a queue append otherwise. A
        subscription that overlaps another one takes :meth:`_overlapping`.
        """
        self.nats_messages += 1
        if route.overlap or (self.crossing and route.pattern in self.crossing):
            self._overlapping(route, subject, data, headers)
            return
        pattern = route.pattern
        batch = self.batches.get(pattern)
        if batch is None:
            return
        item = (subject, websocket.text_frame(protocol.encode_msg(subject, data, headers)))
        self._share(pattern, batch, item)

    def _share(self, pattern: str, batch: outbox.Batch, item: outbox.Pending) -> None:
        """``item`` to every client of ``pattern``: idle ones share ``batch``, the others
        get it in their own queues; flush now if the batch is full, else once per turn."""
        if not batch.items:
            self.active.append(batch)
        batch.append(item)
        dirty = self.dirty
        cut: list[Subscriber] = []
        for conn in self.router.subscribers(pattern):
            queue = conn.queue
            shared = queue.shared
            if shared is batch:
                continue
            # ClientQueue.idle() and not backed up, inlined: this test runs per recipient
            # per message; share() runs once per recipient per flush cycle.
            if shared is None and not (
                conn.paused or queue.frames or queue.latest or queue.dropped
            ):
                queue.share(batch)
                if not conn.dirty:
                    conn.dirty = True
                    dirty.append(conn)
            elif self.enqueue(conn, item, batch.policy):
                cut.append(conn)
        for conn in cut:
            self.cut_slow_consumer(conn, "outbox full")
        if len(batch.items) >= self.max_batch or batch.nbytes >= self.max_batch_bytes:
            self.flush()
        else:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            if self.write_delay_s:
                self.loop.call_later(self.write_delay_s, self.flush)
            else:
                self.loop.call_soon(self.flush)

    def _overlapping(
        self, route: Route, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """One copy of a message several of the worker's subscriptions match, or of a
        pattern some client holds together with a recoverable one that crosses it.

        Only the delivering copy (see :mod:`fanout.core.overlap`) goes on, to the
        clients of every matching pattern, each once, through their own queues
        (never the shared batch: a client may get it via another pattern); a client
        whose recoverable pattern delivers the subject skips it (:mod:`fanout.core.mixed`).
        """
        routes = self.overlaps.select(route, subject, data) if route.overlap else [route]
        if routes is None:
            return
        item: outbox.Pending | None = None
        seen: set[Subscriber] = set()
        cut: list[Subscriber] = []
        mixes = self.mixes
        for matching in routes:
            batch = self.batches.get(matching.pattern)
            if batch is None:
                continue
            for conn in self.router.subscribers(matching.pattern):
                if conn in seen:
                    continue
                seen.add(conn)
                if item is None:
                    frame = protocol.encode_msg(subject, data, headers)
                    item = (subject, websocket.text_frame(frame))
                mix = mixes.get(conn) if mixes else None
                if mix is None:
                    now = item
                else:
                    due = mix.plain_copy(subject, data, item)
                    if due is None:
                        continue  # its recoverable pattern delivers it
                    now = due
                if self.enqueue(conn, now, batch.policy):
                    cut.append(conn)
        for conn in cut:
            self.cut_slow_consumer(conn, "outbox full")
        if item is not None:
            self.schedule_flush()

    def on_history_message(self, route: Route, subject: str, data: bytes, headers: bytes) -> None:
        """A republished message of a recoverable key (v1.2): its ``msg`` carries ``seq``.

        The stream sequence is read from the raw header block; the message goes into
        the key's window, then as on the plain path (idle clients share the key's
        batch) unless some clients' replay is being prepared: those hold it (the seam).
        """
        self.nats_messages += 1
        parsed = history.sequence_of(headers) if headers else None
        if parsed is None:
            return  # published on the republish subject by someone else: not the stream's
        seq, previous = parsed
        recovery = self.recovery
        mixed = bool(self.crossing) and route.pattern in self.crossing
        if not route.overlap:
            channel = recovery.channels.get(route.pattern)
            if channel is None:
                return
            original = recovery.streams.original(subject)
            item = recovery.item(original, seq, data, history.user_headers(headers))
            holding = recovery.on_live(channel, seq, previous, item)
            if not (holding or mixed):
                self._share(route.pattern, channel.batch, item)
                return
            self._hold_or_enqueue([(channel, holding)], seq, item, data)
            return
        selected = self.overlaps.select(route, subject, data)
        if selected is None:
            return
        original = recovery.streams.original(subject)
        item = recovery.item(original, seq, data, history.user_headers(headers))
        targets = []
        for matching in selected:
            channel = recovery.channels.get(matching.pattern)
            if channel is not None:
                targets.append((channel, recovery.on_live(channel, seq, previous, item)))
        self._hold_or_enqueue(targets, seq, item, data)

    def _hold_or_enqueue(
        self,
        targets: list[tuple[Channel, dict[Subscriber, Seam[outbox.Pending]]]],
        seq: int,
        item: outbox.Pending,
        data: bytes,
    ) -> None:
        """The general path of a recoverable message: each client of the matching keys once,
        held while its replay is prepared, else through its own queue; not to a client
        a plain pattern of which delivered it (:mod:`fanout.core.mixed`)."""
        seen: set[Subscriber] | None = set() if len(targets) > 1 else None
        cut: list[Subscriber] = []
        mixes = self.mixes
        for channel, holding in targets:
            for conn in self.router.subscribers(channel.key):
                if seen is not None:
                    if conn in seen:
                        continue
                    seen.add(conn)
                if mixes:
                    mix = mixes.get(conn)
                    if mix is not None:
                        deliver = mix.republished(item[0], data, seq)
                        if mix.settled:
                            self.settled(conn, mix)
                        if not deliver:
                            continue
                seam = holding.get(conn) if holding else None
                if seam is not None:
                    seam.hold(seq, item)
                    if seam.overflow:
                        cut.append(conn)
                elif self.enqueue(conn, item, channel.policy):
                    cut.append(conn)
        for conn in cut:
            self.cut_slow_consumer(conn, "outbox full")
        self.schedule_flush()

    def enqueue(self, conn: Subscriber, item: outbox.Pending, policy: int) -> bool:
        """The general path: into the client's own queue. True when the client must be cut."""
        queue = conn.queue
        paused = conn.paused
        if queue.shared is not None:
            shared_policy = queue.shared.policy
            result = queue.settle(paused)
            if result == outbox.CUT:
                return True
            self.dropped[shared_policy] += result
        result = queue.push(item, policy, paused)
        if result:
            if result == outbox.CUT:
                return True
            self.dropped[policy] += result
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)
        elif not paused and len(queue.frames) >= self.max_batch:
            self.forwarded += conn.flush()
        return False

    def mark_dirty(self, conn: Subscriber) -> None:
        """Flush ``conn`` in the next flush (its transport drained below the low-water mark);
        a replay waiting for that goes on first."""
        replays = self.recovery.replays
        if replays.waiting and conn in replays.waiting:
            replays.writable(conn)
        if conn.queue.idle():
            return
        if not conn.dirty:
            conn.dirty = True
            self.dirty.append(conn)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every dirty client's pending frames, one write each.

        A client that shares a batch from its start writes the batch's one joined
        bytes object: the same object for every such client. A backed-up client's
        shared part becomes its own (:meth:`settle`): the batches are reused after this.
        """
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        forwarded = 0
        for conn in dirty:
            conn.dirty = False
            queue = conn.queue
            batch = queue.shared
            if batch is not None:
                if not conn.paused:
                    queue.shared = None
                    start = queue.shared_from
                    data = batch.joined
                    if data is None or start:
                        data = batch.data(start)
                    conn.transport.write(data)
                    forwarded += len(batch.items) - start
                    continue
                self.settle(conn)
            forwarded += conn.flush()
        if self.active:
            for batch in self.active:
                batch.clear()
            self.active.clear()
        self.forwarded += forwarded

    def cut_slow_consumer(self, conn: Subscriber, reason: str) -> None:
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
        if not up:
            self.recovery.interrupted()
            self.waiting.release_all()
        else:
            self.recovery.reconnected()
        frame = self._status_up if up else self._status_down
        close_when_down = self.settings.nats.disconnect_clients_when_down
        for conn in list(self.connections):
            if not up and close_when_down:
                conn.close(Close.NATS_UNAVAILABLE, "NATS unavailable")
            else:
                conn.send_control(frame)

    def publish_counts(self) -> None:
        """Move the hot-path counters into Prometheus (called once per sweep)."""
        self.forwarded_total += self.forwarded
        self.dropped_total += sum(self.dropped)
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
        self.outbox_max = max(queued, default=0)
        metrics.SEND_QUEUE_MAX.set(self.outbox_max)
        metrics.ACTIVE_CONNECTIONS.set(len(self.connections))
        metrics.SUBSCRIPTIONS.set(self.book.subscription_count)
        metrics.NATS_SUBSCRIPTIONS.set(
            len(self.router) if self.link is None else self.link.subscriptions
        )
