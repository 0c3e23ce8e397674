"""The worker's NATS subscriptions as a state machine: what to send, when a pattern is live.

Per pattern: PENDING (SUB sent, not yet confirmed) → LIVE (a flush PONG after
the SUB came back: nats-server has processed it) → DRAINING (UNSUB sent, not yet
confirmed) → gone. The hub says which patterns it wants (its router counts the
subscribers); this class decides the commands. Wants and unwants only mark a
pattern dirty; a turn (:meth:`begin`) takes the dirty set and :meth:`decide`
turns it into commands, a slice at a time, by comparing "wanted" with
"subscribed", so any interleaving of want/unwant (and of disconnect/reset)
yields at most one NATS subscription per pattern: an UNSUB is always on the
wire before a new SUB of the same pattern. No I/O here; the
worker's driver (``fanout.worker.nats_link``) sends the commands and reports
the flush.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DRAINING", "LIVE", "PENDING", "SUB", "UNSUB", "Subscriptions", "Turn"]

PENDING = "pending"
LIVE = "live"
DRAINING = "draining"

SUB = "sub"
UNSUB = "unsub"


@dataclass(slots=True)
class Turn:
    """The commands of one driver turn, confirmed together by one flush.

    A turn is worked in slices (:meth:`Subscriptions.decide`, :meth:`Subscriptions.confirmed`
    with a ``limit``) so a 3000-pattern turn never holds the worker's loop: the
    cursors say how far each slice got.
    """

    number: int
    epoch: int
    #: The patterns dirty when the turn began, decided in order.
    dirty: list[str] = field(default_factory=list)
    commands: list[tuple[str, str]] = field(default_factory=list)
    #: Patterns that need this turn's flush to become live (new SUBs, or resent by a reconnect).
    confirm: list[str] = field(default_factory=list)
    decided: int = 0
    released: int = 0
    drained: bool = False

    @property
    def undecided(self) -> bool:
        return self.decided < len(self.dirty)

    @property
    def unreleased(self) -> bool:
        return self.released < len(self.confirm)

    @property
    def needs_flush(self) -> bool:
        return bool(self.commands or self.confirm)


class Subscriptions:
    """Wanted patterns vs. the NATS subscriptions of the current client."""

    __slots__ = ("_dirty", "_draining", "_recheck", "_state", "_turns", "epoch", "wanted")

    def __init__(self) -> None:
        self.wanted: set[str] = set()
        #: pattern → turn number of its unconfirmed SUB, or LIVE.
        self._state: dict[str, int | str] = {}
        #: pattern → UNSUBs sent and not yet confirmed (normally 0 or 1).
        self._draining: dict[str, int] = {}
        self._dirty: dict[str, None] = {}
        self._recheck = False
        self._turns = 0
        #: Incremented when the client is replaced: its subscriptions are gone.
        self.epoch = 0

    # -- the hub's side ----------------------------------------------------
    def want(self, pattern: str) -> bool:
        """Somebody here wants ``pattern``; True when it is already live (ack at once)."""
        self.wanted.add(pattern)
        if self._state.get(pattern) == LIVE:
            return True
        self._dirty[pattern] = None
        return False

    def unwant(self, pattern: str) -> None:
        self.wanted.discard(pattern)
        self._dirty[pattern] = None

    def state(self, pattern: str) -> str | None:
        """PENDING, LIVE, DRAINING (only an UNSUB on the wire) or None."""
        current = self._state.get(pattern)
        if current == LIVE:
            return LIVE
        if current is not None:
            return PENDING
        return DRAINING if self._draining.get(pattern) else None

    def is_live(self, pattern: str) -> bool:
        return self._state.get(pattern) == LIVE

    @property
    def subscribed(self) -> int:
        """NATS subscriptions the current client holds (pending or live)."""
        return len(self._state)

    @property
    def has_work(self) -> bool:
        return bool(self._dirty) or self._recheck

    # -- the driver's side --------------------------------------------------
    def take(self) -> Turn:
        """A whole turn at once: :meth:`begin` and :meth:`decide` with no limit."""
        turn = self.begin()
        self.decide(turn)
        return turn

    def begin(self) -> Turn:
        """A new turn owning the patterns dirty so far (in the order they became dirty);
        later wants and unwants are the next turn's. Patterns a reconnect or a lost
        flush left unconfirmed join its flush."""
        self._turns += 1
        turn = Turn(self._turns, self.epoch, list(self._dirty))
        self._dirty = {}
        if self._recheck:
            self._recheck = False
            state = self._state
            for pattern, current in state.items():
                if current != LIVE:
                    state[pattern] = turn.number
                    turn.confirm.append(pattern)
        return turn

    def decide(self, turn: Turn, limit: int | None = None) -> list[tuple[str, str]]:
        """The commands for the turn's next ``limit`` dirty patterns (all when None),
        also appended to ``turn.commands``.

        Each pattern is decided from what is wanted now, so a want or unwant made
        between two slices is never lost: that pattern is dirty again for the next
        turn, which finds nothing left to do or undoes this one.
        """
        start = turn.decided
        stop = len(turn.dirty) if limit is None else min(len(turn.dirty), start + limit)
        turn.decided = stop
        commands: list[tuple[str, str]] = []
        state, wanted, number = self._state, self.wanted, turn.number
        for pattern in turn.dirty[start:stop]:
            current = state.get(pattern)
            if pattern in wanted:
                if current is None:
                    state[pattern] = number
                    commands.append((SUB, pattern))
                    turn.confirm.append(pattern)
            elif current is not None:
                del state[pattern]
                self._draining[pattern] = self._draining.get(pattern, 0) + 1
                commands.append((UNSUB, pattern))
        turn.commands += commands
        return commands

    def _drained(self, turn: Turn) -> None:
        if turn.drained:
            return
        turn.drained = True
        for op, pattern in turn.commands:
            if op == UNSUB:
                left = self._draining[pattern] - 1
                if left:
                    self._draining[pattern] = left
                else:
                    del self._draining[pattern]

    def confirmed(self, turn: Turn, limit: int | None = None) -> list[str]:
        """The flush after ``turn`` came back: its SUBs are live, its UNSUBs are gone.

        Returns the patterns that became live (release the acks waiting on them):
        the next ``limit`` of the turn's (all when None), so the driver can release
        a 3000-pattern turn a slice per loop turn. A pattern undone, or left
        unconfirmed by a disconnect, meanwhile is not live.
        """
        if turn.epoch != self.epoch:
            return []
        self._drained(turn)
        start = turn.released
        stop = len(turn.confirm) if limit is None else min(len(turn.confirm), start + limit)
        turn.released = stop
        live: list[str] = []
        state, number = self._state, turn.number
        for pattern in turn.confirm[start:stop]:
            if state.get(pattern) == number:
                state[pattern] = LIVE
                live.append(pattern)
        return live

    def lost(self, turn: Turn) -> None:
        """The flush after ``turn`` failed (NATS down): its SUBs stay pending until a
        later flush confirms them; its UNSUBs are over (a reconnect resends only
        the client's current subscriptions)."""
        if turn.epoch == self.epoch:
            self._drained(turn)
            self._recheck = True

    def disconnected(self) -> None:
        """The connection dropped: the client resends every SUB on reconnect, unconfirmed."""
        state = self._state
        for pattern in state:
            state[pattern] = 0
        self._recheck = True

    def reconnected(self) -> None:
        """Confirm everything again with the next flush."""
        self._recheck = True

    def reset(self) -> None:
        """The client is gone for good: a new one must subscribe to everything wanted."""
        self.epoch += 1
        self._state.clear()
        self._draining.clear()
        self._dirty = dict.fromkeys(sorted(self.wanted))
        self._recheck = False
