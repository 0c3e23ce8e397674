"""Once per connection across a recoverable and a plain pattern (fanout.core.mixed): the
hand-overs with copies in flight, each message delivered exactly once."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

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
    assert mix.plain_copy(S, b"m1", "i1") == "i1"
    mix.answered(R, 2)
    assert mix.plain_copy(S, b"m2", "i2") is None
    assert mix.republished(S, b"m1", 2) is False  # delivered live while joining
    assert mix.republished(S, b"m2", 3) is True
    assert mix.plain_copy(S, b"m4", "i4") is None
    # m3 (sequence 4, stored after the switch) is not among the skipped: its live copy
    # came before R, and the plain pattern, held since, delivered it
    assert mix.republished(S, b"m3", 4) is False
    assert mix.republished(S, b"m4", 5) is True
    assert mix.plain_copy("xy.zz.a.x", b"p", "ip") == "ip"  # R does not cover it


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
    assert mix.plain_copy(S, b"m", "i") == "i"


def test_removing_a_switched_pattern_releases_the_skipped_copies_still_due() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)  # a resume, or acked before P came
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is None
    assert mix.plain_copy(S, b"m2", "i2") is None
    assert mix.republished(S, b"m1", 1) is True  # m2's republished copy is still on its way
    _, released = mix.remove_recoverable(R)
    assert released == ["i2"]
    assert mix.plain_copy(S, b"m3", "i3") == "i3"


def test_a_lost_republish_is_forgotten_at_the_next_one_and_memory_is_bounded() -> None:
    mix: Mix[str] = Mix(3)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_plain(P)
    assert [mix.plain_copy(S, b"%d" % i, f"i{i}") for i in range(5)] == [None] * 3 + ["i0", "i1"]
    assert mix.republished(S, b"4", 5) is True  # 2 and 3 never came (0, 1 past the bound)
    _, released = mix.remove_recoverable(R)
    assert released == []


def test_another_switched_pattern_keeps_delivering_after_one_goes() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_recoverable("xy.md.*.x", "MD", switched=True)
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is None
    _, released = mix.remove_recoverable(R)
    assert released == []  # xy.md.*.x delivers it
    assert mix.plain_copy(S, b"m2", "i2") is None


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


def test_a_plain_pattern_removed_while_joining_hands_its_subjects_to_the_recoverable_one() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    assert mix.plain_copy(S, b"m1", "i1") == "i1"
    mix.remove_plain(P)
    assert mix.republished(S, b"m1", 1) is False  # P delivered it
    assert mix.republished(S, b"m2", 2) is True  # P was gone when it came: R delivers it
    mix.answered(R, 2)
    assert mix.republished(S, b"m3", 3) is True


def test_a_plain_pattern_added_while_joining_drops_only_what_it_delivered() -> None:
    """``xy.md.b.*`` comes while ``xy.md.>`` joins: m0 on xy.md.b.y was published before it
    (no plain copy reached the client), its republished copy must be delivered."""
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable("xy.md.>", "MD", switched=False)
    mix.add_plain("xy.md.b.*")
    assert mix.republished("xy.md.b.y", b"m0", 1) is True
    assert mix.plain_copy("xy.md.b.y", b"m1", "i1") == "i1"
    assert mix.republished("xy.md.b.y", b"m1", 2) is False
    mix.answered("xy.md.>", 2)
    assert mix.republished(S, b"m", 2) is False  # ≤ top on a subject P (held when R came) matches
    assert mix.republished("xy.md.b.y", b"m2", 3) is True


#: Client ops and NATS events; messages and the stream's steps weighted up.
#: ``republish_direct``: the hub sends a copy on without asking the mix when the
#: connection's patterns no longer cross (and no other client's do).
OPS = [
    *["publish"] * 4,
    *["store", "republish", "republish_direct"] * 2,
    "add_p",
    "remove_p",
    "add_r",
    "live_r",
    "answer_r",
    "remove_r",
]


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(OPS), max_size=60))
@example(["add_p", "publish", "store", "add_r", "live_r", "answer_r"])
@example(["add_r", "live_r", "answer_r", "add_p", "publish", "remove_r"])
@example(["add_r", "live_r", "answer_r", "add_p", "publish", "store", "republish", "remove_r"])
@example(
    [
        *["add_r", "live_r", "answer_r", "add_p", "publish", "remove_p", "store"],
        *["republish_direct", "add_p", "remove_r"],
    ]
)
@example(["add_p", "add_r", "live_r", "answer_r", "publish", "remove_p", "remove_r"])
def test_any_interleaving_delivers_each_message_once(ops: list[str]) -> None:
    """One nats-server's order: a message's live copy reaches the worker at once, the stream
    stores messages in order and republishes them later, in order; recovery answers R
    once its key is live, with the stream's last stored sequence. Whatever the client
    does meanwhile: no message twice; a message published while P was held, or while R
    was answered and held until its republished copy came, exactly once. While P and R
    cross, the hub asks the mix about every copy; once they no longer do, it may or may
    not (other clients' patterns decide), and either must be right.

    The documented residual is allowed (at most twice): a message P delivered before R
    came whose republished copy came after P was removed."""
    mix: Mix[int] = Mix(1000)
    p_held = r_held = r_live = r_answered = False
    published = stored = republished = 0
    got: list[int] = []
    must: set[int] = set()
    r_owes: dict[int, bool] = {}  # message → R answered and held when it was published
    plain: set[int] = set()  # messages P delivered
    residual: set[int] = set()
    r_came = 0  # the last message published before this R came
    for op in [*ops, "drain"]:
        if op == "publish":
            published += 1
            if p_held:
                must.add(published)
                now = mix.plain_copy(S, b"%d" % published, published)
                if now is not None:
                    got.append(now)
                    plain.add(published)
            r_owes[published] = r_held and r_answered
        elif op == "store" and stored < published:
            stored += 1
        elif op in ("republish", "republish_direct", "drain"):
            if op == "drain":
                stored = published
            asked = op == "republish" or mix.crossing(R)
            while republished < stored:
                republished += 1
                if r_held and r_live:
                    if r_owes.get(republished):
                        must.add(republished)
                    if not asked or mix.republished(S, b"%d" % republished, republished):
                        got.append(republished)
                else:
                    r_owes.pop(republished, None)
                if op != "drain":
                    break
        elif op == "add_p" and not p_held:
            p_held = True
            mix.add_plain(P)
        elif op == "remove_p" and p_held:
            p_held = False
            mix.remove_plain(P)
            first = r_came if r_held else published
            residual |= {i for i in plain if republished < i <= first}
        elif op == "add_r" and not r_held:
            r_held, r_live, r_answered = True, False, False
            r_came = published
            mix.add_recoverable(R, "MD", switched=False)
        elif op == "live_r" and r_held:
            r_live = True
        elif op == "answer_r" and r_held and r_live and not r_answered:
            r_answered = True
            mix.answered(R, stored)
        elif op == "remove_r" and r_held:
            r_held = False
            _, released = mix.remove_recoverable(R)
            got.extend(released)
            r_owes = {i: False for i in r_owes}
    twice = sorted({i for i in got if got.count(i) > (2 if i in residual else 1)})
    assert not twice, (twice, got)
    assert must <= set(got), (sorted(must - set(got)), got)


def test_after_the_switch_a_removed_plain_pattern_s_messages_stored_before_it_are_dropped() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") == "i1"  # before R: not remembered
    mix.add_recoverable(R, "MD", switched=False)
    mix.answered(R, 1)  # m1 is stored
    mix.remove_plain(P)
    assert mix.republished(S, b"m1", 1) is False
    assert mix.republished(S, b"m2", 2) is True  # published after P went


def test_a_joining_and_a_switched_pattern_together_deliver_a_skipped_copy() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable("xy.md.>", "MD", switched=True)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)  # joins while xy.md.> delivers
    assert mix.plain_copy(S, b"m1", "i1") is None
    assert mix.republished(S, b"m1", 1) is True


def test_copies_skipped_by_a_removed_plain_pattern_are_not_released_later() -> None:
    """P skipped m1 (R delivers it), then went: the connection no longer crosses, so the
    hub sends R's republished m1 straight on, without asking the mix. P coming back and
    R going must not hand m1 out a second time."""
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is None
    mix.remove_plain(P)
    # R's republished m1 is still due: the hub keeps asking the mix (else it would
    # send it straight on, and m1 come again below)
    assert mix.crossing(R)
    assert mix.republished(S, b"m1", 1) is True
    assert mix.settled == [R]  # nothing more due: R's copies may bypass the mix now
    assert not mix.crossing(R)
    mix.add_plain(P)
    _, released = mix.remove_recoverable(R)
    assert released == []


def test_a_copy_skipped_by_a_removed_plain_pattern_is_released_if_its_pattern_goes() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_plain(P)
    assert mix.plain_copy(S, b"m1", "i1") is None
    assert mix.remove_plain(P) == [P]  # R lingers: m1's republished copy is due
    changed, released = mix.remove_recoverable(R)
    assert changed == [R] and released == ["i1"]
    assert not mix.crossing(R)


def test_copies_delivered_while_joining_keep_the_mix_asked_after_the_plain_pattern_goes() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_plain(P)
    mix.add_recoverable(R, "MD", switched=False)
    assert mix.plain_copy(S, b"m1", "i1") == "i1"
    assert mix.remove_plain(P) == [P]
    assert mix.crossing(R)
    assert mix.republished(S, b"m1", 1) is False
    assert mix.settled == [R] and not mix.crossing(R)


def test_a_skipped_copy_another_held_plain_pattern_matches_stays_due() -> None:
    mix: Mix[str] = Mix(10)
    mix.add_recoverable(R, "MD", switched=True)
    mix.add_plain(P)
    mix.add_plain("xy.md.>")
    assert mix.plain_copy(S, b"m1", "i1") is None
    mix.remove_plain(P)
    assert mix.crossing(R)  # xy.md.> still crosses: R's copy of m1 comes through the mix
    _, released = mix.remove_recoverable(R)
    assert released == ["i1"]
