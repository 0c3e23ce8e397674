"""Small helpers around real WebSocket clients (aiohttp's) and raw sockets for tests."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from nats.aio.client import Client as NatsClient

Frame = dict[str, Any]


class WsClient:
    """A protocol-speaking test client: frames are decoded, batches flattened."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession) -> None:
        self.ws = ws
        self.session = session
        self.frames: list[Frame] = []
        self._next = 0

    @classmethod
    async def connect(
        cls, url: str, token: str | None = None, *, origin: str | None = None, **kw: Any
    ) -> WsClient:
        session = aiohttp.ClientSession()
        headers = {"Origin": origin} if origin else {}
        protocols = ("bearer", token) if token else ()
        try:
            ws = await session.ws_connect(
                url, protocols=protocols, headers=headers, autoping=False, max_msg_size=0, **kw
            )
        except BaseException:
            await session.close()
            raise
        return cls(ws, session)

    async def send(self, frame: Frame | list[Frame]) -> None:
        await self.ws.send_str(json.dumps(frame, separators=(",", ":")))

    async def recv(self, timeout: float = 5.0) -> Frame:
        """Next server frame (batches are split into their elements)."""
        while self._next >= len(self.frames):
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.frames.extend(data if isinstance(data, list) else [data])
            elif msg.type == aiohttp.WSMsgType.PING:
                await self.ws.pong(msg.data)
            elif (
                msg.type
                in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.CLOSING,
                )
                or msg.type == aiohttp.WSMsgType.ERROR
            ):
                raise ConnectionClosed(self.ws.close_code)
        frame = self.frames[self._next]
        self._next += 1
        return frame

    async def expect(self, pred: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        """First frame satisfying ``pred``, skipping others, within ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if pred(frame):
                    return frame

    async def op(self, frame: Frame, timeout: float = 5.0) -> Frame:
        """Send an op with an id and return the reply carrying that id."""
        await self.send(frame)
        return await self.expect(lambda f: f.get("id") == frame["id"], timeout)

    async def subscribe(self, subject: str, op_id: int = 1) -> Frame:
        return await self.op({"op": "sub", "id": op_id, "subject": subject})

    async def closed_code(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code it sent."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.receive()
                if msg.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    return self.ws.close_code

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def wait_for_interest(
    nc: NatsClient,
    client: WsClient,
    subject: str,
    probe: bytes = b'{"probe":true}',
    timeout: float = 20.0,
) -> int:
    """Publish ``probe`` until ``client`` receives it: the gateway's NATS SUB is asynchronous,
    so an ack does not mean NATS already routes the subject to it. Returns the probes sent
    (each may still arrive later, in order, before anything published after this returns)."""
    want = json.loads(probe)
    sent = 0
    async with asyncio.timeout(timeout):
        while True:
            await nc.publish(subject, probe)
            sent += 1
            try:
                frame = await client.expect(lambda f: f.get("op") == "msg", timeout=0.2)
            except TimeoutError:
                continue
            if frame.get("data") == want:
                return sent


class ConnectionClosed(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


def payload_of(frame: Frame) -> bytes:
    if "b64" in frame:
        return base64.b64decode(frame["b64"])
    return json.dumps(frame["data"]).encode()


# -- raw socket helpers (for bytes no well-behaved client would send) ----------
def raw_handshake(
    port: int,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    token: str | None = None,
    timeout: float = 5.0,
    rcvbuf: int | None = None,
) -> tuple[socket.socket, bytes]:
    """Open a TCP socket, send an upgrade request, return (socket, response head; the bytes
    read past it too). ``rcvbuf`` makes a client that soon takes nothing more."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def client_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A masked client → server frame."""
    mask = mask if mask is not None else os.urandom(4)
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = bytes([first, 0x80 | n])
    elif n < 1 << 16:
        header = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        header = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    masked = (
        bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        if n < 4096
        else _mask_fast(payload, mask)
    )
    return header + mask + masked


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def read_close_code(sock: socket.socket, timeout: float = 5.0) -> int | None:
    """Read server frames until a close frame; its code (None if the socket just ends)."""
    sock.settimeout(timeout)
    buf = b""
    while True:
        while len(buf) >= 2:
            n = buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n, off = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n, off = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < off + n:
                break
            opcode, payload, buf = buf[0] & 0x0F, buf[off : off + n], buf[off + n :]
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return None
        if not chunk:
            return None
        buf += chunk
