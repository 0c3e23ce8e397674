"""Locust scenario: WebSocket subscribers (and a NATS publisher), latency and loss as events.

Works against ``fanout serve --demo`` as is (anonymous, the demo's tick stream)::

    pip install -e '.[load]'
    fanout serve --demo --port 8080 &
    locust -f loadtests/locustfile.py --headless -u 200 -r 50 -t 30s --host http://127.0.0.1:8080

Each ``WsSubscriber`` opens a WebSocket to ``--host`` (``http://host:port`` means
``ws://host:port/ws``; a ``ws://`` URL is used as is), subscribes to one subject
and reports every ``msg`` as a request event named ``msg`` (response time = now −
the message's timestamp, in ms); every ``dropped`` notice and every sequence gap
is a failure event (``dropped`` / ``gap``), so loss shows in Locust's failure
table. Locust prints its progress table every few seconds and the summary at the end.

Two sources of messages:

- **demo ticks** (default): subscribers take ``xy.md.tick.<symbol>`` round robin
  over ``FANOUT_LOCUST_SYMBOLS`` (default ``demo,btc,eth,sol``, the demo's); the
  demo publisher sends every symbol each ``demo.interval_s`` (0.5 s), with ``ts``
  (unix ms) and ``seq``. Latency has millisecond resolution.
- **own publisher** (``FANOUT_LOCUST_NATS=nats://host:port``, the gateway's NATS):
  one ``NatsPublisher`` publishes ``{"t": <unix ns>, "n": <seq>, "p": ...}`` at
  ``FANOUT_LOCUST_RATE`` messages/s round robin over ``FANOUT_LOCUST_SUBJECTS``
  subjects ``xy.md.bench.<i>``, ``FANOUT_LOCUST_PAYLOAD`` bytes each. E.g. against
  a gateway that requires tokens::

    fanout keygen --out /tmp/keys --kind ec
    nats-server -a 127.0.0.1 -p 4222 &
    JWT_PUBLIC_KEY=/tmp/keys/public.pem NATS_URLS=nats://127.0.0.1:4222 \\
        fanout serve --workers 1 --host 127.0.0.1 --port 8080 &
    FANOUT_LOCUST_KEY=/tmp/keys/private.pem FANOUT_LOCUST_NATS=nats://127.0.0.1:4222 \\
        FANOUT_LOCUST_RATE=50 locust -f loadtests/locustfile.py --headless -u 201 -r 100 \\
        --run-time 30s --stop-timeout 5 --host http://127.0.0.1:8080

Token: ``FANOUT_LOCUST_TOKEN`` (a token) or ``FANOUT_LOCUST_KEY`` (a private key
PEM to sign one for ``xy.md.>``); neither: anonymous, as ``--demo`` allows.
Defaults: ``FANOUT_LOCUST_SUBJECTS`` 1, ``FANOUT_LOCUST_RATE`` 10 messages/s,
``FANOUT_LOCUST_PAYLOAD`` 100 bytes. Latency uses the wall clock, so publisher
and subscribers should share a host (or a well synced clock). These variables
share the ``FANOUT_`` prefix with the gateway's settings; ``fanout serve`` only
warns about them.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlsplit

from locust import User, between, constant_throughput, events, task

from fanout.devtoken import make_token

SUBJECTS = max(1, int(os.environ.get("FANOUT_LOCUST_SUBJECTS", "1")))
RATE = float(os.environ.get("FANOUT_LOCUST_RATE", "10"))
PAYLOAD = int(os.environ.get("FANOUT_LOCUST_PAYLOAD", "100"))
NATS_URL = os.environ.get("FANOUT_LOCUST_NATS", "")
SYMBOLS = [
    s.strip() for s in os.environ.get("FANOUT_LOCUST_SYMBOLS", "demo,btc,eth,sol").split(",")
] or ["demo"]
SUBJECT = "xy.md.bench.{}"
TICK_SUBJECT = "xy.md.tick.{}"
DEFAULT_HOST = "http://127.0.0.1:8080"
RECV_SLICE_S = 1.0
_ids = itertools.count()


def token() -> str | None:
    """The bearer token to present, or None (anonymous: ``fanout serve --demo``)."""
    given = os.environ.get("FANOUT_LOCUST_TOKEN")
    if given:
        return given
    key = os.environ.get("FANOUT_LOCUST_KEY")
    if not key:
        return None
    return make_token(
        private_key_pem=Path(key).read_bytes(), sub="locust", subjects=["xy.md.>"], ttl_s=3600
    )


def ws_url(host: str) -> str:
    """``http(s)://host:port[/path]`` (Locust's usual ``--host``) as the gateway's WebSocket URL."""
    parts = urlsplit(host)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"need an http(s):// or ws(s):// --host, got {host!r}")
    path = parts.path if parts.path not in ("", "/") else "/ws"
    return f"{scheme}://{parts.netloc}{path}"


def subject_for(n: int) -> str:
    """The subject of the ``n``-th subscriber: demo ticks unless we publish ourselves."""
    if NATS_URL:
        return SUBJECT.format(n % SUBJECTS)
    return TICK_SUBJECT.format(SYMBOLS[n % len(SYMBOLS)])


def report(kind: str, name: str, ms: float, length: int, exc: Exception | None) -> None:
    """One Locust request event (failures when ``exc`` is set)."""
    events.request.fire(  # type: ignore[no-untyped-call]
        request_type=kind,
        name=name,
        response_time=ms,
        response_length=length,
        exception=exc,
        context={},
    )


class WsConn:
    """A minimal client-side WebSocket over a blocking socket (text frames only)."""

    def __init__(self, url: str, bearer: str | None, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or parts.hostname is None:
            raise ValueError(f"need a ws:// URL, got {url!r}")
        tls = parts.scheme == "wss"
        sock = socket.create_connection(
            (parts.hostname, parts.port or (443 if tls else 80)), timeout_s
        )
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
        request = (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        for _ in range(64):
            if b"\r\n\r\n" in self.buf:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            status = head.split(b"\r\n", 1)[0].decode(errors="replace")
            hint = "" if bearer else " (no token: set FANOUT_LOCUST_TOKEN or FANOUT_LOCUST_KEY)"
            raise ConnectionError(f"{status}{hint}")

    def send_text(self, data: bytes) -> None:
        mask = os.urandom(4)
        n = len(data)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        elif n < 1 << 16:
            header = bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((0x81, 0x80 | 127)) + n.to_bytes(8, "big")
        key = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def read_frames(self, timeout_s: float) -> list[tuple[int, bytes]]:
        """Whatever complete frames arrive within ``timeout_s`` (at least one read)."""
        frames: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while not frames:
            left = deadline - time.monotonic()
            if left <= 0:
                return frames
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 18)
            except TimeoutError:
                return frames
            if not chunk:
                raise ConnectionError("server closed the socket")
            self.buf += chunk
            frames = self._parse()
        return frames

    def _parse(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        buf, pos = self.buf, 0
        while len(buf) - pos >= 2:
            n, off = buf[pos + 1] & 0x7F, pos + 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, off = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, off = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            if len(buf) < off + n:
                break
            out.append((buf[pos] & 0x0F, buf[off : off + n]))
            pos = off + n
        self.buf = buf[pos:]
        return out

    def close(self) -> None:
        self.sock.close()


class WsSubscriber(User):
    """One WebSocket client: subscribe once, then report every message it receives."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.subject = subject_for(next(_ids))
        self.last_n: int | None = None
        started = time.perf_counter()
        try:
            self.ws = WsConn(ws_url(self.host or DEFAULT_HOST), token())
            op = {"op": "sub", "id": 1, "subject": self.subject}
            self.ws.send_text(json.dumps(op).encode())
        except (OSError, ConnectionError, ValueError) as exc:
            self.fire("connect", started, 0, exc)
            raise
        self.fire("connect", started, 0, None)

    def on_stop(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()

    def fire(self, name: str, started: float, length: int, exc: Exception | None) -> None:
        report("WS", name, (time.perf_counter() - started) * 1000, length, exc)

    @task
    def receive(self) -> None:
        for opcode, payload in self.ws.read_frames(RECV_SLICE_S):
            if opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.fire("closed", time.perf_counter(), 0, ConnectionError(f"close {code}"))
                self.stop()
                return
            if opcode == 0x1:
                decoded = json.loads(payload)
                for frame in decoded if isinstance(decoded, list) else [decoded]:
                    self.on_frame(frame, len(payload))

    def on_frame(self, frame: dict[str, object], length: int) -> None:
        op = frame.get("op")
        data = frame.get("data")
        if op == "msg" and isinstance(data, dict):
            if "t" in data:  # our publisher: unix ns and a sequence number per subject
                latency_ms, n = (time.time_ns() - int(data["t"])) / 1e6, int(data["n"])
            else:  # a demo tick: unix ms and the publisher's cycle number
                latency_ms, n = time.time() * 1000 - int(data["ts"]), int(data["seq"])
            if self.last_n is not None and n > self.last_n + 1:
                gap = ConnectionError(f"{n - self.last_n - 1} messages missing")
                report("WS", "gap", 0, 0, gap)
            self.last_n = n
            report("WS", "msg", max(0.0, latency_ms), length, None)
        elif op == "dropped":
            loss = ConnectionError(f"dropped {frame.get('count')} ({frame.get('code')})")
            report("WS", "dropped", 0, 0, loss)
        elif op == "error":
            report(
                "WS", "error", 0, 0, ConnectionError(f"{frame.get('code')}: {frame.get('message')}")
            )


class NatsPublisher(User):
    """Publishes timestamped messages over a raw NATS connection (one per run, with NATS)."""

    abstract = not NATS_URL  # demo ticks: the demo publisher does this
    fixed_count = 1
    wait_time = constant_throughput(RATE)

    def on_start(self) -> None:
        parts = urlsplit(NATS_URL)
        self.sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), 5)
        self.sock.recv(65536)
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"locust"}\r\n')
        self.seq = 0
        self.subjects = [SUBJECT.format(i).encode() for i in range(SUBJECTS)]

    def on_stop(self) -> None:
        self.sock.close()

    @task
    def publish(self) -> None:
        self.seq += 1
        subject = self.subjects[self.seq % SUBJECTS]
        n = self.seq // SUBJECTS + 1
        head = b'{"t":%d,"n":%d,"p":"' % (time.time_ns(), n)
        body = head + b"x" * max(0, PAYLOAD - len(head) - 2) + b'"}'
        started = time.perf_counter()
        self.sock.sendall(b"PUB %s %d\r\n%s\r\n" % (subject, len(body), body))
        report("NATS", "publish", (time.perf_counter() - started) * 1000, len(body), None)
        self.sock.settimeout(0)
        try:
            if b"PING" in self.sock.recv(65536):
                self.sock.sendall(b"PONG\r\n")
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(5)
