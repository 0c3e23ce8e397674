from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fanout.core.interest import SubjectRouter


def test_first_and_last_subscriber_are_reported() -> None:
    r: SubjectRouter[str] = SubjectRouter()
    assert r.add("a", "x.y") is True
    assert r.add("b", "x.y") is False
    assert r.add("a", "x.y") is False  # same client twice: still one reference
    assert list(r.subscribers("x.y")) == ["a", "b"]
    assert r.remove("a", "x.y") is False
    assert r.remove("a", "x.y") is False  # idempotent
    assert r.remove("b", "x.y") is True
    assert r.subscribers("x.y") == {}
    assert len(r) == 0


ops = st.lists(
    st.tuples(st.booleans(), st.sampled_from("abc"), st.sampled_from(["s1", "s2", "s3"])),
    max_size=60,
)


@given(ops)
def test_refcounts_match_a_model(sequence: list[tuple[bool, str, str]]) -> None:
    """NATS subscribe/unsubscribe calls implied by add/remove always match the model's sets."""
    r: SubjectRouter[str] = SubjectRouter()
    model: dict[str, set[str]] = {}
    nats_subs: set[str] = set()
    for add, client, pattern in sequence:
        if add:
            if r.add(client, pattern):
                assert pattern not in nats_subs
                nats_subs.add(pattern)
            model.setdefault(pattern, set()).add(client)
        else:
            if r.remove(client, pattern):
                nats_subs.remove(pattern)
            model.get(pattern, set()).discard(client)
        assert nats_subs == {p for p, cs in model.items() if cs}
        for p, cs in model.items():
            assert set(r.subscribers(p)) == cs
