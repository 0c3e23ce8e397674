"""Outbox policies, caps, drop notices and batch sharing (sans-I/O)."""

from __future__ import annotations

import json
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core.outbox import (
    CUT,
    DISCONNECT,
    DROP_OLDEST,
    LATEST,
    POLICIES,
    POLICY_NAMES,
    Batch,
    ClientQueue,
    Pending,
)


def item(subject: str, n: int, size: int = 0) -> Pending:
    body = json.dumps({"n": n, "p": "x" * size}, separators=(",", ":"))
    return subject, f"<{subject}|{body}>".encode()


def notice(subject: str, count: int) -> bytes:
    return f"[dropped {subject} {count}]".encode()


def test_policy_names_match_the_settings_literals() -> None:
    assert POLICY_NAMES == ("drop_oldest", "latest", "disconnect")
    assert POLICIES == {"drop_oldest": DROP_OLDEST, "latest": LATEST, "disconnect": DISCONNECT}


def test_frames_drain_in_order_as_one_write() -> None:
    q = ClientQueue(10, 1 << 20)
    for n in range(3):
        assert q.push(item("a", n), DROP_OLDEST, False) == 0
    assert len(q) == 3
    assert q.drain(notice) == b"".join(item("a", n)[1] for n in range(3))
    assert len(q) == 0 and q.nbytes == 0 and q.idle()


def test_single_frame_drains_as_the_same_object() -> None:
    q = ClientQueue(10, 1 << 20)
    one = item("a", 1)
    q.push(one, DROP_OLDEST, False)
    assert q.drain(notice) is one[1]


def test_drop_oldest_by_count_announces_each_subject_before_the_next_msg() -> None:
    q = ClientQueue(3, 1 << 20)
    pushed = [item("a", 0), item("b", 1), item("a", 2), item("b", 3), item("a", 4)]
    results = [q.push(p, DROP_OLDEST, True) for p in pushed]
    assert results == [0, 0, 0, 1, 1]
    assert q.dropped == {"a": 1, "b": 1}
    assert len(q) == 3
    out = q.drain(notice)
    assert out == notice("a", 1) + notice("b", 1) + b"".join(p[1] for p in pushed[2:])
    assert q.dropped == {} and q.idle()


def test_drop_oldest_by_bytes_keeps_at_least_the_newest_frame() -> None:
    small = [item("s", n) for n in range(3)]
    big = item("s", 9, size=500)
    q = ClientQueue(100, len(big[1]) - 1)
    for p in small:
        q.push(p, DROP_OLDEST, True)
    assert q.push(big, DROP_OLDEST, True) == 3
    assert q.dropped == {"s": 3}
    assert q.drain(notice) == notice("s", 3) + big[1]


def test_eviction_counts_every_frame_it_removes() -> None:
    q = ClientQueue(100, 300)
    for n in range(10):
        q.push(item("s", n, size=5), DROP_OLDEST, True)
    held = len(q)
    big = item("s", 99, size=250)
    dropped = q.push(big, DROP_OLDEST, True)
    assert dropped == held + 1 - len(q)
    assert sum(q.dropped.values()) == 10 + 1 - len(q)
    assert q.nbytes <= 300


def test_latest_keeps_only_the_newest_value_per_subject_while_backed_up() -> None:
    q = ClientQueue(100, 1 << 20)
    assert q.push(item("t.a", 1), LATEST, True) == 0
    assert q.push(item("t.b", 1), LATEST, True) == 0
    assert q.push(item("t.a", 2), LATEST, True) == 1
    assert q.push(item("t.a", 3), LATEST, True) == 1
    assert len(q) == 2
    assert q.dropped == {"t.a": 2}
    assert q.drain(notice) == notice("t.a", 2) + item("t.a", 3)[1] + item("t.b", 1)[1]


def test_latest_is_plain_fifo_while_the_client_keeps_up() -> None:
    q = ClientQueue(100, 1 << 20)
    for n in range(3):
        assert q.push(item("t.a", n), LATEST, False) == 0
    assert q.drain(notice) == b"".join(item("t.a", n)[1] for n in range(3))


def test_latest_value_is_replaced_even_after_the_transport_resumed() -> None:
    """Once a subject has a held latest value, a newer one replaces it (order per subject)."""
    q = ClientQueue(100, 1 << 20)
    q.push(item("t.a", 1), LATEST, True)
    assert q.push(item("t.a", 2), LATEST, False) == 1
    assert q.drain(notice) == notice("t.a", 1) + item("t.a", 2)[1]


def test_disconnect_policy_cuts_when_a_cap_is_passed() -> None:
    q = ClientQueue(2, 1 << 20)
    assert q.push(item("x", 1), DISCONNECT, True) == 0
    assert q.push(item("x", 2), DISCONNECT, True) == 0
    assert q.push(item("x", 3), DISCONNECT, True) == CUT
    big = ClientQueue(100, 50)
    assert big.push(item("x", 1, size=100), DISCONNECT, True) == CUT


def test_batch_is_joined_once_and_shared_by_every_client_from_its_start() -> None:
    batch = Batch(DROP_OLDEST)
    queues = [ClientQueue(10, 1 << 20) for _ in range(3)]
    batch.append(item("a", 1))
    for q in queues:
        assert q.idle()
        q.share(batch)
    batch.append(item("a", 2))
    assert [len(q) for q in queues] == [2, 2, 2]
    outs = [q.drain(notice) for q in queues]
    assert outs[0] == item("a", 1)[1] + item("a", 2)[1]
    assert outs[1] is outs[0] and outs[2] is outs[0]
    assert all(q.idle() for q in queues)


def test_a_client_that_joins_mid_batch_gets_only_its_tail() -> None:
    batch = Batch(DROP_OLDEST)
    early, late = ClientQueue(10, 1 << 20), ClientQueue(10, 1 << 20)
    batch.append(item("a", 1))
    early.share(batch)
    batch.append(item("a", 2))
    late.share(batch)
    batch.append(item("a", 3))
    assert len(early) == 3 and len(late) == 2
    assert late.drain(notice) == item("a", 2)[1] + item("a", 3)[1]
    assert early.drain(notice) == b"".join(item("a", n)[1] for n in (1, 2, 3))


def test_single_frame_batch_is_the_frame_itself() -> None:
    batch = Batch(DROP_OLDEST)
    one = item("a", 1)
    batch.append(one)
    q = ClientQueue(10, 1 << 20)
    q.share(batch)
    assert q.drain(notice) is one[1]


def test_settle_copies_the_shared_tail_under_the_caps() -> None:
    batch = Batch(DROP_OLDEST)
    q = ClientQueue(2, 1 << 20)
    batch.append(item("a", 1))
    q.share(batch)
    for n in (2, 3, 4):
        batch.append(item("a", n))
    assert q.settle(True) == 2
    assert q.shared is None and len(q) == 2
    batch.clear()
    assert q.drain(notice) == notice("a", 2) + item("a", 3)[1] + item("a", 4)[1]


def test_settle_then_push_keeps_order_across_subscriptions() -> None:
    batch = Batch(DROP_OLDEST)
    q = ClientQueue(10, 1 << 20)
    batch.append(item("a", 1))
    q.share(batch)
    assert q.settle(False) == 0
    q.push(item("b", 1), DROP_OLDEST, False)
    batch.append(item("a", 2))
    assert q.drain(notice) == item("a", 1)[1] + item("b", 1)[1]


def test_settle_with_disconnect_policy_reports_cut() -> None:
    batch = Batch(DISCONNECT)
    q = ClientQueue(1, 1 << 20)
    batch.append(item("a", 1))
    q.share(batch)
    batch.append(item("a", 2))
    assert q.settle(True) == CUT


def test_batch_clear_forgets_frames_and_the_joined_bytes() -> None:
    batch = Batch(LATEST)
    batch.append(item("a", 1))
    batch.append(item("a", 2))
    assert batch.data(0) == item("a", 1)[1] + item("a", 2)[1]
    assert batch.nbytes == len(batch.data(0))
    batch.clear()
    assert len(batch) == 0 and batch.nbytes == 0 and batch.joined is None
    batch.append(item("a", 3))
    assert batch.data(0) == item("a", 3)[1]


FRAME = re.compile(r"\[dropped (\w) (\d+)\]|<(\w)\|([^>]*)>")

ops = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 60), st.booleans()),
    min_size=1,
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    policy=st.sampled_from([DROP_OLDEST, LATEST]),
    max_messages=st.integers(1, 8),
    max_bytes=st.integers(40, 400),
)
def test_loss_is_bounded_counted_and_ordered(
    ops: list[tuple[str, int, bool]], policy: int, max_messages: int, max_bytes: int
) -> None:
    """Whatever arrives: caps hold (one frame may exceed the byte cap), every frame is
    either delivered or counted in a notice, and each subject's frames stay in order."""
    q = ClientQueue(max_messages, max_bytes)
    delivered: list[bytes] = []
    counted = 0
    seq = {"a": 0, "b": 0, "c": 0}
    sent = 0
    for subject, size, drain_now in ops:
        seq[subject] += 1
        sent += 1
        result = q.push(item(subject, seq[subject], size), policy, not drain_now)
        assert result >= 0
        counted += result
        assert len(q) <= max_messages
        assert q.nbytes <= max_bytes or len(q) == 1
        if drain_now:
            out = q.drain(lambda s, c: notice(s, c))
            delivered.append(out)
    delivered.append(q.drain(lambda s, c: notice(s, c)))
    text = b"".join(delivered).decode()
    frames = FRAME.findall(text)
    assert "".join(m[0] for m in FRAME.finditer(text)) == text, "bytes outside any frame"
    announced = sum(int(count) for _, count, _, _ in frames if count)
    msgs = [(subject, json.loads(body)["n"]) for _, _, subject, body in frames if subject]
    assert len(msgs) + announced == sent
    assert announced == counted
    last = {"a": 0, "b": 0, "c": 0}
    for subject, n in msgs:
        assert n > last[subject]
        last[subject] = n


def test_held_replies_drain_after_everything_pending_and_survive_the_caps() -> None:
    q = ClientQueue(max_messages=2, max_bytes=10_000)
    batch = Batch(DROP_OLDEST)
    batch.append(item("a", 0))
    q.share(batch)
    assert q.settle(False) == 0
    q.push(item("a", 1), DROP_OLDEST, True)
    q.hold(b"{ack}")
    assert not q.idle()
    q.push(item("b", 2), LATEST, True)  # past the cap: a:0 is dropped, the reply is not
    assert q.drain(notice) == b"[dropped a 1]" + item("a", 1)[1] + item("b", 2)[1] + b"{ack}"
    assert q.idle() and q.take_held() == []


def test_held_replies_follow_a_shared_part_too() -> None:
    q = ClientQueue(max_messages=10, max_bytes=10_000)
    batch = Batch(DROP_OLDEST)
    batch.append(item("a", 0))
    q.share(batch)
    batch.append(item("a", 1))
    q.hold(b"{ack}")
    assert q.drain(notice) == item("a", 0)[1] + item("a", 1)[1] + b"{ack}"
