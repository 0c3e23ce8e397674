"""Once per connection across a recoverable and a plain pattern (fanout.core.mixed): the
hand-overs with copies in flight, each message delivered exactly once."""

from __future__ import annotations

from fanout.core.mixed import Mix

R = "xy.md.a.x"  # recoverable (stream MD)
P = "xy.*.a.x"  # plain, crosses R
S = "xy.md.a.x"  # the subject both match


def test_crossing_patterns_are_reported_both_ways() -> None:
    mix: Mix[str] = Mix(10)
    assert mix.add_plain(P) == []
    assert sorted(mix.add_recoverable(R, "MD", switched=False)) == sorted([R, P])
    assert mix.crossing(R) and mix.crossing(P)
    assert mix.add_plain("xy.>") == ["xy.>"]  # R already crosses
    assert mix.add_plain("other.>") == []
    assert mix.remove_plain(P) == [P]
    changed, released = mix.remove_recoverable(R)
    assert sorted(changed) == sorted([R, "xy.>"]) and released == []
    assert not mix.crossing("xy.>")


def test_joining_then_switched_each_message_once() -> None:
    """m0's live copy came before R (its republish comes after), m1's while R joins; the
    ack switches R (the stream's last sequence then: 2); m2's live copy is skipped."""
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    assert mix.republished(S, b"m0", 1) is False  # the plain pattern delivered it before R
    assert mix.plain_copy(S, b"m1", "i1") is True
    mix.answered(R, 2)
    assert mix.plain_copy(S, b"m2", "i2") is False
    assert mix.republished(S, b"m1", 2) is False  # delivered live while joining
    assert mix.republished(S, b"m2", 3) is True
    assert mix.republished(S, b"m3", 4) is True  # its live copy (skipped) came first
    assert mix.plain_copy("xy.zz.a.x", b"p", "ip") is True  # R does not cover it


def test_a_republished_copy_that_only_the_recoverable_pattern_matches_is_delivered() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable("xy.md.>", "MD", switched=False)
    assert mix.republished("xy.md.b.y", b"x", 1) is True  # P does not match it
    assert mix.republished(S, b"y", 2) is False  # P did, before R joined


def test_the_stream_not_answering_keeps_the_plain_pattern_delivering() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    mix.answered(R, None)
    assert mix.plain_copy(S, b"m", "i") is True


def test_removing_a_switched_pattern_releases_the_skipped_copies_still_due() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)  # a resume, or acked before P came
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is False
    assert mix.plain_copy(S, b"m2", "i2") is False
    assert mix.republished(S, b"m1", 1) is True  # m2's republished copy is still on its way
    _, released = mix.remove_recoverable(R)
    assert released == ["i2"]
    assert mix.plain_copy(S, b"m3", "i3") is True


def test_a_lost_republish_is_forgotten_at_the_next_one_and_memory_is_bounded() -> None:
    mix: Mix[str] = Mix(3)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_plain(P)
    for i in range(5):
        mix.plain_copy(S, b"%d" % i, f"i{i}")
    assert mix.republished(S, b"4", 5) is True  # 2 and 3 never came (0, 1 past the bound)
    _, released = mix.remove_recoverable(R)
    assert released == []


def test_another_switched_pattern_keeps_delivering_after_one_goes() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_recoverable("xy.md.*.x", "MD", switched=True)
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is False
    _, released = mix.remove_recoverable(R)
    assert released == []  # xy.md.*.x delivers it
    assert mix.plain_copy(S, b"m2", "i2") is False


def test_a_plain_pattern_removed_while_no_recoverable_one_is_held_is_forgotten() -> None:
    """The mix outlives the recoverable pattern; a plain one dropped meanwhile must not
    make a later recoverable pattern drop republished copies nobody delivered."""
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    mix.remove_recoverable(R)
    mix.remove_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    assert not mix.crossing(R)
    assert mix.republished(S, b"m", 1) is True
