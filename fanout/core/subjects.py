"""NATS subjects and wildcard patterns: validation, matching, subset and overlap tests.

nats-py only refuses spaces, so a subject such as ``"a\\r\\nSUB >"`` would reach
the server as a protocol command. Every subject or pattern that comes from a
client (or a token claim) passes :func:`validate_subject` / :func:`validate_pattern`
here before it goes anywhere near NATS.

Rules: tokens are separated by ``.`` and never empty; no whitespace and no
character whose Unicode category is ``C*`` (control, format, surrogate,
private use, unassigned) or ``Z*`` (separators); the length cap is in UTF-8
bytes. In a pattern a token that is exactly ``*`` matches one token and a final
token that is exactly ``>`` matches one or more trailing tokens; ``*`` or ``>``
inside a longer token is invalid, as is any wildcard in a concrete subject.

:func:`matches`, :func:`is_subset` and :func:`intersects` assume valid input
and do no validation of their own: they stay cheap for the hot path.
"""

from __future__ import annotations

import unicodedata

from fanout.errors import Code, FanoutError

__all__ = [
    "SubjectError",
    "intersects",
    "is_subset",
    "is_wildcard",
    "matches",
    "validate_pattern",
    "validate_subject",
]


class SubjectError(FanoutError, ValueError):
    """An invalid subject or pattern; ``str(exc)`` is a short reason, safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.SUBJECT_DENIED, message, message)


def _bad_char(text: str) -> str | None:
    """The first whitespace / control / format / separator character in ``text``, if any."""
    # str.isprintable() is False exactly for categories C* and Z* except the ASCII
    # space (a test checks this for every code point), so valid text costs one C call.
    if text.isprintable() and " " not in text:
        return None
    for ch in text:
        if ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            return ch
    return None


def _plain(text: str) -> bool:
    """True for a concrete subject with no empty token: the usual case, checked with C-level
    string scans; anything else takes the per-token loop, which also names the fault."""
    return not ("*" in text or ">" in text or ".." in text or text[0] == "." or text[-1] == ".")


def _validate(text: str, max_bytes: int, wildcards: bool) -> None:
    # The usual case (every sub op), a plain ASCII subject: what the checks below
    # conclude for it, in C-level scans and no call.
    if (
        0 < len(text) <= max_bytes
        and text.isascii()
        and text.isprintable()
        and " " not in text
        and "*" not in text
        and ">" not in text
        and ".." not in text
        and text[0] != "."
        and text[-1] != "."
    ):
        return
    if not text:
        raise SubjectError("empty subject")
    # Each character is at least one UTF-8 byte: refuse huge input before scanning it.
    if len(text) > max_bytes:
        raise SubjectError(f"longer than {max_bytes} bytes")
    bad = _bad_char(text)
    if bad is not None:
        raise SubjectError(f"control or whitespace character U+{ord(bad):04X}")
    if _plain(text):
        if text.isascii() or len(text.encode("utf-8")) <= max_bytes:
            return
        raise SubjectError(f"longer than {max_bytes} bytes")
    tokens = text.split(".")
    last = len(tokens)
    for position, token in enumerate(tokens, 1):
        if not token:
            raise SubjectError(f"empty token at position {position}")
        if "*" in token or ">" in token:
            if not wildcards:
                raise SubjectError(f"wildcard at position {position} (a subject must be concrete)")
            if len(token) != 1:
                raise SubjectError(f"wildcard inside a token at position {position}")
            if token == ">" and position != last:
                raise SubjectError("'>' must be the last token")
    if not text.isascii() and len(text.encode("utf-8")) > max_bytes:
        raise SubjectError(f"longer than {max_bytes} bytes")


def validate_subject(subject: str, max_bytes: int = 256) -> None:
    """Raise :class:`SubjectError` unless ``subject`` is a valid concrete subject (no wildcards)."""
    _validate(subject, max_bytes, wildcards=False)


def validate_pattern(pattern: str, max_bytes: int = 256) -> None:
    """Raise :class:`SubjectError` unless ``pattern`` is a valid subject or wildcard pattern."""
    _validate(pattern, max_bytes, wildcards=True)


def is_wildcard(pattern: str) -> bool:
    """True when some token of ``pattern`` is a ``*`` or ``>`` wildcard."""
    return any(token == "*" or token == ">" for token in pattern.split("."))


def matches(pattern: str, subject: str) -> bool:
    """NATS semantics: does the concrete ``subject`` match ``pattern``? (Hot path.)"""
    if "*" not in pattern:
        if not pattern.endswith(">"):
            return pattern == subject
        # "a.b.>": the prefix "a.b." then at least one more character, hence one more token.
        return len(subject) >= len(pattern) and subject.startswith(pattern[:-1])
    ptokens = pattern.split(".")
    stokens = subject.split(".")
    n = len(ptokens)
    if ptokens[-1] == ">":
        if len(stokens) < n:
            return False
        n -= 1
    elif len(stokens) != n:
        return False
    for i in range(n):
        ptoken = ptokens[i]
        if ptoken != "*" and ptoken != stokens[i]:
            return False
    return True


def is_subset(pattern: str, of: str) -> bool:
    """True iff every subject matched by ``pattern`` is also matched by ``of``."""
    if "*" not in of:
        # Literal tokens, perhaps a final '>' (the usual whitelist and grant): string tests.
        if of[-1] != ">":
            return pattern == of
        prefix = of[:-1]
        return len(pattern) > len(prefix) and pattern.startswith(prefix)
    ptokens = pattern.split(".")
    otokens = of.split(".")
    if otokens[-1] == ">":
        # ``of``'s '>' covers whatever ``pattern`` has from there on (at least one token).
        if len(ptokens) < len(otokens):
            return False
        otokens.pop()
    elif len(ptokens) != len(otokens) or ptokens[-1] == ">":
        return False
    # Here no token of ``pattern`` facing ``of``'s tokens is '>' (it is only ever last).
    return all(
        otoken == "*" or otoken == ptoken for ptoken, otoken in zip(ptokens, otokens, strict=False)
    )


def intersects(a: str, b: str) -> bool:
    """True iff some concrete subject matches both patterns."""
    atokens = a.split(".")
    btokens = b.split(".")
    a_open = atokens[-1] == ">"
    b_open = btokens[-1] == ">"
    if a_open:
        atokens.pop()
    if b_open:
        btokens.pop()
    if a_open and not b_open:
        if len(btokens) <= len(atokens):
            return False
    elif b_open and not a_open:
        if len(atokens) <= len(btokens):
            return False
    elif not a_open and len(atokens) != len(btokens):
        return False
    return all(x == y or x == "*" or y == "*" for x, y in zip(atokens, btokens, strict=False))
