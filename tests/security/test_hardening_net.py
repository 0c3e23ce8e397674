"""Hardening, round 2 (issue 14: the worker and network items).

Each case attacks a real `fanout serve` and then checks that a well-behaved
neighbour on the same worker still receives every message, in order. Most
cases need a gateway configured for them alone, so each starts its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from fanout import runtime
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get, metric, worker_pid
from tests.helpers import async_wait_for
from tests.security.hostile import (
    ORIGIN,
    Neighbour,
    Signer,
    connect_raw,
    fresh_ip,
    handshake,
    read_json,
    read_response,
    start_gateway,
    text,
    upgrade_request,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The module's shared gateway (``gw``): requests on, generous request rates, and a long write
#: stall deadline, so that only the outbox cap can cut a client that stops reading.
GATEWAY_ENV = {
    "WS_REQUEST_WHITELIST": "svc.>",
    "FANOUT_REQUESTS_RATE": "1000",
    "FANOUT_REQUESTS_BURST": "1000",
    "FANOUT_OUTBOX_WRITE_TIMEOUT_S": "120",
}


# -- 1. fd exhaustion must not stop the worker's periodic task ---------------------------------
NOFILE = 200
HEARTBEAT_S = 0.5


def low_nofile() -> None:
    """RLIMIT_NOFILE = NOFILE (soft and hard) for the gateway's whole process tree."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def fd_gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Path]]:
    """A 200-fd gateway whose state directory we can read (TMPDIR), silent sockets kept 60 s."""
    base = tmp_path_factory.mktemp("fd-exhaust")
    tmpdir = base / "run"
    tmpdir.mkdir()
    gw = start_gateway(
        base,
        nats_module.url,
        keypair[1],
        start=False,
        TMPDIR=str(tmpdir),
        FANOUT_SERVER_FD_HEADROOM="64",
        FANOUT_SERVER_HANDSHAKE_RATE_PER_IP="0",
        FANOUT_SERVER_MAX_CONNECTIONS_PER_IP="0",
        FANOUT_SERVER_HANDSHAKE_TIMEOUT_S="60",
        FANOUT_SERVER_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_S),
        FANOUT_SERVER_WORKER_TIMEOUT_S="5",
    )
    gw.start(preexec_fn=low_nofile)
    (state_dir,) = tmpdir.glob("fanout-*")
    yield gw, state_dir
    gw.stop()


def heartbeat_at(state_dir: Path, pid: int) -> float:
    state = runtime.read_state(state_dir, pid)
    return state.heartbeat_at if state is not None else 0.0


async def test_fd_exhaustion_keeps_the_worker_beating_and_serving(
    fd_gw: tuple[Gateway, Path], nc: NatsClient, signer: Signer
) -> None:
    gw, state_dir = fd_gw
    pid = worker_pid(gw)
    neighbour = Neighbour(nc, "xy.md.fd.neighbour")
    await neighbour.start(gw.port, signer.token(sub="fd-neighbour"))
    silent = []
    try:
        for _ in range(NOFILE + 50):
            silent.append(await connect_raw(gw.port))
            if len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE - 1:
                break
        # more than fit: accept() hits EMFILE, so not one descriptor is left over
        silent += [await connect_raw(gw.port) for _ in range(20)]
        await async_wait_for(
            lambda: len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE, 30, "a full fd table"
        )
        full_since = heartbeat_at(state_dir, pid)
        # three heartbeats while the table stays full: the heartbeat needs no new fd
        await async_wait_for(
            lambda: heartbeat_at(state_dir, pid) >= full_since + 3 * HEARTBEAT_S,
            30,
            "heartbeats with the fd table full",
        )
        assert len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE
    finally:
        for _, writer in silent:
            writer.transport.abort()
    released = heartbeat_at(state_dir, pid)
    await async_wait_for(
        lambda: heartbeat_at(state_dir, pid) > released, 30, "a heartbeat after release"
    )
    await async_wait_for(lambda: http_get(gw.http + "/healthz")[0] == 200, 30, "/healthz 200")
    assert worker_pid(gw) == pid
    await neighbour.check(count=20)
    await neighbour.stop()
    assert metric(gw, "fanout_worker_restarts_total") == 0
    assert "worker heartbeat stopped" not in gw.logs()


# -- 2. plain HTTP sockets: one request each, bounded, counted -------------------------------
async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True when the gateway ends the socket (EOF or reset) within 5 s, sending nothing more."""
    try:
        async with asyncio.timeout(5):
            return await reader.read(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def test_keep_alive_http_socket_is_closed_after_one_answer(
    gw: Gateway, neighbour: Neighbour
) -> None:
    reader, writer = await connect_raw(gw.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (200, "close")
        # a second request trickled on the same socket is never answered: the socket is gone
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        assert await closed_by_server(reader)
    finally:
        writer.transport.abort()
    await neighbour.check()


@pytest.fixture(scope="module")
def capped_gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """A worker capped at 4 sockets, silent ones cut after 2 s."""
    gw = start_gateway(
        tmp_path_factory.mktemp("capped"),
        nats_module.url,
        keypair[1],
        FANOUT_SERVER_MAX_CONNECTIONS="4",
        FANOUT_SERVER_MAX_CONNECTIONS_PER_IP="0",
        FANOUT_SERVER_HANDSHAKE_RATE_PER_IP="0",
    )
    yield gw
    gw.stop()


async def test_sockets_before_the_upgrade_count_toward_the_connection_cap(
    capped_gw: Gateway, nc: NatsClient, signer: Signer
) -> None:
    gw = capped_gw
    neighbour = Neighbour(nc, "xy.md.capped.neighbour")
    await neighbour.start(gw.port, signer.token(sub="capped-neighbour"))
    held = [await connect_raw(gw.port) for _ in range(3)]
    try:
        for _, writer in held:  # a partial head each: accepted before the next socket
            writer.write(b"GET /healthz HTTP/1.1\r\n")
        full = await handshake(gw.port, token=signer.token())
        full.close()
        assert (full.status, full.json()["message"]) == (503, "worker is full")
        for reader, _ in held:  # cut at the handshake timeout, not kept for an hour
            assert await closed_by_server(reader)
    finally:
        for _, writer in held:
            writer.transport.abort()
    fresh = await handshake(gw.port, token=signer.token())
    fresh.close()
    assert fresh.status == 101
    await neighbour.check(count=10)
    await neighbour.stop()


# -- 7. a pipelined request never reaches aiohttp's parser (cap and redaction hold) -----------
SECRET = "s3cr3t-api-key-0123456789"


def oversize_request(secret: str) -> bytes:
    """A 20 KB Cookie header that starts with ``secret`` (a parser's error would quote it)."""
    return (
        f"GET /healthz HTTP/1.1\r\nHost: a\r\nCookie: session={secret}; pad={'p' * 20_000}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("same_packet", [True, False], ids=["one-write", "after-the-answer"])
async def test_pipelined_oversize_request_is_never_parsed_or_logged(
    gw: Gateway, neighbour: Neighbour, same_packet: bool
) -> None:
    secret = f"{SECRET}-{same_packet}"
    first = b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    reader, writer = await connect_raw(gw.port)
    try:
        if same_packet:
            writer.write(first + oversize_request(secret))
        else:
            writer.write(first)
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (200, "close")
        if not same_packet:
            writer.write(oversize_request(secret))
        assert await closed_by_server(reader)  # the second request gets no answer at all
    finally:
        writer.transport.abort()
    # on a socket of its own, the same request is refused by the gateway's own cap
    reader, writer = await connect_raw(gw.port)
    try:
        writer.write(oversize_request(secret))
        status, _, body = await read_response(reader)
        assert (status, json.loads(body)["code"]) == (431, "XYW008")
    finally:
        writer.transport.abort()
    await neighbour.check()
    assert secret not in gw.logs()
    assert "Error handling request" not in gw.logs()


# -- 3. request replies go through the bounded outbox ---------------------------------------
REPLY_BYTES = 256 * 1024
#: 4 clients x 48 replies x 256 KiB = 48 MiB: well past what a client may have pending (its
#: outbox, 1 MiB, plus the kernel's socket buffers), and under nats-server's max_pending
#: (64 MiB) for the worker's link even if the worker read nothing during the burst.
REQUESTS_EACH = 48


def vm_rss(pid: int) -> int:
    """The worker's resident set, in bytes (/proc/<pid>/status VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def deaf_client(port: int, token: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An upgraded client with a 4 KiB receive buffer that reads nothing after its welcome."""
    reader, writer = await connect_raw(port, rcvbuf=4096, limit=4096)
    writer.write(upgrade_request(port, token=token, xff=fresh_ip(), origin=ORIGIN))
    status, _, body = await read_response(reader)
    assert status == 101, (status, body)
    assert (await read_json(reader))[0]["op"] == "welcome"
    return reader, writer


async def test_replies_to_a_client_that_stops_reading_are_bounded(
    gw: Gateway, nc: NatsClient, signer: Signer, neighbour: Neighbour
) -> None:
    big = b'"' + b"x" * REPLY_BYTES + b'"'

    async def respond(msg: object) -> None:
        await msg.respond(big)  # type: ignore[attr-defined]

    sub = await nc.subscribe("svc.big", cb=respond)
    await nc.flush()
    pid = worker_pid(gw)
    before = vm_rss(pid)
    cuts_before = metric(gw, "fanout_disconnects_total", close_code="4003")
    clients = [await deaf_client(gw.port, signer.token(requests=["svc.>"])) for _ in range(4)]
    peak = before
    try:
        for n in range(REQUESTS_EACH // 8):
            ops = [
                {"op": "request", "id": n * 8 + i, "subject": "svc.big", "data": None}
                for i in range(8)
            ]
            for _, writer in clients:
                writer.write(text(ops))
            await asyncio.sleep(0)  # waits on: a loop turn; the service here answers
            peak = max(peak, vm_rss(pid))

        def all_cut() -> bool:
            nonlocal peak
            peak = max(peak, vm_rss(pid))
            cut = metric(gw, "fanout_disconnects_total", close_code="4003")
            return cut - cuts_before >= 4

        await async_wait_for(all_cut, 30, "4 clients cut with 4003")
    finally:
        print(f"worker RSS before {before >> 20} MiB, peak {peak >> 20} MiB")  # for the docs
        for _, writer in clients:
            writer.transport.abort()
        await sub.unsubscribe()
    assert peak - before < 64 << 20
    await neighbour.check(count=20)
    _, body, _ = http_get(gw.http + "/healthz")
    assert json.loads(body)["natsConnected"] is True
    assert "NATS error" not in gw.logs()
    assert "NATS disconnected" not in gw.logs()


# -- 13. a second `fanout serve` on the same port is refused ---------------------------------
async def test_second_serve_on_the_same_port_exits_2_naming_the_first(
    gw: Gateway, neighbour: Neighbour
) -> None:
    assert gw.proc is not None
    second = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", *gw.args],
        env=gw.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _, err = await asyncio.to_thread(second.communicate, timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(second.pid, 9)
        second.wait()
        raise AssertionError("a second `fanout serve` on the same port kept running") from None
    assert second.returncode == 2
    plain = [ln for ln in err.decode().splitlines() if not ln.startswith("{")]
    assert plain == [
        f"fanout: port {gw.port} on 127.0.0.1 is already served by the fanout supervisor "
        f"pid {gw.proc.pid}"
    ]
    assert http_get(gw.http + "/readyz")[0] == 200
    await neighbour.check()
