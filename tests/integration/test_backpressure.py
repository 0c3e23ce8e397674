"""Backpressure end to end: slow consumers are cut, loss is announced, /metrics adds up.

A "slow" client here is a raw socket with a 4 KiB receive buffer that stops
reading after its subscription is acknowledged. The gateway's kernel send
buffer still absorbs a few MB before its transport backs up, so the tests
publish large messages (32 KiB) until ``fanout_send_queue_max`` shows a held
outbox.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, metric
from tests.integration.wsclient import WsClient, client_frame, raw_handshake, wait_for_interest

BIG = 32 * 1024
WRITE_TIMEOUT_S = 2.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    private, _ = keypair
    return make_token(
        private_key_pem=private.read_bytes(), sub="bp", subjects=["xy.md.>"], ttl_s=600
    )


@pytest.fixture
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


def start(
    make_gateway: Callable[..., Gateway],
    nats_module: EmbeddedNats,
    keypair: tuple[Path, Path],
    **env: str,
) -> Gateway:
    return make_gateway(
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_OUTBOX_WRITE_BUFFER_HIGH="65536",
        **env,
    )


async def wait_metric(
    gw: Gateway, name: str, pred: Callable[[float], bool], timeout: float, **labels: str
) -> float:
    """The metric's value once ``pred`` holds, or its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(metric, gw, name, **labels)
        if pred(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)  # poll interval of wait_metric


def cut_reasons(gw: Gateway) -> list[str]:
    """Why the gateway cut slow consumers, from its log (one entry per cut)."""
    lines = [json.loads(ln) for ln in gw.logs().splitlines() if ln.startswith("{")]
    return [ln["reason"] for ln in lines if ln.get("msg") == "slow consumer disconnected"]


class SlowClient:
    """A raw WebSocket client that can stop reading (tiny receive buffer)."""

    def __init__(self, port: int, token: str) -> None:
        self.sock, head = raw_handshake(port, token=token, rcvbuf=4096)
        head, _, self.buf = head.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.close_code: int | None = None

    def subscribe(self, subject: str) -> None:
        op = json.dumps({"op": "sub", "id": 1, "subject": subject}).encode()
        self.sock.sendall(client_frame(0x1, op))
        frames = self.read(lambda fs: any(f.get("op") == "ack" for f in fs), 5)
        assert any(f == {"op": "ack", "id": 1} for f in frames), frames

    def read(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float
    ) -> list[dict[str, Any]]:
        """Parse frames (batches flattened) until ``done`` or a close frame."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not done(frames) and self.close_code is None:
            frame = self._next_frame(deadline)
            if frame is None:
                break
            opcode, payload = frame
            if opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big")
            elif opcode == 0x1:
                data = json.loads(payload)
                frames.extend(data if isinstance(data, list) else [data])
        return frames

    def read_once_cut(self, gw: Gateway, timeout: float) -> list[dict[str, Any]]:
        """Wait for the gateway's cut (its log line), then read at once up to the close frame.

        The gateway's close frame waits behind the backlog the client left unread, and the
        gateway drops the socket ``CLOSE_TIMEOUT_S`` (2 s) after sending it: a client that
        starts reading later (after a metric scrape, say) finds the socket gone, no code.
        Run in a thread, started before the cut can happen.
        """
        deadline = time.monotonic() + timeout
        while not cut_reasons(gw):
            if time.monotonic() > deadline:
                return []
            time.sleep(0.02)  # waits on: the cut's log line (at most ``timeout``)
        return self.read(lambda fs: False, max(deadline - time.monotonic(), 5.0))

    def _next_frame(self, deadline: float) -> tuple[int, bytes] | None:
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n, off = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, off = int.from_bytes(buf[2:4], "big"), 4
                elif n == 127 and len(buf) >= 10:
                    n, off = int.from_bytes(buf[2:10], "big"), 10
                if (n < 126 or off > 2) and len(buf) >= off + n:
                    self.buf = buf[off + n :]
                    return buf[0] & 0x0F, buf[off : off + n]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except (TimeoutError, ConnectionResetError):
                return None
            if not chunk:
                return None
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def msgs(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("op") == "msg"]


def seq(frame: dict[str, Any]) -> int:
    return int(frame["data"]["n"])


def payload(n: int, size: int = 0) -> bytes:
    return json.dumps({"n": n, "p": "x" * size}).encode()


async def fill_until(
    gw: Gateway, nc: NatsClient, subject: str, first: int, name: str = "fanout_send_queue_max"
) -> int:
    """Publish big messages until metric ``name`` is positive (by default: some outbox
    holds frames, so the slow client is backed up); returns the next sequence number."""
    n = first
    for rounds in range(1, 41):
        for _ in range(8):
            await nc.publish(subject, payload(n, BIG))
            n += 1
        await nc.flush()
        await asyncio.sleep(0.05)  # waits on nothing: paces the flood so the outbox fills
        if rounds % 8 == 0 and await wait_metric(gw, name, lambda v: v > 0, 1.2) > 0:
            return n
    raise AssertionError(f"{name} stayed 0: the slow client never backed up")


async def collect(
    client: WsClient, pred: Callable[[list[dict[str, Any]]], bool], timeout: float
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while not pred(frames):
            frames.append(await client.recv(timeout))
    return frames


def msg_count(client: WsClient) -> int:
    """Every ``msg`` frame this client has received so far (probes included)."""
    return len(msgs(client.frames))


async def test_stalled_client_is_cut_while_fifty_others_get_everything(
    make_gateway: Callable[..., Gateway],
    nats_module: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    nc: NatsClient,
) -> None:
    gw = start(
        make_gateway, nats_module, keypair, FANOUT_OUTBOX_WRITE_TIMEOUT_S=str(WRITE_TIMEOUT_S)
    )
    subject = "xy.md.bp.stall"
    good = [await WsClient.connect(gw.ws, token) for _ in range(50)]
    slow = SlowClient(gw.port, token)
    try:
        for client in good:
            assert (await client.subscribe(subject))["op"] == "ack"
        slow.subscribe(subject)
        await wait_for_interest(nc, good[0], subject, payload(0))
        end = await fill_until(gw, nc, subject, 1)
        drained = asyncio.create_task(asyncio.to_thread(slow.read_once_cut, gw, 40))
        for n in range(end, end + 20):
            await nc.publish(subject, payload(n))
        await nc.flush()
        last = end + 19
        await asyncio.gather(
            *(collect(c, lambda fs: any(seq(m) == last for m in msgs(fs)), 20) for c in good)
        )
        for client in good:
            numbers = [seq(m) for m in msgs(client.frames) if seq(m) > 0]
            assert numbers == list(range(1, last + 1)), "a reading client lost or reordered"
            assert not [f for f in client.frames if f.get("op") == "dropped"]
        cuts = await wait_metric(
            gw, "xy_ws_slow_consumers_total", lambda v: v >= 1, WRITE_TIMEOUT_S + 20
        )
        assert cuts == 1
        assert cut_reasons(gw) == ["write stalled"]
        seen = msgs(await drained)  # ends at the close frame
        assert slow.close_code == 4003
        numbers = [seq(m) for m in seen if seq(m) > 0]
        assert numbers == sorted(numbers) and 0 < len(numbers) < last
        # Every frame the gateway wrote was read by someone: forwarded == what clients saw.
        saw = sum(msg_count(c) for c in good) + len(seen)
        forwarded = await wait_metric(gw, "xy_ws_messages_forwarded_total", lambda v: v == saw, 10)
        assert forwarded == saw
    finally:
        slow.close()
        await asyncio.gather(*(c.close() for c in good))


async def test_latest_policy_delivers_the_newest_value_after_a_dropped_count(
    make_gateway: Callable[..., Gateway],
    nats_module: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    nc: NatsClient,
) -> None:
    gw = start(
        make_gateway,
        nats_module,
        keypair,
        FANOUT_OUTBOX_WRITE_TIMEOUT_S="30",
        FANOUT_OUTBOX_POLICIES='{"xy.md.tick.>": "latest"}',
    )
    subject = "xy.md.tick.btc"
    reader = await WsClient.connect(gw.ws, token)
    slow = SlowClient(gw.port, token)
    try:
        assert (await reader.subscribe(subject))["op"] == "ack"
        slow.subscribe(subject)
        await wait_for_interest(nc, reader, subject, payload(0))
        end = await fill_until(gw, nc, subject, 1)
        for n in range(end, end + 30):
            await nc.publish(subject, payload(n))
        await nc.flush()
        last = end + 29
        await collect(reader, lambda fs: any(seq(m) == last for m in msgs(fs)), 20)
        frames = slow.read(lambda fs: any(seq(m) == last for m in msgs(fs)), 10)
        assert slow.close_code is None
        prev, pending, notices = 0, 0, 0
        for frame in frames:
            if frame.get("op") == "dropped":
                assert frame == {
                    "op": "dropped",
                    "subject": subject,
                    "count": frame["count"],
                    "code": "XYW003",
                }
                pending += frame["count"]
                notices += frame["count"]
            elif frame.get("op") == "msg" and seq(frame) > 0:
                n = seq(frame)
                assert n - prev - 1 == pending, "a gap must be announced, exactly, before it"
                prev, pending = n, 0
        assert prev == last, "the newest value is delivered"
        assert notices > 0, "the slow client was never backed up"
        assert len([m for m in msgs(frames) if seq(m) > 0]) + notices == last
        reader_numbers = [seq(m) for m in msgs(reader.frames) if seq(m) > 0]
        assert reader_numbers == list(range(1, last + 1))
        dropped = await wait_metric(
            gw, "xy_ws_messages_dropped_total", lambda v: v == notices, 10, reason="latest"
        )
        assert dropped == notices
        assert (
            await asyncio.to_thread(
                metric, gw, "xy_ws_messages_dropped_total", reason="drop_oldest"
            )
            == 0
        )
        saw = msg_count(reader) + len(msgs(frames))
        assert (
            await wait_metric(gw, "xy_ws_messages_forwarded_total", lambda v: v == saw, 10) == saw
        )
    finally:
        slow.close()
        await reader.close()


async def test_disconnect_policy_cuts_on_a_full_outbox_before_the_stall_deadline(
    make_gateway: Callable[..., Gateway],
    nats_module: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    nc: NatsClient,
) -> None:
    gw = start(
        make_gateway,
        nats_module,
        keypair,
        FANOUT_OUTBOX_WRITE_TIMEOUT_S="30",
        FANOUT_OUTBOX_POLICIES='{"xy.md.strict.>": "disconnect"}',
    )
    subject = "xy.md.strict.orders"
    reader = await WsClient.connect(gw.ws, token)
    slow = SlowClient(gw.port, token)
    try:
        assert (await reader.subscribe(subject))["op"] == "ack"
        slow.subscribe(subject)
        await wait_for_interest(nc, reader, subject, payload(0))
        drained = asyncio.create_task(asyncio.to_thread(slow.read_once_cut, gw, 40))
        end = await fill_until(gw, nc, subject, 1, "xy_ws_slow_consumers_total")
        assert cut_reasons(gw) == ["outbox full"]  # not the 30 s stall deadline
        seen = await drained  # ends at the close frame
        assert slow.close_code == 4003
        assert not [f for f in seen if f.get("op") == "dropped"]
        await collect(reader, lambda fs: any(seq(m) == end - 1 for m in msgs(fs)), 20)
        assert [seq(m) for m in msgs(reader.frames) if seq(m) > 0] == list(range(1, end))
        assert await asyncio.to_thread(metric, gw, "xy_ws_slow_consumers_total") == 1
        assert (
            await asyncio.to_thread(metric, gw, "xy_ws_messages_dropped_total", reason="disconnect")
            == 0
        )
    finally:
        slow.close()
        await reader.close()
