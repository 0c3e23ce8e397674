"""Token buckets: the inbound rate limit of a connection, request rates per principal.

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
