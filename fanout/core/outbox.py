"""Per-client bounded outbox with drop policies: loss is bounded, counted, never silent.

The hub appends one shared ``(subject, frame)`` pair per NATS message to every
recipient's outbox and drains each dirty outbox once per loop iteration into a
single write. When an outbox passes its caps (messages or bytes) the
subscription's policy decides:

``drop_oldest``  evict the oldest pending frame (the default);
``latest``       while the client is backed up, keep only the newest frame per
                 subject (market ticks: a stale price is worth nothing);
``disconnect``   the client is cut as a slow consumer (4003).

Every eviction is remembered per subject, and the next drain starts with one
``dropped`` notice per subject, before any further ``msg``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

DROP_OLDEST = 0
LATEST = 1
DISCONNECT = 2
POLICY_NAMES = ("drop_oldest", "latest", "disconnect")
POLICIES = {name: i for i, name in enumerate(POLICY_NAMES)}

#: ``push`` results
QUEUED = 0
DROPPED = 1
CUT = 2

Pending = tuple[str, bytes]


class ClientQueue:
    """The pending frames of one client; all sizes are bounded by its caps."""

    __slots__ = ("dropped", "frames", "latest", "max_bytes", "max_messages", "nbytes")

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.frames: deque[Pending] = deque()
        self.latest: dict[str, bytes] = {}
        self.dropped: dict[str, int] = {}
        self.nbytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.frames) + len(self.latest)

    def push(self, item: Pending, policy: int, backed_up: bool) -> int:
        """Queue one frame; QUEUED, DROPPED (something was evicted) or CUT (disconnect)."""
        subject, frame = item
        size = len(frame)
        result = QUEUED
        if policy == LATEST and (backed_up or subject in self.latest):
            old = self.latest.get(subject)
            self.latest[subject] = frame
            self.nbytes += size
            if old is not None:
                self.nbytes -= len(old)
                self.dropped[subject] = self.dropped.get(subject, 0) + 1
                result = DROPPED
        else:
            self.frames.append(item)
            self.nbytes += size
        if self.nbytes > self.max_bytes or len(self.frames) + len(self.latest) > self.max_messages:
            if policy == DISCONNECT:
                return CUT
            self._evict()
            result = DROPPED
        return result

    def _evict(self) -> None:
        """Drop oldest pending frames until both caps hold again (at least one stays)."""
        frames, latest, dropped = self.frames, self.latest, self.dropped
        while (self.nbytes > self.max_bytes or len(frames) + len(latest) > self.max_messages) and (
            len(frames) + len(latest) > 1
        ):
            if frames:
                subject, frame = frames.popleft()
            else:
                subject = next(iter(latest))
                frame = latest.pop(subject)
            self.nbytes -= len(frame)
            dropped[subject] = dropped.get(subject, 0) + 1

    def drain(self, notice: Callable[[str, int], bytes]) -> bytes:
        """Everything pending as one write: drop notices, queued frames, then latest values."""
        parts: list[bytes] = []
        if self.dropped:
            parts.extend(notice(subject, count) for subject, count in self.dropped.items())
            self.dropped.clear()
        if self.frames:
            parts.extend(frame for _, frame in self.frames)
            self.frames.clear()
        if self.latest:
            parts.extend(self.latest.values())
            self.latest.clear()
        self.nbytes = 0
        return b"".join(parts)
