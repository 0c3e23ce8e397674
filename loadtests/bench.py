#!/usr/bin/env python3
"""Load bench: one scenario against the gateway or nats-server's own WebSocket, one report.

Starts a nats-server, the server under test (``fanout serve --workers N`` with a
dev key pair, or nats-server's native WebSocket listener with ``--server
natsws``), M client processes (picows on uvloop) holding the connections, and a
publisher speaking raw NATS. The publisher puts ``{"t": <CLOCK_MONOTONIC ns>,
"n": <seq>, "p": <padding>}`` into every payload, so each client measures
latency and counts what it got. The figure that survives a noisy shared machine
is the server's CPU time per delivery (user + sys of the server's process tree,
read from ``/proc`` before and after the measured phase), so compare servers in
the same run::

    python loadtests/bench.py --connections 1000 --rate 20 --duration 20
    python loadtests/bench.py --connections 1000 --rate 20 --duration 20 --server natsws

``--url`` targets a gateway that is already running instead (nothing is
started but the clients): with ``--nats`` the bench publishes its stream through
that NATS (the gateway's); without it the clients measure the demo tick stream
of ``fanout serve --demo`` (``xy.md.tick.<symbol>``, millisecond timestamps).
``--token``/``--key`` authenticate (neither: anonymous, as ``--demo`` allows);
``--server-pid`` (the supervisor) adds the server's CPU and RSS figures::

    fanout serve --demo --port 8080 &
    python loadtests/bench.py --url ws://127.0.0.1:8080/ws --connections 200 --duration 10

Everything is on loopback unless ``--url`` says otherwise; every wait is
bounded; every process it starts is stopped on exit, Ctrl-C included. A
progress line per second on stderr while it runs; one JSON line on stdout, then
a human table.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import nats
import picows
import uvloop

from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats, free_port, wait_for_port

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HOST = "127.0.0.1"
SUBJECT = "xy.md.bench.{}"
HISTORY_PATTERN = "xy.md.bench.>"
TICK_SUBJECT = "xy.md.tick.{}"
#: per-client-process shared counters: connected (all settled), warmed, received, failed, open
SLOTS = 5
CONNECTED, WARMED, RECEIVED, FAILED, OPEN = range(SLOTS)
STARTED = time.monotonic()
MAX_LATENCY_SAMPLES = 4_000_000
#: a lock-free ``multiprocessing.Array("q")``: ctypes arrays have no precise static type
Counters = Any


# --- /proc accounting --------------------------------------------------------------------------
def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """``(ppid, utime, stime)`` in clock ticks, or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]), int(fields[12])


def proc_rss(pid: int) -> int:
    """Resident bytes of ``pid`` (0 when gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class CpuSnapshot:
    ticks: dict[int, tuple[int, int]]

    @classmethod
    def take(cls, pids: Iterable[int]) -> CpuSnapshot:
        ticks = {}
        for pid in pids:
            st = proc_stat(pid)
            if st is not None:
                ticks[pid] = (st[1], st[2])
        return cls(ticks)

    def since(self, before: CpuSnapshot) -> tuple[float, float, int]:
        """User and system seconds spent between the snapshots, and processes that vanished."""
        user = sys_ = 0
        for pid, (u, s) in self.ticks.items():
            u0, s0 = before.ticks.get(pid, (0, 0))
            user += u - u0
            sys_ += s - s0
        lost = len(set(before.ticks) - set(self.ticks))
        return user / CLK_TCK, sys_ / CLK_TCK, lost


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# --- publisher (raw NATS protocol, its own process) -------------------------------------------
def nats_handshake(host: str, port: int, name: str) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=5.0)
    buf = b""
    deadline = time.monotonic() + 5.0
    while b"\r\n" not in buf and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("nats-server closed during INFO")
        buf += chunk
    connect = json.dumps({"verbose": False, "pedantic": False, "name": name}).encode()
    sock.sendall(b"CONNECT " + connect + b"\r\nPING\r\n")
    buf = b""
    while b"PONG\r\n" not in buf and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk or b"-ERR" in chunk:
            raise ConnectionError(f"nats-server refused: {chunk!r}")
        buf += chunk
    sock.setblocking(False)
    return sock


def answer_pings(sock: socket.socket) -> None:
    """Read what the server sent (only PING matters to a publisher) without blocking."""
    for _ in range(100):
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        if not data:
            raise ConnectionError("nats-server closed the publisher")
        if b"PING\r\n" in data:
            send_all(sock, b"PONG\r\n")


def send_all(sock: socket.socket, data: bytes, timeout_s: float = 10.0) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("publisher send stalled") from None
            time.sleep(0.0005)


def make_payload(n: int, size: int) -> bytes:
    head = b'{"t":%d,"n":%d,"p":"' % (time.monotonic_ns(), n)
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


def publisher_main(
    host: str,
    port: int,
    subjects: int,
    rate: float,
    burst: int,
    size: int,
    duration: float,
    ctl: Connection,
) -> None:
    """Warm up (seq 0) until told ``go``, then publish the measured phase and report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = nats_handshake(host, port, "bench-publisher")
    names = [SUBJECT.format(s).encode() for s in range(subjects)]
    warm_deadline = time.monotonic() + 600
    while time.monotonic() < warm_deadline:
        if ctl.poll(0.1):
            if ctl.recv() != "go":
                return
            break
        answer_pings(sock)
        send_all(sock, b"".join(pub(name, make_payload(0, size)) for name in names))
    interval = burst * subjects / rate
    ticks = max(1, math.ceil(duration / interval))
    seq = 0
    late = 0
    start = time.monotonic()
    for tick in range(ticks):
        target = start + tick * interval
        now = time.monotonic()
        if now < target:
            time.sleep(target - now)
        elif now - target > interval:
            late += 1
        parts: list[bytes] = []
        for b in range(burst):
            payload_seq = seq + b + 1
            parts.extend(pub(name, make_payload(payload_seq, size)) for name in names)
        seq += burst
        send_all(sock, b"".join(parts))
        if tick % 64 == 0:
            answer_pings(sock)
    end = time.monotonic()
    send_all(sock, b"PING\r\n")
    ctl.send({"per_subject": seq, "start": start, "end": end, "late_ticks": late, "ticks": ticks})
    ctl.recv()
    sock.close()


def pub(subject: bytes, payload: bytes) -> bytes:
    return b"PUB %s %d\r\n%s\r\n" % (subject, len(payload), payload)


# --- clients (picows on uvloop, their own processes) -----------------------------------------
class Data(msgspec.Struct):
    """The bench publisher's ``t``/``n``, or a demo tick's ``ts`` (unix ms) and ``seq``."""

    t: int = 0
    n: int = -1
    ts: int = 0
    seq: int = -1


class Frame(msgspec.Struct):
    op: str
    id: int | None = None
    subject: str = ""
    data: Data | None = None
    count: int = 0
    code: str = ""


FRAMES = msgspec.json.Decoder(Frame | list[Frame])
DATA = msgspec.json.Decoder(Data)


class Stats:
    """What one client process saw; latencies in µs."""

    def __init__(self, record_latency: bool) -> None:
        self.received = 0
        self.warmed = 0
        self.dropped = 0
        self.gaps = 0
        self.failed = 0
        self.closes: Counter[str] = Counter()
        self.lat = array.array("q")
        self.record = record_latency

    def on_data(self, listener: BenchListener, data: Data) -> None:
        if data.ts:
            self.on_tick(listener, data)
            return
        n = data.n
        if n <= 0:
            if not listener.warm:
                listener.warm = True
                self.warmed += 1
            return
        self.received += 1
        if n != listener.last_n + 1 and listener.last_n >= 0:
            self.gaps += max(0, n - listener.last_n - 1)
        listener.last_n = n
        if self.record:
            self.lat.append((time.monotonic_ns() - data.t) // 1000)
            if len(self.lat) >= MAX_LATENCY_SAMPLES:
                self.record = False

    def on_tick(self, listener: BenchListener, data: Data) -> None:
        """A demo tick: the first one warms the connection, every later one counts."""
        if not listener.warm:
            listener.warm = True
            self.warmed += 1
            listener.last_n = data.seq
            return
        self.received += 1
        if data.seq > listener.last_n + 1:
            self.gaps += data.seq - listener.last_n - 1
        listener.last_n = data.seq
        if self.record:
            self.lat.append(max(0, time.time_ns() // 1000 - data.ts * 1000))
            if len(self.lat) >= MAX_LATENCY_SAMPLES:
                self.record = False


class BenchListener(picows.WSListener):
    """One connection; subclasses speak the fanout protocol or NATS over WebSocket."""

    def __init__(self, stats: Stats, ready: asyncio.Future[None]) -> None:
        super().__init__()
        self.stats = stats
        self.ready = ready
        self.warm = False
        self.last_n = -1
        self.transport: picows.WSTransport | None = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("disconnected before ready"))

    def on_close(self, frame: picows.WSFrame) -> None:
        self.stats.closes[str(int(frame.get_close_code().value))] += 1
        if self.transport is not None:
            self.transport.disconnect()


class FanoutListener(BenchListener):
    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        kind = frame.msg_type
        if kind == picows.WSMsgType.TEXT:
            decoded = FRAMES.decode(frame.get_payload_as_bytes())
            for f in decoded if isinstance(decoded, list) else (decoded,):
                self.on_frame(f)
        elif kind == picows.WSMsgType.CLOSE:
            self.on_close(frame)

    def on_frame(self, f: Frame) -> None:
        if f.data is not None:
            self.stats.on_data(self, f.data)
        elif f.op == "dropped":
            self.stats.dropped += f.count
        elif f.op in ("ack", "pong") and not self.ready.done():
            self.ready.set_result(None)
        elif f.op == "error" and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"refused: {f.code}"))


class NatsWsListener(BenchListener):
    """NATS client protocol over WebSocket frames (lines may span frames)."""

    def __init__(self, stats: Stats, ready: asyncio.Future[None]) -> None:
        super().__init__(stats, ready)
        self.buf = b""

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        kind = frame.msg_type
        if kind in (picows.WSMsgType.BINARY, picows.WSMsgType.TEXT):
            self.on_bytes(transport, frame.get_payload_as_bytes())
        elif kind == picows.WSMsgType.CLOSE:
            self.on_close(frame)

    def on_bytes(self, transport: picows.WSTransport, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos = 0
        stats = self.stats
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf.startswith(b"MSG ", pos):
                size = int(buf[buf.rfind(b" ", pos, eol) + 1 : eol])
                end = eol + 2 + size
                if len(buf) < end + 2:
                    break
                stats.on_data(self, DATA.decode(buf[eol + 2 : end]))
                pos = end + 2
                continue
            line = buf[pos:eol]
            pos = eol + 2
            if line == b"PING":
                transport.send(picows.WSMsgType.BINARY, b"PONG\r\n")
            elif line == b"PONG" and not self.ready.done():
                self.ready.set_result(None)
            elif line.startswith(b"-ERR") and not self.ready.done():
                self.ready.set_exception(ConnectionError(line.decode(errors="replace")))
        self.buf = buf[pos:]


@dataclass
class ClientJob:
    index: int
    kind: str
    url: str
    token: str | None
    first: int
    count: int
    subjects: int
    read_buffer: int = 16 * 1024
    record_latency: bool = True
    concurrency: int = 64
    lifetime_s: float = 3600.0
    subscribe: bool = True
    #: Demo symbols to subscribe to (``xy.md.tick.<symbol>``) instead of the bench subjects.
    tick_symbols: list[str] = field(default_factory=list)


async def open_connection(
    job: ClientJob, conn_no: int, stats: Stats, keep: list[picows.WSTransport]
) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    natsws = job.kind == "natsws"
    listener_cls: type[BenchListener] = NatsWsListener if natsws else FanoutListener
    headers = {"Authorization": f"Bearer {job.token}"} if job.token else None
    transport, _ = await picows.ws_connect(
        lambda: listener_cls(stats, ready),
        job.url,
        extra_headers=headers,
        read_buffer_init_size=job.read_buffer,
        websocket_handshake_timeout=20,
    )
    keep.append(transport)
    if job.tick_symbols:
        subject = TICK_SUBJECT.format(job.tick_symbols[conn_no % len(job.tick_symbols)]).encode()
    else:
        subject = SUBJECT.format(conn_no % job.subjects).encode()
    if natsws:
        connect = b'CONNECT {"verbose":false,"pedantic":false,"protocol":1,"headers":false}\r\n'
        sub = b"SUB %s 1\r\n" % subject if job.subscribe else b""
        transport.send(picows.WSMsgType.BINARY, connect + sub + b"PING\r\n")
    elif job.subscribe:
        op = b'{"op":"sub","id":1,"subject":"%s"}' % subject
        transport.send(picows.WSMsgType.TEXT, op)
    else:
        transport.send(picows.WSMsgType.TEXT, b'{"op":"ping","id":1}')
    await asyncio.wait_for(ready, 20)


async def client_async(job: ClientJob, counters: Counters, ctl: Connection) -> None:
    stats = Stats(job.record_latency)
    keep: list[picows.WSTransport] = []
    base = job.index * SLOTS
    sem = asyncio.Semaphore(job.concurrency)

    async def one(conn_no: int) -> None:
        async with sem:
            try:
                await open_connection(job, conn_no, stats, keep)
            except (OSError, TimeoutError, picows.WSError, ConnectionError):
                stats.failed += 1

    connecting = asyncio.gather(*(one(job.first + i) for i in range(job.count)))
    deadline = time.monotonic() + job.lifetime_s
    command: str | None = None
    while time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        counters[base + CONNECTED] = len(keep) if connecting.done() else 0
        counters[base + OPEN] = len(keep)
        counters[base + WARMED] = stats.warmed
        counters[base + RECEIVED] = stats.received
        counters[base + FAILED] = stats.failed
        if ctl.poll():
            command = ctl.recv()
            break
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await connecting
    if command == "report":
        ctl.send(
            {
                "received": stats.received,
                "dropped": stats.dropped,
                "gaps": stats.gaps,
                "failed": stats.failed,
                "closes": dict(stats.closes),
                "lat": stats.lat.tobytes(),
            }
        )
    for transport in keep:
        transport.disconnect(graceful=False)


def client_main(job: ClientJob, counters: Counters, ctl: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise_nofile()
    uvloop.run(client_async(job, counters, ctl))


# --- orchestration ------------------------------------------------------------------------------
@dataclass
class Procs:
    """Everything started, so ``stop`` can end it all (Ctrl-C included)."""

    nats: EmbeddedNats | None = None
    gateway: subprocess.Popen[bytes] | None = None
    #: The started gateway's admin listener (/metrics), for its counters.
    admin: str | None = None
    children: list[mp.process.BaseProcess] = field(default_factory=list)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    stalled: list[socket.socket] = field(default_factory=list)

    def stop(self) -> None:
        for sock in self.stalled:
            sock.close()
        self.stalled.clear()
        for child in self.children:
            if child.is_alive():
                child.terminate()
        for child in self.children:
            child.join(2)
            if child.is_alive():
                child.kill()
                child.join(2)
        gw, self.gateway = self.gateway, None
        if gw is not None and gw.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(gw.pid, signal.SIGTERM)
            try:
                gw.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(gw.pid, signal.SIGKILL)
                gw.wait(5)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        if self.tmp is not None:
            self.tmp.cleanup()
            self.tmp = None


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    prefixes = ("FANOUT_", "NATS_", "JWT_", "WS_", "PROMETHEUS_MULTIPROC_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def start_gateway(
    procs: Procs,
    nats_url: str,
    workers: int,
    max_conns: int,
    extra_env: Sequence[str],
    log_path: Path,
    src: str | None = None,
) -> tuple[int, str]:
    """``fanout serve`` with a fresh dev key pair; returns (port, token)."""
    assert procs.tmp is not None
    keys = Path(procs.tmp.name)
    private, public = generate_keypair("ec")
    (keys / "public.pem").write_bytes(public)
    token = make_token(private_key_pem=private, sub="bench", subjects=["xy.md.>"], ttl_s=86_000)
    port, admin_port = free_port(), free_port()
    procs.admin = f"http://{HOST}:{admin_port}"
    env = clean_env(
        {
            "NATS_URLS": nats_url,
            "FANOUT_ADMIN_PORT": str(admin_port),
            "JWT_PUBLIC_KEY": str(keys / "public.pem"),
            "FANOUT_SERVER_HOST": HOST,
            "FANOUT_SERVER_PORT": str(port),
            "FANOUT_SERVER_MAX_CONNECTIONS": str(max_conns),
            "FANOUT_LOG_LEVEL": "warning",
        }
    )
    for item in extra_env:
        name, _, value = item.partition("=")
        env[name] = value
    if src is not None:
        env["PYTHONPATH"] = str(Path(src).resolve())
    # cwd is the scratch dir: ``python -m`` puts the cwd first on sys.path, which would
    # shadow --gateway-src with whatever tree the bench was started from.
    procs.gateway = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", "--workers", str(workers)],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=keys,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if procs.gateway.poll() is not None:
            raise RuntimeError(f"gateway exited {procs.gateway.returncode}; log: {log_path}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=1) as resp,
        ):
            if resp.status == 200:
                return port, token
        time.sleep(0.1)
    raise RuntimeError(f"gateway not ready in 30 s; log: {log_path}")


def gateway_counters(admin: str) -> dict[str, float]:
    """Totals from the gateway's /metrics on its admin listener (published once per second)."""
    names = (
        "xy_ws_slow_consumers_total",
        "xy_ws_messages_dropped_total",
        "xy_ws_messages_forwarded_total",
    )
    out = dict.fromkeys(names, 0.0)
    with urllib.request.urlopen(f"{admin.rstrip('/')}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def stalled_client(url: str, token: str | None, subject: str, natsws: bool) -> socket.socket:
    """A subscriber that never reads (4 KiB receive buffer): the slow consumer under test."""
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.partition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, int(port)))
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(
        (
            f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
        ).encode()
    )
    head = b""
    for _ in range(100):
        if b"\r\n\r\n" in head:
            break
        head += sock.recv(4096)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"stalled client refused: {head[:40]!r}")
    if natsws:
        sock.sendall(
            masked_frame(0x2, b'CONNECT {"verbose":false}\r\nSUB %s 1\r\n' % subject.encode())
        )
    else:
        sock.sendall(masked_frame(0x1, b'{"op":"sub","id":1,"subject":"%s"}' % subject.encode()))
    return sock


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame (< 126 bytes of payload) with an all-zero mask: the payload as is."""
    if len(payload) >= 126:
        raise ValueError("short frames only")
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def say(text: str) -> None:
    """A progress line on stderr, stamped with the seconds since the tool started."""
    print(f"[{time.monotonic() - STARTED:7.1f} s] {text}", file=sys.stderr, flush=True)


def wait_until(
    pred: Callable[[], bool],
    timeout_s: float,
    step: float = 0.05,
    progress: Callable[[], str] | None = None,
) -> bool:
    """Poll ``pred`` until true or ``timeout_s``; ``progress()`` is said once a second."""
    deadline = time.monotonic() + timeout_s
    next_say = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        if pred():
            return True
        if progress is not None and time.monotonic() >= next_say:
            say(progress())
            next_say += 1.0
        time.sleep(step)
    return pred()


def percentile(sorted_values: Sequence[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def gateway_tree(root: int) -> list[int]:
    """A running gateway's supervisor ``root`` and its workers (not ``--demo``'s side processes)."""

    def is_worker(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"fanout worker")
        except OSError:
            return False

    return [root, *(p for p in process_tree(root) if p != root and is_worker(p))]


def server_pids(procs: Procs, root: int | None = None) -> list[int]:
    """The server's processes: ours, or the gateway at ``root`` (``--server-pid``); [] unknown."""
    if procs.gateway is not None:
        return process_tree(procs.gateway.pid)
    if root is not None:
        return gateway_tree(root)
    if procs.nats is not None and procs.nats.proc is not None:
        return [procs.nats.proc.pid]
    return []


def target(args: argparse.Namespace) -> tuple[str, str | None]:
    """``--url`` as a WebSocket URL and the token to present (None: anonymous)."""
    scheme, sep, rest = args.url.partition("://")
    scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    if not sep or scheme not in ("ws", "wss") or not rest:
        raise RuntimeError(f"--url needs ws://host:port/path, got {args.url!r}")
    host_port, slash, path = rest.partition("/")
    url = f"{scheme}://{host_port}/{path if slash and path else 'ws'}"
    if args.token:
        return url, str(args.token)
    if args.key:
        key = Path(args.key).read_bytes()
        return url, make_token(private_key_pem=key, sub="bench", subjects=["xy.md.>"], ttl_s=3600)
    return url, None


def nats_address(url: str) -> tuple[str, int]:
    host_port = url.partition("://")[2] if "://" in url else url
    host, _, port = host_port.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"--nats needs nats://host:port, got {url!r}")
    return host, int(port)


async def _bench_stream(url: str) -> None:
    from fanout.demo import create_stream

    nc = await nats.connect(url)
    await create_stream(nc, "BENCH", HISTORY_PATTERN, "fanout.live")
    await nc.close()


def start_servers(
    procs: Procs,
    server: str,
    workers: int,
    max_conns: int,
    gateway_env: Sequence[str],
    log_dir: str | None,
    src: str | None = None,
    history: bool = False,
) -> tuple[str, str | None]:
    """nats-server, plus the gateway unless ``server`` is natsws; returns (ws url, token).

    ``history``: JetStream on, a stream BENCH on the bench subjects republishing to
    ``fanout.live.…``, and the gateway told so: the recoverable live path (v1.2).
    """
    procs.tmp = tempfile.TemporaryDirectory(prefix="fanout-bench-")
    natsws = server == "natsws"
    ws_port = free_port()
    conf = f"websocket {{ host: {HOST}, port: {ws_port}, no_tls: true }}\n" if natsws else None
    procs.nats = EmbeddedNats(config_text=conf, jetstream=history)
    procs.nats.start()
    if history:
        asyncio.run(_bench_stream(procs.nats.url))
        gateway_env = [*gateway_env, f"FANOUT_HISTORY_STREAMS={HISTORY_PATTERN}=BENCH"]
    if natsws:
        if not wait_for_port(HOST, ws_port, 10):
            raise RuntimeError("nats-server websocket listener did not start")
        return f"ws://{HOST}:{ws_port}/", None
    log_path = Path(log_dir or procs.tmp.name) / "gateway.log"
    port, token = start_gateway(
        procs, procs.nats.url, workers, max_conns, gateway_env, log_path, src
    )
    return f"ws://{HOST}:{port}/ws", token


def spawn_client(procs: Procs, job: ClientJob, counters: Counters) -> tuple[Connection, int]:
    """One client process (forked: the bench's modules are already imported)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=client_main, args=(job, counters, child), daemon=True)
    proc.start()
    procs.children.append(proc)
    assert proc.pid is not None
    return parent, proc.pid


def run(args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    nofile = raise_nofile()
    natsws = args.server == "natsws" and not args.url
    ticks = bool(args.url) and not args.nats
    nats_pid: int | None = None
    if args.url:
        url, token = target(args)
        nats_host, nats_port = nats_address(args.nats) if args.nats else (HOST, 0)
        say(
            f"target {url}, {'demo ticks' if ticks else 'publishing via ' + args.nats}, "
            f"{'token' if token else 'anonymous'}"
        )
    else:
        url, token = start_servers(
            procs,
            args.server,
            args.workers,
            args.connections + 1000,
            args.gateway_env,
            args.log_dir,
            args.gateway_src,
            args.history,
        )
        assert procs.nats is not None and procs.nats.proc is not None
        nats_host, nats_port, nats_pid = HOST, procs.nats.port, procs.nats.proc.pid
        say(f"started {args.server} at {url}")
    time.sleep(0.3)
    rss_idle = sum(proc_rss(p) for p in workers_of(procs, args.server_pid))

    m = max(1, min(args.clients, args.connections))
    counters: Counters = mp.Array("q", m * SLOTS, lock=False)
    pipes: list[Connection] = []
    client_pids: list[int] = []
    per = [args.connections // m + (1 if i < args.connections % m else 0) for i in range(m)]
    symbols = [x.strip() for x in args.symbols.split(",") if x.strip()] if ticks else []
    first = 0
    for i, count in enumerate(per):
        job = ClientJob(
            i,
            "natsws" if natsws else "fanout",
            url,
            token,
            first,
            count,
            args.subjects,
            record_latency=not args.no_latency,
            tick_symbols=symbols,
        )
        pipe, pid = spawn_client(procs, job, counters)
        pipes.append(pipe)
        client_pids.append(pid)
        first += count

    def total(slot: int) -> int:
        return sum(counters[i * SLOTS + slot] for i in range(m))

    connect_timeout = 30 + args.connections / 200
    done = wait_until(
        lambda: all(
            counters[i * SLOTS + CONNECTED] + counters[i * SLOTS + FAILED] >= per[i]
            for i in range(m)
        ),
        connect_timeout,
        progress=lambda: (
            f"connecting: {total(OPEN)}/{args.connections} open, {total(FAILED)} failed"
        ),
    )
    if not done or total(FAILED):
        raise RuntimeError(
            f"connected {total(CONNECTED)}/{args.connections}, "
            f"failed {total(FAILED)} (RLIMIT_NOFILE {nofile})"
        )
    say(f"connected {args.connections}")
    rss_connected = sum(proc_rss(p) for p in workers_of(procs, args.server_pid))
    for i in range(args.stalled):
        procs.stalled.append(stalled_client(url, token, SUBJECT.format(i % args.subjects), natsws))

    ctx = mp.get_context("fork")
    pub_parent, pub_child = ctx.Pipe()
    if not ticks:
        publisher = ctx.Process(
            target=publisher_main,
            args=(
                nats_host,
                nats_port,
                args.subjects,
                args.rate,
                args.burst,
                args.payload,
                args.duration,
                pub_child,
            ),
            daemon=True,
        )
        publisher.start()
        procs.children.append(publisher)
    if not wait_until(
        lambda: total(WARMED) >= args.connections,
        30,
        progress=lambda: f"warming up: {total(WARMED)}/{args.connections} got a first message",
    ):
        raise RuntimeError(f"only {total(WARMED)}/{args.connections} connections got a message")
    time.sleep(0.5)

    spids = server_pids(procs, args.server_pid)
    say(f"measuring {args.duration} s; server pids {' '.join(map(str, spids)) or 'unknown'}")
    cpu0 = CpuSnapshot.take(spids)
    client0 = CpuSnapshot.take(client_pids)
    nats0 = CpuSnapshot.take([nats_pid] if nats_pid else [])
    before: dict[str, float] = {}
    if args.url:
        with contextlib.suppress(OSError, ValueError):
            before = gateway_counters(args.admin)
    wall0 = time.monotonic()
    received0 = total(RECEIVED)

    def measuring() -> str:
        return (
            f"measuring: {time.monotonic() - wall0:.0f}/{args.duration:.0f} s, "
            f"{total(RECEIVED) - received0} delivered"
        )

    expected: int | None = None
    if ticks:
        end = wall0 + args.duration
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            say(measuring())
        published = {"per_subject": 0, "late_ticks": 0}
        pub_s = time.monotonic() - wall0
    else:
        pub_parent.send("go")
        deadline = wall0 + args.duration + 60
        while not pub_parent.poll(1.0):
            if time.monotonic() > deadline:
                raise RuntimeError("publisher did not finish")
            say(measuring())
        published = pub_parent.recv()
        pub_s = published["end"] - published["start"]
        subscribers = Counter(i % args.subjects for i in range(args.connections))
        expected = published["per_subject"] * sum(subscribers.values())
        drain_limit = max(5.0, args.duration)
        last, last_change = -1, time.monotonic()
        drain_deadline = time.monotonic() + drain_limit
        while time.monotonic() < drain_deadline:
            got = total(RECEIVED)
            if got >= expected:
                break
            if got != last:
                last, last_change = got, time.monotonic()
            elif time.monotonic() - last_change > 2.0:
                break
            time.sleep(0.02)
    wall1 = time.monotonic()
    measured_received = total(RECEIVED) - received0
    cpu1 = CpuSnapshot.take(spids)
    client1 = CpuSnapshot.take(client_pids)
    nats1 = CpuSnapshot.take([nats_pid] if nats_pid else [])
    rss_end = sum(proc_rss(p) for p in workers_of(procs, args.server_pid))
    counters_end: dict[str, float] = {}
    if not natsws:
        time.sleep(1.2)
        with contextlib.suppress(OSError, ValueError):
            after = gateway_counters(args.admin if args.url else procs.admin or "")
            counters_end = {k: v - before.get(k, 0.0) for k, v in after.items()}
    if not ticks:
        pub_parent.send("bye")
    say("collecting the clients' reports")

    reports = []
    for pipe in pipes:
        pipe.send("report")
    for pipe in pipes:
        if not pipe.poll(60):
            raise RuntimeError("a client process did not report")
        reports.append(pipe.recv())
    received = measured_received if ticks else sum(r["received"] for r in reports)
    lat = array.array("q")
    for r in reports:
        lat.frombytes(r["lat"])
    ordered = sorted(lat)
    closes: Counter[str] = Counter()
    for r in reports:
        closes.update(r["closes"])
    gaps = sum(r["gaps"] for r in reports)

    user, sys_, lost_procs = cpu1.since(cpu0)
    cu, cs, _ = client1.since(client0)
    nu, ns, _ = nats1.since(nats0)
    per_delivery = 1e6 / received if received else float("nan")
    cpu_known = bool(spids)

    def per_server_delivery(seconds: float) -> float | None:
        return round(seconds * per_delivery, 3) if cpu_known else None

    rss_known = rss_connected > 0
    return {
        "label": args.label,
        "server": args.url or args.server,
        "workers": args.workers if not (natsws or args.url) else None,
        "source": "demo ticks" if ticks else "bench publisher",
        "connections": args.connections,
        "subjects": len(symbols) if ticks else args.subjects,
        "rate": None if ticks else args.rate,
        "burst": None if ticks else args.burst,
        "payload": None if ticks else args.payload,
        "duration_s": round(pub_s, 3),
        "measured_s": round(wall1 - wall0, 3),
        "published": None if ticks else published["per_subject"] * args.subjects,
        "late_ticks": published["late_ticks"],
        "expected": expected,
        "delivered": received,
        "lost": gaps if expected is None else expected - received,
        "dropped_notices": sum(r["dropped"] for r in reports),
        "gaps": gaps,
        "closes": dict(closes),
        "deliveries_per_s": round(received / pub_s, 1) if pub_s > 0 else None,
        "latency_ms": {
            "p50": percentile(ordered, 0.50) / 1000,
            "p99": percentile(ordered, 0.99) / 1000,
            "max": (ordered[-1] / 1000) if ordered else float("nan"),
            "samples": len(ordered),
        },
        "server_cpu_s": {"user": user, "sys": sys_} if cpu_known else None,
        "server_cpu_us_per_delivery": per_server_delivery(user + sys_),
        "server_user_us_per_delivery": per_server_delivery(user),
        "server_sys_us_per_delivery": per_server_delivery(sys_),
        "server_procs_lost": lost_procs,
        "client_cpu_us_per_delivery": round((cu + cs) * per_delivery, 3),
        "nats_cpu_s": round(nu + ns, 3) if nats_pid else None,
        "rss_per_conn_kib": round(rss_connected / args.connections / 1024, 2)
        if rss_known
        else None,
        "rss_delta_per_conn_kib": round((rss_connected - rss_idle) / args.connections / 1024, 2)
        if rss_known
        else None,
        "rss_end_mib": round(rss_end / 2**20, 1) if rss_known else None,
        "rss_growth_mib": round((rss_end - rss_connected) / 2**20, 1) if rss_known else None,
        "stalled": args.stalled,
        "slow_consumers_cut": counters_end.get("xy_ws_slow_consumers_total"),
        "dropped_total": counters_end.get("xy_ws_messages_dropped_total"),
    }


def workers_of(procs: Procs, root: int | None = None) -> list[int]:
    """The processes holding client sockets: gateway workers, or nats-server itself.

    With ``--url``: the children of ``root`` (``--server-pid``), or none when it is unknown.
    """
    if procs.gateway is not None:
        return [p for p in process_tree(procs.gateway.pid) if p != procs.gateway.pid]
    if root is not None:
        return gateway_tree(root)[1:]
    if procs.nats is not None and procs.nats.proc is not None:
        return [procs.nats.proc.pid]
    return []


def na(value: object, spec: str = "") -> str:
    """``value`` formatted, or ``n/a`` when the run could not measure it."""
    return "n/a" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    lat = result["latency_ms"]
    running = str(result["server"]).startswith(("ws://", "wss://"))
    workers = "running gateway" if running else f"workers {na(result['workers'])}"
    if result["source"] == "demo ticks":
        scenario = f"{result['connections']} conns on {result['subjects']} demo tick subjects"
    else:
        scenario = (
            f"{result['connections']} conns, {result['subjects']} subjects, "
            f"{result['rate']} msg/s, burst {result['burst']}, {result['payload']} B"
        )
    cpu = (
        "n/a (give --server-pid)"
        if result["server_cpu_us_per_delivery"] is None
        else f"{result['server_cpu_us_per_delivery']:.3f} "
        f"(user {result['server_user_us_per_delivery']:.3f}, "
        f"sys {result['server_sys_us_per_delivery']:.3f})"
    )
    rows = [
        ("server", f"{result['server']} ({workers})"),
        ("scenario", f"{scenario}, {result['duration_s']} s"),
        ("deliveries/s", f"{result['deliveries_per_s']}"),
        (
            "delivered / expected",
            f"{result['delivered']} / {na(result['expected'])} "
            f"(lost {result['lost']}, dropped notices "
            f"{result['dropped_notices']}, gaps {result['gaps']})",
        ),
        ("latency ms p50/p99/max", f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f}"),
        ("server CPU-µs/delivery", cpu),
        ("client CPU-µs/delivery", f"{result['client_cpu_us_per_delivery']:.3f}"),
        (
            "RSS per connection KiB",
            f"{na(result['rss_per_conn_kib'])} "
            f"(delta over idle {na(result['rss_delta_per_conn_kib'])})",
        ),
        (
            "RSS end / growth MiB",
            f"{na(result['rss_end_mib'])} / "
            f"{na(result['rss_growth_mib'])} "
            f"({result['stalled']} stalled subscribers, "
            f"{na(result['slow_consumers_cut'])} cut)",
        ),
        ("closes", json.dumps(result["closes"])),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--server",
        choices=["fanout", "natsws"],
        default="fanout",
        help="what to start and measure (ignored with --url)",
    )
    p.add_argument(
        "--url",
        help="measure this running gateway (ws://host:port/ws) instead of "
        "starting one; see --nats, --token, --key, --server-pid",
    )
    p.add_argument(
        "--nats",
        help="with --url: publish through this NATS (nats://host:port); "
        "without it, measure the demo tick stream",
    )
    p.add_argument(
        "--token", help="with --url: the JWT to present (neither this nor --key: anonymous)"
    )
    p.add_argument("--key", help="with --url: a private key PEM to sign a token for xy.md.>")
    p.add_argument(
        "--server-pid",
        type=int,
        help="with --url: the supervisor's pid, for the server CPU and RSS figures",
    )
    p.add_argument(
        "--admin",
        default="http://127.0.0.1:9090",
        help="with --url: the gateway's admin listener, for its /metrics counters",
    )
    p.add_argument(
        "--symbols",
        default="demo,btc,eth,sol",
        help="with --url and no --nats: demo symbols to subscribe to",
    )
    p.add_argument("--connections", type=int, default=1000, help="WebSocket clients")
    p.add_argument("--subjects", type=int, default=1, help="subjects published round robin")
    p.add_argument("--rate", type=float, default=20.0, help="messages/s published (all subjects)")
    p.add_argument("--burst", type=int, default=1, help="messages per subject per tick")
    p.add_argument("--payload", type=int, default=100, help="payload bytes")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--workers", type=int, default=1, help="gateway workers started")
    p.add_argument("--clients", type=int, default=2, help="client processes")
    p.add_argument("--no-latency", action="store_true", help="do not record latencies")
    p.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway, e.g. FANOUT_OUTBOX_WRITE_DELAY_MS=1",
    )
    p.add_argument("--log-dir", help="keep the gateway log here (None: in a temporary directory)")
    p.add_argument(
        "--gateway-src",
        metavar="DIR",
        help="run the gateway from another source tree (PYTHONPATH), e.g. an export "
        "of the previous revision: before/after in the same session",
    )
    p.add_argument("--label", default="", help="a name for this run in the JSON line")
    p.add_argument(
        "--history",
        action="store_true",
        help="make the bench subjects recoverable (JetStream stream + RePublish)",
    )
    p.add_argument(
        "--stalled",
        type=int,
        default=0,
        help="extra subscribers that never read (slow consumers under test)",
    )
    args = p.parse_args(argv)
    if args.connections < 1 or args.subjects < 1 or args.rate <= 0 or args.burst < 1:
        p.error("connections, subjects, burst must be >= 1 and rate > 0")
    if not 1 <= args.duration <= 3600:
        p.error("duration must be 1..3600 s")
    if not args.url and (args.nats or args.token or args.key or args.server_pid):
        p.error("--nats, --token, --key and --server-pid go with --url")
    if args.url and args.stalled and not args.nats:
        p.error("--stalled needs published bench subjects: give --nats with --url")
    return args


def interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so ``finally`` stops every process we started."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_tool(
    name: str,
    args: argparse.Namespace,
    scenario: Callable[[argparse.Namespace, Procs], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """Run one load scenario; every process it started is stopped, whatever happens."""
    interrupt_on_sigterm()
    procs = Procs()
    try:
        result = scenario(args, procs)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop()
    print(json.dumps(result), flush=True)
    print(render(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool("bench", parse_args(argv), run, table)


if __name__ == "__main__":
    sys.exit(main())
