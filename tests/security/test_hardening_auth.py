"""Hostile clients against tokens, requests, logs and metrics (issue 14 items 4, 5, 8, 10, 11).

One gateway with requests on (``svc.>``, and ``down.>`` for the circuits meant to
open), a real NATS service on ``svc.slow.*`` that answers after 50 ms and one on
``down.hang.*`` that never answers. Each case asserts the exact answer (status,
error code, metric, log growth in bytes or lines) and then that the neighbour on
the same worker lost nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.conftest import Gateway, sample, scrape
from tests.helpers import async_wait_for
from tests.security.hostile import (
    Neighbour,
    Reply,
    Signer,
    client_frame,
    close_code,
    handshake,
    read_json,
    text,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

FAILURES = 3
FLOOR_MS = 300
GATEWAY_ENV = {
    "WS_REQUEST_WHITELIST": "svc.>,down.>",
    "FANOUT_REQUESTS_DEFAULT_TIMEOUT_MS": "1000",
    "FANOUT_REQUESTS_MAX_TIMEOUT_MS": "2000",
    "FANOUT_REQUESTS_BREAKER_FAILURES": str(FAILURES),
    "FANOUT_REQUESTS_BREAKER_RESET_S": "60",
    "FANOUT_REQUESTS_BREAKER_TIMEOUT_FLOOR_MS": str(FLOOR_MS),
    "FANOUT_REQUESTS_RATE": "1000",
    "FANOUT_REQUESTS_BURST": "1000",
}
CUT = "…(cut)"
SUPPRESSED = "client error lines suppressed"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services(nc: NatsClient) -> AsyncIterator[None]:
    """``svc.slow.*``: healthy, answers in 50 ms; ``down.hang.*``: takes requests, never answers."""

    async def slow(msg: Msg) -> None:
        await asyncio.sleep(0.05)  # waits on: answering in 50 ms, past a 1 ms client timeout
        await msg.respond(b'{"ok":true}')

    async def hang(msg: Msg) -> None:
        return None

    subs = [await nc.subscribe("svc.slow.*", cb=slow), await nc.subscribe("down.hang.*", cb=hang)]
    await nc.flush()
    yield
    for sub in subs:
        await sub.unsubscribe()


async def connect(gw: Gateway, signer: Signer, **claims: Any) -> tuple[Reply, str]:
    """An authenticated raw WebSocket and its connection id (from the welcome)."""
    reply = await handshake(gw.port, token=signer.token(**claims))
    assert reply.status == 101, (reply.status, reply.body)
    (welcome,) = await read_json(reply.reader)
    assert welcome["op"] == "welcome"
    return reply, str(welcome["conn"])


async def call(ws: Reply, op_id: int, subject: str, **kw: Any) -> dict[str, Any]:
    ws.writer.write(text({"op": "request", "id": op_id, "subject": subject, **kw}))
    (frame,) = await read_json(ws.reader)
    assert frame["id"] == op_id
    return frame


def log_size(gw: Gateway) -> int:
    assert gw.log_path is not None
    return gw.log_path.stat().st_size


def log_since(gw: Gateway, offset: int) -> list[dict[str, Any]]:
    assert gw.log_path is not None
    with gw.log_path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.splitlines() if line.startswith(b"{")]


# -- item 4: the circuit breaker counts only what the service caused ----------------------------
async def test_client_chosen_short_timeouts_do_not_open_the_circuit(
    gw: Gateway, signer: Signer, neighbour: Neighbour, services: None
) -> None:
    attacker, _ = await connect(gw, signer, requests=["svc.>"])
    victim, _ = await connect(gw, signer, requests=["svc.>"])
    try:
        for op_id in range(1, 4 * FAILURES + 1):
            frame = await call(attacker, op_id, "svc.slow.get", timeout_ms=1)
            assert (frame["op"], frame["code"]) == ("error", "XYW012")
        frame = await call(victim, 1, "svc.slow.get")
        assert frame == {"op": "reply", "id": 1, "data": {"ok": True}, "hdr": frame["hdr"]}
        samples = await asyncio.to_thread(scrape, gw)
        assert sample(samples, "fanout_circuit_state", subject_pattern="svc.>") == 0.0
    finally:
        attacker.close()
        victim.close()
    await neighbour.check()


async def test_service_caused_failures_still_open_the_circuit(
    gw: Gateway, signer: Signer, neighbour: Neighbour, services: None
) -> None:
    """No responders and timeouts at the floor are the service's: they still count.

    Under ``down.>``: the circuits it opens stay open (reset 60 s), and ``svc.>``'s gauge,
    the worst of its subjects, must read closed whichever test runs first."""
    ws, _ = await connect(gw, signer, requests=["down.>"])
    try:
        codes = [(await call(ws, i, "down.nobody.get"))["code"] for i in range(1, FAILURES + 2)]
        assert codes == ["XYW013"] * FAILURES + ["XYW011"]
        codes = [
            (await call(ws, 10 + i, "down.hang.get", timeout_ms=FLOOR_MS))["code"]
            for i in range(FAILURES + 1)
        ]
        assert codes == ["XYW012"] * FAILURES + ["XYW011"]
    finally:
        ws.close()
    await neighbour.check()


# -- item 5: client text in error frames and logs is bounded -------------------------------------
async def test_unknown_one_mib_keys_are_cut_in_error_frames_and_the_log(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws, _ = await connect(gw, signer)
    before = await asyncio.to_thread(log_size, gw)
    try:
        for op_id in range(1, 21):
            key = chr(ord("a") + op_id) * ((1 << 20) - 64)  # the frame stays under 1 MiB
            ws.writer.write(text({"op": "ping", "id": op_id, key: 1}))
            (frame,) = await read_json(ws.reader)
            assert (frame["op"], frame["id"], frame["code"]) == ("error", op_id, "XYW008")
            assert frame["message"].endswith(CUT)
            assert len(frame["message"].encode()) <= 200 + len(CUT.encode())
    finally:
        ws.close()
    grown = await asyncio.to_thread(log_size, gw) - before
    assert grown < 64 * 1024, f"the log grew by {grown} bytes for 20 frames"
    await neighbour.check()


async def test_a_refused_1000_op_request_batch_logs_a_bounded_number_of_lines(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    ws, conn = await connect(gw, signer, requests=["svc.slow.*"])
    before = await asyncio.to_thread(log_size, gw)
    try:
        batch = [{"op": "request", "id": i, "subject": "svc.other.get"} for i in range(1, 1001)]
        ws.writer.write(client_frame(0x1, json.dumps(batch).encode()))
        frames = await read_json(ws.reader)
        assert len(frames) == 1000
        assert {(f["op"], f["code"]) for f in frames} == {("error", "XYW002")}

        def accounted() -> list[dict[str, Any]]:
            """The lines once each refusal is a line of its own or counted in a summary."""
            lines = log_since(gw, before)
            logged = sum(1 for line in lines if line.get("conn") == conn)
            counted = sum(line["suppressed"] for line in lines if line["msg"] == SUPPRESSED)
            return lines if logged + counted >= 1000 else []

        # a sweep writes the summary within a second; the log is read in a thread
        lines = await async_wait_for(
            lambda: asyncio.to_thread(accounted), what="every refusal logged or summarised"
        )
    finally:
        ws.close()
    refusals = [line for line in lines if line.get("conn") == conn]
    summaries = [line for line in lines if line["msg"] == SUPPRESSED]
    assert 0 < len(refusals) <= 200 + 50, len(refusals)  # the burst + about a second's refill
    # one summary per sweep: two when a sweep falls while the batch is being refused
    assert 1 <= len(summaries) <= 2, summaries
    assert sum(line["suppressed"] for line in summaries) == 1000 - len(refusals)
    await neighbour.check()


async def test_refused_handshakes_go_through_the_client_log_limiter(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    """600 bad tokens: every refusal is either one line or counted in a summary line."""
    total, parallel = 600, 10
    before = await asyncio.to_thread(log_size, gw)

    async def refused(n: int) -> None:
        for _ in range(n):
            reply = await handshake(gw.port, token="garbage.token.here")
            reply.close()
            assert reply.status == 401

    await asyncio.gather(*(refused(total // parallel) for _ in range(parallel)))

    def accounted() -> list[dict[str, Any]]:
        """The lines once a summary is written and each refusal is a line or counted in one."""
        lines = log_since(gw, before)
        logged = sum(1 for line in lines if line["msg"] == "handshake refused")
        counted = sum(line["suppressed"] for line in lines if line["msg"] == SUPPRESSED)
        return lines if counted and logged + counted >= total else []

    # a sweep writes the summary within a second; the log is read in a thread
    lines = await async_wait_for(
        lambda: asyncio.to_thread(accounted), what="every refusal logged or summarised"
    )
    refusals = [line for line in lines if line["msg"] == "handshake refused"]
    suppressed = sum(line["suppressed"] for line in lines if line["msg"] == SUPPRESSED)
    assert len(refusals) < total and len(refusals) + suppressed >= total
    await neighbour.check()


# -- item 8: close codes chosen by clients ------------------------------------------------------
async def test_client_close_codes_share_one_label_and_are_not_logged_as_errors(
    gw: Gateway, signer: Signer, neighbour: Neighbour
) -> None:
    codes = (1011, 4003, 3000, 4999)
    disconnects = "fanout_disconnects_total"
    client = sample(await asyncio.to_thread(scrape, gw), disconnects, close_code="client")
    before = await asyncio.to_thread(log_size, gw)
    conns = []
    for code in codes:
        ws, conn = await connect(gw, signer)
        conns.append(conn)
        try:
            ws.writer.write(client_frame(0x8, code.to_bytes(2, "big")))
            assert await close_code(ws.reader) == code  # echoed, as RFC 6455 asks
        finally:
            ws.close()
    samples = await asyncio.to_thread(scrape, gw)
    assert sample(samples, disconnects, close_code="client") == (client or 0) + len(codes)
    for code in (3000, 4999):
        assert sample(samples, disconnects, close_code=str(code)) is None
    logged = [
        line for line in await asyncio.to_thread(log_since, gw, before) if line.get("conn") in conns
    ]
    assert logged == []
    await neighbour.check()


# -- items 10 and 11: sub required; no requests claim, no requests -----------------------------
@pytest.mark.parametrize("sub", [None, ""], ids=["no-sub", "empty-sub"])
async def test_a_token_without_sub_is_refused(
    gw: Gateway, signer: Signer, neighbour: Neighbour, sub: str | None
) -> None:
    reply = await handshake(gw.port, token=signer.token(sub=sub))
    reply.close()
    assert (reply.status, reply.json()["code"]) == (401, "XYW005")
    ws, _ = await connect(gw, signer)
    try:
        ws.writer.write(text({"op": "auth", "id": 5, "token": signer.token(sub=sub)}))
        (frame,) = await read_json(ws.reader)
        assert (frame["op"], frame["id"], frame["code"]) == ("error", 5, "XYW005")
    finally:
        ws.close()
    await neighbour.check()


async def test_a_token_without_requests_claim_may_request_nothing(
    gw: Gateway, signer: Signer, neighbour: Neighbour, services: None
) -> None:
    ws, _ = await connect(gw, signer)  # a subscriber's token: no ``requests`` claim
    try:
        frame = await call(ws, 1, "svc.slow.get")
        assert frame == {
            "op": "error",
            "id": 1,
            "code": "XYW002",
            "message": "requests not allowed on svc.slow.get",
        }
    finally:
        ws.close()
    await neighbour.check()
