"""The worker's clients that hold a recoverable and a plain pattern crossing each other.

:mod:`fanout.core.mixed` decides, per such client, which copy of a message
delivers it (the live one of the plain pattern or the republished one of the
recoverable pattern). This module keeps those decisions' inputs up to date as
clients subscribe and unsubscribe, and tells the hub which NATS keys have such
clients (:attr:`Mixes.crossing`): only those leave the direct path. A client
gets its :class:`~fanout.core.mixed.Mix` the first time it holds both kinds (its
patterns indexed once), and keeps it until it goes, so later ops cost the same
whatever it holds.
"""

from __future__ import annotations

from fanout.core import outbox
from fanout.core.mixed import Mix
from fanout.worker.recovery import Recovery
from fanout.worker.subscriber import Subscriber


class Mixes:
    """Each client's :class:`Mix` and the NATS keys whose clients' patterns cross."""

    __slots__ = ("crossing", "mixes", "recoverable_held", "recovery")

    def __init__(self, recovery: Recovery) -> None:
        self.recovery = recovery
        self.mixes: dict[Subscriber, Mix[outbox.Pending]] = {}
        #: How many recoverable patterns each client holds (clients with none are absent).
        self.recoverable_held: dict[Subscriber, int] = {}
        #: NATS key → the clients of it whose patterns cross (read on the hot path).
        self.crossing: dict[str, dict[Subscriber, None]] = {}

    def added_plain(self, conn: Subscriber, pattern: str) -> None:
        if self.recoverable_held and conn in self.recoverable_held:
            self._add(conn, pattern, None)

    def added_recoverable(self, conn: Subscriber, pattern: str, switched: bool) -> None:
        """``switched``: a resume (or a sub acked at once) delivers from the sub on."""
        held = self.recoverable_held[conn] = self.recoverable_held.get(conn, 0) + 1
        if conn in self.mixes or len(conn.subs) > held:
            self._add(conn, pattern, switched)

    def dropped(self, conn: Subscriber, pattern: str, recoverable: bool) -> list[outbox.Pending]:
        """``pattern`` left ``conn``; for a recoverable one, the plain copies it had the
        client skip whose republished copy has not come: the hub delivers them now."""
        if recoverable:
            held = self.recoverable_held[conn] - 1
            if held:
                self.recoverable_held[conn] = held
            else:
                del self.recoverable_held[conn]
        mix = self.mixes.get(conn)
        if mix is None:
            return []
        if not recoverable:
            self._crossed(conn, mix, mix.remove_plain(pattern))
            return []
        changed, released = mix.remove_recoverable(pattern)
        self._crossed(conn, mix, changed)
        return released

    def gone(self, conn: Subscriber) -> None:
        """``conn``'s patterns were all dropped."""
        self.mixes.pop(conn, None)

    def answered(self, conn: Subscriber, pattern: str, top: int | None) -> None:
        """Recovery decided the ack of ``conn``'s recoverable ``pattern`` (``top``: the
        stream's last sequence then, None if unknown): from now on it delivers."""
        mix = self.mixes.get(conn)
        if mix is not None:
            mix.answered(pattern, top)

    def settled(self, conn: Subscriber, mix: Mix[outbox.Pending]) -> None:
        """``mix``'s lingering recoverable patterns have nothing due any more: their copies
        may take the direct path again."""
        changed, mix.settled = mix.settled, []
        self._crossed(conn, mix, changed)

    def _add(self, conn: Subscriber, pattern: str, switched: bool | None) -> None:
        """``switched`` None: a plain pattern."""
        mix = self.mixes.get(conn)
        if mix is None:
            self.mixes[conn] = mix = Mix(self.recovery.hold_limit)
            changed = self._index(conn, mix)
        elif switched is None:
            changed = mix.add_plain(pattern)
        else:
            stream = self.recovery.streams.stream_for(pattern)
            assert stream is not None
            changed = mix.add_recoverable(pattern, stream, switched)
        self._crossed(conn, mix, changed)

    def _index(self, conn: Subscriber, mix: Mix[outbox.Pending]) -> list[str]:
        """Every pattern of ``conn`` into its new mix; a recoverable one whose plain ack
        recovery has not given yet is joining."""
        recovery = self.recovery
        changed: list[str] = []
        recoverable: list[tuple[str, str, bool]] = []
        for pattern in conn.subs:
            stream = recovery.streams.stream_for(pattern)
            if stream is None:
                changed += mix.add_plain(pattern)
                continue
            channel = recovery.channels.get(recovery.key_of(pattern))
            r = None if channel is None else channel.pending.get(conn)
            recoverable.append((pattern, stream, r is None or r.resume is not None))
        for pattern, stream, switched in recoverable:
            changed += mix.add_recoverable(pattern, stream, switched)
        return changed

    def _crossed(self, conn: Subscriber, mix: Mix[outbox.Pending], changed: list[str]) -> None:
        for pattern in changed:
            key = self.recovery.key_of(pattern)
            if mix.crossing(pattern):
                self.crossing.setdefault(key, {})[conn] = None
            else:
                clients = self.crossing.get(key)
                if clients is not None:
                    clients.pop(conn, None)
                    if not clients:
                        del self.crossing[key]
