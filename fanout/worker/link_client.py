"""nats-py's client as the worker's link uses it: our messages straight to the hub,
SUB/UNSUB lines in batches.

nats-py gives each Subscription its own queue and task, and sends each SUB or
UNSUB through a coroutine; at a thousand subscriptions per client that was
most of a sub/unsub's cost and all of its garbage. Here a subscription of ours
is a lean :class:`Subscription` (nats-py still replays it on reconnect and
closes it on close), its messages go from the parser to the hub in wire order,
and its commands are written into nats-py's pending buffer, a slice at a time,
with no coroutine per command. Everything private of nats-py used here is
pinned by ``tests/unit/test_subscriptions.py``.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from nats.aio.client import PING_PROTO, Client
from nats.aio.subscription import Subscription
from nats.errors import ConnectionReconnectingError

from fanout.core.overlap import Route

__all__ = ["LinkClient", "Listener"]


class Listener(Protocol):
    """What the link reports to the hub (which owns routing and the waiting acks)."""

    def on_nats_message(
        self, route: Route, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> None: ...

    def on_history_message(
        self, route: Route, subject: str, data: bytes, headers: bytes
    ) -> None: ...

    def subscribed(self, sid: int, pattern: str) -> Route: ...

    def unsubscribing(self, route: Route) -> None: ...

    def removed(self, route: Route) -> None: ...

    def became_live(self, patterns: list[str]) -> None: ...

    def routes_lost(self) -> None: ...


class _RoutedSubscription(Subscription):
    """A Subscription whose messages never queue: LinkClient hands them to the hub.

    The attributes nats-py's client reads (reconnect replay, unsubscribe, close,
    drain) are class defaults, except the ones that differ per subscription or
    are mutable; the queue, event and iterator ``Subscription.__init__`` builds are
    never made.
    """

    _queue = ""
    _max_msgs = 0
    _received = 0
    _cb = None
    _future = None
    _closed = False
    _pending_msgs_limit = 0
    _pending_bytes_limit = 0
    _pending_queue = None  # type: ignore[assignment]
    _pending_size = 0
    _wait_for_msgs_task = None
    _message_iterator = None
    _jsi = None

    def __init__(self, conn: Client, sid: int, subject: str) -> None:
        self._conn = conn
        self._id = sid
        self._subject = subject
        self._pending_next_msgs_calls = {}


class LinkClient(Client):
    """nats-py's client, delivering our subscriptions' messages synchronously, in wire order.

    Copies of one message on two overlapping subscriptions thus reach the hub
    adjacent and in order. Other subscriptions (the request inbox) keep
    nats-py's own path. ``_process_msg`` is private API.
    """

    def __init__(self, listener: Listener, history_prefix: str | None = None) -> None:
        super().__init__()
        self.listener = listener
        self.routes: dict[int, Route] = {}
        #: Routes of republished subjects (recovery, v1.2): their messages keep the raw
        #: header block (the sequence is read from it), the others' are parsed as before.
        self.history_routes: dict[int, Route] = {}
        self._history_prefix = None if history_prefix is None else history_prefix + "."

    def route(self, pattern: str, lines: list[bytes]) -> tuple[Subscription, Route]:
        """Subscribe ``pattern`` for the hub; its SUB line is appended to ``lines``.

        The route is in place before the SUB is on the wire; :meth:`send` queues
        the lines, :meth:`confirm` writes them. Queued while reconnecting, the SUB
        goes twice (nats-py's replay of its subscriptions, then its buffer):
        nats-server ignores a SUB of a sid it holds.
        """
        self._sid += 1
        sid = self._sid
        sub = _RoutedSubscription(self, sid, pattern)
        prefix = self._history_prefix
        table = self.history_routes if prefix and pattern.startswith(prefix) else self.routes
        route = table[sid] = self.listener.subscribed(sid, pattern)
        self._subs[sid] = sub
        lines.append(b"SUB %s  %d\r\n" % (pattern.encode(), sid))
        return sub, route

    def unroute(self, sub: Subscription, lines: list[bytes]) -> None:
        """``sub.unsubscribe()``, its UNSUB line appended to ``lines``, also while
        reconnecting: nats-py replays only the subscriptions it still holds, then
        sends its buffer, where this sid's SUB line may still be (its turn did not
        reach nats-server before the connection dropped); the UNSUB after it undoes
        it. nats-server ignores an UNSUB of a sid it does not hold.
        """
        sub._closed = True
        self._subs.pop(sub._id, None)
        lines.append(b"UNSUB %d \r\n" % sub._id)

    def send(self, lines: list[bytes]) -> None:
        """Queue ``lines`` as one command in nats-py's pending buffer (no flush)."""
        if lines:
            data = b"".join(lines)
            self._pending.append(data)
            self._pending_data_size += len(data)

    def unrouted(self, routes: list[Route]) -> None:
        """No message can arrive on these any more: the flush after their UNSUBs came back."""
        for route in routes:
            self.routes.pop(route.sid, None)
            self.history_routes.pop(route.sid, None)

    async def confirm(self, timeout_s: float) -> None:
        """Write every buffered command with a PING behind it, in one write; wait for the PONG.

        The PONG proves nats-server has read every command before it. nats-py's
        ``flush`` would write its PING straight to the socket, ahead of commands
        still in its buffer, and take two trips through its flusher task. The
        future stays in nats-py's FIFO of PONG waiters, in wire order (appended
        and written with no await between), and is never cancelled: nats-py
        fails setting a cancelled one when a late PONG comes.
        """
        transport = self._transport
        if transport is None or not self.is_connected:
            raise ConnectionReconnectingError
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        pending, self._pending = self._pending, []
        pending.append(PING_PROTO)
        self._pending_data_size = 0
        self._pongs.append(pong)
        try:
            transport.writelines(pending)
        except (OSError, RuntimeError) as exc:  # the socket is gone: nats-py's reader reconnects
            raise ConnectionReconnectingError from exc
        await asyncio.wait_for(asyncio.shield(pong), max(1.0, timeout_s))

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        route = self.routes.get(sid)
        if route is None:
            route = self.history_routes.get(sid)
            if route is None:
                await super()._process_msg(sid, subject, reply, data, headers)
                return
            self.stats["in_msgs"] += 1
            self.stats["in_bytes"] += len(data)
            self.listener.on_history_message(route, subject.decode(), data, headers)
            return
        stats = self.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        hdr = await self._process_headers(headers) if headers else None
        self.listener.on_nats_message(route, subject.decode(), data, hdr)
