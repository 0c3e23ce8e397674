"""Which copy of a NATS message delivers it when the worker's subscriptions overlap.

A message whose subject matches several of the worker's NATS subscriptions
arrives once per subscription, in wire order (copies of one publish are
adjacent). Exactly one copy must reach the clients: the one that arrives on the
*delivering* subscription D(s), the oldest existing, non-draining subscription
whose pattern matches the subject s; the clients of every pattern matching s get
that copy (each client once).

Adding a subscription never changes D for a subject an older one covers, so an
add neither loses nor duplicates. D changes only when a subscription P is
removed while an overlapping one exists: at the moment its UNSUB is issued
(:meth:`Overlaps.drain`) P stops being a candidate. One message's copies may
straddle that moment, so the last copy processed before it is remembered: after
the switch, its remaining copies (same subject and payload; as many as the
subscriptions that matched it, less those already seen) are dropped if it was
delivered already, or the first of them delivers it if not. A message whose
copies all arrived before the switch is no straddle. Residual: a message whose
group was cut at that instant, followed at once by an *identical* one, may count
as one.

A subscription with no overlapping one (``Route.overlap == 0``) needs none of
this: the hub delivers its messages on the fast path without asking.
"""

from __future__ import annotations

from dataclasses import dataclass

from fanout.core.trie import PatternTrie

__all__ = ["Overlaps", "Route"]


class Route:
    """One NATS subscription of the worker (pending, live or draining)."""

    __slots__ = ("draining", "overlap", "pattern", "seq", "sid")

    def __init__(self, sid: int, pattern: str, seq: int) -> None:
        self.sid = sid
        self.pattern = pattern
        #: Age: a lower number was subscribed earlier.
        self.seq = seq
        #: How many other existing subscriptions intersect this one.
        self.overlap = 0
        self.draining = False

    def __repr__(self) -> str:
        state = " draining" if self.draining else ""
        return f"Route({self.sid}, {self.pattern!r}, overlap={self.overlap}{state})"


@dataclass(slots=True)
class _Copy:
    """The copies seen of one message: ``expected`` is one per subscription matching it."""

    subject: str
    data: bytes
    delivered: bool
    expected: int
    seen: int = 1

    def is_rest_of(self, subject: str, data: bytes) -> bool:
        return self.seen < self.expected and self.subject == subject and self.data == data


class Overlaps:
    """The worker's subscriptions indexed by pattern, and the delivering-copy rule."""

    __slots__ = ("_last", "_seq", "_straddle", "routes", "trie")

    def __init__(self) -> None:
        self.trie: PatternTrie[Route] = PatternTrie()
        self.routes: dict[int, Route] = {}
        self._seq = 0
        self._last: _Copy | None = None
        self._straddle: _Copy | None = None

    def add(self, sid: int, pattern: str) -> Route:
        """A SUB was issued: the new subscription is the youngest."""
        self._seq += 1
        route = Route(sid, pattern, self._seq)
        others = self.trie.intersecting(pattern)
        if others:
            for other in others:
                other.overlap += 1
            route.overlap = len(others)
        self.trie.add(pattern, route)
        self.routes[sid] = route
        return route

    def drain(self, route: Route) -> None:
        """Its UNSUB is being issued: copies arriving on it no longer choose D."""
        route.draining = True
        last = self._last
        if route.overlap and last is not None:
            if last.seen < last.expected:  # the switch cuts this message's copies in two
                self._straddle = last
            self._last = None

    def remove(self, route: Route) -> None:
        """No copy can arrive on it any more (the flush after its UNSUB came back)."""
        if self.routes.get(route.sid) is not route:
            return  # already gone (its client was replaced: sids start again at 1)
        del self.routes[route.sid]
        self.trie.remove(route.pattern, route)
        if route.overlap:  # else nothing intersects it: no count to update, no walk
            self._straddle = None  # every copy sent before its UNSUB has arrived
            for other in self.trie.intersecting(route.pattern):
                other.overlap -= 1

    def clear(self) -> None:
        """The NATS client was replaced: none of its subscriptions exist any more."""
        self.trie = PatternTrie()
        self.routes.clear()
        self._last = self._straddle = None

    def select(self, route: Route, subject: str, data: bytes) -> list[Route] | None:
        """For a copy on an overlapping ``route``: the routes whose clients get it, or None."""
        matching = self.trie.matching(subject)
        straddle = self._straddle
        if straddle is not None:
            if straddle.is_rest_of(subject, data):
                straddle.seen += 1
                if straddle.seen == straddle.expected:
                    self._straddle = None
                deliver = not straddle.delivered
                straddle.delivered = True
                return matching if deliver else None
            self._straddle = None
        oldest: Route | None = None
        for candidate in matching:
            if not candidate.draining and (oldest is None or candidate.seq < oldest.seq):
                oldest = candidate
        deliver = oldest is route
        last = self._last
        if last is not None and last.is_rest_of(subject, data):
            # another copy of the same message (copies are adjacent in wire order)
            last.seen += 1
            last.delivered = last.delivered or deliver
        else:
            self._last = _Copy(subject, data, deliver, len(matching))
        return matching if deliver else None
