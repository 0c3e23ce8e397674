"""Whitelist ∩ token grants, and claim templates (fanout.core.acl)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.core.acl import SubjectAcl, expand_templates
from fanout.core.subjects import is_subset, matches

DEFAULT_WHITELIST = ["xy.md.>"]
DENIED = "not allowed: {}"


# --------------------------------------------------------------------------- whitelist only


@pytest.mark.parametrize("pattern", ["xy.md.tick.demo", "xy.md.tick.*", "xy.md.*", "xy.md.*.*.x"])
def test_default_whitelist_allows_below_xy_md(pattern: str) -> None:
    assert SubjectAcl(DEFAULT_WHITELIST, None).check(pattern) is None


@pytest.mark.parametrize("pattern", ["xy.mdx.a", "xy.md", "other.a", "xy.*.tick", "*.md.a", "xy"])
def test_default_whitelist_refuses_outside(pattern: str) -> None:
    assert SubjectAcl(DEFAULT_WHITELIST, None).check(pattern) == DENIED.format(pattern)


def test_full_wildcard_refused_unless_enabled() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None)
    for pattern in ("xy.md.>", "xy.md.tick.>", ">"):
        assert acl.check(pattern) == "'>' subscriptions are not enabled"
    on = SubjectAcl(DEFAULT_WHITELIST, None, allow_full_wildcard=True)
    assert on.check("xy.md.>") is None
    assert on.check("xy.md.tick.>") is None
    assert on.check(">") == "not allowed: >"
    assert on.check("xy.>") == "not allowed: xy.>"


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("xy.md.a\r\nSUB >", "control or whitespace character U+000D"),
        ("xy.md..a", "empty token at position 3"),
        ("xy.md.>.a", "'>' must be the last token"),
        ("xy.md.a*", "wildcard inside a token at position 3"),
        ("", "empty subject"),
        ("xy.md." + "a" * 300, "longer than 256 bytes"),
    ],
)
def test_invalid_patterns_get_the_validator_reason(pattern: str, reason: str) -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None, allow_full_wildcard=True)
    assert acl.check(pattern) == reason


def test_max_bytes_applies() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None, max_bytes=12)
    assert acl.check("xy.md.abcdef") is None
    assert acl.check("xy.md.abcdefg") == "longer than 12 bytes"
    assert not acl.allows_subject("xy.md.abcdefg")


def test_allows_subject() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None)
    assert acl.allows_subject("xy.md.tick.demo")
    assert not acl.allows_subject("xy.md")
    assert not acl.allows_subject("xy.mdx.a")
    assert not acl.allows_subject("xy.md.*")  # a wildcard is not a concrete subject
    assert not acl.allows_subject("xy.md.a\r\nPUB x 1")
    assert not acl.allows_subject("")


def test_several_whitelist_patterns_are_a_union() -> None:
    acl = SubjectAcl(["xy.md.>", "news.*"], None)
    assert acl.check("news.eu") is None
    assert acl.check("news.*") is None
    assert acl.check("news.eu.fr") == DENIED.format("news.eu.fr")
    assert acl.check("*.eu") == DENIED.format("*.eu")


def test_invalid_whitelist_patterns_allow_nothing() -> None:
    acl = SubjectAcl(["a..b", "c\nd", "ok.*"], None)
    assert acl.check("ok.x") is None
    assert acl.check("a..b") == "empty token at position 2"
    assert not acl.allows_subject("c\nd")
    assert not acl.allows_subject("a.b")


# --------------------------------------------------------------------------- grants


def test_grants_intersect_with_whitelist() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, ["xy.md.tick.*", "other.>"])
    assert acl.grants == ("xy.md.tick.*", "other.>")
    assert acl.check("xy.md.tick.demo") is None
    assert acl.check("xy.md.tick.*") is None
    assert acl.check("xy.md.book.demo") == DENIED.format("xy.md.book.demo")
    assert acl.check("xy.md.*") == DENIED.format("xy.md.*")  # wider than the grant
    assert acl.check("other.a") == DENIED.format("other.a")  # granted, not whitelisted
    assert acl.allows_subject("xy.md.tick.btc")
    assert not acl.allows_subject("xy.md.book.btc")
    assert not acl.allows_subject("other.a")


def test_empty_grants_allow_nothing() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, [])
    assert acl.grants == ()
    assert acl.check("xy.md.tick.demo") == DENIED.format("xy.md.tick.demo")
    assert not acl.allows_subject("xy.md.tick.demo")


def test_no_grants_means_whitelist_only() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None)
    assert acl.grants is None


def test_invalid_grants_allow_nothing() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, ["xy.md.a b", "xy.md.x*"])
    assert acl.grants == ()
    assert acl.check("xy.md.x1") == DENIED.format("xy.md.x1")


def test_grant_wider_than_whitelist_does_not_widen() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, [">"], allow_full_wildcard=True)
    assert acl.check("xy.md.>") is None
    assert acl.check("xy.>") == DENIED.format("xy.>")
    assert not acl.allows_subject("secret.a")


ACL_PATTERNS = st.lists(st.sampled_from(["a", "b", "*"]), min_size=1, max_size=3).map(
    ".".join
) | st.lists(st.sampled_from(["a", "b", "*"]), max_size=2).map(lambda t: ".".join([*t, ">"]))


@settings(max_examples=300)
@given(
    st.lists(ACL_PATTERNS, max_size=4), st.none() | st.lists(ACL_PATTERNS, max_size=3), ACL_PATTERNS
)
def test_check_is_the_subset_rule(
    whitelist: list[str], grants: list[str] | None, pattern: str
) -> None:
    """The split (exact set, prefix tuple, the rest) answers what is_subset over every
    pattern answers."""
    acl = SubjectAcl(whitelist, grants, allow_full_wildcard=True)
    allowed = any(is_subset(pattern, of) for of in whitelist) and (
        grants is None or any(is_subset(pattern, of) for of in grants)
    )
    assert (acl.check(pattern) is None) is allowed


def test_acl_has_slots() -> None:
    acl = SubjectAcl(DEFAULT_WHITELIST, None)
    assert not hasattr(acl, "__dict__")


# --------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("sub", "expected"),
    [
        ("alice", ["orders.alice.*"]),
        ("al-ice_1", ["orders.al-ice_1.*"]),
        ("ünï", ["orders.ünï.*"]),
        ("al.ice", []),
        ("*", []),
        (">", []),
        ("a*", []),
        ("", []),
        ("al ice", []),
        ("al\r\nSUB >", []),
        ("a\u2028b", []),
        ("a\u200bb", []),
        ("x" * 300, []),
    ],
)
def test_template_with_sub(sub: str, expected: list[str]) -> None:
    assert expand_templates(["orders.{sub}.*"], {"sub": sub}) == expected


@pytest.mark.parametrize("value", [None, 42, 4.2, True, ["alice"], {"a": "b"}, b"alice"])
def test_template_value_must_be_a_string(value: object) -> None:
    assert expand_templates(["orders.{sub}.>", "fixed.a"], {"sub": value}) == ["fixed.a"]


def test_template_missing_claim_drops_only_that_pattern() -> None:
    claims = {"sub": "alice"}
    assert expand_templates(["a.{tenant}.>", "b.{sub}.>", "c.{}"], claims) == ["b.alice.>"]


def test_templates_several_placeholders_and_inside_tokens() -> None:
    claims = {"sub": "alice", "tenant": "acme"}
    assert expand_templates(["t.{tenant}.u-{sub}.>"], claims) == ["t.acme.u-alice.>"]
    assert expand_templates(["{tenant}{sub}"], claims) == ["acmealice"]


def test_expanded_patterns_are_validated() -> None:
    claims = {"sub": "alice"}
    assert expand_templates(["a..{sub}", "a.>.{sub}", "{sub}*", "ok.{sub}"], claims) == ["ok.alice"]
    assert expand_templates(["a.{sub}"], claims, max_bytes=6) == []
    assert expand_templates(["a.{sub}"], claims, max_bytes=7) == ["a.alice"]


def test_claim_values_are_not_expanded_again() -> None:
    claims = {"sub": "{role}", "role": "*"}
    assert expand_templates(["u.{sub}"], claims) == ["u.{role}"]


def test_patterns_without_placeholders_pass_through() -> None:
    assert expand_templates(["xy.md.>", "a.*.b"], {}) == ["xy.md.>", "a.*.b"]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_no_claim_value_widens_a_template(value: str) -> None:
    """Whatever the claim, the result allows nothing beyond one literal token in the slot."""
    for pattern in expand_templates(["orders.{sub}.*"], {"sub": value}):
        assert pattern == f"orders.{value}.*"
        assert is_subset(pattern, "orders.*.*")
        assert matches(pattern, f"orders.{value}.x")
        assert not matches(pattern, "orders.other.x") or value == "other"


# --------------------------------------------------------------------------- from_claims


def _from(claims: Mapping[str, object] | None, **kw: bool) -> SubjectAcl:
    return SubjectAcl.from_claims(
        DEFAULT_WHITELIST,
        claims,
        "subjects",
        allow_full_wildcard=kw.get("full", False),
        max_bytes=256,
    )


def test_from_claims_anonymous_and_absent_claim_are_whitelist_only() -> None:
    for claims in (None, {"sub": "alice"}):
        acl = _from(claims)
        assert acl.grants is None
        assert acl.check("xy.md.tick.demo") is None


def test_from_claims_list() -> None:
    acl = _from({"sub": "alice", "subjects": ["xy.md.{sub}.*", "xy.md.public.>"]}, full=True)
    assert acl.grants == ("xy.md.alice.*", "xy.md.public.>")
    assert acl.check("xy.md.alice.x") is None
    assert acl.check("xy.md.bob.x") == DENIED.format("xy.md.bob.x")
    assert acl.check("xy.md.public.>") is None


def test_from_claims_comma_separated_string() -> None:
    acl = _from({"sub": "alice", "subjects": "xy.md.{sub}.* , xy.md.public.>,"})
    assert acl.grants == ("xy.md.alice.*", "xy.md.public.>")


@pytest.mark.parametrize("sub", ["al.ice", "*", ">"])
def test_from_claims_hostile_sub_grants_nothing(sub: str) -> None:
    acl = _from({"sub": sub, "subjects": ["xy.md.{sub}.*"]})
    assert acl.grants == ()
    assert acl.check("xy.md.al.ice") == DENIED.format("xy.md.al.ice")
    assert acl.check("xy.md.x.y") == DENIED.format("xy.md.x.y")


@pytest.mark.parametrize("claim", [None, 42, {"a": "xy.md.>"}, ["xy.md.>", 3], [["xy.md.>"]], True])
def test_from_claims_wrong_type_fails_closed(claim: object) -> None:
    acl = _from({"sub": "alice", "subjects": claim})
    assert acl.grants == ()
    assert acl.check("xy.md.tick.demo") == DENIED.format("xy.md.tick.demo")
    assert not acl.allows_subject("xy.md.tick.demo")


def test_from_claims_uses_the_named_claim_and_options() -> None:
    acl = SubjectAcl.from_claims(
        ["svc.>"],
        {"requests": "svc.orders.*"},
        "requests",
        allow_full_wildcard=False,
        max_bytes=256,
    )
    assert acl.grants == ("svc.orders.*",)
    assert acl.allows_subject("svc.orders.create")
    assert not acl.allows_subject("svc.users.create")
    assert acl.check("svc.>") == "'>' subscriptions are not enabled"
