"""Recovery (protocol v1.2) without I/O: which subscriptions have history, what a resume
asks for, the seam between replay and live, and one read serving many resumes.

The worker reads JetStream (``fanout.worker.history``); everything that decides
lives here and is unit tested without a server:

- :class:`Streams`: a subscription pattern is recoverable when one configured
  pattern covers all of it; the live messages of such a pattern arrive on the
  stream's republished subject ``<prefix>.<subject>`` with ``Nats-Sequence``.
- :func:`resume_of`: the ``since``/``last`` of a ``sub`` → a :class:`Resume`, a
  ``recovered:false`` reason, or :class:`~fanout.core.protocol.FrameError` (``XYW008``).
- :func:`verdict`: a resume against the stream's state (epoch, first/last
  sequence, first time) → read it, or the reason it cannot be recovered.
- :class:`Window`: the worker's recent messages of one pattern, bounded in count
  and age, complete from a known sequence on (so a resume within it needs no read).
- :class:`Seam`: live messages wait while the replay is sent, then only those
  after the last replayed one go out: no gap, no duplicate, order kept.

One read serving many resumes is :mod:`fanout.core.reads`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

from fanout.core import subjects
from fanout.core.protocol import FrameError

Reason = Literal["gap", "epoch", "limit", "no_history", "unavailable"]
GAP: Reason = "gap"
EPOCH: Reason = "epoch"
LIMIT: Reason = "limit"
NO_HISTORY: Reason = "no_history"
UNAVAILABLE: Reason = "unavailable"

#: Clock skew tolerated on ``since.time`` before it counts as "in the future" (malformed).
FUTURE_LEEWAY_S = 60.0

T = TypeVar("T")

#: Headers JetStream adds to a republished message; never passed on to clients.
_REPUBLISH_HEADERS = frozenset(
    {"nats-stream", "nats-subject", "nats-sequence", "nats-time-stamp", "nats-last-sequence"}
)


# -- which subscriptions are recoverable ------------------------------------------------------


class Streams:
    """Configured pattern → stream name; the republish prefix of live messages."""

    __slots__ = ("_streams", "prefix")

    def __init__(self, streams: Mapping[str, str], prefix: str) -> None:
        self._streams = dict(streams)
        self.prefix = prefix

    def __bool__(self) -> bool:
        return bool(self._streams)

    def stream_for(self, pattern: str) -> str | None:
        """The stream holding every subject ``pattern`` matches (first configured match)."""
        for configured, stream in self._streams.items():
            if subjects.is_subset(pattern, configured):
                return stream
        return None

    def live_subject(self, pattern: str) -> str:
        """The NATS subject to subscribe for a recoverable pattern's live messages."""
        return f"{self.prefix}.{pattern}"

    def original(self, subject: str) -> str:
        """The published subject of a republished one."""
        return subject[len(self.prefix) + 1 :]

    def republish(self) -> list[tuple[str, str]]:
        """(src, dest) of the RePublish each stream needs (documented, created in ``--demo``)."""
        return [(p, self.live_subject(p)) for p in self._streams]


def sequence_of(headers: bytes) -> tuple[int, int] | None:
    """``(Nats-Sequence, Nats-Last-Sequence)`` from a raw ``NATS/1.0`` header block.

    Read straight from the bytes (no dict, no decode): this runs per live message.
    ``Nats-Last-Sequence`` is the previous sequence of the same subject (0: none).
    """
    i = headers.find(b"Nats-Sequence:")
    if i < 0:
        return None
    end = headers.find(b"\r\n", i)
    j = headers.find(b"Nats-Last-Sequence:")
    try:
        seq = int(headers[i + 14 : end])
        last = int(headers[j + 19 : headers.find(b"\r\n", j)]) if j >= 0 else 0
    except ValueError:
        return None
    return seq, last


def user_headers(headers: bytes) -> dict[str, str] | None:
    """The publisher's own headers of a republished message (JetStream's removed).

    Several values of one name are joined with ``, `` as on the live path.
    """
    out: dict[str, str] = {}
    for line in headers.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.decode("latin-1").strip()
        if key.lower() in _REPUBLISH_HEADERS:
            continue
        text = value.decode("utf-8", "replace").strip()
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out or None


# -- what a resume asks for -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    """Exactly one of: after a sequence (with the epoch it came from), since a time, the last K."""

    after: int | None = None
    epoch: str | None = None
    time: float | None = None
    last: int | None = None


def parse_time(text: str) -> float:
    """RFC 3339 with an explicit offset (``Z`` or ``±hh:mm``) → unix seconds; ValueError else."""
    if len(text) > 40 or "T" not in text.upper():
        raise ValueError("not an RFC 3339 time")
    parsed = datetime.fromisoformat(text.replace("z", "Z"))
    if parsed.tzinfo is None:
        raise ValueError("an RFC 3339 time needs Z or an offset")
    return parsed.astimezone(UTC).timestamp()


def resume_of(
    op_id: int,
    seq: int | None,
    epoch: str | None,
    time_text: str | None,
    last: int | None,
    *,
    now: float,
    max_replay: int,
) -> Resume | Reason:
    """A ``sub``'s resume fields (``since`` unpacked) → what to replay, or a reason not to.

    Malformed → :class:`FrameError` (``XYW008``): ``since`` with both or neither of
    ``seq`` and ``time``, ``seq`` without ``epoch``, a time that is not RFC 3339 or
    lies in the future, ``since`` together with ``last``. Well-formed but more than
    ``max_replay`` (``last``) → ``"limit"``. Range checks (``seq``/``last`` ≥ 0 / ≥ 1,
    at most 2^53-1) are the decoder's.
    """
    if last is not None:
        if seq is not None or epoch is not None or time_text is not None:
            raise FrameError("give since or last, not both", op_id)
        return LIMIT if last > max_replay else Resume(last=last)
    if (seq is None) == (time_text is None):
        raise FrameError("since needs exactly one of seq and time", op_id)
    if time_text is not None:
        if epoch is not None:
            raise FrameError("since.epoch goes with since.seq", op_id)
        try:
            at = parse_time(time_text)
        except ValueError:
            raise FrameError("since.time is not an RFC 3339 time", op_id) from None
        if at > now + FUTURE_LEEWAY_S:
            raise FrameError("since.time is in the future", op_id)
        return Resume(time=at)
    if not epoch:
        raise FrameError("since.seq needs since.epoch", op_id)
    return Resume(after=seq, epoch=epoch)


@dataclass(frozen=True, slots=True)
class StreamState:
    """What a stream info says, as far as recovery cares."""

    epoch: str
    first_seq: int
    last_seq: int
    #: Unix seconds of the first stored message (0.0 when the stream is empty).
    first_time: float


def verdict(resume: Resume, state: StreamState) -> Reason | None:
    """None when ``resume`` can be served from this stream, else why not.

    ``after`` beyond the stream's last sequence cannot come from this stream: the
    client's position belongs to another history (``epoch``). ``time`` before
    the first stored message when messages were dropped (first sequence > 1) is a
    ``gap``; ``last`` is always servable (fewer stored is all there is).
    """
    if resume.after is not None:
        if resume.epoch != state.epoch or resume.after > state.last_seq:
            return EPOCH
        if state.first_seq > resume.after + 1 and state.last_seq > resume.after:
            return GAP
        return None
    if resume.time is not None and state.first_seq > 1 and state.first_time > resume.time:
        return GAP
    return None


# -- the in-memory window ---------------------------------------------------------------------


class Window(Generic[T]):
    """Recent messages of one subscription pattern, in sequence order.

    ``complete_after``: the window holds every message of the pattern with a
    sequence above it (None: unknown yet). It is learnt from a JetStream read
    (everything up to the read's end, live after it) or, for a plain subject,
    from a message's ``Nats-Last-Sequence``. Dropping the oldest entry (count or
    age) moves it up to that entry's sequence.
    """

    __slots__ = ("_floor", "_items", "complete_after", "max_age_s", "max_items")

    def __init__(self, max_items: int, max_age_s: float) -> None:
        self.max_items = max_items
        self.max_age_s = max_age_s
        self._items: deque[tuple[int, float, T]] = deque()
        self.complete_after: int | None = None
        #: The highest sequence dropped (count or age): the window never vouches below it.
        self._floor = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def last_seq(self) -> int | None:
        return self._items[-1][0] if self._items else None

    def add(self, seq: int, at: float, item: T, previous: int | None = None) -> None:
        """A live message received at ``at`` (unix seconds: a ``since.time`` resume compares
        with it). ``previous``: its subject's previous sequence, when the pattern is one
        subject; a message missing between two (live delivery is at most once) starts the
        window afresh after it."""
        if self.max_items <= 0 or self.max_age_s <= 0:
            return
        items = self._items
        if items and seq <= items[-1][0]:
            if seq == items[-1][0]:
                return  # the same message again
            self.reset()  # sequences went back: the stream was recreated
        if previous is not None:
            tail = items[-1][0] if items else self.complete_after
            if tail is None or previous != tail:
                items.clear()
                self.complete_after = self._floor = previous
        items.append((seq, at, item))
        self.expire(at)

    def expire(self, now: float) -> None:
        items = self._items
        horizon = now - self.max_age_s
        while items and (len(items) > self.max_items or items[0][1] < horizon):
            seq, _, _ = items.popleft()
            self._floor = seq
            if self.complete_after is not None and seq > self.complete_after:
                self.complete_after = seq

    def learn(self, complete_after: int) -> None:
        """Every live message after ``complete_after`` reached this window (a read covered
        the stream up to it while the live subscription was already on)."""
        known = max(complete_after, self._floor)
        if self.complete_after is None or known < self.complete_after:
            self.complete_after = known

    def reset(self) -> None:
        """Live delivery was interrupted (NATS down): vouch for nothing until learnt again."""
        self._items.clear()
        self.complete_after = None
        self._floor = 0

    def after(self, seq: int) -> list[tuple[int, T]] | None:
        """Every message after ``seq``, or None when the window cannot vouch for that."""
        if self.complete_after is None or seq < self.complete_after:
            return None
        return [(s, item) for s, _, item in self._items if s > seq]

    def since(self, at: float) -> list[tuple[int, T]] | None:
        """Messages at or after ``at``, when the window reaches back that far."""
        items = self._items
        if self.complete_after is None or not items or items[0][1] > at:
            return None
        return [(s, item) for s, t, item in items if t >= at]

    def last(self, k: int) -> list[tuple[int, T]] | None:
        """The last ``k`` messages, when the window holds that many."""
        items = self._items
        if self.complete_after is None or len(items) < k:
            return None
        return [(s, item) for s, _, item in list(items)[len(items) - k :]]


# -- the seam between replay and live ---------------------------------------------------------


class Seam(Generic[T]):
    """Live messages of one client's subscription held while its replay is sent."""

    __slots__ = ("held", "limit", "overflow")

    def __init__(self, limit: int) -> None:
        self.held: list[tuple[int, T]] = []
        self.limit = limit
        #: More live messages arrived than may wait: the client is cut (4003).
        self.overflow = False

    def hold(self, seq: int, item: T) -> None:
        if len(self.held) >= self.limit:
            self.overflow = True
            return
        self.held.append((seq, item))

    def release(self, last_replayed: int) -> list[tuple[int, T]]:
        """The held messages after the replay's last one, in order, each once."""
        out: list[tuple[int, T]] = []
        top = last_replayed
        for seq, item in self.held:
            if seq > top:
                out.append((seq, item))
                top = seq
        self.held = []
        return out
