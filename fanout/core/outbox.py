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

Replies to the client's ops go out at once when nothing is pending; otherwise
they are *held* behind the pending frames and drained after them (an ``unsub``
ack promises that nothing of that pattern follows it). Held replies are not
messages: the caps and policies never drop them (the inbound rate limit bounds them).

Sharing: within one flush cycle every subscriber of a NATS subscription gets
the same frames in the same order. A :class:`Batch` holds them once; an idle,
writable client only remembers where its part of the batch starts
(:meth:`ClientQueue.share`), so a thousand such clients cost no per-client
append and write one joined ``bytes`` object between them. A client that gets
anything else (another subscription's frame, a backed-up transport) first
*settles*: its shared part is copied into its own queue under the usual caps.
"""

from __future__ import annotations

from collections.abc import Callable

DROP_OLDEST = 0
LATEST = 1
DISCONNECT = 2
POLICY_NAMES = ("drop_oldest", "latest", "disconnect")
POLICIES = {name: i for i, name in enumerate(POLICY_NAMES)}

#: ``push`` / ``settle`` result when the ``disconnect`` policy cuts the client (else: drops).
CUT = -1

Pending = tuple[str, bytes]


class Batch:
    """The frames one NATS subscription delivered during the current flush cycle."""

    __slots__ = ("frames", "items", "joined", "nbytes", "policy")

    def __init__(self, policy: int) -> None:
        self.policy = policy
        self.items: list[Pending] = []
        self.frames: list[bytes] = []
        self.nbytes = 0
        self.joined: bytes | None = None

    def __len__(self) -> int:
        return len(self.items)

    def append(self, item: Pending) -> None:
        self.items.append(item)
        self.frames.append(item[1])
        self.nbytes += len(item[1])
        self.joined = None

    def data(self, start: int) -> bytes:
        """Frames ``start:`` as one bytes object; the whole batch is joined once and shared."""
        frames = self.frames
        if start:
            return frames[start] if len(frames) - start == 1 else b"".join(frames[start:])
        joined = self.joined
        if joined is None:
            joined = self.joined = frames[0] if len(frames) == 1 else b"".join(frames)
        return joined

    def clear(self) -> None:
        """End of the flush cycle: nobody refers to these frames any more."""
        self.items.clear()
        self.frames.clear()
        self.nbytes = 0
        self.joined = None


class ClientQueue:
    """The pending frames of one client; all sizes are bounded by its caps."""

    __slots__ = (
        "dropped",
        "frames",
        "held",
        "latest",
        "max_bytes",
        "max_messages",
        "nbytes",
        "shared",
        "shared_from",
    )

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.frames: list[Pending] = []
        self.latest: dict[str, bytes] = {}
        self.dropped: dict[str, int] = {}
        #: Reply frames that go after everything pending now.
        self.held: list[bytes] = []
        self.nbytes = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.shared: Batch | None = None
        self.shared_from = 0

    def __len__(self) -> int:
        """Messages waiting (queued, latest values and the shared part of a batch)."""
        shared = self.shared
        tail = len(shared.items) - self.shared_from if shared is not None else 0
        return len(self.frames) + len(self.latest) + tail

    def idle(self) -> bool:
        """Nothing pending at all, not even a drop notice: the client may share a batch."""
        return not (self.frames or self.latest or self.dropped or self.shared or self.held)

    def hold(self, reply: bytes) -> None:
        """A reply frame to drain after what is pending (the shared part settled first)."""
        self.held.append(reply)

    def take_held(self) -> list[bytes]:
        """The held replies, for a connection that closes (its messages are not sent)."""
        held, self.held = self.held, []
        return held

    def share(self, batch: Batch) -> None:
        """Take the batch's last frame, and the frames appended after it, as pending."""
        self.shared = batch
        self.shared_from = len(batch.items) - 1

    def settle(self, backed_up: bool) -> int:
        """Copy the shared part of the batch into this queue (caps apply): drops or CUT."""
        batch = self.shared
        if batch is None:
            return 0
        self.shared = None
        total = 0
        for item in batch.items[self.shared_from :]:
            result = self.push(item, batch.policy, backed_up)
            if result == CUT:
                return CUT
            total += result
        return total

    def push(self, item: Pending, policy: int, backed_up: bool) -> int:
        """Queue one frame; the number of messages dropped to make room, or CUT.

        A shared part must be settled first (the hub does): order is kept.
        """
        subject, frame = item
        size = len(frame)
        dropped = 0
        latest = self.latest
        if policy == LATEST and (backed_up or subject in latest):
            old = latest.get(subject)
            latest[subject] = frame
            self.nbytes += size
            if old is not None:
                self.nbytes -= len(old)
                self.dropped[subject] = self.dropped.get(subject, 0) + 1
                dropped = 1
        else:
            self.frames.append(item)
            self.nbytes += size
        if self.nbytes > self.max_bytes or len(self.frames) + len(latest) > self.max_messages:
            if policy == DISCONNECT:
                return CUT
            dropped += self._evict()
        return dropped

    def _evict(self) -> int:
        """Drop oldest pending frames until both caps hold again (at least one stays)."""
        frames, latest, dropped = self.frames, self.latest, self.dropped
        evicted = 0
        nbytes = self.nbytes
        held = len(frames) + len(latest)
        while (nbytes > self.max_bytes or held > self.max_messages) and held > 1:
            if evicted < len(frames):
                subject, frame = frames[evicted]
            else:
                subject = next(iter(latest))
                frame = latest.pop(subject)
            evicted += 1
            held -= 1
            nbytes -= len(frame)
            dropped[subject] = dropped.get(subject, 0) + 1
        del frames[:evicted]
        self.nbytes = nbytes
        return evicted

    def drain(self, notice: Callable[[str, int], bytes]) -> bytes:
        """Everything pending as one write: drop notices, queued frames, latest values,
        then the held replies."""
        shared = self.shared
        if shared is not None and not (self.frames or self.latest or self.dropped or self.held):
            self.shared = None
            return shared.data(self.shared_from)
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
        if shared is not None:
            self.shared = None
            parts.append(shared.data(self.shared_from))
        if self.held:
            parts.extend(self.held)
            self.held = []
        self.nbytes = 0
        return parts[0] if len(parts) == 1 else b"".join(parts)
