"""Requests end to end (v1.1): WebSocket client → real gateway → real NATS → fanout.service.

One nats-server, one `fanout serve` with requests on (tight limits so every
rule shows within a second), one `fanout.service` in this process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

from fanout.core import metadata as md
from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats
from fanout.service import Request, Service, ServiceError
from tests.conftest import Gateway, launch_gateway, metric
from tests.integration.wsclient import WsClient

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
BURST = 20
MAX_IN_FLIGHT = 20
FAILURES = 3
RESET_S = 0.5


@pytest.fixture(scope="module")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An EC key of our own: loading an RSA private key costs ~50 ms, and we sign 60 tokens."""
    directory = tmp_path_factory.mktemp("ec-keys")
    private, public = generate_keypair("ec")
    (directory / "private.pem").write_bytes(private)
    (directory / "public.pem").write_bytes(public)
    return directory / "private.pem", directory / "public.pem"


@pytest.fixture(scope="module")
def gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = launch_gateway(
        tmp_path_factory.mktemp("gw-requests"),
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        WS_REQUEST_WHITELIST="svc.>",
        FANOUT_REQUESTS_RATE=str(BURST),
        FANOUT_REQUESTS_BURST=str(BURST),
        FANOUT_REQUESTS_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        FANOUT_REQUESTS_DEFAULT_TIMEOUT_MS="1000",
        FANOUT_REQUESTS_MAX_TIMEOUT_MS="1000",
        FANOUT_REQUESTS_BREAKER_FAILURES=str(FAILURES),
        FANOUT_REQUESTS_BREAKER_RESET_S=str(RESET_S),
        FANOUT_REQUESTS_BREAKER_TIMEOUT_FLOOR_MS="100",
        FANOUT_REQUESTS_ALLOWED_HEADERS="X-Tenant",
    )
    yield gateway
    gateway.stop()


@dataclass
class Backend:
    """What the test service saw, and switches the tests flip."""

    seen: list[dict[str, str]] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    healthy: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend(nats_module: EmbeddedNats) -> AsyncIterator[Backend]:
    state = Backend()
    nc = await nats.connect(nats_module.url)
    svc = Service(nc, name="orders", version="1.0.0")

    def count(req: Request) -> None:
        state.calls[req.endpoint] = state.calls.get(req.endpoint, 0) + 1

    @svc.handler("svc.orders.*")
    async def orders(req: Request) -> Any:
        state.seen.append(dict(req.headers))
        return {"subject": req.subject, "echo": req.data}

    @svc.handler("svc.echo.*")
    async def echo(req: Request) -> Any:
        meta = req.metadata
        return {"conn": meta.conn if meta else None, "n": req.data["n"]}

    @svc.handler("svc.flaky.*")
    async def flaky(req: Request) -> Any:
        count(req)
        if not state.healthy:
            raise ServiceError("500", "database down")
        return "fine"

    @svc.handler("svc.slow.*")
    async def slow(req: Request) -> Any:
        count(req)
        await asyncio.wait_for(state.release.wait(), 5)
        return "late"

    await svc.start()
    yield state
    state.release.set()
    await svc.stop()
    await nc.close()


def token_for(keypair: tuple[Path, Path], sub: str, **kw: Any) -> str:
    kw.setdefault("requests", ["svc.>"])  # without the claim a token may request nothing
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub=sub, subjects=["xy.md.>"], ttl_s=600, **kw
    )


async def connect(
    gw: Gateway, keypair: tuple[Path, Path], sub: str, **kw: Any
) -> tuple[WsClient, str]:
    client = await WsClient.connect(gw.ws, token_for(keypair, sub, **kw))
    welcome = await client.recv()
    assert welcome["op"] == "welcome"
    return client, welcome["conn"]


def request(op_id: int, subject: str, data: Any = None, **kw: Any) -> dict[str, Any]:
    return {"op": "request", "id": op_id, "subject": subject, "data": data, **kw}


# -- the round trip --------------------------------------------------------------------------------
async def test_metadata_reaches_the_service_and_trace_context_comes_back(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, conn = await connect(gw, keypair, "alice")
    try:
        before = time.time()
        reply = await client.op(
            request(
                1,
                "svc.orders.get",
                {"id": 7},
                headers={
                    "correlationId": "checkout-42",
                    "causationId": "click-9",
                    "traceparent": TP,
                    "tracestate": "congo=t61rcWkgMzE",
                },
            )
        )
        after = time.time()
    finally:
        await client.close()
    assert reply["op"] == "reply"
    assert reply["data"] == {"subject": "svc.orders.get", "echo": {"id": 7}}
    assert reply["hdr"]["traceparent"] == TP
    assert reply["hdr"]["tracestate"] == "congo=t61rcWkgMzE"
    assert reply["hdr"]["Fanout-Correlation-Id"] == "checkout-42"
    seen = backend.seen[-1]
    assert seen["Fanout-Principal"] == "alice"
    assert seen["Fanout-Conn"] == conn
    assert seen["Fanout-Correlation-Id"] == "checkout-42"
    assert seen["Fanout-Causation-Id"] == "click-9"
    assert seen["traceparent"] == TP and seen["tracestate"] == "congo=t61rcWkgMzE"
    assert "Authorization" not in seen
    ms, _ = md.decode_ulid(seen["Fanout-Msg-Id"])
    assert before - 0.01 <= ms / 1000 <= after + 0.01
    assert before - 0.01 <= md.parse_timestamp(seen["Fanout-Timestamp"]) <= after + 0.01
    assert reply["hdr"]["Fanout-Causation-Id"] == seen["Fanout-Msg-Id"]  # the service's reply


async def test_new_trace_and_correlation_when_the_client_sends_none(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, _ = await connect(gw, keypair, "alice")
    try:
        reply = await client.op(request(2, "svc.orders.get", "x", headers={"traceparent": "junk"}))
    finally:
        await client.close()
    seen = backend.seen[-1]
    assert md.parse_traceparent(seen["traceparent"]) is not None
    assert seen["traceparent"] != "junk" and "tracestate" not in seen
    assert reply["hdr"]["traceparent"] == seen["traceparent"]
    assert seen["Fanout-Correlation-Id"] == seen["Fanout-Msg-Id"]
    assert "Fanout-Causation-Id" not in seen


async def test_client_headers_are_filtered(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, conn = await connect(gw, keypair, "alice")
    try:
        reply = await client.op(
            request(
                3,
                "svc.orders.get",
                headers={
                    "Fanout-Principal": "mallory",
                    "fanout-conn": "fake",
                    "Authorization": "Bearer forged",
                    "x-tenant": "acme",
                    "X-Other": "dropped",
                },
            )
        )
        assert reply["op"] == "reply"
        seen = backend.seen[-1]
        assert seen["Fanout-Principal"] == "alice" and seen["Fanout-Conn"] == conn
        assert "Authorization" not in seen and "X-Other" not in seen
        assert seen["X-Tenant"] == "acme"
        bad = await client.op(request(4, "svc.orders.get", headers={"correlationId": "has space"}))
        assert (bad["op"], bad["code"]) == ("error", "XYW008")
        assert "correlationId" in bad["message"]
        bad = await client.op(request(5, "svc.orders.get", headers={"X-Tenant": "a\r\nb"}))
        assert (bad["op"], bad["code"]) == ("error", "XYW008")
    finally:
        await client.close()


async def test_denied_and_invalid_subjects(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, _ = await connect(gw, keypair, "bob", requests=["svc.orders.*", "svc.users.{sub}"])
    try:
        cases = {
            10: ("xy.md.tick.demo", "requests not allowed on xy.md.tick.demo"),
            11: ("svc.users.alice", "requests not allowed on svc.users.alice"),
            12: ("svc.orders.*", "invalid subject: wildcard"),
            13: ("svc..get", "invalid subject: empty token"),
        }
        for op_id, (subject, message) in cases.items():
            frame = await client.op(request(op_id, subject))
            assert (frame["op"], frame["code"]) == ("error", "XYW002"), frame
            assert frame["message"].startswith(message)
        allowed = await client.op(request(14, "svc.orders.list"))
        assert allowed["op"] == "reply"
        own = await client.op(request(15, "svc.users.bob", timeout_ms=200))
        assert own["code"] == "XYW013"  # allowed by the claim's template; nobody answers
    finally:
        await client.close()


@pytest.mark.slow  # in-process: tests/unit/test_inproc_requests.py
async def test_no_responders(gw: Gateway, backend: Backend, keypair: tuple[Path, Path]) -> None:
    client, _ = await connect(gw, keypair, "alice")
    try:
        # answered by NATS's no-responders status, not by the 1000 ms timeout (XYW012)
        frame = await client.op(request(20, "svc.nobody.home", timeout_ms=1000))
    finally:
        await client.close()
    assert frame == {
        "op": "error",
        "id": 20,
        "code": "XYW013",
        "message": "no responders on svc.nobody.home",
    }


# -- limits ----------------------------------------------------------------------------------------
@pytest.mark.slow  # in-process: tests/unit/test_inproc_requests.py
async def test_rate_limit_triggers_at_the_rate_and_recovers(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    # two connections of one principal (one bucket), each sending one batch: the requests
    # arrive together, so the bucket barely refills however slow the machine is (a request
    # per round trip would get a token back every 50 ms)
    client, _ = await connect(gw, keypair, "rate-limited-user")
    second, _ = await connect(gw, keypair, "rate-limited-user")
    each = BURST * 3 // 4  # under the in-flight cap; together over the burst
    try:
        for c in (client, second):
            await c.send([request(op_id, "svc.orders.get") for op_id in range(1, each + 1)])
        frames = [
            await c.expect(lambda f: f.get("op") in ("reply", "error"))
            for c in (client, second)
            for _ in range(each)
        ]
        ok = len([f for f in frames if f["op"] == "reply"])
        refused = [f for f in frames if f["op"] == "error"]
        assert {f["code"] for f in refused} == {"XYW010"}
        assert BURST <= ok <= BURST + 2  # the burst, plus what refilled meanwhile
        limited = refused[-1]
        assert 0 < limited["retry_after_ms"] <= 1000 / BURST
        await asyncio.sleep(limited["retry_after_ms"] / 1000)  # waits on the retry-after hint
        again = await client.op(request(100, "svc.orders.get"))
        assert again["op"] == "reply"
        other, _ = await connect(gw, keypair, "someone-else")  # a principal has its own bucket
        try:
            assert (await other.op(request(1, "svc.orders.get")))["op"] == "reply"
        finally:
            await other.close()
    finally:
        await client.close()
        await second.close()


@pytest.mark.slow  # in-process: tests/unit/test_inproc_requests.py
async def test_in_flight_cap_per_connection(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, _ = await connect(gw, keypair, "impatient")
    try:
        await client.send([request(i, "svc.slow.cap") for i in range(1, MAX_IN_FLIGHT + 6)])
        refused = [await client.expect(lambda f: f.get("op") == "error") for _ in range(5)]
        assert sorted(f["id"] for f in refused) == list(range(MAX_IN_FLIGHT + 1, MAX_IN_FLIGHT + 6))
        assert {f["code"] for f in refused} == {"XYW007"}
        backend.release.set()
        replies = [
            await client.expect(lambda f: f.get("op") == "reply") for _ in range(MAX_IN_FLIGHT)
        ]
        assert {f["data"] for f in replies} == {"late"}
    finally:
        backend.release.clear()
        await client.close()


async def test_timeouts_are_capped_and_open_the_breaker(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, _ = await connect(gw, keypair, "waiter")
    try:
        frame = await client.op(request(1, "svc.slow.t", timeout_ms=200))
        assert (frame["code"], frame["message"]) == (
            "XYW012",
            "no reply within 200 ms on svc.slow.t",
        )
        frame = await client.op(request(2, "svc.slow.t", timeout_ms=60_000))  # capped at 1000 ms
        assert frame["message"] == "no reply within 1000 ms on svc.slow.t"
        frame = await client.op(request(3, "svc.slow.t", timeout_ms=100))
        assert frame["code"] == "XYW012"
        calls = backend.calls["svc.slow.*"]
        frame = await client.op(request(4, "svc.slow.t", timeout_ms=100))
        assert frame["code"] == "XYW011"
        assert backend.calls["svc.slow.*"] == calls
    finally:
        await client.close()


@pytest.mark.slow  # in-process: tests/unit/test_inproc_requests.py
async def test_breaker_opens_rejects_fast_and_closes_after_a_probe(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    client, _ = await connect(gw, keypair, "breaker-user")
    calls = backend.calls.get("svc.flaky.*", 0)  # other tests call svc.flaky.* too
    try:
        for op_id in range(1, FAILURES + 1):
            frame = await client.op(request(op_id, "svc.flaky.get"))
            assert frame["op"] == "reply"  # a micro error reply, forwarded as is
            assert frame["hdr"]["Nats-Service-Error-Code"] == "500"
            assert frame["hdr"]["Nats-Service-Error"] == "database down"
        assert backend.calls["svc.flaky.*"] == calls + FAILURES
        frame = await client.op(request(10, "svc.flaky.get"))
        assert (frame["code"], frame["message"]) == ("XYW011", "circuit open for svc.flaky.get")
        assert 0 < frame["retry_after_ms"] <= RESET_S * 1000
        assert backend.calls["svc.flaky.*"] == calls + FAILURES  # NATS untouched while open
        assert metric(gw, "fanout_circuit_state", subject_pattern="svc.>") == 2.0
        other = await client.op(request(11, "svc.flaky.list"))  # per subject
        assert other["hdr"]["Nats-Service-Error-Code"] == "500"
        backend.healthy = True
        await asyncio.sleep(frame["retry_after_ms"] / 1000 + 0.05)  # waits on the retry-after hint
        probe = await client.op(request(12, "svc.flaky.get"))
        assert probe["data"] == "fine"
        after = await client.op(request(13, "svc.flaky.get"))
        assert after["data"] == "fine"
    finally:
        backend.healthy = False
        await client.close()


# -- scale and observability -----------------------------------------------------------------------
async def test_1000_concurrent_requests_over_50_connections(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path]
) -> None:
    clients = await asyncio.gather(*(connect(gw, keypair, f"load-{i}") for i in range(50)))
    try:
        per = BURST
        await asyncio.gather(
            *(
                client.send(
                    [request(k, f"svc.echo.{i}", {"n": i * 1000 + k}) for k in range(1, per + 1)]
                )
                for i, (client, _) in enumerate(clients)
            )
        )

        async def collect(client: WsClient) -> list[dict[str, Any]]:
            return [
                await client.expect(lambda f: f.get("op") in ("reply", "error"), 10)
                for _ in range(per)
            ]

        results = await asyncio.gather(*(collect(client) for client, _ in clients))
    finally:
        await asyncio.gather(*(client.close() for client, _ in clients))
    for i, ((_, conn), frames) in enumerate(zip(clients, results, strict=True)):
        assert sorted(f["id"] for f in frames) == list(range(1, per + 1))
        for frame in frames:
            assert frame["op"] == "reply", frame
            assert frame["data"] == {"conn": conn, "n": i * 1000 + frame["id"]}


async def test_metrics(gw: Gateway, backend: Backend, keypair: tuple[Path, Path]) -> None:
    client, _ = await connect(gw, keypair, "metrics-user")
    try:
        ok_before = metric(gw, "fanout_requests_total", outcome="ok")
        assert (await client.op(request(1, "svc.orders.get")))["op"] == "reply"
        assert (await client.op(request(2, "svc.none", timeout_ms=100)))["code"] == "XYW013"
        assert (await client.op(request(3, "nope.x")))["code"] == "XYW002"
    finally:
        await client.close()
    assert metric(gw, "fanout_requests_total", outcome="ok") == ok_before + 1
    assert metric(gw, "fanout_requests_total", outcome="no_responders") >= 1
    assert metric(gw, "fanout_requests_total", outcome="denied") >= 1
    assert metric(gw, "fanout_requests_total", outcome="circuit_open") >= 0
    assert metric(gw, "fanout_request_duration_seconds_count") >= ok_before + 2
    assert metric(gw, "fanout_client_errors_total", code="XYW013") >= 1


# -- the browser client ----------------------------------------------------------------------------
def node_with_websocket() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run(
        [
            node,
            "--experimental-websocket",
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ],
        capture_output=True,
        timeout=10,
    )
    return node if probe.returncode == 0 else None


JS_CLIENT = """
import { FanoutClient } from "./fanout.mjs";
const [url, token] = process.argv.slice(2);
const client = new FanoutClient(url, { token: () => token, pingIntervalMs: 0 });
const out = {};
const opts = { timeoutMs: 2000, headers: { correlationId: "js-1" } };
const ok = await client.request("svc.orders.get", { id: 7 }, opts);
out.ok = { data: ok.data, corr: ok.hdr["Fanout-Correlation-Id"] };
const cases = [["none", "svc.nobody"], ["service", "svc.flaky.js"], ["denied", "xy.md.x"]];
for (const [name, subject] of cases) {
  try { await client.request(subject, null, { timeoutMs: 500 }); out[name] = "resolved"; }
  catch (e) { out[name] = { code: e.code, message: e.message }; }
}
console.log(JSON.stringify(out));
client.close();
"""


async def test_fanout_js_request(
    gw: Gateway, backend: Backend, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    node = node_with_websocket()
    if node is None:
        pytest.skip("needs node with a WebSocket global (node >= 20.10)")
    shutil.copy(ROOT / "fanout" / "static" / "fanout.js", tmp_path / "fanout.mjs")
    (tmp_path / "main.mjs").write_text(JS_CLIENT)
    proc = await asyncio.create_subprocess_exec(
        node,
        "--experimental-websocket",
        "--no-warnings",
        "main.mjs",
        gw.ws,
        token_for(keypair, "js-user"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 0, stderr.decode()
    out = json.loads(stdout)
    assert out["ok"] == {"data": {"subject": "svc.orders.get", "echo": {"id": 7}}, "corr": "js-1"}
    assert out["none"]["code"] == "XYW013"
    assert out["service"] == {"code": "500", "message": "500: database down"}
    assert out["denied"]["code"] == "XYW002"


# -- forward_token: the service verifies the browser's own JWT -------------------------------------
async def test_forwarded_token_is_verified_by_the_service(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    from fanout.service import JwtAuth

    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        WS_REQUEST_WHITELIST="svc.secure.>",
        FANOUT_REQUESTS_FORWARD_TOKEN="true",
        FANOUT_WS_AUTH_REQUIRED="false",
    )
    nc = await nats.connect(nats_module.url)
    svc = Service(nc, name="secure").with_auth(
        JwtAuth(public_key=str(keypair[1]), audience="orders")
    )

    @svc.handler("svc.secure.whoami")
    async def whoami(req: Request) -> Any:
        assert req.context.principal is not None
        return req.context.principal.sub

    await svc.start()
    try:
        cases = [
            (token_for(keypair, "alice", audience="orders"), {"op": "reply", "data": "alice"}),
            (token_for(keypair, "alice"), {"code": "401", "message": "wrong audience"}),
            (None, {"code": "401", "message": "a bearer token is required"}),
        ]
        for token, expected in cases:
            client = await WsClient.connect(gateway.ws, token)
            try:
                await client.recv()
                frame = await client.op(request(1, "svc.secure.whoami"))
            finally:
                await client.close()
            if "data" in expected:
                assert (frame["op"], frame["data"]) == ("reply", expected["data"])
            else:
                assert frame["hdr"]["Nats-Service-Error-Code"] == expected["code"]
                assert frame["hdr"]["Nats-Service-Error"] == expected["message"]
    finally:
        await svc.stop()
        await nc.close()
        gateway.stop()
