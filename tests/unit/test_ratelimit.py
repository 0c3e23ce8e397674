from __future__ import annotations

import pytest

from fanout.core.ratelimit import TokenBucket


def test_burst_then_refill_at_rate() -> None:
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert all(b.take(1, 0.0) for _ in range(5))
    assert b.take(1, 0.0) is False
    assert b.retry_after() == pytest.approx(0.1)
    assert b.take(1, 0.05) is False
    assert b.take(1, 0.1) is True
    assert b.take(1, 100.0) is True
    assert b.tokens == pytest.approx(4.0)  # capped at burst, one spent


def test_failed_take_spends_nothing() -> None:
    b = TokenBucket(rate=1, burst=3, now=0.0)
    assert b.take(5, 0.0) is False
    assert b.take(3, 0.0) is True


def test_first_use_without_clock_starts_full() -> None:
    b = TokenBucket(rate=1, burst=2)
    assert b.take(2, 123.0) is True
    assert b.take(1, 123.0) is False
