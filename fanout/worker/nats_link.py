"""The worker's one NATS connection: connect, reconnect forever, rebuild when closed.

nats-py closes a client for good on most ``-ERR`` even with infinite
reconnects, so ``closed_cb`` is treated as fatal for the link: a new client is
built and every wanted subscription is made again. The hub says which patterns
it wants (``want``/``unwant``); this module owns the Subscription objects.
Which connect failures end the boot is :mod:`fanout.worker.nats_auth`'s call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fanout.errors import Code
from fanout.settings import Nats
from fanout.worker.nats_auth import (
    NatsAuthError,
    check_files,
    connect_options,
    fatal_reason,
    may_hide_refused_certificate,
    refused_client_certificate,
)

log = logging.getLogger("fanout.nats")

OnMessage = Callable[[str, Msg], None]
OnStatus = Callable[[bool], None]


class NatsLink:
    """Keeps one live NATS client and the subscriptions the hub wants."""

    def __init__(self, cfg: Nats, on_message: OnMessage, on_status: OnStatus) -> None:
        self.cfg = cfg
        self.on_message = on_message
        self.on_status = on_status
        self.wanted: dict[str, Subscription | None] = {}
        self.nc: Client | None = None
        self.connected = False
        self.last_error: str | None = Code.NATS_DOWN
        self.reconnects = 0
        self._closed = asyncio.Event()
        self._first_outcome = asyncio.Event()
        self._auth_failed: str | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

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
        self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            await asyncio.wait_for(self._first_outcome.wait(), self.cfg.connect_timeout_s + 1.0)
        except TimeoutError:
            log.warning("NATS not reachable yet, retrying", extra={"code": Code.NATS_DOWN})
        if self._auth_failed is not None:
            self._task.cancel()
            raise NatsAuthError(self._auth_failed)

    async def _run(self) -> None:
        """Connect (nats-py retries every URL forever), serve, and rebuild after a close."""
        while not self._stopping:
            nc = Client()
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
            for pattern in list(self.wanted):
                await self._subscribe(pattern)
            self.on_status(True)
            self._first_outcome.set()
            await self._closed.wait()

    async def _subscribe(self, pattern: str) -> None:
        nc = self.nc
        if nc is None or not nc.is_connected or pattern not in self.wanted:
            return
        on_message = self.on_message

        async def deliver(msg: Msg) -> None:
            on_message(pattern, msg)

        sub = await nc.subscribe(pattern, cb=deliver, pending_bytes_limit=64 * 1024 * 1024)
        if pattern in self.wanted and self.nc is nc:
            self.wanted[pattern] = sub
        else:
            await sub.unsubscribe()

    def want(self, pattern: str) -> None:
        self.wanted[pattern] = None
        if self.nc is not None and self.nc.is_connected:
            asyncio.get_running_loop().create_task(self._subscribe(pattern))

    def unwant(self, pattern: str) -> None:
        sub = self.wanted.pop(pattern, None)
        if sub is not None and self.nc is not None and not self.nc.is_closed:
            asyncio.get_running_loop().create_task(self._unsubscribe(sub))

    @staticmethod
    async def _unsubscribe(sub: Subscription) -> None:
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.debug("unsubscribe failed", extra={"reason": str(exc)})

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
            self.on_status(False)

    async def _on_reconnected(self) -> None:
        self.connected = True
        self.reconnects += 1
        log.info("NATS reconnected", extra={"fields": {"url": self.url}})
        self.on_status(True)

    async def _on_closed(self) -> None:
        if self._stopping:
            return
        log.error("NATS connection closed; rebuilding the link", extra={"code": Code.NATS_DOWN})
        await self._on_disconnected()
        for pattern in self.wanted:
            self.wanted[pattern] = None
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
        if self._task is not None:
            self._task.cancel()
        nc, self.nc = self.nc, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=2.0)
            except (TimeoutError, nats.errors.Error):
                await nc.close()
