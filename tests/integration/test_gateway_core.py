"""Gateway core end to end: real nats-server, real `fanout serve`, real WebSocket clients."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, gateway_env, http_get, launch_gateway
from tests.helpers import wait_for
from tests.integration.wsclient import (
    WsClient,
    client_frame,
    payload_of,
    raw_handshake,
    read_close_code,
    wait_for_interest,
)

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    _, public = keypair
    gateway = launch_gateway(
        tmp_path_factory.mktemp("gw"),
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(public),
        WS_ALLOWED_ORIGINS=ORIGIN,
        FANOUT_WS_MAX_FRAME_BYTES="65536",
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    private, _ = keypair
    return make_token(
        private_key_pem=private.read_bytes(), sub="alice", subjects=["xy.md.>"], ttl_s=600
    )


@pytest.fixture
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


async def test_welcome_then_ack_then_messages(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    client = await WsClient.connect(gw.ws, token)
    try:
        welcome = await client.recv()
        assert welcome["op"] == "welcome"
        assert welcome["v"] == 1
        assert isinstance(welcome["conn"], str) and welcome["conn"]
        assert welcome["expires_at"] > time.time()
        assert welcome["limits"]["max_frame_bytes"] == 65536
        assert client.ws.protocol == "bearer"
        assert await client.subscribe("xy.md.tick.demo") == {"op": "ack", "id": 1}
        await wait_for_interest(nc, client, "xy.md.tick.demo")
        await nc.publish("xy.md.tick.demo", b'{"price": 1.5,  "seq":1}')
        await nc.publish("xy.md.tick.demo", b"\xff\x00binary")
        await nc.publish("xy.md.tick.demo", b'{"seq":3}', headers={"traceparent": "00-abc-def-01"})
        first = await client.expect(lambda f: f.get("op") == "msg")
        assert first == {
            "op": "msg",
            "subject": "xy.md.tick.demo",
            "data": {"price": 1.5, "seq": 1},
        }
        second = await client.expect(lambda f: f.get("op") == "msg")
        assert "data" not in second and payload_of(second) == b"\xff\x00binary"
        third = await client.expect(lambda f: f.get("op") == "msg")
        assert third["data"] == {"seq": 3}
        assert third["hdr"] == {"traceparent": "00-abc-def-01"}
    finally:
        await client.close()


async def test_raw_frame_is_verbatim_and_compact(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    client = await WsClient.connect(gw.ws, token)
    try:
        await client.subscribe("xy.md.raw")
        await wait_for_interest(nc, client, "xy.md.raw")
        await nc.publish("xy.md.raw", b'{"a" :  [1, 2]}')
        msg = await client.ws.receive(timeout=5)
        while '"probe"' in msg.data:
            msg = await client.ws.receive(timeout=5)
        assert msg.data == '{"op":"msg","subject":"xy.md.raw","data":{"a" :  [1, 2]}}'
    finally:
        await client.close()


async def test_acl_denials(gw: Gateway, token: str) -> None:
    client = await WsClient.connect(gw.ws, token)
    try:
        for i, subject in enumerate(
            ["other.thing", "xy.md.>", "xy.md", "xy.md.a\r\nSUB x 1", "xy..md"], 1
        ):
            reply = await client.op({"op": "sub", "id": i, "subject": subject})
            assert reply["op"] == "error" and reply["code"] == "XYW002", (subject, reply)
        assert (await client.subscribe("xy.md.tick.*", 10)) == {"op": "ack", "id": 10}
        assert (await client.op({"op": "unsub", "id": 11, "subject": "nope.x"})) == {
            "op": "ack",
            "id": 11,
        }
        assert (await client.op({"op": "ping", "id": 12})) == {"op": "pong", "id": 12}
    finally:
        await client.close()


async def test_token_claims_narrow_the_whitelist(gw: Gateway, keypair: tuple[Path, Path]) -> None:
    private, _ = keypair
    narrow = make_token(
        private_key_pem=private.read_bytes(), sub="bob", subjects=["xy.md.{sub}.*"], ttl_s=600
    )
    client = await WsClient.connect(gw.ws, narrow)
    try:
        assert (await client.subscribe("xy.md.bob.x", 1))["op"] == "ack"
        denied = await client.op({"op": "sub", "id": 2, "subject": "xy.md.alice.x"})
        assert denied["code"] == "XYW002"
    finally:
        await client.close()


def refused(port: int, **kw: object) -> tuple[int, dict[str, object]]:
    sock, head = raw_handshake(port, **kw)  # type: ignore[arg-type]
    sock.settimeout(5)
    rest = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    finally:
        sock.close()
    status = int(head.split(b" ", 2)[1])
    body = (head + rest).split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body)


def test_handshake_refusals(gw: Gateway, token: str, keypair: tuple[Path, Path]) -> None:
    assert refused(gw.port) == (401, {"code": "XYW001", "message": "a token is required"})
    status, body = refused(gw.port, token="not.a.jwt")
    assert (status, body["code"]) == (401, "XYW005")
    status, body = refused(gw.port, token=token, headers={"Origin": "https://evil.example.com"})
    assert (status, body["code"]) == (403, "XYW006")
    status, body = refused(gw.port, token=token, headers={"Origin": ORIGIN + ".evil.com"})
    assert (status, body["code"]) == (403, "XYW006")
    private, _ = keypair
    expired = make_token(
        private_key_pem=private.read_bytes(), sub="a", subjects=[], ttl_s=60, now=time.time() - 3600
    )
    status, body = refused(gw.port, token=expired)
    assert (status, body["code"]) == (401, "XYW005")
    assert token[:20] not in json.dumps(body)
    status, body, _ = http_get(gw.http + "/ws")
    assert status == 426 and json.loads(body)["code"] == "XYW008"


async def test_origin_allowed_and_missing(gw: Gateway, token: str) -> None:
    for origin in (ORIGIN, None):
        client = await WsClient.connect(gw.ws, token, origin=origin)
        assert (await client.recv())["op"] == "welcome"
        await client.close()


async def test_bad_frames_answered_and_neighbour_unharmed(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    watcher = await WsClient.connect(gw.ws, token)
    await watcher.subscribe("xy.md.watch")
    await wait_for_interest(nc, watcher, "xy.md.watch")
    bad = await WsClient.connect(gw.ws, token)
    try:
        await bad.ws.send_str("{not json")
        err = await bad.expect(lambda f: f.get("op") == "error")
        assert err["code"] == "XYW008" and err["id"] is None
        await bad.ws.send_str('{"op":"sub","id":5,"subject":"xy.md.a","extra":1}')
        err = await bad.expect(lambda f: f.get("op") == "error")
        assert (err["code"], err["id"]) == ("XYW008", 5)
        await bad.ws.send_str('{"op":"launch","id":6}')
        err = await bad.expect(lambda f: f.get("op") == "error")
        assert (err["code"], err["id"]) == ("XYW008", 6)
        assert (await bad.op({"op": "ping", "id": 7}))["op"] == "pong"
        await bad.ws.send_bytes(b"\x00\x01")
        assert await bad.closed_code() == 1003
        for i in range(20):
            await nc.publish("xy.md.watch", json.dumps({"i": i}).encode())
        got = [
            await watcher.expect(lambda f: f.get("op") == "msg" and "i" in f["data"])
            for _ in range(20)
        ]
        assert [f["data"]["i"] for f in got] == list(range(20))
    finally:
        await bad.close()
        await watcher.close()


def test_oversize_frame_closes_1009(gw: Gateway, token: str) -> None:
    sock, head = raw_handshake(gw.port, token=token)
    try:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(client_frame(0x1, b"x" * 70000))
        assert read_close_code(sock) == 1009
    finally:
        sock.close()


def test_invalid_utf8_closes_1007(gw: Gateway, token: str) -> None:
    sock, head = raw_handshake(gw.port, token=token)
    try:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(client_frame(0x1, b'{"op":"ping","id":1,"x":"\xff"}'))
        assert read_close_code(sock) == 1007
    finally:
        sock.close()


def test_unmasked_frame_closes_1002(gw: Gateway, token: str) -> None:
    sock, head = raw_handshake(gw.port, token=token)
    try:
        assert head.startswith(b"HTTP/1.1 101")
        sock.sendall(b"\x81\x05hello")
        assert read_close_code(sock) == 1002
    finally:
        sock.close()


XYW001_COUNTED = r'^fanout_handshake_failures_total\{code="XYW001"\} [1-9]'


def test_healthz_and_metrics(gw: Gateway) -> None:
    assert refused(gw.port)[0] == 401  # no token: one XYW001 to count, whatever ran before
    status, body, _ = http_get(gw.http + "/healthz")
    assert status == 200
    health = json.loads(body)
    for name in (
        "natsConnected",
        "subscriptions",
        "lastErrorCode",
        "uptimeSeconds",
        "clients",
        "subsPerConn",
    ):
        assert name in health
    assert health["natsConnected"] is True
    assert "workers" not in health
    status, body, _ = http_get(gw.admin + "/healthz")
    assert status == 200 and len(json.loads(body)["workers"]) == 1
    status, body, _ = http_get(gw.http + "/readyz")
    assert status == 200

    def metrics() -> str:
        status, body, _ = http_get(gw.admin + "/metrics")
        assert status == 200
        return body.decode()

    # worker counters reach /metrics once per sweep
    text = wait_for(
        lambda: t if re.search(XYW001_COUNTED, t := metrics(), re.M) else None,
        10,
        "the refused handshake counted",
    )
    for series in (
        "xy_ws_active_connections",
        "xy_ws_messages_forwarded_total",
        "xy_ws_messages_dropped_total",
        "xy_ws_slow_consumers_total",
        "xy_nats_reconnects_total",
        "xy_ws_send_queue_size",
        "fanout_handshake_failures_total",
        "fanout_workers",
    ):
        assert re.search(rf"^{series}(\{{|\s)", text, re.M), series


async def test_dedup_overlapping_subscriptions(
    gw: Gateway, token: str, nc: nats.aio.client.Client
) -> None:
    client = await WsClient.connect(gw.ws, token)
    try:
        await client.subscribe("xy.md.dup.a", 1)
        await client.subscribe("xy.md.dup.*", 2)
        await wait_for_interest(nc, client, "xy.md.dup.a")
        await nc.publish("xy.md.dup.a", b'{"n":1}')
        await nc.publish("xy.md.dup.b", b'{"n":2}')
        await nc.publish("xy.md.dup.a", b'{"n":3}')
        seen = []
        with pytest.raises(TimeoutError):
            while True:
                f = await client.expect(lambda f: f.get("op") == "msg", timeout=0.7)
                if "n" in f["data"]:
                    seen.append(f["data"]["n"])
        assert seen == [1, 2, 3]
    finally:
        await client.close()


async def test_nats_restart_status_frames(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    private, public = keypair
    server = EmbeddedNats()
    server.start()
    gateway = launch_gateway(
        tmp_path, "--workers", "1", NATS_URLS=server.url, JWT_PUBLIC_KEY=str(public)
    )
    tok = make_token(private_key_pem=private.read_bytes(), sub="c", subjects=["xy.md.>"], ttl_s=600)
    client = await WsClient.connect(gateway.ws, tok)
    try:
        await client.subscribe("xy.md.r")
        nc = await nats.connect(server.url)
        await wait_for_interest(nc, client, "xy.md.r")
        await nc.close()
        server.kill()
        down = await client.expect(lambda f: f.get("op") == "status", timeout=10)
        assert down == {"op": "status", "nats": "down", "code": "XYW004"}
        status, body, _ = http_get(gateway.http + "/readyz")
        assert status == 503 and json.loads(body)["code"] == "XYW004"
        server = EmbeddedNats(port=server.port)
        server.start()
        up = await client.expect(lambda f: f.get("op") == "status", timeout=15)
        assert up["nats"] == "up"
        nc = await nats.connect(server.url)
        await wait_for_interest(nc, client, "xy.md.r")
        await nc.close()
        _, body, _ = http_get(gateway.admin + "/metrics")
        assert re.search(r"^xy_nats_reconnects_total [1-9]", body.decode(), re.M)
    finally:
        await client.close()
        gateway.stop()
        server.stop()


async def test_demo_mode_serves_ticks_anonymously(tmp_path: Path) -> None:
    gateway = launch_gateway(tmp_path, "--demo", "--workers", "1")
    try:
        client = await WsClient.connect(gateway.ws)
        welcome = await client.recv()
        assert welcome["expires_at"] is None
        ack = await client.subscribe("xy.md.tick.demo")
        assert (ack["op"], ack["id"]) == ("ack", 1)  # + epoch and seq: the demo's ticks are
        tick = await client.expect(lambda f: f.get("op") == "msg", timeout=5)  # recoverable
        assert tick["subject"] == "xy.md.tick.demo"
        assert {"symbol", "price", "ts", "seq"} <= set(tick["data"])
        created = await client.op(
            {
                "op": "request",
                "id": 2,
                "subject": "svc.orders.create",
                "data": {"item": "tea", "qty": 2},
                "timeout_ms": 3000,
            },
            timeout=5,
        )
        assert created["op"] == "reply" and created["data"]["item"] == "tea"
        await client.close()
        status, body, _ = http_get(gateway.http + "/")
        assert status == 200 and b"fanout" in body.lower()
    finally:
        assert gateway.stop() == 0


def test_config_error_exits_2_naming_the_field(keypair: tuple[Path, Path]) -> None:
    env = gateway_env(FANOUT_SERVER_PORT="99999")
    out = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "check-config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("fanout: invalid config: server.port:")
    out = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "serve"],
        env=gateway_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "jwt.public_key" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "check-config"],
        env=gateway_env(
            NATS_URLS="nats://a:4222, nats://b:4222",
            NATS_NKEY_SEED="SUAXXXSECRET" + "A" * 46,  # shaped like a seed
            WS_SUBJECT_WHITELIST="xy.md.>,orders.*",
            JWT_PUBLIC_KEY=str(keypair[1]),
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    effective = json.loads(out.stdout)
    assert effective["nats"]["urls"] == ["nats://a:4222", "nats://b:4222"]
    assert effective["nats"]["nkey_seed"] == "<redacted>"
    assert effective["ws"]["subject_whitelist"] == ["xy.md.>", "orders.*"]
    assert "SUAXXXSECRET" not in out.stdout
