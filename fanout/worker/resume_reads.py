"""The JetStream reads behind resumes (protocol v1.2 recovery), coalesced.

:class:`~fanout.worker.recovery.Recovery` decides what a resume is owed; when
the key's in-memory window cannot give it, the read comes from here. Every read
is shared (:mod:`fanout.core.reads`): resumes by position of one key join one
read in flight, resumes by time or count go in rounds, and concurrent askers of
a stream's state share one request, so a reconnect storm of 5 000 clients costs
a few reads, not 5 000 consumers. Each resume's share goes back to recovery's
:meth:`~Answers.answer`. A read task that crashes (a bug) resets its key's
shared read state and hands every resume of the key still waiting to
:meth:`~Answers.unavailable`: also those it had taken off the shared state but
not answered yet, so no client is left without its ack.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from fanout.core import history, outbox
from fanout.core.history import Reason, StreamState
from fanout.core.reads import share_last, share_since
from fanout.worker.channel import Channel, Resuming
from fanout.worker.history import HistoryReader, Stored, Unavailable

log = logging.getLogger("fanout.recovery")

#: A message read from the stream as it goes out: ``(seq, frame)``.
Replayed = list[tuple[int, outbox.Pending]]


class Answers(Protocol):
    """What the reads need of recovery: a task that says when it crashed, the answers."""

    def spawn(
        self,
        coro: Coroutine[Any, Any, None],
        name: str,
        channel: Channel,
        rescue: Callable[[], None],
    ) -> None: ...

    def answer(
        self,
        r: Resuming,
        epoch: str | None,
        replay: Replayed,
        reason: Reason | None,
        top: int | None = None,
    ) -> None: ...

    def unavailable(self, waiting: Iterable[Resuming]) -> None: ...


class ResumeReads:
    """A worker's shared JetStream reads for resumes: stream states, reads, rounds."""

    def __init__(
        self,
        reader: HistoryReader,
        max_replay: int,
        answers: Answers,
        encode: Callable[[Stored], outbox.Pending],
    ) -> None:
        self.reader = reader
        self.max_replay = max_replay
        self.answers = answers
        #: A stored message as the ``msg`` frame of its subject.
        self.encode = encode
        self._fetching: dict[str, asyncio.Task[StreamState]] = {}

    def items(self, got: list[Stored]) -> Replayed:
        """Messages read as they go out, each encoded once for every resume sharing it."""
        return [(m.seq, self.encode(m)) for m in got]

    async def state(self, stream: str) -> StreamState:
        """The stream's state, fresh; concurrent askers share one request."""
        task = self._fetching.get(stream)
        if task is None:
            task = asyncio.get_running_loop().create_task(self.reader.state(stream))
            self._fetching[stream] = task
            task.add_done_callback(lambda _: self._fetching.pop(stream, None))
        return await asyncio.shield(task)

    def by_time_or_count(self, channel: Channel, r: Resuming, state: StreamState) -> None:
        """``r`` resumes by ``since.time`` or ``last``: it joins the next round."""
        rounds, waiting = channel.rounds, channel.pending.values()
        if not rounds.want((r, state)):
            return
        self.answers.spawn(
            self._rounds(channel),
            "rounds",
            channel,
            lambda: self.answers.unavailable([*(w for w, _ in rounds.abandon()), *waiting]),
        )

    def by_position(self, channel: Channel, r: Resuming, after: int, epoch: str) -> None:
        """``r`` resumes after ``after``: it joins the read in flight, or waits for the next."""
        start = channel.reads.want(r, after, r.held)
        if start is not None:
            reads, waiting = channel.reads, channel.pending.values()
            self.answers.spawn(
                self._read(channel, start, epoch),
                "read",
                channel,
                lambda: self.answers.unavailable([*reads.abandon(), *waiting]),
            )

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
                served, next_start = channel.reads.done(self.items(got), pending > len(got))
            for s in served:
                self.answers.answer(s.waiter, epoch, s.messages, s.reason, top)
            start = next_start

    async def _rounds(self, channel: Channel) -> None:
        """Rounds of ``since.time`` / ``last`` resumes of one channel until none waits."""
        while batch := channel.rounds.take():
            state = max((s for _, s in batch), key=lambda s: s.last_seq)
            resumes = [(r, r.resume) for r, _ in batch if r.resume is not None]
            since = [(r, x.time) for r, x in resumes if x.time is not None]
            last = [(r, x.last) for r, x in resumes if x.last is not None]
            if since:
                await self._since(channel, since, state)
            if last:
                await self._last(channel, last, state)

    async def _since(
        self, channel: Channel, waiters: list[tuple[Resuming, float]], state: StreamState
    ) -> None:
        """One read from the earliest time; each resume takes its share of it."""
        epoch, top = state.epoch, state.last_seq
        try:
            got, pending = await self.reader.read(
                channel.stream,
                channel.pattern,
                since=min(at for _, at in waiters),
                limit=self.max_replay + 1,
            )
        except Unavailable as exc:
            log.warning("JetStream read failed", extra={"reason": str(exc)})
            for r, _ in waiters:
                self.answers.answer(r, epoch, [], history.UNAVAILABLE, top)
            return
        timed = [(m.seq, m.time, item) for m, (_, item) in zip(got, self.items(got), strict=True)]
        for r, at in waiters:
            share = share_since(timed, at, pending > len(got), self.max_replay)
            if share is None:
                channel.rounds.want((r, state))  # a round is out: this is the next one's
            elif isinstance(share, int):
                self.by_position(channel, r, share, epoch)
            elif isinstance(share, str):
                self.answers.answer(r, epoch, [], share, top)
            else:
                self.answers.answer(r, epoch, share, None, top)

    async def _last(
        self, channel: Channel, waiters: list[tuple[Resuming, int]], state: StreamState
    ) -> None:
        """One read of the largest count; each resume takes the last K of it."""
        epoch, top = state.epoch, state.last_seq
        k = max(n for _, n in waiters)
        try:
            got = await self.reader.last(channel.stream, channel.pattern, k, state)
        except Unavailable as exc:
            log.warning("JetStream read failed", extra={"reason": str(exc)})
            for r, _ in waiters:
                self.answers.answer(r, epoch, [], history.UNAVAILABLE, top)
            return
        items = self.items(got)
        for r, n in waiters:
            self.answers.answer(r, epoch, share_last(items, n), None, top)
