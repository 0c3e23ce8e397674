"""Connection abuse: slow-loris, silent and half-open sockets, clients that never read,
connect/close loops, and the per-address / per-principal / handshake-rate limits
(with X-Forwarded-For believed only from the trusted proxy).

Each case asserts the exact outcome (close code, status + code, or a cut at the
deadline) and then that the neighbour on the same worker lost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re

import pytest
from nats.aio.client import Client as NatsClient

from tests.conftest import Gateway, http_get, metric
from tests.helpers import async_wait_for
from tests.security.hostile import (
    Neighbour,
    Signer,
    close_code,
    connect_raw,
    fresh_ip,
    handshake,
    open_ws,
    read_json,
    send_request,
    text,
    upgrade_request,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

GATEWAY_ENV = {
    "FANOUT_WS_PING_INTERVAL_S": "1",
    "FANOUT_WS_IDLE_TIMEOUT_S": "3",
    "FANOUT_OUTBOX_WRITE_TIMEOUT_S": "2",
}


async def counted(gw: Gateway, series: str) -> None:
    """Wait until /metrics has ``series`` (name and labels) at 1 or more (once per sweep)."""
    pattern = re.compile(rf"^{re.escape(series)} [1-9]", re.M)
    await async_wait_for(
        lambda: pattern.search(http_get(gw.admin + "/metrics")[1].decode()),
        20,
        f"{series} counted",
        interval=0.2,
    )


async def wait_metric(gw: Gateway, name: str, above: float, timeout: float = 20.0) -> float:
    """The value of ``name`` once it is above ``above``."""
    return await async_wait_for(
        lambda: v if (v := metric(gw, name)) > above else None,
        timeout,
        f"{name} above {above}",
        interval=0.2,
    )


async def cut(reader: asyncio.StreamReader, timeout: float = 30.0) -> None:
    """Read whatever comes until the server closes the socket (EOF or reset); TimeoutError
    when it never does."""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass


async def test_slow_loris_head_cut_at_handshake_timeout(gw: Gateway, neighbour: Neighbour) -> None:
    before = await asyncio.to_thread(metric, gw, "fanout_handshake_timeouts_total")
    reader, writer = await connect_raw(gw.port)
    request = upgrade_request(gw.port, xff=fresh_ip())

    async def trickle() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await asyncio.sleep(1.0)  # waits on: one byte a second is the slow-loris attack

    task = asyncio.get_running_loop().create_task(trickle())
    try:
        await cut(reader)
    finally:
        task.cancel()
        writer.transport.abort()
    # the cut came from the handshake deadline, not from anything else
    assert await wait_metric(gw, "fanout_handshake_timeouts_total", before) >= before + 1
    await neighbour.check()


async def test_silent_socket_cut_at_handshake_timeout(gw: Gateway, neighbour: Neighbour) -> None:
    before = await asyncio.to_thread(metric, gw, "fanout_handshake_timeouts_total")
    reader, writer = await connect_raw(gw.port)
    try:
        await cut(reader)
    finally:
        writer.transport.abort()
    assert await wait_metric(gw, "fanout_handshake_timeouts_total", before) >= before + 1
    await neighbour.check()


async def test_half_open_client_closed_1001_at_idle_timeout(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws = await open_ws(gw.port, signer)
    try:
        # sends nothing, answers no ping: as if the peer vanished
        assert await close_code(ws.reader, timeout=30) == 1001
    finally:
        ws.close()
    await neighbour.check()


async def subscribed_raw(
    ws_reader: asyncio.StreamReader,
    ws_writer: asyncio.StreamWriter,
    nc: NatsClient,
    subject: str,
) -> None:
    ws_writer.write(text({"op": "sub", "id": 1, "subject": subject}))
    assert await read_json(ws_reader) == [{"op": "ack", "id": 1}]
    async with asyncio.timeout(5):
        while True:
            await nc.publish(subject, b'{"probe":1}')
            try:
                async with asyncio.timeout(0.2):
                    frames = await read_json(ws_reader)
            except TimeoutError:
                continue
            if any(f.get("op") == "msg" for f in frames):
                return


async def pump(nc: NatsClient, subject: str, stop: asyncio.Event) -> None:
    """About 20 MB/s of 4 KB messages until ``stop``: more than any socket buffer holds."""
    chunk = json.dumps({"pad": "x" * 4000}).encode()
    while not stop.is_set():
        for _ in range(50):
            await nc.publish(subject, chunk)
        await asyncio.sleep(0.01)  # waits on: paces the flood, letting the client fall behind


async def last_close_code(reader: asyncio.StreamReader) -> int | None:
    """Read to the end; the code of the close frame the stream ends with (frame sync may be
    lost when the client read single bytes, so the close frame is found from the end)."""
    data = bytearray()
    try:
        async with asyncio.timeout(5):
            while chunk := await reader.read(1 << 20):
                data += chunk
    except ConnectionResetError:
        return None
    for n in range(2, 126):
        if len(data) >= n + 2 and data[-n - 2] == 0x88 and data[-n - 1] == n:
            return int.from_bytes(data[-n : -n + 2], "big")
    return None


@pytest.mark.parametrize("reads_per_second", [0, 1], ids=["never reads", "reads one byte a second"])
async def test_client_that_does_not_read_is_cut_4003(
    reads_per_second: int,
    gw: Gateway,
    signer: Signer,
    nc: NatsClient,
    neighbour: Neighbour,
) -> None:
    subject = f"xy.md.flood.{reads_per_second}"
    reader, writer = await connect_raw(gw.port, rcvbuf=4096)
    writer.write(upgrade_request(gw.port, token=signer.token(), xff=fresh_ip()))
    await reader.readuntil(b"\r\n\r\n")
    await read_json(reader)  # welcome
    await subscribed_raw(reader, writer, nc, subject)
    before = await asyncio.to_thread(metric, gw, "xy_ws_slow_consumers_total")

    async def sip() -> None:
        while reads_per_second:
            await reader.readexactly(1)
            await asyncio.sleep(1.0)  # waits on: one byte a second is the case under test

    loop = asyncio.get_running_loop()
    sipping = loop.create_task(sip())
    stop = asyncio.Event()
    pumping = loop.create_task(pump(nc, subject, stop))
    try:
        await neighbour.check()
        await wait_metric(gw, "xy_ws_slow_consumers_total", before, timeout=20)
        stop.set()
        await pumping
        sipping.cancel()
        await asyncio.gather(sipping, return_exceptions=True)
        assert await last_close_code(reader) == 4003
        await counted(gw, 'fanout_disconnects_total{close_code="4003"}')
    finally:
        stop.set()
        sipping.cancel()
        writer.transport.abort()
    await neighbour.check()


async def test_connect_close_loop_leaks_nothing(gw: Gateway, neighbour: Neighbour) -> None:
    _, body, _ = http_get(gw.admin + "/healthz")
    pid = json.loads(body)["workers"][0]["pid"]
    baseline = len(os.listdir(f"/proc/{pid}/fd"))
    for i in range(300):
        _, writer = await connect_raw(gw.port)
        if i % 2:
            writer.write(b"GET /ws HTTP/1.1\r\n")
        writer.transport.abort()
    await neighbour.check()
    await async_wait_for(
        lambda: len(os.listdir(f"/proc/{pid}/fd")) <= baseline + 2, 20, "the fds released"
    )
    status, body, _ = http_get(gw.admin + "/healthz")
    assert status == 200 and json.loads(body)["workers"][0]["pid"] == pid


async def test_upgrade_close_loop_meets_the_handshake_rate(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    """Every upgrade attempt spends the address's budget, even one that fails later on."""
    address = fresh_ip()
    bad = signer.token(iss="https://elsewhere.test/")
    replies = await asyncio.gather(*(handshake(gw.port, token=bad, xff=address) for _ in range(10)))
    for reply in replies:
        reply.close()
    statuses = sorted(r.status for r in replies)
    # the burst of 6, plus a token back (2/s) if the ten took longer than half a second
    assert statuses in ([401] * 6 + [503] * 4, [401] * 7 + [503] * 3), statuses
    refusals = [r for r in replies if r.status == 503]
    for last in refusals:
        assert last.json() == {"code": "XYW007", "message": "too many handshakes from this address"}
        assert int(last.headers["retry-after"]) >= 1
    await asyncio.sleep(0.6)  # waits on the refill (2 handshakes/s): one token back
    reply = await handshake(gw.port, token=signer.token(), xff=address)
    reply.close()
    assert reply.status == 101
    await counted(gw, 'fanout_limit_refusals_total{limit="handshake_rate"}')
    await neighbour.check()


async def test_per_address_cap(gw: Gateway, signer: Signer, neighbour: Neighbour) -> None:
    address = fresh_ip()
    held = [await handshake(gw.port, token=signer.token(), xff=address) for _ in range(4)]
    try:
        assert [r.status for r in held] == [101] * 4
        reply = await handshake(gw.port, token=signer.token(), xff=address)
        reply.close()
        assert reply.status == 503 and reply.json()["code"] == "XYW007"
        assert reply.json()["message"] == "too many connections from this address"
        assert reply.headers["retry-after"] == "5"
    finally:
        for r in held:
            r.close()
    await counted(gw, 'fanout_limit_refusals_total{limit="per_ip"}')
    await neighbour.check()


async def test_per_principal_cap(gw: Gateway, signer: Signer, neighbour: Neighbour) -> None:
    held = [await handshake(gw.port, token=signer.token(sub="greedy")) for _ in range(3)]
    try:
        assert [r.status for r in held] == [101] * 3
        reply = await handshake(gw.port, token=signer.token(sub="greedy"))
        reply.close()
        assert reply.status == 503
        assert reply.json() == {
            "code": "XYW007",
            "message": "too many connections for this principal",
        }
    finally:
        for r in held:
            r.close()
    await counted(gw, 'fanout_limit_refusals_total{limit="per_principal"}')
    await neighbour.check()


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    """127.0.0.1 is no proxy: rotating X-Forwarded-For does not escape its per-address cap."""
    held = []
    try:
        for _ in range(4):
            request = upgrade_request(gw.port, token=signer.token(), xff=fresh_ip())
            held.append(await send_request(gw.port, request, source="127.0.0.1"))
        assert [r.status for r in held] == [101] * 4
        request = upgrade_request(gw.port, token=signer.token(), xff=fresh_ip())
        reply = await send_request(gw.port, request, source="127.0.0.1")
        reply.close()
        assert (reply.status, reply.json()["code"]) == (503, "XYW007")
    finally:
        for r in held:
            r.close()
    await neighbour.check()


async def test_spoofed_left_hops_of_a_trusted_chain_are_ignored(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    """Only the hop the trusted proxy appended counts: the client's own prefix is ignored."""
    real = fresh_ip()
    held = []
    try:
        for _ in range(4):
            chain = f"{fresh_ip()}, {real}"
            held.append(await handshake(gw.port, token=signer.token(), xff=chain))
        assert [r.status for r in held] == [101] * 4
        reply = await handshake(gw.port, token=signer.token(), xff=f"{fresh_ip()}, {real}")
        reply.close()
        assert (reply.status, reply.json()["code"]) == (503, "XYW007")
    finally:
        for r in held:
            r.close()
    await neighbour.check()
