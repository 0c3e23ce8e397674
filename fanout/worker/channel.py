"""One recoverable key's state in the worker (protocol v1.2), and a resume waiting for
its answer.

:mod:`fanout.worker.recovery` works on these: the live path adds to a key's
window and holds messages for its resuming clients (the seams), the answers
use its coalesced reads (:mod:`fanout.core.reads`), and a catch-up
(:mod:`fanout.worker.catch_up`) runs at most one at a time per key.
"""

from __future__ import annotations

from dataclasses import dataclass

from fanout.core import outbox, subjects
from fanout.core.history import Reason, Resume, Seam, StreamState, Window
from fanout.core.reads import Reads, Rounds
from fanout.settings import Settings
from fanout.worker.catch_up import CatchUp
from fanout.worker.subscriber import Replies, Subscriber


@dataclass(slots=True, eq=False)
class Resuming:
    """A ``sub`` of a recoverable pattern whose ack waits for recovery to answer."""

    conn: Subscriber
    key: str
    op_id: int
    replies: Replies
    slot: int
    #: What to replay; None: a plain sub (the ack only carries the epoch).
    resume: Resume | None
    #: Decided before asking the stream (``limit`` for ``last`` > max_replay).
    reason: Reason | None = None
    #: ``Reads.started`` of its key when its live messages began to be held.
    held: int = 0

    @property
    def asked(self) -> bool:
        """The sub asked to resume: its ack says ``recovered``."""
        return self.resume is not None or self.reason is not None


class Channel:
    """One recoverable key: its stream, window, held clients and reads."""

    __slots__ = (
        "batch",
        "catching_up",
        "exact",
        "holding",
        "key",
        "last_seq",
        "pattern",
        "pending",
        "policy",
        "reads",
        "rounds",
        "stream",
        "window",
    )

    def __init__(
        self, key: str, pattern: str, stream: str, policy: int, settings: Settings
    ) -> None:
        h = settings.history
        self.key = key
        self.pattern = pattern
        self.stream = stream
        self.policy = policy
        #: Shared by the clients that are idle when a live message comes (as on the plain path).
        self.batch = outbox.Batch(policy)
        #: One subject, no wildcard: ``Nats-Last-Sequence`` proves the window complete.
        self.exact = not subjects.is_wildcard(pattern)
        self.window: Window[outbox.Pending] = Window(h.window_messages, h.window_s)
        #: Subs whose ack waits for recovery's answer (one per client: a pattern is
        #: subscribed once per connection).
        self.pending: dict[Subscriber, Resuming] = {}
        #: The resuming ones' held live messages (looked up per live message).
        self.holding: dict[Subscriber, Seam[outbox.Pending]] = {}
        self.reads: Reads[Resuming, outbox.Pending] = Reads(h.max_replay)
        self.rounds: Rounds[tuple[Resuming, StreamState]] = Rounds()
        #: The highest sequence the live path has seen (or the stream had once the
        #: subscription was live): where a catch-up after a live outage reads from.
        self.last_seq = 0
        #: The catch-up in flight (one at a time per key).
        self.catching_up: CatchUp | None = None
