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
cover everything from the sub on). The hand-over relies on one nats-server's
order: a message's live copy reaches the worker before its republished one, and
one stream republishes in the order it stores.

- While R *joins*, P delivers s and each copy it delivered is remembered
  (subject, payload); once R is switched, P's copy of s is *skipped* and
  remembered with its frame.
- R's republished copy of s, when a plain pattern that crossed R when it came
  is still held and matches s: that pattern had every such message, so the
  copy is delivered only if its live copy was skipped (else the plain pattern
  delivered it, while joining or before R came).
- Otherwise it is dropped when it is one a plain pattern delivered while R
  joined (remembered), or, once switched, one stored before the switch on a
  subject a pattern that crossed R when it came (removed since) matches.
- Removing a switched R: the copies P skipped whose republished copy has not
  come yet are delivered now (their republish would no longer reach the
  connection); then P delivers s again. Removing P: R delivers what P no longer
  does; while copies P delivered or skipped during R's life are still due, R
  *lingers* (:meth:`Mix.crossing` stays true, so the hub keeps asking: a copy
  sent straight on would come twice, or be released again later), and is
  reported in :attr:`Mix.settled` once the last of them came.

Memory is bounded: each remembered list keeps at most ``limit`` copies (the
outbox's message cap; past it the oldest skipped copy is delivered at once, and
its republished copy counts as delivered); a republished copy that never comes
(republish is at most once: recovery's catch-up reads the stream for those) is
forgotten when a later one of its stream is matched. Residuals: as in
:mod:`fanout.core.overlap`, identical messages (same subject and payload)
published back to back at a hand-over may pair with each other's copy; and a
message P delivered before R came whose republished copy arrives after P was
removed (``unsub`` P within the stream's store latency of that message) may be
delivered again by R, unless stored before R's switch and R still lingers (a
duplicate, never a loss).
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

    __slots__ = ("came_with", "delivered", "held_since", "pattern", "stream", "switched", "top")

    def __init__(self, pattern: str, stream: str, switched: bool, came_with: list[str]) -> None:
        self.pattern = pattern
        self.stream = stream
        self.switched = switched
        #: The plain patterns that crossed it when it came: copies they delivered before
        #: are not remembered (their republished copies may still be on the way).
        self.came_with = frozenset(came_with)
        #: Those still held: every copy they had of its subjects since is remembered.
        self.held_since = set(came_with)
        #: Copies the plain patterns delivered while joining, oldest first.
        self.delivered: deque[_Copy] = deque()
        #: The stream's last sequence when it switched: stored before that, a message of
        #: a ``came_with`` pattern's subject was delivered by it.
        self.top = 0


class Mix(Generic[T]):
    """One connection's plain and recoverable patterns where they intersect.

    ``T`` is the outbox item of a skipped plain copy (delivered if its recoverable
    pattern goes before the republished copy came). The hub asks :meth:`plain_copy`
    and :meth:`republished` only for patterns it was told cross (:meth:`crossing`).
    """

    __slots__ = (
        "_crossing",
        "_lingering",
        "_plain",
        "_recoverable",
        "_skipped",
        "_trie",
        "limit",
        "settled",
    )

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._plain: PatternTrie[str] = PatternTrie()
        self._trie: PatternTrie[_Recoverable] = PatternTrie()
        self._recoverable: dict[str, _Recoverable] = {}
        #: pattern (either kind) → how many of the other kind intersect it.
        self._crossing: dict[str, int] = {}
        #: stream → plain copies skipped while their republished copy is due.
        self._skipped: dict[str, deque[tuple[str, bytes, T]]] = {}
        #: Recoverable patterns no plain one crosses any more whose republished copies
        #: are still due against what a removed one delivered or skipped: the hub must
        #: keep asking (a copy sent straight on would come twice, or a release later).
        self._lingering: set[str] = set()
        #: Lingering patterns whose last due copy came: the owner re-reads :meth:`crossing`.
        self.settled: list[str] = []

    def crossing(self, pattern: str) -> bool:
        """Some pattern of the other kind intersects ``pattern`` (or, for a recoverable
        one, did and left copies due): the hub asks about its copies."""
        return self._crossing.get(pattern, 0) > 0 or pattern in self._lingering

    # -- patterns ------------------------------------------------------------------------
    def add_plain(self, pattern: str) -> list[str]:
        """A plain pattern added: the patterns (either kind) that now cross and did not."""
        self._plain.add(pattern, pattern)
        others = self._trie.intersecting(pattern)
        for r in others:
            self._lingering.discard(r.pattern)
        return self._cross(pattern, [r.pattern for r in others], +1)

    def remove_plain(self, pattern: str) -> list[str]:
        """A plain pattern removed: the patterns that no longer cross."""
        self._plain.remove(pattern, pattern)
        others = self._trie.intersecting(pattern)
        for r in others:
            r.held_since.discard(pattern)
        changed = self._cross(pattern, [r.pattern for r in others], -1)
        for r in others:
            if r.pattern in changed and self._due(r):
                self._lingering.add(r.pattern)
                changed.remove(r.pattern)
        return changed

    def add_recoverable(self, pattern: str, stream: str, switched: bool) -> list[str]:
        """A recoverable pattern added (``switched``: a resume); the patterns that now cross."""
        others = self._plain.intersecting(pattern)
        r = _Recoverable(pattern, stream, switched, others)
        self._recoverable[pattern] = r
        self._trie.add(pattern, r)
        return self._cross(pattern, others, +1)

    def remove_recoverable(self, pattern: str) -> tuple[list[str], list[T]]:
        """A recoverable pattern removed: the patterns that no longer cross, and the plain
        copies it made the connection skip whose republished copy has not come (to deliver
        now, in order)."""
        r = self._recoverable.pop(pattern)
        self._trie.remove(pattern, r)
        lingered = pattern in self._lingering
        self._lingering.discard(pattern)
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
        changed = self._cross(pattern, self._plain.intersecting(pattern), -1)
        return [*changed, pattern] if lingered else changed, released

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

    def _due(self, r: _Recoverable) -> bool:
        """A copy the plain patterns delivered or skipped while ``r`` was held is still due."""
        if r.delivered:
            return True
        skipped = self._skipped.get(r.stream)
        return skipped is not None and any(subjects.matches(r.pattern, s) for s, _, _ in skipped)

    def _settle(self) -> None:
        for pattern in [p for p in self._lingering if not self._due(self._recoverable[p])]:
            self._lingering.discard(pattern)
            self.settled.append(pattern)

    def _switched_for(self, subject: str) -> _Recoverable | None:
        for r in self._trie.matching(subject):
            if r.switched:
                return r
        return None

    # -- copies ------------------------------------------------------------------------------
    def plain_copy(self, subject: str, data: bytes, item: T) -> T | None:
        """A plain pattern's copy of ``subject``: what to deliver to the connection now:
        ``item``, or None (skipped); past the bound, the oldest skipped one instead (its
        republished copy is then dropped like one the plain pattern delivered)."""
        switched = self._switched_for(subject)
        if switched is not None:
            skipped = self._skipped.get(switched.stream)
            if skipped is None:
                skipped = self._skipped[switched.stream] = deque()
            skipped.append((subject, data, item))
            return skipped.popleft()[2] if len(skipped) > self.limit else None
        for r in self._trie.matching(subject):
            r.delivered.append((subject, data))
            if len(r.delivered) > self.limit:
                r.delivered.popleft()
        return item

    def republished(self, subject: str, data: bytes, seq: int) -> bool:
        """A recoverable pattern's copy of ``subject``: True to deliver it to the connection.

        Dropped when a plain pattern delivered that message: remembered while joining;
        on a subject a plain pattern held since R came matches, every message it had
        is accounted for (delivered: joining or before R; skipped: remembered), so only
        a skipped one is delivered; on a subject only a pattern removed since matches,
        those stored before the switch.
        """
        drop = False
        skipped_taken: bool | None = None
        stream = None
        for r in self._trie.matching(subject):
            stream = r.stream
            if _take((subject, data), r.delivered):
                drop = True
            elif any(subjects.matches(p, subject) for p in r.held_since):
                if skipped_taken is None:
                    skipped_taken = self._take_skipped(r.stream, subject, data)
                drop = drop or not skipped_taken
            elif r.switched and seq <= r.top:
                drop = drop or any(subjects.matches(p, subject) for p in r.came_with)
        if skipped_taken is None and not drop and stream is not None:
            self._take_skipped(stream, subject, data)
        if self._lingering:
            self._settle()
        return not drop

    def _take_skipped(self, stream: str, subject: str, data: bytes) -> bool:
        """Forget the skipped copy of this message (and older ones: their republished
        copies never came); False when it was not skipped."""
        skipped = self._skipped.get(stream)
        if skipped:
            for i, (s, d, _) in enumerate(skipped):
                if s == subject and d == data:
                    for _ in range(i + 1):
                        skipped.popleft()
                    return True
        return False


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
