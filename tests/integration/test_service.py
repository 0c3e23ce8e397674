"""fanout.service against a real nats-server: micro discovery and stats, JWT (JWKS over real
HTTP), limits, typed errors, and OpenTelemetry spans with an in-memory exporter."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from aiohttp import web
from jwt.algorithms import ECAlgorithm
from nats.aio.client import Client

from fanout.core import metadata as md
from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from fanout.service import (
    JwtAuth,
    Next,
    Request,
    Service,
    ServiceError,
    Telemetry,
    request,
)
from tests.helpers import async_wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest_asyncio.fixture(loop_scope="module")
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, bytes]:
    return generate_keypair("ec")


def token(private: bytes, sub: str = "alice", **kw: Any) -> str:
    return make_token(private_key_pem=private, sub=sub, subjects=[], ttl_s=300, **kw)


@pytest_asyncio.fixture(loop_scope="module")
async def jwks_url(ec_keys: tuple[bytes, bytes]) -> AsyncIterator[str]:
    """A real JWKS endpoint on loopback serving the public half of ``ec_keys`` as kid ``k1``."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    jwk = json.loads(ECAlgorithm.to_jwk(load_pem_public_key(ec_keys[1])))  # type: ignore[arg-type]
    jwk.update(kid="k1", use="sig")

    async def serve(_: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/jwks.json"
    await runner.cleanup()


# -- NATS micro: discovery and stats ---------------------------------------------------------------
async def test_discovery_and_stats(nc: Client) -> None:
    svc = Service(nc, name="inventory", version="2.1.0", description="stock levels")

    @svc.handler("svc.inventory.get", metadata={"owner": "team-a"})
    async def get(req: Request) -> Any:
        if req.data == "missing":
            raise ServiceError("404", "no such item")
        if req.data == "crash":
            raise RuntimeError("db password=hunter2 leaked in a traceback")
        return {"sku": req.data, "qty": 3}

    async with svc:
        ping = json.loads((await nc.request("$SRV.PING.inventory", b"", timeout=2)).data)
        assert (ping["name"], ping["version"], ping["id"]) == ("inventory", "2.1.0", svc.micro.id)
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        info = json.loads((await nc.request("$SRV.INFO", b"", timeout=2)).data)
        assert info["description"] == "stock levels"
        assert [(e["name"], e["subject"], e["metadata"]) for e in info["endpoints"]] == [
            ("svc-inventory-get", "svc.inventory.get", {"owner": "team-a"})
        ]

        assert (await request(nc, "svc.inventory.get", "abc")).data == {"sku": "abc", "qty": 3}
        with pytest.raises(ServiceError) as err:
            await request(nc, "svc.inventory.get", "missing")
        assert (err.value.code, err.value.message) == ("404", "no such item")
        raw = await nc.request("svc.inventory.get", b'"crash"', timeout=2)
        assert raw.headers == {
            "Nats-Service-Error": "internal error",
            "Nats-Service-Error-Code": "500",
        }
        assert raw.data == b""
        bad_meta = await nc.request(
            "svc.inventory.get",
            b'"x"',
            timeout=2,
            headers={md.MSG_ID: "not-a-ulid", md.TIMESTAMP: "2024-01-01T00:00:00.000Z"},
        )
        assert bad_meta.headers is not None
        assert bad_meta.headers["Nats-Service-Error-Code"] == "400"
        assert "messageId" in bad_meta.headers["Nats-Service-Error"]

        stats = json.loads((await nc.request("$SRV.STATS.inventory", b"", timeout=2)).data)
        endpoint = stats["endpoints"][0]
        assert (endpoint["num_requests"], endpoint["num_errors"]) == (4, 3)
        assert endpoint["last_error"] == "400:" + bad_meta.headers["Nats-Service-Error"]
        assert "hunter2" not in json.dumps(stats)


async def test_reply_metadata(nc: Client) -> None:
    svc = Service(nc, name="meta", tracing=False)
    seen: list[Request] = []

    @svc.handler("svc.meta.>")
    async def handle(req: Request) -> Any:
        seen.append(req)
        return None

    async with svc:
        reply = await request(
            nc,
            "svc.meta.a.b",
            correlation_id="corr-7",
            causation_id="cause-1",
            headers={"traceparent": TP},
        )
    req = seen[0]
    assert (req.subject, req.endpoint) == ("svc.meta.a.b", "svc.meta.>")
    assert req.metadata is not None and req.metadata.correlation == md.Correlation(
        "corr-7", "cause-1"
    )
    assert (req.context.correlation_id, req.context.causation_id) == ("corr-7", "cause-1")
    meta = reply.metadata
    assert meta is not None and meta.correlation is not None
    assert meta.correlation.correlation_id == "corr-7"
    assert meta.correlation.causation_id == req.metadata.message_id
    assert reply.data is None


# -- message-level JWT over JWKS -------------------------------------------------------------------
async def test_jwt_from_jwks(nc: Client, ec_keys: tuple[bytes, bytes], jwks_url: str) -> None:
    auth = JwtAuth(jwks_url=jwks_url, audience="orders", jwks_refetch_interval_s=0.01)
    svc = Service(nc, name="secure").with_auth(auth)

    @svc.handler("svc.secure.whoami")
    async def whoami(req: Request) -> Any:
        principal = req.context.principal
        assert principal is not None
        return {"sub": principal.sub, "roles": principal.claims.get("roles")}

    async with svc:
        good = token(ec_keys[0], kid="k1", audience="orders", extra={"roles": ["buyer"]})
        reply = await request(nc, "svc.secure.whoami", token=good)
        assert reply.data == {"sub": "alice", "roles": ["buyer"]}
        cases = [
            (None, "a bearer token is required"),
            (token(ec_keys[0], kid="k1"), "wrong audience"),
            (token(ec_keys[0], kid="k2", audience="orders"), "unknown signing key"),
            (token(generate_keypair("ec")[0], kid="k1", audience="orders"), "invalid signature"),
            ("not.a.jwt", "malformed token"),
        ]
        for bad, message in cases:
            with pytest.raises(ServiceError) as err:
                await request(nc, "svc.secure.whoami", token=bad)
            assert (err.value.code, err.value.message) == ("401", message)
    assert auth.jwks is not None and auth.jwks.keys_loaded == 1


# -- limits through real requests ------------------------------------------------------------------
async def test_rate_limit_and_breaker_through_nats(nc: Client) -> None:
    broken = True
    calls = 0
    svc = (
        Service(nc, name="limited")
        .with_rate_limit(rate=10, burst=3)
        .with_circuit_breaker(failures=2, reset_after=0.3)
    )

    @svc.handler("svc.limited.op")
    async def op(req: Request) -> Any:
        nonlocal calls
        calls += 1
        if broken and req.data == "fail":
            raise RuntimeError("boom")
        return "ok"

    async with svc:

        async def as_principal(data: Any, principal: str) -> str:
            """Send as the gateway would for ``principal``; the error code, or "ok"."""
            meta = md.MessageMetadata(
                message_id=md.new_ulid(), timestamp=md.iso_timestamp(0), principal=principal
            )
            msg = await nc.request(
                "svc.limited.op", json.dumps(data).encode(), timeout=2, headers=md.to_headers(meta)
            )
            return (msg.headers or {}).get("Nats-Service-Error-Code", "ok")

        # four at once (sent one by one, a slow machine would refill the bucket between them)
        burst = await asyncio.gather(*(as_principal("x", "alice") for _ in range(4)))
        assert sorted(burst) == ["429", "ok", "ok", "ok"]
        assert await as_principal("x", "bob") == "ok"

        async def answered(data: Any, principal: str) -> bool:
            return await as_principal(data, principal) == "ok"

        await async_wait_for(lambda: answered("x", "alice"), 10, "alice's bucket to refill")

        assert [await as_principal("fail", "carol") for _ in range(2)] == ["500", "500"]
        before = calls
        assert await as_principal("fail", "dave") == "503"
        assert calls == before
        broken = False
        # refused (503, the handler untouched) until the reset time; then the probe closes it
        await async_wait_for(lambda: answered("fail", "dave"), 10, "the breaker's probe")
        assert await as_principal("fail", "erin") == "ok"


# -- OpenTelemetry ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def otel() -> Any:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace", exc_type=ImportError)
    export = pytest.importorskip("opentelemetry.sdk.trace.export", exc_type=ImportError)
    in_memory = pytest.importorskip(
        "opentelemetry.sdk.trace.export.in_memory_span_exporter", exc_type=ImportError
    )
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    return provider, exporter


async def test_one_server_span_per_request_continuing_the_callers_trace(
    nc: Client, otel: Any, ec_keys: tuple[bytes, bytes]
) -> None:
    from opentelemetry.trace import SpanKind, StatusCode

    provider, exporter = otel
    exporter.clear()
    seen: list[Request] = []
    recording: list[bool] = []

    async def tag(req: Request, call_next: Next) -> Any:
        req.span.set_attribute("app.tenant", "acme")
        return await call_next(req)

    svc = (
        Service(nc, name="traced", tracer_provider=provider)
        .with_auth(JwtAuth(public_key=ec_keys[1].decode(), required=False))
        .with_rate_limit(rate=100, burst=100)
        .with_circuit_breaker(failures=5, reset_after=1.0)
        .with_interceptor(tag)
    )

    @svc.handler("svc.traced.get")
    async def get(req: Request) -> Any:
        seen.append(req)
        recording.append(req.span.is_recording())
        if req.data == "fail":
            raise ServiceError("503", "backend busy")
        return "ok"

    async with svc:
        meta = md.MessageMetadata(
            message_id=md.new_ulid(),
            timestamp=md.iso_timestamp(0),
            correlation=md.Correlation("corr-1", "cause-1"),
            conn="c-9",
            authentication=md.JwtAuthentication(token(ec_keys[0])),
            traceparent=TP,
            tracestate="congo=t61rcWkgMzE",
        )
        reply = await nc.request("svc.traced.get", b'"x"', timeout=2, headers=md.to_headers(meta))
        failed = await nc.request(
            "svc.traced.get", b'"fail"', timeout=2, headers=md.to_headers(meta)
        )

    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["process svc.traced.get", "process svc.traced.get"]
    ok, bad = spans
    assert ok.kind == SpanKind.SERVER
    assert format(ok.context.trace_id, "032x") == TP.split("-")[1]
    assert ok.parent is not None and ok.parent.is_remote
    assert format(ok.parent.span_id, "016x") == TP.split("-")[2]
    attrs = dict(ok.attributes)
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.destination.name"] == "svc.traced.get"
    assert attrs["messaging.nats.subject"] == "svc.traced.get"
    assert attrs["messaging.message.id"] == meta.message_id
    assert attrs["messaging.message.conversation_id"] == "corr-1"
    assert attrs["messaging.correlation_id"] == "corr-1"
    assert attrs["messaging.causation_id"] == "cause-1"
    assert attrs["nats.feature.auth.status"] == "success"
    assert attrs["auth.message.principal_id"] == "alice"
    assert attrs["nats.feature.ratelimit.triggered"] is False
    assert attrs["ratelimit.identity_type"] == "jwt_sub"
    assert attrs["nats.feature.circuitbreaker.state"] == "closed"
    assert attrs["app.tenant"] == "acme"
    assert ok.status.status_code == StatusCode.UNSET
    assert bad.status.status_code == StatusCode.ERROR
    assert dict(bad.attributes)["error.type"] == "503"
    assert failed.headers is not None and failed.headers["Nats-Service-Error-Code"] == "503"
    assert reply.headers is not None
    span_id = format(ok.context.span_id, "016x")
    assert reply.headers["traceparent"] == f"00-{TP.split('-')[1]}-{span_id}-01"
    assert reply.headers["tracestate"] == "congo=t61rcWkgMzE"
    assert recording == [True, True] and seen[0].context.otel_context is not None


async def test_client_span_is_the_server_spans_parent(nc: Client, otel: Any) -> None:
    from opentelemetry.trace import SpanKind

    provider, exporter = otel
    exporter.clear()
    svc = Service(nc, name="linked", tracer_provider=provider)

    @svc.handler("svc.linked.get")
    async def get(req: Request) -> Any:
        return 1

    async with svc:
        await request(nc, "svc.linked.get", telemetry=Telemetry(provider), correlation_id="c-2")
    server, client = sorted(exporter.get_finished_spans(), key=lambda s: s.kind != SpanKind.SERVER)
    assert client.kind == SpanKind.CLIENT and client.name == "send svc.linked.get"
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    assert dict(client.attributes)["messaging.message.conversation_id"] == "c-2"


async def test_tracing_off_still_propagates(nc: Client) -> None:
    svc = Service(nc, name="untraced", tracing=False)
    seen: list[Request] = []

    @svc.handler("svc.untraced.get")
    async def get(req: Request) -> Any:
        seen.append(req)
        return 1

    async with svc:
        reply = await request(
            nc, "svc.untraced.get", headers={"traceparent": TP}, telemetry=Telemetry(enabled=False)
        )
    sent = seen[0].headers["traceparent"]
    assert md.parse_traceparent(sent) is not None
    assert reply.headers["traceparent"] == sent
    assert not seen[0].span.is_recording()


# -- the example service ---------------------------------------------------------------------------
async def test_example_orders_service(nc: Client, nats_module: EmbeddedNats) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "orders_service.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        "--nats",
        nats_module.url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:

        async def discovered() -> bool:
            try:
                await nc.request("$SRV.PING.orders", b"", timeout=0.2)
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                return False
            return True

        await async_wait_for(discovered, 20, "the service to answer discovery")

        def as_user(sub: str) -> dict[str, str]:
            meta = md.MessageMetadata(
                message_id=md.new_ulid(), timestamp=md.iso_timestamp(0), principal=sub
            )
            return md.to_headers(meta)

        created = await nc.request(
            "svc.orders.create", b'{"item":"tea","qty":2}', timeout=2, headers=as_user("alice")
        )
        order = json.loads(created.data)
        assert (order["id"], order["owner"], order["item"], order["qty"]) == (
            "o-1",
            "alice",
            "tea",
            2,
        )
        got = await nc.request(
            "svc.orders.get", b'{"id":"o-1"}', timeout=2, headers=as_user("alice")
        )
        assert json.loads(got.data) == order
        hidden = await nc.request(
            "svc.orders.get", b'{"id":"o-1"}', timeout=2, headers=as_user("bob")
        )
        assert hidden.headers is not None and hidden.headers["Nats-Service-Error-Code"] == "404"
        invalid = await nc.request(
            "svc.orders.create", b'{"item":"tea"}', timeout=2, headers=as_user("alice")
        )
        assert invalid.headers is not None and invalid.headers["Nats-Service-Error-Code"] == "400"
        listed = await nc.request("svc.orders.list", b"", timeout=2, headers=as_user("alice"))
        assert json.loads(listed.data) == [order]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, stderr.decode()
    assert b"svc.orders.create ok corr=" in stderr
