"""Token buckets: the inbound rate limit of a connection, and the one keyed map of them.

:class:`KeyedRateLimiter` is the only bucket-per-key map: request rates per
principal (gateway and ``fanout.service``) and handshakes per address
(:class:`fanout.core.limits.HandshakeRate`) all count with it.
Time is passed in by the caller (monotonic seconds), so the rules are plain
arithmetic and unit tests need no clock.
"""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; starts full."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def take(self, n: float, now: float) -> bool:
        """Spend ``n`` tokens if there are enough; False (and nothing spent) otherwise."""
        if self.last is not None:
            tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        else:
            tokens = self.tokens
        self.last = now
        if tokens >= n:
            self.tokens = tokens - n
            return True
        self.tokens = tokens
        return False

    def retry_after(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens are available (0 when they are now)."""
        missing = n - self.tokens
        return 0.0 if missing <= 0 else missing / self.rate

    def full(self, now: float) -> bool:
        """True when the bucket has refilled: it is then the same as a new one."""
        last = self.last
        return last is None or self.tokens + (now - last) * self.rate >= self.burst


class KeyedRateLimiter:
    """A token bucket per key, at most ``max_keys`` of them (least recently used goes first).

    Evicting a bucket forgets its debt, so a client with more live keys than
    ``max_keys`` could get more than its rate: size the map above the number
    of principals active within ``burst / rate`` seconds. :meth:`prune` drops
    refilled buckets; call it from a periodic sweep, never per check (it is O(n)).
    """

    __slots__ = ("_buckets", "burst", "max_keys", "rate")

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate > 0, burst >= 1 and max_keys >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, now: float, cost: float = 1.0) -> float | None:
        """``None`` when ``key`` may go now (tokens spent), else seconds until it may."""
        buckets = self._buckets
        bucket = buckets.pop(key, None)
        if bucket is None:
            if len(buckets) >= self.max_keys:
                del buckets[next(iter(buckets))]
            bucket = TokenBucket(self.rate, self.burst, now)
        buckets[key] = bucket
        if bucket.take(cost, now):
            return None
        return bucket.retry_after(cost)

    def prune(self, now: float) -> None:
        """Forget keys whose bucket is full again: they cost nothing to recreate."""
        buckets = self._buckets
        for key in [key for key, bucket in buckets.items() if bucket.full(now)]:
            del buckets[key]
