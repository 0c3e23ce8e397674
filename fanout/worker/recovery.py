"""Recovery in the worker (protocol v1.2): sequences on live messages, resumes answered.

A client pattern covered by ``[history].streams`` is subscribed on NATS under
its republished subject (``<prefix>.<pattern>``: the stream's ``RePublish``
adds ``Nats-Sequence``), so the hub's key for it is that subject; everything
else in the hub (router, NATS subscription state, overlaps, deferred acks) is
unchanged. Per such key a :class:`Channel` keeps the in-memory window, the
clients whose live messages are held while their replay is prepared (the seam)
and the coalesced JetStream reads.

A ``sub`` with ``since``/``last`` holds its live messages from the moment it is
added; once the NATS subscription is live its answer is worked out (window,
else one coalesced read), the replay goes into the client's outbox under the
``disconnect`` policy (a client that cannot keep up is cut, 4003), then the
held messages after the last replayed one, then the ack with ``recovered``.

A replay is paced (:class:`Replay`): it goes into the outbox while the client's
transport takes it, and waits for the transport to drain whenever it backs up,
so ``max_replay`` × message size need not fit in the outbox. Live messages stay
held meanwhile (bounded: an overflow cuts the client, 4003) and are paced the
same way after it; the ack follows once all of it is written. A client that
stops reading is cut by the write stall (``outbox.write_timeout_s``, 4003): the
worker never holds more for it than the read it already has, half an outbox
and the held live messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from fanout.core import history, outbox, protocol, subjects, websocket
from fanout.core.history import Reads, Reason, Resume, Seam, Streams, StreamState, Window
from fanout.core.interest import SubjectRouter
from fanout.core.wsconnection import OPEN
from fanout.settings import Settings
from fanout.worker.history import HistoryReader, Stored, Unavailable
from fanout.worker.subscriber import Replies, Subscriber

log = logging.getLogger("fanout.recovery")

#: A JetStream API request of recovery gives up after this long (then: ``unavailable``).
JS_TIMEOUT_S = 2.0


@dataclass(slots=True, eq=False)
class Resuming:
    """A ``sub`` of a recoverable pattern whose ack waits for recovery to answer."""

    conn: Subscriber
    key: str
    op_id: int
    replies: Replies
    slot: int
    #: What to replay; None: a plain sub (the ack only carries the epoch).
    resume: Resume | None
    #: Decided before asking the stream (``limit`` for ``last`` > max_replay).
    reason: Reason | None = None

    @property
    def asked(self) -> bool:
        """The sub asked to resume: its ack says ``recovered``."""
        return self.resume is not None or self.reason is not None


class Channel:
    """One recoverable key: its stream, window, held clients and reads."""

    __slots__ = (
        "batch",
        "catching_up",
        "exact",
        "holding",
        "key",
        "last_seq",
        "pattern",
        "pending",
        "policy",
        "reads",
        "stream",
        "window",
    )

    def __init__(
        self, key: str, pattern: str, stream: str, policy: int, settings: Settings
    ) -> None:
        h = settings.history
        self.key = key
        self.pattern = pattern
        self.stream = stream
        self.policy = policy
        #: Shared by the clients that are idle when a live message comes (as on the plain path).
        self.batch = outbox.Batch(policy)
        #: One subject, no wildcard: ``Nats-Last-Sequence`` proves the window complete.
        self.exact = not subjects.is_wildcard(pattern)
        self.window: Window[outbox.Pending] = Window(h.window_messages, h.window_s)
        #: Subs whose ack waits for recovery's answer (one per client: a pattern is
        #: subscribed once per connection).
        self.pending: dict[Subscriber, Resuming] = {}
        #: The resuming ones' held live messages (looked up per live message).
        self.holding: dict[Subscriber, Seam[outbox.Pending]] = {}
        self.reads: Reads[Resuming, outbox.Pending] = Reads(h.max_replay)
        #: The highest sequence the live path has seen (or the stream had once the
        #: subscription was live): where a catch-up after a live outage reads from.
        self.last_seq = 0
        self.catching_up = False


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


class Deliveries(Protocol):
    """What recovery needs of the hub: who subscribes to a key, and the general delivery path."""

    router: SubjectRouter[Subscriber]

    def enqueue(self, conn: Subscriber, item: outbox.Pending, policy: int) -> bool: ...

    def cut_slow_consumer(self, conn: Subscriber, reason: str) -> None: ...

    def answered(self, conn: Subscriber, pattern: str, top: int | None) -> None: ...


class Recovery:
    """The worker's recoverable keys and the answers to resumes."""

    def __init__(self, settings: Settings, hub: Deliveries, reader: HistoryReader) -> None:
        h = settings.history
        self.settings = settings
        self.hub = hub
        self.reader = reader
        self.streams = Streams(h.streams, h.republish_prefix)
        self.max_replay = h.max_replay
        self.hold_limit = settings.outbox.max_messages
        self.channels: dict[str, Channel] = {}
        #: Replays waiting for their client's transport to drain.
        self.replaying: dict[Subscriber, list[Replay]] = {}
        self._fetching: dict[str, asyncio.Task[StreamState]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- keys ------------------------------------------------------------------------------
    def key_of(self, pattern: str) -> str:
        """The hub's key (the NATS subject) of a client pattern."""
        if self.streams and self.streams.stream_for(pattern) is not None:
            return self.streams.live_subject(pattern)
        return pattern

    def open(self, key: str, pattern: str, policy: int) -> None:
        """The first client of a recoverable key: its window starts with the subscription."""
        stream = self.streams.stream_for(pattern)
        assert stream is not None
        self.channels[key] = Channel(key, pattern, stream, policy, self.settings)

    def close(self, key: str) -> None:
        self.channels.pop(key, None)

    def begin(self, r: Resuming) -> None:
        """A sub of a recoverable key whose ack recovery gives; a resume holds its live
        messages from now until its replay is sent."""
        channel = self.channels[r.key]
        channel.pending[r.conn] = r
        if r.resume is not None:
            channel.holding[r.conn] = Seam(self.hold_limit)

    def forget(self, conn: Subscriber, key: str) -> None:
        """``conn`` left ``key`` (unsub or gone) before its answer: plain ack, nothing held.

        A read in flight still answers it; :meth:`answer` then finds it gone and stops.
        """
        channel = self.channels.get(key)
        if channel is None:
            return
        r = channel.pending.pop(conn, None)
        channel.holding.pop(conn, None)
        if r is not None:
            r.replies.fill(r.slot, protocol.ack(r.op_id))
            for p in list(self.replaying.get(conn, ())):
                if p.r is r:
                    self._paced(p)

    def interrupted(self) -> None:
        """NATS went down: live messages may be missing from every window."""
        for channel in self.channels.values():
            channel.window.reset()

    # -- live messages ----------------------------------------------------------------------
    def item(
        self, subject: str, seq: int, data: bytes, headers: dict[str, str] | None
    ) -> outbox.Pending:
        """The ``msg`` frame of a recoverable subject, encoded once for every recipient."""
        frame = protocol.encode_msg_seq(subject, seq, data, headers)
        return (subject, websocket.text_frame(frame))

    def on_live(
        self, channel: Channel, seq: int, previous: int, item: outbox.Pending
    ) -> dict[Subscriber, Seam[outbox.Pending]]:
        """A live message of ``channel``: into its window; the clients to hold it for.

        On a single subject, ``Nats-Last-Sequence`` beyond the last one seen means live
        messages were lost on the way (republish is at most once): catch up first.
        """
        last = channel.last_seq
        if channel.exact and last and previous > last and not channel.catching_up:
            self.catch_up(channel, last)
        if seq > last:
            channel.last_seq = seq
        # wall-clock time: ``since.time`` resumes compare it with the client's RFC 3339 time
        channel.window.add(seq, time.time(), item, previous if channel.exact else None)
        return channel.holding

    def reconnected(self) -> None:
        """NATS is back: what was published while the link was down never came live."""
        for channel in self.channels.values():
            if channel.last_seq and not channel.catching_up:
                self.catch_up(channel, channel.last_seq)

    def catch_up(self, channel: Channel, after: int) -> None:
        """Hold every client of ``channel`` (not already resuming), read what it missed
        after ``after`` from the stream, then deliver it and the held live messages."""
        channel.catching_up = True
        seams: dict[Subscriber, Seam[outbox.Pending]] = {}
        for conn in self.hub.router.subscribers(channel.key):
            if conn not in channel.holding:
                seams[conn] = channel.holding[conn] = Seam(self.hold_limit)
        self._spawn(self._catch_up(channel, after, seams))

    async def _catch_up(
        self, channel: Channel, after: int, seams: dict[Subscriber, Seam[outbox.Pending]]
    ) -> None:
        missed = 0
        try:
            got, pending = await self.reader.read(
                channel.stream, channel.pattern, after=after, limit=self.max_replay
            )
            missed = pending - len(got)
        except Unavailable as exc:
            log.warning("JetStream catch-up failed", extra={"reason": str(exc)})
            got, missed = [], 1
        channel.catching_up = False
        if self.channels.get(channel.key) is not channel:
            return
        items = self._items(got)
        for conn, seam in seams.items():
            if channel.holding.get(conn) is not seam:
                continue  # left meanwhile
            del channel.holding[conn]
            if conn.state != OPEN:
                continue
            if missed:
                queue = conn.queue
                queue.dropped[channel.pattern] = queue.dropped.get(channel.pattern, 0) + missed
            if self._deliver(conn, channel, items, seam, after) is not None:
                conn.flush()

    def _deliver(
        self,
        conn: Subscriber,
        channel: Channel,
        replay: list[tuple[int, outbox.Pending]],
        seam: Seam[outbox.Pending] | None,
        last: int,
    ) -> int | None:
        """``replay`` then what ``seam`` held after it into ``conn``'s outbox; the last
        sequence delivered, or None when that cut the client (4003)."""
        hub = self.hub
        for seq, item in replay:
            if hub.enqueue(conn, item, outbox.DISCONNECT):
                hub.cut_slow_consumer(conn, "outbox full during replay")
                return None
            last = seq
        if seam is not None:
            if seam.overflow:
                hub.cut_slow_consumer(conn, "live messages held during replay overflowed")
                return None
            for seq, item in seam.release(last):
                if hub.enqueue(conn, item, channel.policy):
                    hub.cut_slow_consumer(conn, "outbox full")
                    return None
                last = seq
        return last

    # -- answers ------------------------------------------------------------------------------
    def live(self, r: Resuming) -> None:
        """The NATS subscription of ``r.key`` is live: work out ``r``'s answer."""
        self._spawn(self._serve(r))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def state(self, stream: str) -> StreamState:
        """The stream's state, fresh; concurrent askers share one request."""
        task = self._fetching.get(stream)
        if task is None:
            task = asyncio.get_running_loop().create_task(self.reader.state(stream))
            self._fetching[stream] = task
            task.add_done_callback(lambda _: self._fetching.pop(stream, None))
        return await asyncio.shield(task)

    async def _serve(self, r: Resuming) -> None:
        channel = self.channels.get(r.key)
        if channel is None or r.conn.state != OPEN:
            return
        try:
            state = await self.state(channel.stream)
        except Unavailable as exc:
            log.warning("JetStream unavailable", extra={"reason": str(exc)})
            self.answer(r, None, [], history.UNAVAILABLE if r.asked else None)
            return
        epoch, top = state.epoch, state.last_seq
        if top > channel.last_seq:
            channel.last_seq = top  # the subscription is live: nothing before it is owed
        resume = r.resume
        if resume is None or r.reason is not None:
            self.answer(r, epoch, [], r.reason, top)
            return
        reason = history.verdict(resume, state)
        if reason is not None:
            self.answer(r, epoch, [], reason, top)
            return
        window = channel.window
        if resume.after is not None:
            if resume.after >= top:
                self.answer(r, epoch, [], None, top)
                return
            cached = window.after(resume.after)
            if cached is not None:
                self.answer(r, epoch, cached, None, top)
                return
            start = channel.reads.want(r, resume.after)
            if start is not None:
                self._spawn(self._read(channel, start, epoch))
            return
        cached = window.since(resume.time) if resume.time is not None else None
        if cached is None and resume.last is not None:
            cached = window.last(resume.last)
        if cached is not None:
            self.answer(r, epoch, cached, None, top)
            return
        try:
            if resume.time is not None:
                got, pending = await self.reader.read(
                    channel.stream, channel.pattern, since=resume.time, limit=self.max_replay + 1
                )
                if pending > self.max_replay:
                    self.answer(r, epoch, [], history.LIMIT, top)
                    return
            else:
                assert resume.last is not None
                got = await self.reader.last(channel.stream, channel.pattern, resume.last, state)
        except Unavailable as exc:
            log.warning("JetStream read failed", extra={"reason": str(exc)})
            self.answer(r, epoch, [], history.UNAVAILABLE, top)
            return
        self.answer(r, epoch, self._items(got), None, top)

    def _items(self, got: list[Stored]) -> list[tuple[int, outbox.Pending]]:
        return [(m.seq, self.item(m.subject, m.seq, m.data, _without_nats(m.headers))) for m in got]

    async def _read(self, channel: Channel, start: int | None, epoch: str) -> None:
        """Coalesced reads of one channel until no resume waits for one."""
        while start is not None:
            try:
                got, pending = await self.reader.read(
                    channel.stream, channel.pattern, after=start, limit=self.max_replay + 1
                )
            except Unavailable as exc:
                log.warning("JetStream read failed", extra={"reason": str(exc)})
                top = None
                served, next_start = channel.reads.done([], False, history.UNAVAILABLE)
            else:
                top = got[-1].seq if got else start
                if pending <= len(got):
                    channel.window.learn(top)
                served, next_start = channel.reads.done(self._items(got), pending > len(got))
            for s in served:
                self.answer(s.waiter, epoch, s.messages, s.reason, top)
            start = next_start

    def answer(
        self,
        r: Resuming,
        epoch: str | None,
        replay: list[tuple[int, outbox.Pending]],
        reason: Reason | None,
        top: int | None = None,
    ) -> None:
        """Replay, then the held live messages after it, then the ack (or nothing: gone).

        The ack's ``seq`` is where the subscription now stands: the highest of ``top``
        (what the stream or the read had), the last replayed and the last released.
        """
        conn = r.conn
        channel = self.channels.get(r.key)
        if channel is None or channel.pending.get(conn) is not r:
            return
        if conn.state != OPEN:
            del channel.pending[conn]
            channel.holding.pop(conn, None)
            return
        if reason is None and r.resume is not None and replay:
            assert epoch is not None  # a replay comes from a stream that answered
            seam = channel.holding.get(conn)
            p = Replay(r, channel, replay, epoch, top, seam, last=r.resume.after or 0)
            self.replaying.setdefault(conn, []).append(p)
            self._pace(p)
            return
        del channel.pending[conn]
        seam = channel.holding.pop(conn, None)
        after = r.resume.after or 0 if reason is None and r.resume is not None else 0
        last = self._deliver(conn, channel, [], seam, after)
        if last is not None:
            self._acked(r, channel, epoch, reason, last, top)

    def _acked(
        self,
        r: Resuming,
        channel: Channel,
        epoch: str | None,
        reason: Reason | None,
        last: int,
        top: int | None,
    ) -> None:
        conn = r.conn
        conn.flush()
        self.hub.answered(conn, channel.pattern, None if epoch is None else top)
        recovered = reason is None if r.asked else None
        position = None if epoch is None else max(last, top or 0)
        ack = protocol.recovery_ack(r.op_id, epoch, recovered, reason, position)
        r.replies.fill(r.slot, ack)

    def writable(self, conn: Subscriber) -> None:
        """``conn``'s transport drained: its replays go on."""
        for p in list(self.replaying.get(conn, ())):
            self._pace(p)

    def _pace(self, p: Replay) -> None:
        """Write ``p``'s replay, then the live messages held meanwhile, until the client's
        transport backs up (then wait for :meth:`writable`); the ack once all of it is
        written. The outbox is flushed whenever it holds half its caps."""
        r, channel = p.r, p.channel
        conn = r.conn
        if (
            self.channels.get(r.key) is not channel
            or channel.pending.get(conn) is not r
            or conn.state != OPEN
        ):
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
        del channel.pending[conn]
        channel.holding.pop(conn, None)
        self._acked(r, channel, p.epoch, None, p.last, p.top)

    def _paced(self, p: Replay) -> None:
        """``p`` is over (written, or its client left or was cut)."""
        conn = p.r.conn
        replays = self.replaying.get(conn)
        if replays is not None and p in replays:
            replays.remove(p)
            if not replays:
                del self.replaying[conn]

    def no_history(self, op_id: int) -> bytes:
        """The ack of a resume on a subject no stream holds (live delivery goes on)."""
        return protocol.recovery_ack(op_id, None, False, history.NO_HISTORY)


def _without_nats(headers: dict[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    kept = {k: v for k, v in headers.items() if not k.lower().startswith("nats-")}
    return kept or None
