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

import functools
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


class _Cover:
    """Valid patterns split for the subset test every ``sub`` runs: ``'*'``-free ones are
    a set of exact subjects and a tuple of ``a.b.`` prefixes (``a.b.>``), one C call each;
    only patterns with a ``*`` take :func:`is_subset`. Equal to ``any(is_subset(p, of)
    for of in patterns)`` for a valid ``p`` (which never ends with the prefixes' dot)."""

    __slots__ = ("exact", "general", "prefixes")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.exact = frozenset(of for of in patterns if "*" not in of and of[-1] != ">")
        self.prefixes = tuple(of[:-1] for of in patterns if "*" not in of and of[-1] == ">")
        self.general = tuple(of for of in patterns if "*" in of)

    def covers(self, pattern: str) -> bool:
        if pattern in self.exact or pattern.startswith(self.prefixes):
            return True
        for allowed in self.general:  # noqa: SIM110 (any() over a generator costs more)
            if is_subset(pattern, allowed):
                return True
        return False


@functools.lru_cache(maxsize=1024)
def _cover(patterns: tuple[str, ...]) -> _Cover:
    """One shared cover per list: every connection has the whitelist, most share grants."""
    return _Cover(patterns)


class SubjectAcl:
    """(union of whitelist patterns) ∩ (union of grant patterns) for one connection.

    ``grants=None`` means the token puts no restriction (whitelist only);
    ``grants=[]`` allows nothing. Invalid patterns in either list allow nothing.
    """

    __slots__ = (
        "_allow_full_wildcard",
        "_grants",
        "_grants_cover",
        "_max_bytes",
        "_whitelist",
        "_whitelist_cover",
    )

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
        self._whitelist_cover = _cover(self._whitelist)
        self._grants_cover = None if self._grants is None else _cover(self._grants)
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
        if not self._whitelist_cover.covers(pattern):
            return f"not allowed: {pattern}"
        grants = self._grants_cover
        if grants is not None and not grants.covers(pattern):
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
