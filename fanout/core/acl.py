"""What one connection may subscribe to: the configured whitelist ∩ the token's grants.

A pattern is allowed when it is a subset of some whitelist pattern and (when the
token carries a grants claim) of some grant pattern, so every subject it can
ever match is allowed by both. Grants come from a claim (``subjects`` by
default) and may use ``{name}`` templates filled from other claims, e.g.
``orders.{sub}.>``. Everything fails closed: a claim of the wrong type grants
nothing, and a template whose value is not exactly one valid token drops its
pattern, so a claim value can never widen what a pattern allows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from fanout.core.subjects import (
    SubjectError,
    is_subset,
    matches,
    validate_pattern,
    validate_subject,
)

__all__ = ["SubjectAcl", "expand_templates"]

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def _claim_token(claims: Mapping[str, object], name: str, max_bytes: int) -> str:
    """The claim as one subject token; SubjectError (the pattern is dropped) when it is not."""
    value = claims.get(name)
    if not isinstance(value, str) or "." in value:
        raise SubjectError(f"claim {name!r} is not one subject token")
    validate_subject(value, max_bytes)
    return value


def expand_templates(
    patterns: Sequence[str], claims: Mapping[str, object], max_bytes: int = 256
) -> list[str]:
    """Fill ``{name}`` placeholders from ``claims``; drop any pattern that cannot be filled safely.

    A value must be a string that is one valid concrete token (no '.', '*', '>',
    whitespace or control characters, not empty). Patterns that are invalid
    after expansion are dropped too.
    """
    out: list[str] = []
    for pattern in patterns:
        try:
            expanded = _PLACEHOLDER.sub(
                lambda m: _claim_token(claims, m.group(1), max_bytes), pattern
            )
            validate_pattern(expanded, max_bytes)
        except SubjectError:
            continue
        out.append(expanded)
    return out


def _valid_only(patterns: Sequence[str], max_bytes: int) -> tuple[str, ...]:
    """The valid patterns of ``patterns``: an invalid pattern allows nothing."""
    valid: list[str] = []
    for pattern in patterns:
        try:
            validate_pattern(pattern, max_bytes)
        except SubjectError:
            continue
        valid.append(pattern)
    # All valid (the usual case): tuple() of the caller's tuple shares it across connections.
    return tuple(patterns) if len(valid) == len(patterns) else tuple(valid)


def _covered(pattern: str, by: tuple[str, ...]) -> bool:
    """Some pattern of ``by`` covers ``pattern`` (a plain loop: every sub op runs this)."""
    for allowed in by:  # noqa: SIM110 (any() over a generator costs more than the test)
        if is_subset(pattern, allowed):
            return True
    return False


class SubjectAcl:
    """(union of whitelist patterns) ∩ (union of grant patterns) for one connection.

    ``grants=None`` means the token puts no restriction (whitelist only);
    ``grants=[]`` allows nothing. Invalid patterns in either list allow nothing.
    """

    __slots__ = ("_allow_full_wildcard", "_grants", "_max_bytes", "_whitelist")

    def __init__(
        self,
        whitelist: Sequence[str],
        grants: Sequence[str] | None,
        *,
        allow_full_wildcard: bool = False,
        max_bytes: int = 256,
    ) -> None:
        self._whitelist = _valid_only(whitelist, max_bytes)
        self._grants = None if grants is None else _valid_only(grants, max_bytes)
        self._allow_full_wildcard = allow_full_wildcard
        self._max_bytes = max_bytes

    @classmethod
    def from_claims(
        cls,
        whitelist: Sequence[str],
        claims: Mapping[str, object] | None,
        claim_name: str,
        *,
        allow_full_wildcard: bool = False,
        max_bytes: int = 256,
    ) -> SubjectAcl:
        """Build the ACL from verified claims (``None`` = anonymous: whitelist only).

        The claim, when present, is a list of patterns or one comma-separated
        string; any other type grants nothing.
        """
        if claims is None or claim_name not in claims:
            return cls(
                whitelist, None, allow_full_wildcard=allow_full_wildcard, max_bytes=max_bytes
            )
        raw = claims[claim_name]
        patterns: list[str] = []
        if isinstance(raw, str):
            patterns = [part.strip() for part in raw.split(",")]
        elif isinstance(raw, list | tuple) and all(isinstance(item, str) for item in raw):
            patterns = list(raw)
        grants = expand_templates(patterns, claims, max_bytes)
        return cls(whitelist, grants, allow_full_wildcard=allow_full_wildcard, max_bytes=max_bytes)

    @property
    def grants(self) -> tuple[str, ...] | None:
        """The token's (expanded, valid) grant patterns; ``None`` when it sets none."""
        return self._grants

    def check(self, pattern: str) -> str | None:
        """``None`` when the client may subscribe to ``pattern``, else a client-safe reason."""
        try:
            validate_pattern(pattern, self._max_bytes)
        except SubjectError as exc:
            return str(exc)
        if not self._allow_full_wildcard and pattern.endswith(">"):
            return "'>' subscriptions are not enabled"
        if not _covered(pattern, self._whitelist):
            return f"not allowed: {pattern}"
        grants = self._grants
        if grants is not None and not _covered(pattern, grants):
            return f"not allowed: {pattern}"
        return None

    def allows_subject(self, subject: str) -> bool:
        """True when ``subject`` is a valid concrete subject allowed by whitelist and grants."""
        try:
            validate_subject(subject, self._max_bytes)
        except SubjectError:
            return False
        if not any(matches(allowed, subject) for allowed in self._whitelist):
            return False
        grants = self._grants
        return grants is None or any(matches(grant, subject) for grant in grants)
