"""Recovery without I/O: recoverable patterns, resume validation, verdicts, the window,
and the seam rule (fanout.core.history; read coalescing: test_reads.py)."""

from __future__ import annotations

import pytest

from fanout.core import history
from fanout.core.history import Resume, Seam, Streams, StreamState, Window
from fanout.core.protocol import FrameError
from fanout.errors import Code

NOW = 1_764_590_000.0  # 2025-12-01T11:53:20Z


# -- Streams ----------------------------------------------------------------------------------


def test_a_pattern_is_recoverable_only_when_a_configured_pattern_covers_it() -> None:
    s = Streams({"xy.md.>": "MD", "orders.*.fills": "ORDERS"}, "fanout.rp")
    assert s.stream_for("xy.md.tick.btc") == "MD"
    assert s.stream_for("xy.md.tick.*") == "MD"
    assert s.stream_for("xy.md.>") == "MD"
    assert s.stream_for("orders.42.fills") == "ORDERS"
    assert s.stream_for("xy.>") is None  # partly covered: no seq for the rest
    assert s.stream_for("orders.42.other") is None
    assert s.live_subject("xy.md.tick.*") == "fanout.rp.xy.md.tick.*"
    assert s.original("fanout.rp.xy.md.tick.btc") == "xy.md.tick.btc"
    assert s.republish() == [
        ("xy.md.>", "fanout.rp.xy.md.>"),
        ("orders.*.fills", "fanout.rp.orders.*.fills"),
    ]
    assert not Streams({}, "p") and s


def test_sequence_from_raw_headers() -> None:
    raw = (
        b"NATS/1.0\r\nNats-Stream: MD\r\nNats-Subject: xy.md.a\r\nNats-Sequence: 1234\r\n"
        b"Nats-Time-Stamp: 2026-12-01T10:00:00.1Z\r\nNats-Last-Sequence: 1200\r\n\r\n"
    )
    assert history.sequence_of(raw) == (1234, 1200)
    assert history.sequence_of(b"NATS/1.0\r\nNats-Sequence: 7\r\n\r\n") == (7, 0)
    assert history.sequence_of(b"NATS/1.0\r\nX: 1\r\n\r\n") is None
    assert history.sequence_of(b"NATS/1.0\r\nNats-Sequence: x\r\n\r\n") is None


def test_user_headers_of_a_republished_message() -> None:
    raw = (
        b"NATS/1.0\r\nNats-Stream: MD\r\ntraceparent: 00-ab-cd-01\r\nNats-Sequence: 3\r\n"
        b"X-Tag: a\r\nX-Tag: b\r\nNats-Last-Sequence: 1\r\n\r\n"
    )
    assert history.user_headers(raw) == {"traceparent": "00-ab-cd-01", "X-Tag": "a, b"}
    assert history.user_headers(b"NATS/1.0\r\nNats-Sequence: 3\r\n\r\n") is None


# -- resume_of --------------------------------------------------------------------------------


def _resume(
    seq: int | None = None,
    epoch: str | None = None,
    time: str | None = None,
    last: int | None = None,
) -> Resume | str:
    return history.resume_of(7, seq, epoch, time, last, now=NOW, max_replay=1000)


def test_well_formed_resumes() -> None:
    assert _resume(seq=0, epoch="E") == Resume(after=0, epoch="E")
    assert _resume(seq=41, epoch="E") == Resume(after=41, epoch="E")
    assert _resume(time="2025-12-01T11:00:00Z") == Resume(time=NOW - 3200)
    assert _resume(time="2025-12-01T12:00:00+01:00") == Resume(time=NOW - 3200)
    assert _resume(last=1) == Resume(last=1)
    assert _resume(last=1000) == Resume(last=1000)


def test_last_over_max_replay_is_limit_not_malformed() -> None:
    assert _resume(last=1001) == history.LIMIT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "since needs exactly one of seq and time"),
        ({"seq": 1, "epoch": "E", "time": "2025-12-01T11:00:00Z"}, "exactly one of seq and time"),
        ({"seq": 1}, "since.seq needs since.epoch"),
        ({"seq": 1, "epoch": ""}, "since.seq needs since.epoch"),
        ({"time": "2025-12-01T11:00:00Z", "epoch": "E"}, "since.epoch goes with since.seq"),
        ({"time": "yesterday"}, "not an RFC 3339 time"),
        ({"time": "2025-12-01"}, "not an RFC 3339 time"),
        ({"time": "2025-12-01T11:00:00"}, "not an RFC 3339 time"),  # no offset
        ({"time": "2025-13-01T11:00:00Z"}, "not an RFC 3339 time"),
        ({"time": "2025-12-01T11:00:00Z" + " " * 40}, "not an RFC 3339 time"),
        ({"time": "2025-12-01T11:55:00Z"}, "in the future"),
        ({"last": 5, "seq": 1, "epoch": "E"}, "give since or last, not both"),
    ],
)
def test_malformed_resumes_are_xyw008_with_the_op_id(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(FrameError) as err:
        _resume(**kwargs)  # type: ignore[arg-type]
    assert err.value.code == Code.MALFORMED and err.value.id == 7
    assert message in err.value.message


def test_time_within_the_clock_skew_leeway_is_accepted() -> None:
    assert _resume(time="2025-12-01T11:54:00Z") == Resume(time=NOW + 40)


# -- verdict ----------------------------------------------------------------------------------

STATE = StreamState(epoch="E", first_seq=100, last_seq=200, first_time=NOW - 600)


@pytest.mark.parametrize(
    ("resume", "reason"),
    [
        (Resume(after=150, epoch="E"), None),
        (Resume(after=99, epoch="E"), None),  # first stored is the next one: complete
        (Resume(after=200, epoch="E"), None),  # nothing missed
        (Resume(after=98, epoch="E"), history.GAP),
        (Resume(after=0, epoch="E"), history.GAP),
        (Resume(after=150, epoch="OTHER"), history.EPOCH),
        (Resume(after=201, epoch="E"), history.EPOCH),  # a position this stream never had
        (Resume(time=NOW - 60), None),
        (Resume(time=NOW - 3600), history.GAP),
        (Resume(last=5), None),
    ],
)
def test_verdict(resume: Resume, reason: str | None) -> None:
    assert history.verdict(resume, STATE) == reason


def test_an_old_time_on_a_stream_that_never_dropped_anything_is_no_gap() -> None:
    state = StreamState(epoch="E", first_seq=1, last_seq=5, first_time=NOW - 10)
    assert history.verdict(Resume(time=NOW - 3600), state) is None


def test_a_purged_stream_is_a_gap_only_when_something_was_missed() -> None:
    empty = StreamState(epoch="E", first_seq=201, last_seq=200, first_time=0.0)
    assert history.verdict(Resume(after=200, epoch="E"), empty) is None
    assert history.verdict(Resume(after=150, epoch="E"), empty) == history.GAP


# -- Window -----------------------------------------------------------------------------------


def test_window_of_a_subject_is_complete_from_the_first_messages_previous() -> None:
    w: Window[str] = Window(max_items=10, max_age_s=60)
    assert w.after(0) is None
    w.add(10, NOW, "a", previous=7)
    w.add(12, NOW, "b", previous=10)
    assert w.complete_after == 7
    assert w.after(7) == [(10, "a"), (12, "b")]
    assert w.after(10) == [(12, "b")]
    assert w.after(12) == []
    assert w.after(6) is None  # before what the window vouches for
    assert w.last(2) == [(10, "a"), (12, "b")] and w.last(3) is None


def test_window_restarts_after_a_missed_live_message() -> None:
    w: Window[str] = Window(max_items=10, max_age_s=60)
    w.add(10, NOW, "a", previous=7)
    w.add(15, NOW, "c", previous=12)  # 12 never reached us
    assert w.complete_after == 12
    assert w.after(10) is None
    assert w.after(12) == [(15, "c")]


def test_window_drops_by_count_and_age_and_moves_its_vouching_point() -> None:
    w: Window[int] = Window(max_items=3, max_age_s=10)
    for seq in range(1, 6):
        w.add(seq, NOW + seq, seq, previous=seq - 1)
    assert len(w) == 3 and w.complete_after == 2
    assert w.after(1) is None and w.after(2) == [(3, 3), (4, 4), (5, 5)]
    w.expire(NOW + 14.5)  # 3 and 4 are older than 10 s
    assert w.complete_after == 4 and w.after(4) == [(5, 5)]
    assert w.since(NOW + 5) == [(5, 5)] and w.since(NOW + 4) is None


def test_window_of_a_wildcard_learns_completeness_from_a_read() -> None:
    w: Window[str] = Window(max_items=10, max_age_s=60)
    w.add(10, NOW, "a")
    w.add(11, NOW, "b")
    assert w.after(9) is None
    w.learn(10)  # a read covered everything up to 10
    assert w.after(10) == [(11, "b")]
    assert w.after(9) is None
    w.learn(8)
    assert w.after(8) == [(10, "a"), (11, "b")]
    w.add(11, NOW, "dup")  # the same sequence again: ignored
    assert w.after(10) == [(11, "b")]
    w.add(3, NOW, "new stream")  # sequences went back: recreated, vouch for nothing
    assert w.after(10) is None and w.after(2) is None and len(w) == 1


def test_window_never_vouches_below_what_it_dropped() -> None:
    w: Window[int] = Window(max_items=2, max_age_s=60)
    for seq in (5, 6, 7):
        w.add(seq, NOW, seq)
    w.learn(3)  # a read up to 3, but 5 was dropped since
    assert w.complete_after == 5 and w.after(5) == [(6, 6), (7, 7)]
    w.reset()
    assert w.after(7) is None and len(w) == 0


def test_disabled_window_holds_nothing() -> None:
    w: Window[str] = Window(max_items=0, max_age_s=60)
    w.add(1, NOW, "a", previous=0)
    assert len(w) == 0 and w.after(0) is None


# -- Seam -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "last_replayed", "out"),
    [
        ([], 10, []),
        ([11, 12], 10, [11, 12]),
        ([9, 10, 11], 10, [11]),  # live copies of replayed messages are dropped
        ([10, 11, 11, 12], 10, [11, 12]),  # each once
        ([12, 11, 13], 10, [12, 13]),  # never backwards
        ([5, 6], 10, []),
    ],
)
def test_seam_no_gap_no_duplicate_order_kept(
    held: list[int], last_replayed: int, out: list[int]
) -> None:
    seam: Seam[str] = Seam(limit=100)
    for seq in held:
        seam.hold(seq, f"m{seq}")
    assert seam.release(last_replayed) == [(s, f"m{s}") for s in out]
    assert seam.held == []


def test_seam_is_bounded() -> None:
    seam: Seam[int] = Seam(limit=2)
    for seq in range(3):
        seam.hold(seq, seq)
    assert seam.overflow and len(seam.held) == 2
