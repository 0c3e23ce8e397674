"""Which local clients want which NATS subscription, with reference counts.

A worker subscribes on NATS once per distinct client pattern, only while at
least one of its own clients wants it: ``add`` says when a pattern got its
first subscriber (subscribe on NATS), ``remove`` when it lost its last
(unsubscribe). No I/O here; the hub acts on the answers.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

C = TypeVar("C", bound=Hashable)


class SubjectRouter(Generic[C]):
    """pattern → subscribers (insertion-ordered, so delivery order is stable)."""

    __slots__ = ("_by_pattern",)

    def __init__(self) -> None:
        self._by_pattern: dict[str, dict[C, None]] = {}

    def add(self, client: C, pattern: str) -> bool:
        """Add ``client`` to ``pattern``; True when the pattern is new to this worker."""
        subs = self._by_pattern.get(pattern)
        if subs is None:
            self._by_pattern[pattern] = {client: None}
            return True
        subs[client] = None
        return False

    def remove(self, client: C, pattern: str) -> bool:
        """Remove ``client`` from ``pattern``; True when nobody here wants it any more."""
        subs = self._by_pattern.get(pattern)
        if subs is None or client not in subs:
            return False
        del subs[client]
        if subs:
            return False
        del self._by_pattern[pattern]
        return True

    def subscribers(self, pattern: str) -> dict[C, None]:
        """The live subscriber dict for ``pattern`` (empty when none). Do not mutate."""
        return self._by_pattern.get(pattern) or {}

    def __len__(self) -> int:
        return len(self._by_pattern)
