"""One JetStream read for many resumes of a pattern (protocol v1.2), without I/O.

A reconnect storm of 5 000 clients resuming ``xy.md.tick.btc`` must cost one
read, not 5 000 consumers, whichever way they resume:

- :class:`Reads`: by position (``since.seq``). A resume joins the read in
  flight when that read starts at or before its position; the others wait, and
  the next read starts at the lowest waiting position.
- :class:`Rounds`: by time (``since.time``) or count (``last``). The resumes
  waiting when a round starts share its reads: one from the earliest time, one
  of the largest count; each takes its share (:func:`share_since`,
  :func:`share_last`). A time resume whose share runs past a truncated read
  goes on as a resume by position (from its first message).

A resume joins only a read that started after its live messages began to be
held: a read sees the stream as it was when it started, so a resume held only
later would miss what came live in between. ``Reads.started`` numbers the
reads; a resume remembers that number when it begins holding (``held``). A
round's reads start after its resumes were queued, so rounds need no number.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fanout.core.history import LIMIT, Reason

T = TypeVar("T")
M = TypeVar("M")


@dataclass(slots=True)
class Read(Generic[T]):
    """One JetStream read of a pattern: everything after ``after`` (at most ``limit``)."""

    after: int
    #: Its place in the order reads started (``Reads.started`` when it did).
    number: int
    waiters: list[tuple[T, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Served(Generic[T, M]):
    """A waiter's answer: its messages (sequence > its position), or the reason it gets none."""

    waiter: T
    messages: list[tuple[int, M]]
    reason: Reason | None


class Reads(Generic[T, M]):
    """Resumes of one pattern by position; one read in flight at a time.

    5 000 clients resuming the same subject cost one read, or a few when some
    arrive with older positions, or begin, while one is running.
    """

    __slots__ = ("_next", "in_flight", "max_replay", "started")

    def __init__(self, max_replay: int) -> None:
        self.max_replay = max_replay
        self.in_flight: Read[T] | None = None
        self._next: list[tuple[T, int]] = []
        #: Reads started so far: a resume's ``held`` is this number when it began holding.
        self.started = 0

    def __bool__(self) -> bool:
        return self.in_flight is not None or bool(self._next)

    def want(self, waiter: T, after: int, held: int) -> int | None:
        """Position to start a new read from, or None when the waiter joined or waits.

        ``held``: :attr:`started` when the waiter's live messages began to be held.
        """
        read = self.in_flight
        if read is None:
            return self._start(after, [(waiter, after)])
        if read.after <= after and read.number > held:
            read.waiters.append((waiter, after))
        else:
            self._next.append((waiter, after))
        return None

    def _start(self, after: int, waiters: list[tuple[T, int]]) -> int:
        self.started += 1
        self.in_flight = Read(after, self.started, waiters)
        return after

    def cancel(self, waiter: T) -> None:
        """A waiter left (its client closed or unsubscribed): it gets no answer."""
        if self.in_flight is not None:
            self.in_flight.waiters = [w for w in self.in_flight.waiters if w[0] is not waiter]
        self._next = [w for w in self._next if w[0] is not waiter]

    def abandon(self) -> list[T]:
        """The read in flight will never finish (its task crashed): every waiter, in
        flight or next, to be answered otherwise; the next :meth:`want` starts afresh."""
        waiting = [w for w, _ in self.in_flight.waiters] if self.in_flight is not None else []
        waiting += [w for w, _ in self._next]
        self.in_flight, self._next = None, []
        return waiting

    def done(
        self, messages: Iterable[tuple[int, M]], truncated: bool, reason: Reason | None = None
    ) -> tuple[list[Served[T, M]], int | None]:
        """The read in flight finished: answers, and where the next read starts (or None).

        ``messages``: sequence order, at most ``max_replay + 1`` (``truncated``: there
        were more). ``reason`` set: the read failed, every waiter gets it.
        """
        read = self.in_flight
        assert read is not None
        self.in_flight = None
        got = list(messages)
        served: list[Served[T, M]] = []
        retry: list[tuple[T, int]] = []
        for waiter, after in read.waiters:
            if reason is not None:
                served.append(Served(waiter, [], reason))
                continue
            mine = [m for m in got if m[0] > after]
            if len(mine) > self.max_replay or (truncated and after == read.after):
                served.append(Served(waiter, [], LIMIT))
            elif truncated:
                retry.append((waiter, after))
            else:
                served.append(Served(waiter, mine, None))
        pending = retry + self._next
        self._next = []
        if not pending:
            return served, None
        return served, self._start(min(after for _, after in pending), pending)


class Rounds(Generic[T]):
    """Resumes of one pattern by time or count, answered a round at a time."""

    __slots__ = ("busy", "taken", "waiting")

    def __init__(self) -> None:
        self.waiting: list[T] = []
        #: The round out (what the last :meth:`take` returned).
        self.taken: list[T] = []
        #: A round is out: new resumes wait for the next one.
        self.busy = False

    def want(self, waiter: T) -> bool:
        """Queue ``waiter``; True when no round is out (the caller runs the rounds)."""
        self.waiting.append(waiter)
        if self.busy:
            return False
        self.busy = True
        return True

    def take(self) -> list[T]:
        """The next round's resumes; empty: no more rounds until the next :meth:`want`."""
        batch, self.waiting = self.waiting, []
        self.taken = batch
        if not batch:
            self.busy = False
        return batch

    def abandon(self) -> list[T]:
        """The rounds will never finish (their task crashed): the round out and the
        waiting resumes, to be answered otherwise; the next :meth:`want` starts afresh."""
        left = self.taken + self.waiting
        self.taken, self.waiting, self.busy = [], [], False
        return left


def share_since(
    messages: Sequence[tuple[int, float, M]], at: float, truncated: bool, max_replay: int
) -> list[tuple[int, M]] | Reason | int | None:
    """A ``since.time`` resume's share of a read by time from the round's earliest time.

    ``messages``: ``(seq, stored time, message)`` in sequence order, at most
    ``max_replay + 1`` (``truncated``: there were more). The share: its messages;
    ``limit``; the sequence to go on after by position (the read stopped inside
    the share); or None (the read stopped before ``at``: read by time again).
    """
    mine = [(seq, m) for seq, t, m in messages if t >= at]
    if len(mine) > max_replay:
        return LIMIT
    if not truncated:
        return mine
    return mine[0][0] - 1 if mine else None


def share_last(messages: Sequence[tuple[int, M]], k: int) -> list[tuple[int, M]]:
    """A ``last:k`` resume's share of the round's read of the largest count."""
    return list(messages[max(0, len(messages) - k) :])
