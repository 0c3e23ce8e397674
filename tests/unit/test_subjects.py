"""Subject / pattern validation and NATS wildcard semantics (fanout.core.subjects)."""

from __future__ import annotations

import itertools
import re
import sys
import unicodedata
from functools import cache

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fanout.core.subjects import (
    SubjectError,
    intersects,
    is_subset,
    is_wildcard,
    matches,
    validate_pattern,
    validate_subject,
)

# --------------------------------------------------------------------------- reference


def reference_matches(pattern: str, subject: str) -> bool:
    """An independent (regex) statement of NATS matching, to check the fast one against."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.fullmatch(r"\.".join(parts), subject) is not None


# Small world: patterns of up to 4 tokens over {a, b, *, >}; subjects of up to 5
# tokens over {a, b, c} ("c" never appears in a pattern, so it stands for "any
# other token"). Any counter-example to subset / overlap fits in this universe.
PATTERN_TOKENS = ("a", "b", "*")
UNIVERSE = tuple(
    ".".join(tokens) for n in range(1, 6) for tokens in itertools.product(("a", "b", "c"), repeat=n)
)


def _small_patterns() -> list[str]:
    out = []
    for n in range(1, 5):
        for head in itertools.product(PATTERN_TOKENS, repeat=n - 1):
            for last in (*PATTERN_TOKENS, ">"):
                out.append(".".join((*head, last)))
    return out


SMALL_PATTERNS = _small_patterns()


@cache
def matched_set(pattern: str) -> frozenset[str]:
    return frozenset(s for s in UNIVERSE if reference_matches(pattern, s))


# --------------------------------------------------------------------------- validation

VALID_SUBJECTS = [
    "a",
    "xy.md.tick.demo",
    "orders.alice.created",
    "a-b_c.$SYS.x~y",
    "ünïcödé.東京.данные",
    "emoji.🚀",
    "{sub}.x",
    "123.456",
    "a" * 256,
]

INJECTIONS = [
    "a\r\nSUB >",
    "a\r\nPUB x 1",
    "a\nb",
    "a\rb",
    "a\tb",
    "a b",
    " a",
    "a ",
    "a\x00b",
    "a\x7fb",
    "a\x1bb",
    "a\u2028b",
    "a\u2029b",
    "a\u0085b",
    "a\u00a0b",
    "a\u200bb",
    "a\u3000b",
    "a\ufeffb",
    "a\ud800b",
    "a\ue000b",
    "a.\u200e.b",
    "",
    ".",
    "..",
    ".a",
    "a.",
    "a..b",
    "a.>.b",
    ">.a",
    "a*",
    "a.b>",
    "a.*b",
    "a.>>",
    "a.**",
    "x" * 257,
    "é" * 129,
    ("a." * 200) + "a",
]


@pytest.mark.parametrize("subject", VALID_SUBJECTS)
def test_valid_subjects_pass_both_validators(subject: str) -> None:
    validate_subject(subject)
    validate_pattern(subject)
    assert not is_wildcard(subject)
    assert matches(subject, subject)


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_strings_rejected_by_both_validators(bad: str) -> None:
    with pytest.raises(SubjectError):
        validate_subject(bad)
    with pytest.raises(SubjectError):
        validate_pattern(bad)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty subject"),
        ("a..b", "empty token at position 2"),
        (".a", "empty token at position 1"),
        ("a.", "empty token at position 2"),
        ("a\r\nSUB >", "control or whitespace character U+000D"),
        ("a b", "control or whitespace character U+0020"),
        ("a\u2028", "control or whitespace character U+2028"),
        ("a\u200b", "control or whitespace character U+200B"),
        ("a.>.b", "'>' must be the last token"),
        ("a.b*", "wildcard inside a token at position 2"),
        ("a>", "wildcard inside a token at position 1"),
        ("x" * 257, "longer than 256 bytes"),
        ("é" * 129, "longer than 256 bytes"),
    ],
)
def test_pattern_reasons(text: str, reason: str) -> None:
    with pytest.raises(SubjectError) as info:
        validate_pattern(text)
    assert str(info.value) == reason


def test_subject_refuses_wildcards() -> None:
    for text, position in (("a.*", 2), ("*", 1), ("a.>", 2), ("a*.b", 1)):
        with pytest.raises(SubjectError) as info:
            validate_subject(text)
        assert str(info.value) == f"wildcard at position {position} (a subject must be concrete)"


@pytest.mark.parametrize("pattern", ["*", ">", "a.*", "a.>", "*.*.>", "a.*.b.>", "xy.md.>"])
def test_valid_patterns(pattern: str) -> None:
    validate_pattern(pattern)
    assert is_wildcard(pattern)


def test_subject_error_is_value_error() -> None:
    assert issubclass(SubjectError, ValueError)


def test_length_cap_is_in_utf8_bytes() -> None:
    validate_subject("é" * 128)  # 256 bytes
    validate_subject("a" * 10, max_bytes=10)
    with pytest.raises(SubjectError, match=r"^longer than 10 bytes$"):
        validate_subject("a" * 11, max_bytes=10)
    with pytest.raises(SubjectError, match=r"^longer than 10 bytes$"):
        validate_subject("aaaa.ééé", max_bytes=10)  # 8 characters, 11 bytes
    validate_pattern("🚀" * 64)  # 4 bytes each: 256
    with pytest.raises(SubjectError, match=r"^longer than 256 bytes$"):
        validate_pattern("🚀" * 64 + ".>")


def _forbidden(ch: str) -> bool:
    return ch.isspace() or unicodedata.category(ch)[0] in "CZ"


ALL_CHARS = [chr(cp) for cp in range(sys.maxunicode + 1) if chr(cp) not in ".*>"]


def test_fast_character_check_equals_the_rule_for_every_code_point() -> None:
    """The validator's fast path (str.isprintable, minus the space) is exactly the rule."""
    assert [ch for ch in ALL_CHARS if (ch.isprintable() and ch != " ") == _forbidden(ch)] == []


def test_every_allowed_code_point_is_accepted() -> None:
    allowed = "".join(ch for ch in ALL_CHARS if not _forbidden(ch))
    assert len(allowed) > 100_000
    validate_subject(allowed, max_bytes=4 * len(allowed))
    validate_pattern(allowed + ".>", max_bytes=4 * len(allowed) + 2)


def test_forbidden_code_points_are_rejected_with_their_code_point() -> None:
    """Every forbidden character except unassigned / private use (those: one in 97)."""
    checked = 0
    for ch in ALL_CHARS:
        if not _forbidden(ch):
            continue
        if unicodedata.category(ch) in ("Cn", "Co") and ord(ch) % 97:
            continue
        checked += 1
        for validate in (validate_subject, validate_pattern):
            with pytest.raises(SubjectError) as info:
                validate("a" + ch)
            assert str(info.value) == f"control or whitespace character U+{ord(ch):04X}"
    assert checked > 10_000


def test_first_offending_character_is_reported() -> None:
    with pytest.raises(SubjectError, match=r"^control or whitespace character U\+0009$"):
        validate_subject("ok.a\tb\nc")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.b", "a.b.c", False),
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        (">", "a", True),
        (">", "a.b.c", True),
        ("*.b.>", "x.b.y", True),
        ("*.b.>", "x.c.y", False),
        ("*.b.>", "x.b", False),
        ("xy.md.>", "xy.md.tick.demo", True),
        ("xy.md.>", "xy.mdx.a", False),
        ("xy.md.>", "xy.md", False),
    ],
)
def test_matches_table(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected
    assert reference_matches(pattern, subject) is expected


def test_matches_agrees_with_reference_exhaustively() -> None:
    for pattern in SMALL_PATTERNS:
        for subject in UNIVERSE:
            assert matches(pattern, subject) is reference_matches(pattern, subject), (
                pattern,
                subject,
            )


def test_is_wildcard() -> None:
    assert is_wildcard("a.*")
    assert is_wildcard(">")
    assert not is_wildcard("a.b")
    assert not is_wildcard("a*b")  # invalid, and not a wildcard token


# --------------------------------------------------------------------------- subset / intersect


@pytest.mark.parametrize(
    ("pattern", "of", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.*", True),
        ("a.*", "a.b", False),
        ("a.*", "a.>", True),
        ("a.>", "a.*", False),
        ("a.b.c", "a.>", True),
        ("a", "a.>", False),
        ("a.>", ">", True),
        (">", "a.>", False),
        ("a.*.>", "a.>", True),
        ("a.>", "a.*.>", False),
        ("*.b", "a.*", False),
        ("xy.md.tick.*", "xy.md.>", True),
        ("xy.md.>", "xy.md.>", True),
        ("xy.md", "xy.md.>", False),
        ("xy.mdx.a", "xy.md.>", False),
    ],
)
def test_is_subset_table(pattern: str, of: str, expected: bool) -> None:
    assert is_subset(pattern, of) is expected


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
        ("a.*", "*.b", True),
        ("a.>", "a", False),
        ("a.>", "a.b.c", True),
        ("a.>", "*.b", True),
        ("a.>", "b.>", False),
        ("a.*.c", "a.>", True),
        (">", "x", True),
        ("a.b.>", "a.*", False),
        ("a.b.>", "*.*.*.d", True),
    ],
)
def test_intersects_table(a: str, b: str, expected: bool) -> None:
    assert intersects(a, b) is expected
    assert intersects(b, a) is expected


def test_subset_and_intersects_agree_with_brute_force_exhaustively() -> None:
    """All pairs of small patterns: the set-level truth over the universe decides."""
    for p in SMALL_PATTERNS:
        mp = matched_set(p)
        assert is_subset(p, p)
        for q in SMALL_PATTERNS:
            mq = matched_set(q)
            assert is_subset(p, q) is (mp <= mq), (p, q)
            assert intersects(p, q) is bool(mp & mq), (p, q)


# --------------------------------------------------------------------------- properties

LITERALS = st.sampled_from(["a", "b", "c", "tick", "ü", "x-1"])
ANY_TOKEN = st.text(
    alphabet=st.characters(blacklist_categories=("C", "Z"), blacklist_characters=".*>"),
    min_size=1,
    max_size=8,
).filter(lambda t: not any(ch.isspace() for ch in t))


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(LITERALS, st.just("*")), min_size=1, max_size=5))
    if draw(st.booleans()):
        tokens[-1] = ">"
    return ".".join(tokens)


@st.composite
def narrower(draw: st.DrawFn, pattern: str) -> str:
    """A random pattern that is a subset of ``pattern`` (by construction, not by is_subset)."""
    out: list[str] = []
    for token in pattern.split("."):
        if token == "*":
            out.append(draw(st.one_of(st.just("*"), LITERALS)))
        elif token == ">":
            out.extend(draw(st.lists(st.one_of(st.just("*"), LITERALS), min_size=1, max_size=3)))
            if draw(st.booleans()):
                out.append(">")
        else:
            out.append(token)
    return ".".join(out)


@st.composite
def instance(draw: st.DrawFn, pattern: str) -> str:
    """A random concrete subject matched by ``pattern`` (by construction)."""
    out: list[str] = []
    for token in pattern.split("."):
        if token == "*":
            out.append(draw(st.one_of(LITERALS, ANY_TOKEN)))
        elif token == ">":
            out.extend(draw(st.lists(st.one_of(LITERALS, ANY_TOKEN), min_size=1, max_size=3)))
        else:
            out.append(token)
    return ".".join(out)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_subset_chain_and_matching_agree(data: st.DataObject) -> None:
    r = data.draw(patterns())
    q = data.draw(narrower(r))
    p = data.draw(narrower(q))
    s = data.draw(instance(p))
    for pat in (p, q, r):
        validate_pattern(pat)
    validate_subject(s)
    assert is_subset(p, q) and is_subset(q, r) and is_subset(p, r)
    assert is_subset(p, p)
    assert matches(p, s) and matches(q, s) and matches(r, s)
    assert is_subset(s, p)
    assert intersects(p, q) and intersects(q, p) and intersects(s, r)


@settings(max_examples=200, deadline=None)
@given(patterns(), patterns(), patterns())
def test_random_patterns_relations_are_consistent(p: str, q: str, r: str) -> None:
    if is_subset(p, q) and is_subset(q, r):
        assert is_subset(p, r)
    if is_subset(p, q):
        assert intersects(p, q)
    if is_subset(p, q) and is_subset(q, p):
        assert p == q  # one spelling per set of subjects in NATS syntax
    assert intersects(p, q) is intersects(q, p)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_matches_is_subset_of_concrete(data: st.DataObject) -> None:
    p = data.draw(patterns())
    s = data.draw(st.one_of(instance(p), instance(data.draw(patterns()))))
    assert matches(p, s) is reference_matches(p, s)
    assert matches(p, s) is is_subset(s, p)
    assert matches(p, s) is intersects(p, s)


@settings(max_examples=200, deadline=None)
@given(st.lists(ANY_TOKEN, min_size=1, max_size=6))
def test_valid_subjects_round_trip(tokens: list[str]) -> None:
    subject = ".".join(tokens)
    assume(len(subject.encode("utf-8")) <= 256)
    validate_subject(subject)
    validate_pattern(subject)
    assert subject.split(".") == tokens
    assert matches(subject, subject)
    assert is_subset(subject, subject)
    assert not is_wildcard(subject)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(ANY_TOKEN, min_size=1, max_size=4),
    st.characters(categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp"]),
    st.integers(min_value=0, max_value=40),
)
def test_any_control_or_separator_anywhere_is_rejected(
    tokens: list[str], bad: str, where: int
) -> None:
    subject = ".".join(tokens)
    where = min(where, len(subject))
    poisoned = subject[:where] + bad + subject[where:]
    for validate in (validate_subject, validate_pattern):
        with pytest.raises(SubjectError):
            validate(poisoned)
