"""Tools of the hostile-input suite: raw sockets, forged tokens, and the well-behaved neighbour.

Every case opens its own raw connection (bytes no real client would send) to
one shared gateway per test module, asserts the exact answer, and then asks
the :class:`Neighbour` — a normal client on the same worker, connected before
the first case — to prove it still receives every message, in order.

Clients come from 127.0.0.2, the gateway's only trusted proxy, each with its
own ``X-Forwarded-For`` address: so per-address limits and the handshake rate
can be exercised per case without one case starving the next.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from nats.aio.client import Client as NatsClient

from tests.conftest import Gateway, launch_gateway
from tests.helpers import async_wait_for

ORIGIN = "https://app.example.com"
ISSUER = "https://id.fanout.test/"
AUDIENCE = "fanout"
PROXY = "127.0.0.2"
REVOKED_JTI = "revoked-jti-0001"
_ips = itertools.count(1)


def fresh_ip() -> str:
    """A client address no other case has used (198.18.0.0/15, the benchmarking range)."""
    n = next(_ips)
    return f"198.18.{n // 250}.{n % 250 + 1}"


def start_gateway(
    log_dir: Path, nats_url: str, public_key: Path, *, start: bool = True, **env: str
) -> Gateway:
    denylist = log_dir / "denylist.txt"
    denylist.write_text(f"# revoked\n{REVOKED_JTI}\n")
    settings: dict[str, Any] = {
        "NATS_URLS": nats_url,
        "JWT_PUBLIC_KEY": str(public_key),
        "JWT_ISSUER": ISSUER,
        "JWT_AUDIENCE": AUDIENCE,
        "WS_ALLOWED_ORIGINS": ORIGIN,
        "FANOUT_JWT_LEEWAY_S": "5",
        "FANOUT_JWT_MAX_LIFETIME_S": "3600",
        "FANOUT_JWT_DENYLIST_PATH": str(denylist),
        "FANOUT_SERVER_TRUSTED_PROXIES": PROXY,
        "FANOUT_SERVER_HANDSHAKE_TIMEOUT_S": "2",
        "FANOUT_SERVER_MAX_CONNECTIONS_PER_IP": "4",
        "FANOUT_SERVER_MAX_CONNECTIONS_PER_PRINCIPAL": "3",
        "FANOUT_SERVER_HANDSHAKE_RATE_PER_IP": "2",
        "FANOUT_SERVER_HANDSHAKE_BURST_PER_IP": "6",
    }
    settings.update(env)
    return launch_gateway(log_dir, "--workers", "1", start=start, **settings)


# -- tokens ---------------------------------------------------------------------------------
@dataclass
class Signer:
    """Signs tokens with the gateway's trusted RSA key (or another key, for the bad cases)."""

    private_pem: bytes
    public_pem: bytes
    _subs: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def claims(self, **over: Any) -> dict[str, Any]:
        now = int(time.time())
        base: dict[str, Any] = {
            "sub": f"user-{next(self._subs)}",
            "subjects": ["xy.md.>"],
            "iat": now,
            "exp": now + 600,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "jti": os.urandom(8).hex(),
        }
        base.update(over)
        return {k: v for k, v in base.items() if v is not None}

    def token(self, headers: dict[str, Any] | None = None, **over: Any) -> str:
        return jwt.encode(self.claims(**over), self.private_pem, "RS256", headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(claims: dict[str, Any]) -> str:
    """``alg: none``: no signature at all."""
    head = b64(b'{"alg":"none","typ":"JWT"}')
    return f"{head}.{b64(json.dumps(claims).encode())}."


def hs256_with_public_key(claims: dict[str, Any], public_pem: bytes) -> str:
    """The classic confusion: HMAC keyed with the RSA public key the server holds."""
    head = b64(b'{"alg":"HS256","typ":"JWT"}')
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(public_pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


# -- raw HTTP / WebSocket -------------------------------------------------------------------
@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    def close(self) -> None:
        self.writer.transport.abort()


def upgrade_request(
    port: int,
    *,
    token: str | None = None,
    xff: str | None = None,
    origin: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    omit: tuple[str, ...] = (),
    method: str = "GET",
    version: str = "1.1",
) -> bytes:
    headers = [
        ("Host", f"127.0.0.1:{port}"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
        ("Sec-WebSocket-Version", "13"),
    ]
    if token is not None:
        headers.append(("Authorization", f"Bearer {token}"))
    if xff is not None:
        headers.append(("X-Forwarded-For", xff))
    if origin is not None:
        headers.append(("Origin", origin))
    headers = [h for h in headers if h[0] not in omit] + (extra or [])
    lines = [f"{method} /ws HTTP/{version}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect_raw(
    port: int, source: str = PROXY, rcvbuf: int | None = None, limit: int = 1 << 22
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from ``source``; a small ``rcvbuf`` and ``limit`` (the reader's buffer,
    past which it stops reading the socket) make a client that soon takes nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock, limit=limit)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """The next response on ``reader``: status, headers (lower-case names), and the body
    when it is not a 101."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if status != 101:
        async with asyncio.timeout(5):
            body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def send_request(port: int, request: bytes, source: str = PROXY) -> Reply:
    """Send ``request`` raw on a connection of its own; its response."""
    reader, writer = await connect_raw(port, source)
    writer.write(request)
    status, headers, body = await read_response(reader)
    return Reply(status, headers, body, reader, writer)


async def handshake(port: int, **kw: Any) -> Reply:
    """A well-formed upgrade (every field overridable); each call gets a fresh client address."""
    kw.setdefault("xff", fresh_ip())
    return await send_request(port, upgrade_request(port, **kw))


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0
) -> bytes:
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 1 << 16:
        header = bytes([first, mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([first, mask_bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return header + key + body


def text(obj: object) -> bytes:
    return client_frame(0x1, json.dumps(obj, separators=(",", ":")).encode())


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    n = head[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return head[0] & 0x0F, await reader.readexactly(n)


async def read_json(reader: asyncio.StreamReader, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The next text frame's JSON objects (a batch is flattened); pings are skipped."""
    async with asyncio.timeout(timeout):
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == 0x1:
                data = json.loads(payload)
                return data if isinstance(data, list) else [data]
            if opcode == 0x8:
                raise AssertionError(f"closed with {int.from_bytes(payload[:2], 'big')}")


async def close_code(reader: asyncio.StreamReader, timeout: float = 5.0) -> int | None:
    """Read until the server's close frame; its code (None if the socket ends without one)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await read_frame(reader)
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return None


async def open_ws(port: int, signer: Signer, **claims: Any) -> Reply:
    """An authenticated upgrade; the welcome frame is already read."""
    reply = await handshake(port, token=signer.token(**claims))
    assert reply.status == 101, (reply.status, reply.body)
    welcome = await read_json(reply.reader)
    assert welcome[0]["op"] == "welcome"
    return reply


# -- the neighbour --------------------------------------------------------------------------
class Neighbour:
    """A well-behaved client on the same worker that must receive every message, in order."""

    def __init__(self, nc: NatsClient, subject: str) -> None:
        self.nc = nc
        self.subject = subject
        self.published = 0
        self.seen: list[int] = []
        self.other: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self, port: int, token: str) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(PROXY, 0)))
        self.ws = await self.session.ws_connect(
            f"ws://127.0.0.1:{port}/ws",
            protocols=("bearer", token),
            headers={"X-Forwarded-For": fresh_ip(), "Origin": ORIGIN},
            autoping=True,
        )
        self.task = asyncio.get_running_loop().create_task(self._read())
        await self.ws.send_str(json.dumps({"op": "sub", "id": 1, "subject": self.subject}))
        await async_wait_for(
            lambda: any(f.get("op") == "ack" for f in self.other), 20, "the neighbour's ack"
        )

        async def probed() -> bool:  # the NATS SUB is asynchronous: probe until one arrives
            await self.nc.publish(self.subject, b'{"probe":true}')
            return bool(self.seen)

        await async_wait_for(probed, 20, "the neighbour's first message", interval=0.05)
        self.seen.clear()

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            for frame in data if isinstance(data, list) else [data]:
                if frame.get("op") == "msg":
                    body = frame.get("data", {})
                    self.seen.append(body.get("seq", -1))
                    self.arrived.set()
                else:
                    self.other.append(frame)

    async def check(self, count: int = 5, timeout: float = 20.0) -> None:
        """Publish ``count`` more messages; every message since the start must have arrived."""
        self.seen = [s for s in self.seen if s >= 0]
        for _ in range(count):
            self.published += 1
            await self.nc.publish(self.subject, json.dumps({"seq": self.published}).encode())
        async with asyncio.timeout(timeout):
            while len(self.seen) < self.published:
                self.arrived.clear()
                await self.arrived.wait()
                self.seen = [s for s in self.seen if s >= 0]
        assert self.seen == list(range(1, self.published + 1))
        assert not [f for f in self.other if f.get("op") in ("dropped", "status", "error")]
        assert self.ws is not None and not self.ws.closed

    async def stop(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, 5)
        if self.session is not None:
            await self.session.close()
