"""The worker's one NATS connection: connect, reconnect forever, rebuild when closed.

nats-py closes a client for good on most ``-ERR`` even with infinite
reconnects, so ``closed_cb`` is treated as fatal for the link: a new client is
built and every wanted subscription is made again. The hub says which patterns
it wants (``want``/``unwant``); this module owns the Subscription objects and
drives :class:`fanout.core.subscriptions.Subscriptions` through the nats-py
client of :mod:`fanout.worker.link_client`. Which connect failures end the boot
is :mod:`fanout.worker.nats_auth`'s call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fanout.core.overlap import Route
from fanout.core.subscriptions import SUB, Subscriptions, Turn
from fanout.errors import Code
from fanout.settings import Nats
from fanout.worker.link_client import LinkClient, Listener
from fanout.worker.nats_auth import (
    NatsAuthError,
    check_files,
    connect_options,
    fatal_reason,
    may_hide_refused_certificate,
    refused_client_certificate,
)

log = logging.getLogger("fanout.nats")

OnStatus = Callable[[bool], None]

#: Patterns a driver step handles per loop turn: 3000 of them must not hold the loop.
COMMANDS_PER_TURN = 64


class NatsLink:
    """Keeps one live NATS client and drives the subscriptions the hub wants.

    One driver task applies the commands of :class:`Subscriptions` in order
    (each SUB, each UNSUB), then sends ONE flush whose PONG confirms every SUB
    of that turn: a 1000-sub batch costs one round trip. At most one nats-py
    Subscription per pattern exists at any time.
    """

    def __init__(
        self,
        cfg: Nats,
        listener: Listener,
        on_status: OnStatus,
        history_prefix: str | None = None,
    ) -> None:
        self.cfg = cfg
        #: Subjects under ``<prefix>.`` are recovery's republished ones (v1.2).
        self.history_prefix = history_prefix
        self.listener = listener
        self.on_status = on_status
        self.table = Subscriptions()
        #: pattern → (nats-py Subscription, our route) of the current client.
        self.subs: dict[str, tuple[Subscription, Route]] = {}
        self.nc: LinkClient | None = None
        self.connected = False
        self.last_error: str | None = Code.NATS_DOWN
        self.reconnects = 0
        self._closed = asyncio.Event()
        self._first_outcome = asyncio.Event()
        self._wake = asyncio.Event()
        self._auth_failed: str | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._driver: asyncio.Task[None] | None = None

    @property
    def url(self) -> str | None:
        nc = self.nc
        if nc is None or nc.connected_url is None:
            return None
        u = nc.connected_url
        return f"{u.scheme}://{u.hostname}:{u.port}"

    async def start(self) -> None:
        """Begin connecting; NatsAuthError when the servers reject our credentials.

        An unreachable NATS is not a boot error: the worker serves clients (with a
        ``status`` down frame) while the link keeps trying every configured URL.
        """
        check_files(self.cfg)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        self._driver = loop.create_task(self._drive())
        try:
            await asyncio.wait_for(self._first_outcome.wait(), self.cfg.connect_timeout_s + 1.0)
        except TimeoutError:
            log.warning("NATS not reachable yet, retrying", extra={"code": Code.NATS_DOWN})
        if self._auth_failed is not None:
            self._task.cancel()
            self._driver.cancel()
            raise NatsAuthError(self._auth_failed)

    async def _run(self) -> None:
        """Connect (nats-py retries every URL forever), serve, and rebuild after a close."""
        while not self._stopping:
            nc = LinkClient(self.listener, self.history_prefix)
            try:
                await nc.connect(
                    **connect_options(self.cfg),
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                )
            except Exception as exc:
                self.last_error = Code.NATS_DOWN
                fatal = str(exc) if isinstance(exc, NatsAuthError) else fatal_reason(exc, self.cfg)
                if fatal is not None:
                    self._auth_failed = fatal
                    self._first_outcome.set()
                log.error("NATS connect failed", extra={"code": Code.NATS_DOWN, "reason": str(exc)})
                await asyncio.sleep(self.cfg.reconnect_wait_s)
                continue
            self.nc = nc
            self._closed.clear()
            self.connected = True
            self.last_error = None
            log.info("NATS connected", extra={"fields": {"url": self.url}})
            self._wake.set()
            self.on_status(True)
            self._first_outcome.set()
            await self._closed.wait()

    def want(self, pattern: str) -> bool:
        """The hub wants ``pattern``; True when it is live already (ack at once)."""
        if self.table.want(pattern):
            return True
        self._wake.set()
        return False

    def unwant(self, pattern: str) -> None:
        self.table.unwant(pattern)
        self._wake.set()

    def is_live(self, pattern: str) -> bool:
        return self.table.is_live(pattern)

    @property
    def subscriptions(self) -> int:
        """NATS subscriptions of the current client (what nats-server holds for it)."""
        return len(self.subs)

    async def _drive(self) -> None:
        """The one driver: whenever there is work, a turn of commands and one flush.

        Every step of a turn (deciding and queueing its commands, releasing its
        live patterns, dropping its unsubscribed routes) runs a slice of
        COMMANDS_PER_TURN patterns per loop turn: a 3000-pattern turn is some fifty
        short callbacks, not one of 10 ms, and still one PING/PONG.
        """
        while not self._stopping:
            await self._wake.wait()
            await asyncio.sleep(0)  # the rest of a frame's ops (the next slice) joins this turn
            self._wake.clear()
            nc = self.nc
            if nc is None or nc.is_closed or not self.table.has_work:
                continue
            turn = self.table.begin()
            unsubscribed = await self._apply(nc, turn)
            if unsubscribed is None or not turn.needs_flush:
                continue
            try:
                await nc.confirm(self.cfg.connect_timeout_s)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("subscription flush failed", extra={"reason": str(exc)})
                self.table.lost(turn)
                if nc.is_connected:
                    self._wake.set()
                await self._removed(nc, turn, unsubscribed)
            else:
                await self._removed(nc, turn, unsubscribed)
                await self._live(turn)

    async def _apply(self, nc: LinkClient, turn: Turn) -> list[Route] | None:
        """Decide and queue one turn's SUBs and UNSUBs in order, a slice per loop turn;
        the routes unsubscribed, or None when the client was replaced meanwhile (the
        new one gets every SUB). Bookkeeping only, no I/O: :meth:`LinkClient.confirm`
        writes them."""
        unsubscribed: list[Route] = []
        subs, listener, table = self.subs, self.listener, self.table
        while True:
            lines: list[bytes] = []
            for op, pattern in table.decide(turn, COMMANDS_PER_TURN):
                if op == SUB:
                    subs[pattern] = nc.route(pattern, lines)
                    continue
                sub, route = subs.pop(pattern)
                listener.unsubscribing(route)
                unsubscribed.append(route)
                nc.unroute(sub, lines)
            nc.send(lines)
            if not turn.undecided:
                return unsubscribed
            await asyncio.sleep(0)  # thousands of commands must not hold the loop
            if turn.epoch != table.epoch:
                return None

    async def _removed(self, nc: LinkClient, turn: Turn, unsubscribed: list[Route]) -> None:
        """The turn's UNSUBs are over: their routes go, a slice per loop turn, until the
        client is replaced (its routes went all at once)."""
        for start in range(0, len(unsubscribed), COMMANDS_PER_TURN):
            if start:
                await asyncio.sleep(0)
                if turn.epoch != self.table.epoch:
                    return
            routes = unsubscribed[start : start + COMMANDS_PER_TURN]
            nc.unrouted(routes)
            for route in routes:
                self.listener.removed(route)

    async def _live(self, turn: Turn) -> None:
        """The turn's PONG came: its patterns become live and their acks go, a slice per
        loop turn (a pattern undone or a link gone meanwhile does not)."""
        while True:
            live = self.table.confirmed(turn, COMMANDS_PER_TURN)
            if live:
                self.listener.became_live(live)
            if not turn.unreleased or turn.epoch != self.table.epoch:
                return
            await asyncio.sleep(0)

    async def _on_error(self, exc: Exception) -> None:
        """nats-py retries its first connect forever: a fatal error at boot must end it."""
        reason = fatal_reason(exc, self.cfg)
        booting = not self._first_outcome.is_set()
        if reason is None and booting and may_hide_refused_certificate(exc, self.cfg):
            reason = await refused_client_certificate(self.cfg)
        if reason is not None and booting:
            raise NatsAuthError(reason)
        message = "NATS error" if self.connected else "NATS connect failed"
        log.warning(message, extra={"code": Code.NATS_DOWN, "reason": reason or str(exc)})

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        if self.connected:
            self.connected = False
            self.last_error = Code.NATS_DOWN
            log.warning("NATS disconnected", extra={"code": Code.NATS_DOWN})
            self.table.disconnected()
            self.on_status(False)

    async def _on_reconnected(self) -> None:
        self.connected = True
        self.reconnects += 1
        self.table.reconnected()
        self._wake.set()
        log.info("NATS reconnected", extra={"fields": {"url": self.url}})
        self.on_status(True)

    async def _on_closed(self) -> None:
        if self._stopping:
            return
        log.error("NATS connection closed; rebuilding the link", extra={"code": Code.NATS_DOWN})
        await self._on_disconnected()
        self.table.reset()
        self.subs.clear()
        self.listener.routes_lost()
        self.nc = None
        self._closed.set()

    async def request(
        self, subject: str, payload: bytes, timeout_s: float, headers: dict[str, str] | None
    ) -> Msg:
        if self.nc is None or not self.nc.is_connected:
            raise nats.errors.ConnectionClosedError
        return await self.nc.request(subject, payload, timeout=timeout_s, headers=headers)

    async def close(self) -> None:
        self._stopping = True
        for task in (self._task, self._driver):
            if task is not None:
                task.cancel()
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=2.0)
            except (TimeoutError, nats.errors.Error):
                await nc.close()
