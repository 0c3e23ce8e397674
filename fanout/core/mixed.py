"""Once per connection across a recoverable and a plain pattern that both match a subject.

A recoverable pattern R (one stream covers all of it) is subscribed on NATS under
its republished subject; a plain pattern P under itself. When a connection holds
both and they intersect (``xy.md.a.x`` recoverable, ``xy.*.a.x`` plain), a message
on a subject s of both reaches the worker twice: first live on P, later
republished on R with its stream sequence. The two copies are not adjacent (the
republish waits for the store), so :mod:`fanout.core.overlap` cannot pair them.

The rule, per connection: the **recoverable pattern delivers** s (its copy carries
``seq``) once it is *switched*; until then the plain pattern does. R is switched
from the moment its ack is decided (``answered``, the stream's last sequence
``top`` then known), or at once for a resume (its held live messages and replay
cover everything from the sub on). The hand-over is exact because, on one
nats-server, a message's live copy reaches the worker before its republished one
and before the stream's state answer that follows it:

- *Joining* (R added, ack pending): P delivers s; each copy it delivered is
  remembered (subject, payload). R's republished copy of s is dropped when it
  matches one of them, or when it can only be a message P delivered before R
  came (s matched a plain pattern held then and still held).
- *Switched*: P's copy of s is skipped (and remembered with its frame); R's
  republished copies are dropped when they are ones P delivered while joining
  (remembered, or sequence ≤ ``top`` on a subject a pattern held when R came
  matches), else delivered.
- Removing a switched R: the copies P skipped whose republished copy has not
  come yet are delivered now (their republish would no longer reach the
  connection); then P delivers s again. Removing P while R is switched changes
  nothing for s; while R joins, R delivers what P no longer does.

Memory is bounded: each remembered list keeps at most ``limit`` copies (the
outbox's message cap); a republished copy that never comes (republish is at
most once: recovery's catch-up reads the stream for those) is forgotten when a
later one of its stream is matched. Residuals: as in :mod:`fanout.core.overlap`,
identical messages (same subject and payload) published back to back at a
hand-over may pair with each other's copy; and a message P delivered just
before R came, whose republished copy arrives after P was removed while R was
still joining (``sub`` R and ``unsub`` P within the stream's store latency),
is delivered again by R (a duplicate rather than a loss).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from fanout.core import subjects
from fanout.core.trie import PatternTrie

__all__ = ["Mix"]

T = TypeVar("T")

_Copy = tuple[str, bytes]


class _Recoverable:
    """One recoverable pattern of the connection and its hand-over state."""

    __slots__ = ("delivered", "pattern", "plain_seen", "stream", "switched", "top")

    def __init__(self, pattern: str, stream: str, switched: bool) -> None:
        self.pattern = pattern
        self.stream = stream
        self.switched = switched
        #: The plain patterns that crossed it when it came (their copies delivered before
        #: are not remembered), less those removed while it was joining.
        self.plain_seen: set[str] = set()
        #: Copies the plain patterns delivered while joining, oldest first.
        self.delivered: deque[_Copy] = deque()
        #: Republished copies up to this sequence were delivered by a plain pattern.
        self.top = 0


class Mix(Generic[T]):
    """One connection's plain and recoverable patterns where they intersect.

    ``T`` is the outbox item of a skipped plain copy (delivered if its recoverable
    pattern goes before the republished copy came). The hub asks :meth:`plain_copy`
    and :meth:`republished` only for patterns it was told cross (:meth:`crossing`).
    """

    __slots__ = ("_crossing", "_plain", "_recoverable", "_skipped", "_trie", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._plain: PatternTrie[str] = PatternTrie()
        self._trie: PatternTrie[_Recoverable] = PatternTrie()
        self._recoverable: dict[str, _Recoverable] = {}
        #: pattern (either kind) → how many of the other kind intersect it.
        self._crossing: dict[str, int] = {}
        #: stream → plain copies skipped while their republished copy is due.
        self._skipped: dict[str, deque[tuple[str, bytes, T]]] = {}

    def crossing(self, pattern: str) -> bool:
        """Some pattern of the other kind intersects ``pattern``."""
        return self._crossing.get(pattern, 0) > 0

    # -- patterns ------------------------------------------------------------------------
    def add_plain(self, pattern: str) -> list[str]:
        """A plain pattern added: the patterns (either kind) that now cross and did not."""
        self._plain.add(pattern, pattern)
        others = self._trie.intersecting(pattern)
        return self._cross(pattern, [r.pattern for r in others], +1)

    def remove_plain(self, pattern: str) -> list[str]:
        """A plain pattern removed: the patterns that no longer cross."""
        self._plain.remove(pattern, pattern)
        others = self._trie.intersecting(pattern)
        for r in others:
            if not r.switched:
                r.plain_seen.discard(pattern)  # what it delivers no more, R must
        return self._cross(pattern, [r.pattern for r in others], -1)

    def add_recoverable(self, pattern: str, stream: str, switched: bool) -> list[str]:
        """A recoverable pattern added (``switched``: a resume); the patterns that now cross."""
        r = _Recoverable(pattern, stream, switched)
        others = self._plain.intersecting(pattern)
        if not switched:
            r.plain_seen.update(others)
        self._recoverable[pattern] = r
        self._trie.add(pattern, r)
        return self._cross(pattern, others, +1)

    def remove_recoverable(self, pattern: str) -> tuple[list[str], list[T]]:
        """A recoverable pattern removed: the patterns that no longer cross, and the plain
        copies it made the connection skip whose republished copy has not come (to deliver
        now, in order)."""
        r = self._recoverable.pop(pattern)
        self._trie.remove(pattern, r)
        released: list[T] = []
        skipped = self._skipped.get(r.stream)
        if r.switched and skipped:
            kept: deque[tuple[str, bytes, T]] = deque()
            for subject, data, item in skipped:
                if subjects.matches(pattern, subject) and not self._switched_for(subject):
                    released.append(item)
                else:
                    kept.append((subject, data, item))
            self._skipped[r.stream] = kept
        return self._cross(pattern, self._plain.intersecting(pattern), -1), released

    def answered(self, pattern: str, top: int | None) -> None:
        """The ack of ``pattern`` is decided; ``top``: the stream's last sequence then
        (None: the stream did not answer, so its copies may never come: stay joining)."""
        r = self._recoverable.get(pattern)
        if r is None or r.switched or top is None:
            return
        r.switched = True
        r.top = top

    def _cross(self, pattern: str, others: list[str], step: int) -> list[str]:
        crossing = self._crossing
        changed: list[str] = []
        before = crossing.get(pattern, 0)
        after = before + step * len(others)
        if after:
            crossing[pattern] = after
        else:
            crossing.pop(pattern, None)
        if others and (before == 0) != (after == 0):
            changed.append(pattern)
        for other in others:
            count = crossing.get(other, 0) + step
            if count:
                crossing[other] = count
            else:
                del crossing[other]
            if count == (1 if step > 0 else 0):
                changed.append(other)
        return changed

    def _switched_for(self, subject: str) -> _Recoverable | None:
        for r in self._trie.matching(subject):
            if r.switched:
                return r
        return None

    # -- copies ------------------------------------------------------------------------------
    def plain_copy(self, subject: str, data: bytes, item: T) -> bool:
        """A plain pattern's copy of ``subject``: True to deliver it to the connection."""
        switched = self._switched_for(subject)
        if switched is not None:
            skipped = self._skipped.get(switched.stream)
            if skipped is None:
                skipped = self._skipped[switched.stream] = deque()
            skipped.append((subject, data, item))
            if len(skipped) > self.limit:
                skipped.popleft()
            return False
        for r in self._trie.matching(subject):
            r.delivered.append((subject, data))
            if len(r.delivered) > self.limit:
                r.delivered.popleft()
        return True

    def republished(self, subject: str, data: bytes, seq: int) -> bool:
        """A recoverable pattern's copy of ``subject``: True to deliver it to the connection."""
        drop = False
        stream = None
        for r in self._trie.matching(subject):
            stream = r.stream
            delivered = _take((subject, data), r.delivered)
            # else it may be a message a plain pattern delivered before R came
            earlier = (not r.switched or seq <= r.top) and any(
                subjects.matches(p, subject) for p in r.plain_seen
            )
            if delivered or earlier:
                drop = True
        if not drop and stream is not None:
            skipped = self._skipped.get(stream)
            if skipped:
                _take_skipped(subject, data, skipped)
        return not drop


def _take(copy: _Copy, delivered: deque[_Copy]) -> bool:
    """Remove ``copy`` and every older one (their republished copies never came)."""
    if not delivered:
        return False
    for i, seen in enumerate(delivered):
        if seen == copy:
            for _ in range(i + 1):
                delivered.popleft()
            return True
    return False


def _take_skipped(subject: str, data: bytes, skipped: deque[tuple[str, bytes, T]]) -> None:
    for i, (s, d, _) in enumerate(skipped):
        if s == subject and d == data:
            for _ in range(i + 1):
                skipped.popleft()
            return
