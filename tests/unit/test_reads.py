"""One read for many resumes, without I/O (fanout.core.reads): by position, by time, by
count, and who may join a read already out."""

from __future__ import annotations

from fanout.core import history
from fanout.core.reads import Reads, Rounds, share_last, share_since


def _msgs(*seqs: int) -> list[tuple[int, bytes]]:
    return [(s, b"m%d" % s) for s in seqs]


# -- by position ------------------------------------------------------------------------------


def test_one_read_serves_every_resume_at_or_after_its_start() -> None:
    reads: Reads[str, bytes] = Reads(max_replay=100)
    assert reads.want("a", 10, held=0) == 10
    assert [reads.want(f"c{i}", 10 + i % 3, held=0) for i in range(5000)] == [None] * 5000
    served, again = reads.done(_msgs(11, 12, 13), truncated=False)
    assert again is None and not reads
    by = {s.waiter: s for s in served}
    assert len(by) == 5001
    assert by["a"].messages == _msgs(11, 12, 13) and by["a"].reason is None
    assert by["c1"].messages == _msgs(12, 13)
    assert by["c2"].messages == _msgs(13)


def test_an_older_position_waits_for_a_second_read() -> None:
    reads: Reads[str, bytes] = Reads(max_replay=100)
    assert reads.want("new", 10, held=0) == 10
    assert reads.want("old", 5, held=0) is None
    assert reads.want("older", 3, held=0) is None
    served, again = reads.done(_msgs(11), truncated=False)
    assert [s.waiter for s in served] == ["new"] and again == 3
    served, again = reads.done(_msgs(4, 6, 11), truncated=False)
    assert {s.waiter: s.messages for s in served} == {"old": _msgs(6, 11), "older": _msgs(4, 6, 11)}
    assert again is None


def test_a_resume_held_only_after_a_read_started_waits_for_the_next() -> None:
    """The read out saw the stream before this resume's live messages were held: what came
    live in between would be in neither, so it gets a read of its own."""
    reads: Reads[str, bytes] = Reads(max_replay=100)
    assert reads.want("early", 10, held=reads.started) == 10
    late = reads.started  # began holding now: the read above is already out
    assert reads.want("late", 10, held=late) is None
    served, again = reads.done(_msgs(11), truncated=False)
    assert [s.waiter for s in served] == ["early"] and again == 10
    served, again = reads.done(_msgs(11, 12), truncated=False)
    assert [(s.waiter, s.messages) for s in served] == [("late", _msgs(11, 12))]
    assert again is None and reads.started == 2


def test_limit_per_waiter_and_truncated_reads() -> None:
    reads: Reads[str, bytes] = Reads(max_replay=2)
    reads.want("far", 0, held=0)
    reads.want("near", 3, held=0)
    # the read from 0 stopped at max_replay + 1 messages: "far" is over the limit;
    # "near" needs what lies beyond the read, so it gets a read of its own
    served, again = reads.done(_msgs(1, 2, 3), truncated=True)
    assert [(s.waiter, s.reason) for s in served] == [("far", history.LIMIT)]
    assert again == 3
    served, again = reads.done(_msgs(4, 5), truncated=False)
    assert [(s.waiter, s.messages, s.reason) for s in served] == [("near", _msgs(4, 5), None)]
    reads.want("x", 0, held=reads.started)
    reads.want("y", 0, held=reads.started - 1)
    served, _ = reads.done(_msgs(1, 2, 3), truncated=False)
    assert {s.reason for s in served} == {history.LIMIT}


def test_a_failed_read_answers_every_waiter_and_a_waiter_can_leave() -> None:
    reads: Reads[str, bytes] = Reads(max_replay=10)
    reads.want("a", 1, held=0)
    reads.want("b", 2, held=0)
    reads.want("gone", 2, held=0)
    reads.want("later", 0, held=0)
    reads.cancel("gone")
    served, again = reads.done([], truncated=False, reason=history.UNAVAILABLE)
    assert [(s.waiter, s.reason) for s in served] == [
        ("a", history.UNAVAILABLE),
        ("b", history.UNAVAILABLE),
    ]
    assert again == 0
    reads.cancel("later")
    served, again = reads.done([], truncated=False)
    assert served == [] and again is None


# -- by time and by count ---------------------------------------------------------------------


def test_rounds_the_resumes_that_come_while_one_is_out_wait_for_the_next() -> None:
    rounds: Rounds[str] = Rounds()
    assert rounds.want("a") is True  # the caller runs the rounds
    assert rounds.want("b") is False
    assert rounds.take() == ["a", "b"]
    assert rounds.want("c") is False  # the round of a and b is out
    assert rounds.take() == ["c"]
    assert rounds.take() == [] and not rounds.busy
    assert rounds.want("d") is True


def _timed(*seqs: int) -> list[tuple[int, float, bytes]]:
    """Message ``s`` stored at time ``100 + s``."""
    return [(s, 100.0 + s, b"m%d" % s) for s in seqs]


def test_abandoned_reads_and_rounds_give_back_every_waiter_and_start_afresh() -> None:
    """A crashed read or round task: its waiters are answered otherwise, the next resume
    starts a new read (or round) instead of waiting for one that never ends."""
    reads: Reads[str, bytes] = Reads(max_replay=100)
    assert reads.want("a", 10, held=0) == 10
    assert reads.want("b", 5, held=0) is None
    assert reads.abandon() == ["a", "b"] and not reads
    assert reads.want("c", 7, held=0) == 7
    rounds: Rounds[str] = Rounds()
    assert rounds.want("x")
    assert rounds.take() == ["x"]
    assert not rounds.want("y")
    assert rounds.abandon() == ["x", "y"]
    assert rounds.want("z") and rounds.take() == ["z"]


def test_each_time_resume_takes_its_share_of_the_read_from_the_earliest() -> None:
    read = _timed(1, 2, 3, 4)
    assert share_since(read, 101.0, False, 10) == _msgs(1, 2, 3, 4)
    assert share_since(read, 102.5, False, 10) == _msgs(3, 4)
    assert share_since(read, 200.0, False, 10) == []
    assert share_since(read, 101.0, False, 3) == history.LIMIT


def test_a_time_share_past_a_truncated_read_goes_on_by_position_or_reads_again() -> None:
    read = _timed(1, 2, 3)  # max_replay 2: 3 messages and more stored
    assert share_since(read, 101.0, True, 2) == history.LIMIT  # the earliest: over the limit
    assert share_since(read, 102.0, True, 2) == 1  # from message 2 on, by position
    assert share_since(read, 150.0, True, 2) is None  # later than the whole read: by time again


def test_each_last_resume_takes_the_last_k_of_the_largest_read() -> None:
    read = _msgs(5, 6, 7, 8)
    assert share_last(read, 2) == _msgs(7, 8)
    assert share_last(read, 4) == read
    assert share_last(read, 9) == read  # fewer stored is all there is
