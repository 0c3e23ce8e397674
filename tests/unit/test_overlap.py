"""The delivering-copy rule: exactly one copy of each message, also across adds and removals."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core.overlap import Overlaps


def test_overlap_counts_follow_adds_and_removals() -> None:
    o = Overlaps()
    a = o.add(1, "m.a.x")
    b = o.add(2, "m.a.*")
    c = o.add(3, "z.>")
    assert (a.overlap, b.overlap, c.overlap) == (1, 1, 0)
    o.drain(a)
    o.remove(a)
    assert b.overlap == 0 and 1 not in o.routes
    o.remove(a)  # idempotent
    assert b.overlap == 0


def test_the_oldest_subscription_delivers() -> None:
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    assert o.select(new, "m.a.x", b"1") is None
    assert o.select(old, "m.a.x", b"1") == [old, new]
    # a subject only the younger one matches: it delivers
    assert o.select(new, "m.a.y", b"2") == [new]


def test_draining_subscription_hands_over_to_the_next_oldest() -> None:
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    o.drain(old)
    assert o.select(old, "m.a.x", b"1") is None
    assert o.select(new, "m.a.x", b"1") is not None


def test_straddle_delivered_before_the_switch_is_not_delivered_again() -> None:
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    assert o.select(old, "m.a.x", b"7") is not None
    o.drain(old)
    assert o.select(new, "m.a.x", b"7") is None
    assert o.select(new, "m.a.x", b"8") is not None


def test_a_complete_message_before_the_switch_is_no_straddle() -> None:
    """Both copies of "7" arrived before the switch: a later identical "7" is a new message."""
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    assert o.select(old, "m.a.x", b"7") is not None
    assert o.select(new, "m.a.x", b"7") is None
    o.drain(old)
    assert o.select(new, "m.a.x", b"7") is not None


def test_a_straddle_ends_with_its_last_copy() -> None:
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    assert o.select(old, "m.a.x", b"7") is not None
    o.drain(old)
    assert o.select(new, "m.a.x", b"7") is None  # the straddling copy
    assert o.select(new, "m.a.x", b"7") is not None  # the next, identical message


def test_identical_messages_after_every_subscription_went_and_came_back() -> None:
    """A client subscribes m.* and m.a, gets "1", leaves; the next one does the same."""
    o = Overlaps()
    for round_ in range(3):
        star = o.add(2 * round_ + 1, "m.*")
        lit = o.add(2 * round_ + 2, "m.a")
        delivered = [o.select(r, "m.a", b'{"n":1}') is not None for r in (star, lit)]
        assert delivered.count(True) == 1, round_
        for route in (star, lit):
            o.drain(route)
        for route in (star, lit):
            o.remove(route)


def test_straddle_dropped_before_the_switch_is_delivered_after_it() -> None:
    o = Overlaps()
    old = o.add(1, "m.a.x")
    new = o.add(2, "m.a.*")
    assert o.select(new, "m.a.x", b"7") is None
    o.drain(old)
    assert o.select(old, "m.a.x", b"7") is not None
    assert o.select(new, "m.a.x", b"8") is not None


@settings(max_examples=400)
@given(
    n=st.integers(1, 12),
    orders=st.lists(st.booleans(), min_size=12, max_size=12),
    switch_at=st.integers(0, 40),
    inflight=st.integers(0, 4),
    add_third_at=st.integers(0, 12),
)
def test_every_message_exactly_once_while_a_pattern_is_removed(
    n: int, orders: list[bool], switch_at: int, inflight: int, add_third_at: int
) -> None:
    """A server sends each message's copies adjacently (in any order among the
    subscriptions); the worker drains P at an arbitrary point between two copies;
    P's copies keep arriving for ``inflight`` more messages (until the server reads
    the UNSUB). Each message must be delivered exactly once."""
    o = Overlaps()
    p = o.add(1, "m.a.x")
    q = o.add(2, "m.a.*")
    r = None
    delivered: list[bytes] = []
    position = 0
    unsub_read_at: int | None = None
    for i in range(n):
        if i == add_third_at and r is None:
            r = o.add(3, "m.>")
        data = str(i).encode()
        holders = [q] if r is None else [q, r]
        if unsub_read_at is None or i < unsub_read_at:
            holders.append(p)
        if orders[i]:
            holders.reverse()
        for route in holders:
            if position == switch_at and not p.draining:
                o.drain(p)
                unsub_read_at = i + inflight
            position += 1
            if o.select(route, "m.a.x", data) is not None:
                delivered.append(data)
    assert delivered == [str(i).encode() for i in range(n)]


def test_a_route_of_a_replaced_client_cannot_remove_its_successor() -> None:
    """A new NATS client numbers its sids from 1 again."""
    o = Overlaps()
    old = o.add(1, "m.a")
    o.clear()
    new = o.add(1, "m.a")
    o.remove(old)
    assert o.routes == {1: new}
    assert o.trie.matching("m.a") == [new]
