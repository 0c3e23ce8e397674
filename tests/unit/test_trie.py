"""The pattern trie answers exactly what subjects.matches / subjects.intersects would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core import subjects
from fanout.core.trie import PatternTrie

TOKENS = st.sampled_from(["a", "b", "c"])
PATTERN_TOKENS = st.sampled_from(["a", "b", "c", "*"])


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(PATTERN_TOKENS, min_size=1, max_size=4))
    if draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


@st.composite
def concrete(draw: st.DrawFn) -> str:
    return ".".join(draw(st.lists(TOKENS, min_size=1, max_size=5)))


def test_matching_and_intersecting_basics() -> None:
    t: PatternTrie[str] = PatternTrie()
    for p in ["a.b", "a.*", "a.>", "b.c", "*.c.>"]:
        t.add(p, p)
    assert sorted(t.matching("a.b")) == ["a.*", "a.>", "a.b"]
    assert sorted(t.matching("a.b.c")) == ["a.>"]
    assert sorted(t.matching("x.c.d")) == ["*.c.>"]
    assert sorted(t.intersecting("a.x")) == ["a.*", "a.>"]
    assert sorted(t.intersecting(">")) == sorted(["a.b", "a.*", "a.>", "b.c", "*.c.>"])
    assert sorted(t.intersecting("*.c")) == ["a.*", "a.>", "b.c"]
    assert t.intersecting("c") == []


def test_values_share_a_pattern_and_removal_prunes() -> None:
    t: PatternTrie[int] = PatternTrie()
    t.add("a.b", 1)
    t.add("a.b", 2)
    assert sorted(t.matching("a.b")) == [1, 2]
    assert t.remove("a.b", 1) is True
    assert t.remove("a.b", 1) is False
    assert t.remove("a.c", 2) is False
    assert t.matching("a.b") == [2]
    assert t.remove("a.b", 2) is True
    assert len(t) == 0
    assert t._concrete == {}
    assert t._concrete_root.children == {}
    assert t._groups == {}


def test_wildcards_leave_no_stem_behind() -> None:
    t: PatternTrie[int] = PatternTrie()
    for n, p in enumerate(["a.*", "a.*.c", "a.b.>", "*.b", ">", "a.>"]):
        t.add(p, n)
    assert sorted(t.matching("a.b.c")) == [1, 2, 4, 5]
    assert sorted(t.matching("a.b")) == [0, 3, 4, 5]
    for n, p in enumerate(["a.*", "a.*.c", "a.b.>", "*.b", ">", "a.>"]):
        assert t.remove(p, n) is True
    assert t._stems == {} and t._stem_lengths == {} and t._wild_root.children == {}


def test_many_stem_lengths_answer_the_same() -> None:
    """Past a few stem lengths a query looks up its own token starts instead."""
    t: PatternTrie[str] = PatternTrie()
    stored = [".".join(["t"] * n) + ".*" for n in range(1, 13)] + ["x.>", "t.t.t.>", "*.t"]
    for p in stored:
        t.add(p, p)
    for subject in ["t", "t.t.t.t", "t.t.t.t.t.t.t.t.t.t.t.t", "x.t", "t.x.t.t"]:
        expected = sorted(p for p in stored if subjects.matches(p, subject))
        assert sorted(t.matching(subject)) == expected


@settings(max_examples=300)
@given(st.lists(patterns(), max_size=12, unique=True), patterns(), concrete())
def test_agrees_with_subjects_module(stored: list[str], query: str, subject: str) -> None:
    t: PatternTrie[str] = PatternTrie()
    for p in stored:
        t.add(p, p)
    assert sorted(t.matching(subject)) == sorted(p for p in stored if subjects.matches(p, subject))
    assert sorted(t.intersecting(query)) == sorted(
        p for p in stored if subjects.intersects(p, query)
    )


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.booleans(), patterns(), st.integers(0, 2)), max_size=30),
    patterns(),
    concrete(),
)
def test_adds_and_removes_agree_with_a_list(
    ops: list[tuple[bool, str, int]], query: str, subject: str
) -> None:
    """Concrete and wildcard patterns live in different indexes: any mix of adds and
    removes (several values per pattern, removes of what is not there) answers as a list."""
    t: PatternTrie[tuple[str, int]] = PatternTrie()
    stored: list[tuple[str, int]] = []
    for add, pattern, value in ops:
        item = (pattern, value)
        if add:
            t.add(pattern, item)
            stored.append(item)
        else:
            assert t.remove(pattern, item) is (item in stored)
            if item in stored:
                stored.remove(item)
    assert len(t) == len(stored)
    assert sorted(t.matching(subject)) == sorted(
        i for i in stored if subjects.matches(i[0], subject)
    )
    assert sorted(t.intersecting(query)) == sorted(
        i for i in stored if subjects.intersects(i[0], query)
    )
    assert sorted(t.intersecting(subject)) == sorted(
        i for i in stored if subjects.intersects(i[0], subject)
    )
    for item in stored:
        assert t.remove(item[0], item) is True
    assert t._concrete == {}
    assert t._concrete_root.children == {}
    assert t._groups == {}
    assert t._wild_root.children == {}
    assert t._stems == {} and t._stem_lengths == {}
