"""A worker built in-process: Hub + Gateway + WsConnection on fake transports, scripted time.

What the process-tree tests check through real sockets and real seconds, these
check in milliseconds: bytes go in as masked client frames through
``WsConnection.data_received``, frames come out of :class:`FakeTransport`'s
write log, and the sweep / ping timers run when the test calls them with the
:class:`Clock`'s scripted time. The worker is wired like
:class:`fanout.worker.main.Worker` wires it (same constructors, same order);
NATS is either absent (the test feeds the hub's message entry point) or a real
nats-server through the real :class:`~fanout.worker.nats_link.NatsLink`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import time
from collections.abc import Mapping
from typing import Any

from fanout import settings as config
from fanout.core import websocket
from fanout.core.auth import KeySet
from fanout.core.overlap import Route
from fanout.settings import Settings
from fanout.worker.connection import WsConnection
from fanout.worker.gateway import Gateway
from fanout.worker.hub import Hub
from fanout.worker.nats_link import NatsLink
from tests.security.hostile import client_frame

#: Loop turns :meth:`InProc.turn` lets run: a flush scheduled with ``call_soon`` needs one.
TURNS = 3


def make_settings(**overrides: Any) -> Settings:
    """Validated settings from dotted paths (``{"outbox.max_messages": 3}``), no environment."""
    given: dict[str, Any] = {"admin.port": 0}
    given.update(overrides)
    return config.load(environ={}, overrides=given, check_files=False)


class Clock:
    """Scripted time: ``now()`` (monotonic) and ``wall()`` move only when the test advances them.

    ``now()`` is the real monotonic reading at creation plus the advance, because the
    connection stamps its own events (pause, last read) with ``time.monotonic()``;
    a test runs in milliseconds, the deadlines it crosses are whole seconds.
    """

    def __init__(self, wall: float | None = None) -> None:
        self._mono0 = time.monotonic()
        self._wall0 = time.time() if wall is None else wall
        self.advanced = 0.0

    def advance(self, seconds: float) -> None:
        self.advanced += seconds

    def now(self) -> float:
        return time.monotonic() + self.advanced

    def wall(self) -> float:
        return self._wall0 + self.advanced


class FakeTransport(asyncio.Transport):
    """Records writes; the test stalls and drains it (pause/resume_writing) and sees close/abort.

    A write after ``close`` is recorded like any other (asyncio would still send it).

        ``close``/``abort`` report ``connection_lost`` on the next loop turn, as asyncio does.
    """

    def __init__(self, peer: str = "127.0.0.1") -> None:
        super().__init__()
        self.peer = peer
        self.data = bytearray()
        #: Every object passed to ``write``, as passed: clients sharing a batch get the same one.
        self.chunks: list[bytes | bytearray | memoryview] = []
        self.closed = False
        self.aborted = False
        self.high_water: int | None = None
        self.buffered = 0
        self._protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.chunks.append(data)
        self.data += data

    @property
    def writes(self) -> int:
        return len(self.chunks)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        if not self.is_closing():
            self.closed = True
            self._lost()

    def abort(self) -> None:
        if not self.aborted:
            was_closing = self.is_closing()
            self.aborted = True
            if not was_closing:
                self._lost()

    def _lost(self) -> None:
        protocol = self._protocol
        if isinstance(protocol, asyncio.Protocol):
            asyncio.get_running_loop().call_soon(protocol.connection_lost, None)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return (self.peer, 50000) if name == "peername" else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def pause_reading(self) -> None:
        """Reading is the test's business: nothing to pause."""

    def resume_reading(self) -> None:
        """Reading is the test's business: nothing to resume."""


def server_frames(data: bytes | bytearray) -> tuple[list[tuple[int, bytes]], int]:
    """Complete unmasked server frames in ``data`` as (opcode, payload), and bytes used."""
    frames: list[tuple[int, bytes]] = []
    at = 0
    while len(data) - at >= 2:
        n = data[at + 1] & 0x7F
        head = 2
        if n == 126:
            n, head = int.from_bytes(data[at + 2 : at + 4], "big"), 4
        elif n == 127:
            n, head = int.from_bytes(data[at + 2 : at + 10], "big"), 10
        if len(data) - at < head + n:
            break
        frames.append((data[at] & 0x0F, bytes(data[at + head : at + head + n])))
        at += head + n
    return frames, at


class Client:
    """One client: bytes in through the connection, frames out of the fake transport."""

    def __init__(self, conn: WsConnection, transport: FakeTransport) -> None:
        self.conn = conn
        self.transport = transport
        self._read = transport.data.index(b"\r\n\r\n") + 4  # past the 101 response
        self.close_code: int | None = None
        self.pings = 0

    def send(self, *ops: Mapping[str, Any]) -> None:
        """One text frame: one op, or a JSON array of several."""
        body: Any = ops[0] if len(ops) == 1 else list(ops)
        self.send_raw(client_frame(0x1, json.dumps(body, separators=(",", ":")).encode()))

    def send_raw(self, data: bytes) -> None:
        self.conn.data_received(data)

    def frames(self) -> list[tuple[int, bytes]]:
        """Server frames written since the last read."""
        frames, used = server_frames(self.transport.data[self._read :])
        self._read += used
        for opcode, payload in frames:
            if opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big")
            elif opcode == 0x9:
                self.pings += 1
        return frames

    def received(self) -> list[dict[str, Any]]:
        """The JSON objects written since the last read (a batch flattened)."""
        out: list[dict[str, Any]] = []
        for opcode, payload in self.frames():
            if opcode == 0x1:
                data = json.loads(payload)
                out.extend(data if isinstance(data, list) else [data])
        return out

    def msgs(self) -> list[dict[str, Any]]:
        return [f for f in self.received() if f.get("op") == "msg"]


class InProc:
    """One worker's client side in this process (see :class:`fanout.worker.main.Worker`)."""

    def __init__(
        self, settings: Settings, keys: KeySet | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.clock = Clock() if clock is None else clock
        self.hub = Hub(settings, asyncio.get_running_loop())
        self.gateway = Gateway(settings, self.hub, keys, wall=self.clock.wall)
        self.link: NatsLink | None = None
        self._sids = itertools.count(1)
        self._routes: dict[str, Route] = {}

    async def start_nats(self) -> NatsLink:
        """The real link to ``nats.urls``, wired as the worker wires it."""
        history = self.settings.history
        link = NatsLink(
            self.settings.nats,
            self.hub,
            self.hub.on_nats_status,
            history.republish_prefix if history.streams else None,
        )
        self.link = self.hub.link = link
        await link.start()
        self.hub.nats_up = link.connected
        return link

    async def stop(self) -> None:
        for conn in list(self.hub.connections):
            conn.transport.abort()
        await self.turn()
        if self.link is not None:
            await self.link.close()

    async def connect(
        self, token: str | None = None, peer: str = "127.0.0.1", **headers: str
    ) -> Client:
        """A client through the real handshake checks (``admit``): HandshakeError or AuthError."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /ws HTTP/1.1",
            "Host: 127.0.0.1:8080",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if token is not None:
            lines.append(f"Authorization: Bearer {token}")
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
        parsed = websocket.parse_request_head(raw, self.settings.server.max_request_head_bytes)
        assert parsed is not None
        transport = FakeTransport(peer)
        conn = await self.gateway.admit(parsed[0], transport, peer)
        transport.set_protocol(conn)
        return Client(conn, transport)

    def route(self, pattern: str) -> Route:
        """The route a NATS subscription of ``pattern`` would have (no NATS involved)."""
        route = self._routes.get(pattern)
        if route is None:
            route = self._routes[pattern] = self.hub.subscribed(next(self._sids), pattern)
        return route

    def publish(self, pattern: str, subject: str, data: bytes) -> None:
        """A message from NATS on ``pattern``'s subscription, straight into the hub."""
        self.hub.on_nats_message(self.route(pattern), subject, data, None)

    async def turn(self) -> None:
        """Let the loop run what was scheduled (the hub's flush, connection_lost)."""
        for _ in range(TURNS):
            await asyncio.sleep(0)  # waits on: one loop turn, no time

    def sweep(self) -> None:
        self.gateway.sweep(self.clock.now())

    def ping_idle(self) -> None:
        self.gateway.ping_idle(self.clock.now())
