"""Recovery in the worker (protocol v1.2): sequences on live messages, resumes answered.

A client pattern covered by ``[history].streams`` is subscribed on NATS under
its republished subject (``<prefix>.<pattern>``: the stream's ``RePublish``
adds ``Nats-Sequence``), so the hub's key for it is that subject; everything
else in the hub (router, NATS subscription state, overlaps, deferred acks) is
unchanged. Per such key a :class:`~fanout.worker.channel.Channel` keeps the
in-memory window, the clients whose live messages are held while their replay
is prepared (the seam) and the state of its coalesced JetStream reads
(:mod:`fanout.core.reads`), which :mod:`fanout.worker.resume_reads` runs when the
window cannot answer. Live messages missed on the way (the worker's NATS link
was down, ``Nats-Last-Sequence`` skipped one) are caught up from the stream
(:mod:`fanout.worker.catch_up`). A recovery task that crashes (a bug) is logged
(XYW009) and counted, and whoever waited on it is answered anyway
(``unavailable``, or a ``dropped`` notice for clients a catch-up held).

A ``sub`` with ``since``/``last`` holds its live messages from the moment it is
added; once the NATS subscription is live its answer is worked out (window,
else one coalesced read), the replay goes into the client's outbox under the
``disconnect`` policy (a client that cannot keep up is cut, 4003), then the
held messages after the last replayed one, then the ack with ``recovered``.

A replay is written at the client's pace (:mod:`fanout.worker.replay`), so
``max_replay`` × message size need not fit in the outbox.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from fanout import metrics
from fanout.core import history, outbox, protocol, websocket
from fanout.core.history import Reason, Seam, Streams
from fanout.core.interest import SubjectRouter
from fanout.core.wsconnection import OPEN
from fanout.errors import Code
from fanout.settings import Settings
from fanout.worker.catch_up import CatchUp, Missed
from fanout.worker.channel import Channel, Resuming
from fanout.worker.history import HistoryReader, Stored, Unavailable
from fanout.worker.replay import Outlet, Replay, Replays
from fanout.worker.resume_reads import ResumeReads
from fanout.worker.subscriber import Subscriber

log = logging.getLogger("fanout.recovery")

#: A JetStream API request of recovery gives up after this long (then: ``unavailable``).
JS_TIMEOUT_S = 2.0


class Deliveries(Outlet, Protocol):
    """What recovery needs of the hub: who subscribes to a key, the general delivery path
    (:class:`~fanout.worker.replay.Outlet`), and word that a recoverable sub was answered."""

    router: SubjectRouter[Subscriber]

    def answered(self, conn: Subscriber, pattern: str, top: int | None) -> None: ...


class Recovery:
    """The worker's recoverable keys and the answers to resumes."""

    def __init__(self, settings: Settings, hub: Deliveries, reader: HistoryReader) -> None:
        h = settings.history
        self.settings = settings
        self.hub = hub
        self.streams = Streams(h.streams, h.republish_prefix)
        self.max_replay = h.max_replay
        self.hold_limit = settings.outbox.max_messages
        self.channels: dict[str, Channel] = {}
        #: Replays waiting for their client's transport to drain.
        self.replays = Replays(hub, self._current, self._replayed)
        #: The shared JetStream reads for resumes a window cannot answer (its reader
        #: serves catch-ups too).
        self.jetstream = ResumeReads(reader, h.max_replay, self, self._encode)
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
        channel = self.channels.pop(key, None)
        if channel is not None and channel.catching_up is not None:
            channel.catching_up.abandoned = True

    def begin(self, r: Resuming) -> None:
        """A sub of a recoverable key whose ack recovery gives; a resume holds its live
        messages from now until its replay is sent."""
        channel = self.channels[r.key]
        channel.pending[r.conn] = r
        if r.resume is not None:
            channel.holding[r.conn] = Seam(self.hold_limit)
            r.held = channel.reads.started

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
            self.replays.stop(r)

    def interrupted(self) -> None:
        """NATS went down: live messages may be missing from every window, and a catch-up
        read already out may miss what is published until the link is back."""
        for channel in self.channels.values():
            channel.window.reset()
            if channel.catching_up is not None:
                channel.catching_up.again = True

    # -- live messages ----------------------------------------------------------------------
    def item(
        self, subject: str, seq: int, data: bytes, headers: dict[str, str] | None
    ) -> outbox.Pending:
        """The ``msg`` frame of a recoverable subject, encoded once for every recipient."""
        frame = protocol.encode_msg_seq(subject, seq, data, headers)
        return (subject, websocket.text_frame(frame))

    def _encode(self, m: Stored) -> outbox.Pending:
        return self.item(m.subject, m.seq, m.data, _without_nats(m.headers))

    def on_live(
        self, channel: Channel, seq: int, previous: int, item: outbox.Pending
    ) -> dict[Subscriber, Seam[outbox.Pending]]:
        """A live message of ``channel``: into its window; the clients to hold it for.

        On a single subject, ``Nats-Last-Sequence`` beyond the last one seen means live
        messages were lost on the way (republish is at most once): catch up first, or,
        when a catch-up is out already, make it read at least that far.
        """
        last = channel.last_seq
        if channel.exact and last and previous > last:
            running = channel.catching_up
            if running is None:
                self.catch_up(channel, last, previous)
            else:
                running.need(previous)
        if seq > last:
            channel.last_seq = seq
        # wall-clock time: ``since.time`` resumes compare it with the client's RFC 3339 time
        channel.window.add(seq, time.time(), item, previous if channel.exact else None)
        return channel.holding

    def reconnected(self) -> None:
        """NATS is back: what was published while the link was down never came live."""
        for channel in self.channels.values():
            if channel.last_seq and channel.catching_up is None:
                self.catch_up(channel, channel.last_seq)

    def catch_up(self, channel: Channel, after: int, required: int = 0) -> None:
        """Hold every client of ``channel`` (not already resuming), read what it missed
        after ``after`` (at least up to ``required``), then deliver it and the held
        live messages."""
        run = channel.catching_up = CatchUp(channel.stream, channel.pattern, after, required)
        for conn in self.hub.router.subscribers(channel.key):
            if conn not in channel.holding:
                run.seams[conn] = channel.holding[conn] = Seam(self.hold_limit)
        crashed = Missed([], after, 1, "failed")
        self.spawn(
            self._catch_up(channel, run),
            "catch_up",
            channel,
            lambda: self._caught_up(channel, run, crashed),
        )

    async def _catch_up(self, channel: Channel, run: CatchUp) -> None:
        self._caught_up(channel, run, await run.read(self.jetstream.reader, self.max_replay))

    def _caught_up(self, channel: Channel, run: CatchUp, missed: Missed) -> None:
        """Deliver what ``run`` read, then what it held (``missed.lost``: a ``dropped`` notice)."""
        if channel.catching_up is run:
            channel.catching_up = None
        if self.channels.get(channel.key) is not channel:
            return
        if missed.reached > channel.last_seq:
            channel.last_seq = missed.reached
        items = self.jetstream.items(missed.messages)
        for conn, seam in run.seams.items():
            if channel.holding.get(conn) is not seam:
                continue  # left meanwhile
            del channel.holding[conn]
            if conn.state != OPEN:
                continue
            if missed.lost:
                queue = conn.queue
                queue.dropped[channel.pattern] = queue.dropped.get(channel.pattern, 0) + missed.lost
            if self._deliver(conn, channel, items, seam, run.after) is not None:
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
        self.spawn(self._serve(r), "serve", self.channels[r.key], lambda: self.unavailable([r]))

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        channel: Channel,
        rescue: Callable[[], None],
    ) -> None:
        """Run ``coro``; should it crash (a bug: JetStream failing is ``Unavailable``,
        handled inside), ``rescue`` answers whoever waited on it."""
        task = asyncio.get_running_loop().create_task(coro, name=f"recovery {name}")
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._ended, name, channel.pattern, rescue))

    def _ended(
        self, name: str, pattern: str, rescue: Callable[[], None], task: asyncio.Task[None]
    ) -> None:
        self._tasks.discard(task)
        if task.cancelled() or (exc := task.exception()) is None:
            return
        log.error(
            "recovery task failed; what waited on it is answered unavailable",
            exc_info=exc,
            extra={
                "code": Code.INTERNAL,
                "reason": f"{type(exc).__name__}: {exc}",
                "fields": {"task": name, "pattern": pattern},
            },
        )
        metrics.RECOVERY_TASK_FAILURES.labels(name).inc()
        rescue()

    def unavailable(self, waiting: Iterable[Resuming]) -> None:
        """Answer resumes whose work crashed ``unavailable`` (a replay under way goes on)."""
        for r in waiting:
            if not self.replays.running(r):
                self.answer(r, None, [], history.UNAVAILABLE if r.asked else None)

    async def _serve(self, r: Resuming) -> None:
        channel = self.channels.get(r.key)
        if channel is None or r.conn.state != OPEN:
            return
        try:
            state = await self.jetstream.state(channel.stream)
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
            self.jetstream.by_position(channel, r, resume.after, epoch)
            return
        cached = window.since(resume.time) if resume.time is not None else None
        if cached is None and resume.last is not None:
            cached = window.last(resume.last)
        if cached is not None:
            self.answer(r, epoch, cached, None, top)
        else:
            self.jetstream.by_time_or_count(channel, r, state)

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
            self.replays.start(
                Replay(r, channel, replay, epoch, top, seam, last=r.resume.after or 0)
            )
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

    def _current(self, p: Replay) -> bool:
        r = p.r
        return self.channels.get(r.key) is p.channel and p.channel.pending.get(r.conn) is r

    def _replayed(self, p: Replay) -> None:
        r, channel = p.r, p.channel
        del channel.pending[r.conn]
        channel.holding.pop(r.conn, None)
        self._acked(r, channel, p.epoch, None, p.last, p.top)

    def no_history(self, op_id: int) -> bytes:
        """The ack of a resume on a subject no stream holds (live delivery goes on)."""
        return protocol.recovery_ack(op_id, None, False, history.NO_HISTORY)


def _without_nats(headers: dict[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    kept = {k: v for k, v in headers.items() if not k.lower().startswith("nats-")}
    return kept or None
