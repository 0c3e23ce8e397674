"""The first protocol on every accepted socket: read the request head, then hand off.

Admission itself is decided in one place, :meth:`fanout.worker.gateway.Gateway.admit`;
:class:`Handshake` only reads the head, routes the socket, and writes the
refusal when there is one: a :class:`HandshakeError` (from the head's parser or
the gateway's checks) or the token check's :class:`AuthError`, written as they
are raised (status, ``XYW0xx`` code), nothing converted on the way.

A WebSocket upgrade on the configured path is checked by the gateway and the
socket moves to a lean :class:`WsConnection`; anything else (``/readyz``,
``/healthz``, the pages, a plain GET on the WebSocket path) moves to aiohttp's
own request handler with the bytes read so far. So aiohttp serves HTTP while
WebSocket clients never pay for aiohttp's per-connection objects.

The whole request head is read and checked here, for every path, before
aiohttp sees a byte: an oversize head is refused with 431 by us (aiohttp's own
error log would quote the start of the header, a token included), and a head
still incomplete ``server.handshake_timeout_s`` after accept is cut by the
sweep (slow-loris). With TLS, the handshake itself is bounded by the same
timeout (``ssl_handshake_timeout``) before this protocol even starts.

A plain HTTP socket serves exactly one request: aiohttp gets that request's
head and nothing after it (a pipelined request never reaches its parser), the
answer says ``Connection: close``, and the handshake protocol stays in front of aiohttp so
the socket keeps counting toward the connection cap and is cut by the same
deadline if it is still open ``server.handshake_timeout_s`` after accept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

from fanout import logs, metrics
from fanout.core import websocket
from fanout.core.auth import AuthError
from fanout.core.websocket import HandshakeError
from fanout.errors import Code
from fanout.worker.gateway import Gateway

log = logging.getLogger("fanout.handshake")


class Handshake(asyncio.Protocol):
    __slots__ = (
        "buf",
        "gateway",
        "http",
        "http_factory",
        "peer",
        "transport",
        "upgrading",
        "via_proxy",
    )

    def __init__(self, gateway: Gateway, http_factory: Callable[[], asyncio.Protocol]) -> None:
        self.gateway = gateway
        self.http_factory = http_factory
        self.http: asyncio.Protocol | None = None
        self.buf = bytearray()
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.upgrading = False
        self.via_proxy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if peer else "?"
        self.gateway.pending_handshakes[self] = time.monotonic()

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self.upgrading or self.http is not None:
            return
        self.buf += data
        max_head = self.gateway.settings.server.max_request_head_bytes
        try:
            parsed = websocket.parse_request_head(self.buf, max_head)
        except HandshakeError as exc:
            self.refuse(exc)
            return
        if parsed is None:
            return
        head, consumed = parsed
        if head.path == self.gateway.settings.ws.path and head.is_websocket_upgrade():
            self.peer, self.via_proxy = self.gateway.client_of(self.peer, head)
            self.upgrading = True
            transport.pause_reading()
            rest = bytes(self.buf[consumed:])
            self.buf = bytearray()
            asyncio.get_running_loop().create_task(self.upgrade(transport, head, rest))
            return
        http = self.http = self.http_factory()
        http.connection_made(transport)
        http.data_received(bytes(self.buf[:consumed]))
        self.buf = bytearray()

    async def upgrade(
        self, transport: asyncio.Transport, head: websocket.RequestHead, rest: bytes
    ) -> None:
        try:
            conn = await self.gateway.admit(head, transport, self.peer, self.via_proxy)
        except (HandshakeError, AuthError) as exc:
            self.refuse(exc)
            return
        except ConnectionResetError:
            return
        except Exception as exc:  # whatever raises, the client gets an answer and a close
            message = f"handshake failed: {type(exc).__name__}: {exc}"
            self.gateway.client_log.log(log, message, code=Code.INTERNAL, peer=self.peer)
            self.refuse(HandshakeError(500, Code.INTERNAL, "internal error"))
            return
        finally:
            self.gateway.pending_handshakes.pop(self, None)
        metrics.HANDSHAKES.labels("accepted").inc()
        logs.connection_event(log, "connection opened", conn)
        self.transport = None
        transport.set_protocol(conn)
        if rest:
            conn.data_received(rest)
        transport.resume_reading()

    def refuse(self, exc: HandshakeError | AuthError) -> None:
        """Count, log and answer a refusal, then close the socket."""
        headers, limit = (exc.headers, exc.limit) if isinstance(exc, HandshakeError) else ((), "")
        metrics.HANDSHAKE_FAILURES.labels(exc.code).inc()
        metrics.handshake_refused(exc.code, limit)
        self.gateway.client_log.log(
            log,
            "handshake refused",
            code=exc.code,
            status=exc.status,
            peer=self.peer,
            reason=exc.message,
        )
        self.gateway.pending_handshakes.pop(self, None)
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            transport.write(websocket.response_error(exc.status, exc.code, exc.message, headers))
            transport.close()

    def eof_received(self) -> bool | None:
        return self.http.eof_received() if self.http is not None else False

    def pause_writing(self) -> None:
        if self.http is not None:
            self.http.pause_writing()

    def resume_writing(self) -> None:
        if self.http is not None:
            self.http.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gateway.pending_handshakes.pop(self, None)
        self.transport = None
        if self.http is not None:
            self.http.connection_lost(exc)
