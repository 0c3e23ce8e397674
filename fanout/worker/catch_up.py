"""Catching a recoverable key up from its stream after live messages were missed.

Live delivery is at most once: while the worker's NATS link is down (a node
died, a blip) or when a single subject's ``Nats-Last-Sequence`` skips a
message, the missing messages must be read from the stream while the key's
clients are held (their seams). On a failover that read is the hard part:
JetStream may not answer for seconds (stream or meta leader re-elected), and a
read consumer on an R3 replica that has not applied the newest messages comes
back short without any error. So a catch-up keeps gap detection on while it
runs (the highest ``Nats-Last-Sequence`` it has not seen is what it must
reach), reads again after a short or failed read with bounded backoff, and only
then reports the loss (``dropped``). Holding the clients is bounded by their
seams (overflow: 4003, and the client resumes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from fanout import metrics
from fanout.core import outbox
from fanout.core.history import Seam
from fanout.worker.history import HistoryReader, Stored, Unavailable
from fanout.worker.subscriber import Subscriber

log = logging.getLogger("fanout.recovery")

#: A catch-up reads again for this long before it reports the loss (a JetStream leader
#: election after a node failure takes a few seconds).
CATCH_UP_S = 10.0
#: Pause before the second read; doubled for each next one, up to ``MAX_PAUSE_S``.
FIRST_PAUSE_S = 0.1
MAX_PAUSE_S = 2.0

#: ``complete``: everything missed was read; ``limit``: more than ``max_replay``;
#: ``failed``: JetStream did not answer, or not far enough, within ``CATCH_UP_S``
#: (the labels of ``fanout_recovery_catchups_total``).
Outcome = Literal["complete", "limit", "failed"]


@dataclass(frozen=True, slots=True)
class Missed:
    """What a catch-up read: the messages, how far it got, how many it could not get."""

    messages: list[Stored]
    reached: int
    #: Messages known lost (at least one when the read failed or fell short).
    lost: int
    outcome: Outcome


@dataclass(slots=True, eq=False)
class CatchUp:
    """One catch-up of a key in flight: where it reads from, what it must reach, whom it holds."""

    stream: str
    pattern: str
    after: int
    #: The highest sequence the clients must get: a live message's ``Nats-Last-Sequence``
    #: that nothing delivered yet (0: none known).
    required: int = 0
    #: The link dropped while a read was out: that read may miss what came meanwhile.
    again: bool = False
    #: Every client of the key was closed or left: stop reading.
    abandoned: bool = False
    seams: dict[Subscriber, Seam[outbox.Pending]] = field(default_factory=dict)

    def need(self, previous: int) -> None:
        """A live message says its subject's previous message is ``previous``."""
        if previous > self.required:
            self.required = previous

    async def read(self, reader: HistoryReader, max_replay: int) -> Missed:
        """Read what was missed after ``after`` until it covers ``required`` (at most
        ``max_replay`` messages), retrying failed and short reads for ``CATCH_UP_S``."""
        got: list[Stored] = []
        cursor = self.after
        deadline = time.monotonic() + CATCH_UP_S
        pause = FIRST_PAUSE_S
        while not self.abandoned:
            self.again = False
            try:
                more, pending = await reader.read(
                    self.stream, self.pattern, after=cursor, limit=max_replay - len(got)
                )
            except Unavailable as exc:
                why = str(exc)
            else:
                got += more
                if more:
                    cursor = more[-1].seq
                if pending > len(more):
                    return self._done(got, cursor, pending - len(more), "limit")
                if cursor >= self.required and not self.again:
                    return self._done(got, cursor, 0, "complete")
                why = f"the read reached {cursor}, {self.required} is needed"
            if time.monotonic() + pause > deadline:
                log.warning(
                    "catch-up gave up: messages lost",
                    extra={"fields": {"pattern": self.pattern, "after": cursor}, "reason": why},
                )
                return self._done(got, cursor, 1, "failed")
            log.info(
                "catch-up reads again",
                extra={"fields": {"pattern": self.pattern, "pause_s": pause}, "reason": why},
            )
            await asyncio.sleep(pause)
            pause = min(2 * pause, MAX_PAUSE_S)
        return Missed(got, cursor, 0, "complete")

    def _done(self, got: list[Stored], reached: int, lost: int, outcome: Outcome) -> Missed:
        metrics.RECOVERY_CATCHUPS.labels(outcome).inc()
        metrics.RECOVERY_CAUGHT_UP.inc(len(got))
        return Missed(got, reached, lost, outcome)
