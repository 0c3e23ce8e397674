"""The JWKS cache against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from fanout.core.auth import TokenVerifier
from fanout.core.jwks import MAX_JWKS_BYTES
from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import free_port
from fanout.jwks_cache import retry_delay_s
from fanout.worker.jwks import JwksCache
from tests.helpers import async_wait_for

KEY_A = generate_keypair("rsa")
KEY_B = generate_keypair("ec")
KEY_C = generate_keypair("ed25519")


def jwks(*entries: tuple[str, bytes]) -> dict[str, Any]:
    keys = []
    for kid, pub_pem in entries:
        pub = serialization.load_pem_public_key(pub_pem)
        if isinstance(pub, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(pub, as_dict=True)
        else:
            assert isinstance(pub, ed25519.Ed25519PublicKey)
            jwk = OKPAlgorithm.to_jwk(pub, as_dict=True)
        keys.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": keys}


class JwksServer:
    """Serves whatever the test sets; counts every hit."""

    def __init__(self) -> None:
        self.hits = 0
        self.document: dict[str, Any] = jwks(("a", KEY_A[1]))
        self.raw: bytes | None = None
        self.status = 200
        self.chunked = False
        self.delay_s = 0.0
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)  # waits on: a slow JWKS endpoint, the case
        if self.raw is None:
            return web.json_response(self.document, status=self.status)
        if not self.chunked:
            return web.Response(body=self.raw, status=self.status)
        resp = web.StreamResponse(status=self.status)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(self.raw), 256 * 1024):
            await resp.write(self.raw[start : start + 256 * 1024])
        await resp.write_eof()
        return resp


@pytest_asyncio.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", srv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.url = f"http://{host}:{port}/jwks.json"
    yield srv
    await runner.cleanup()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def cache(server: JwksServer, clock: FakeClock) -> AsyncIterator[JwksCache]:
    c = JwksCache(server.url, refetch_interval_s=30, refresh_s=3600, timeout_s=2, clock=clock)
    await c.start()
    yield c
    await c.close()


def token(private_pem: bytes, kid: str) -> str:
    return make_token(private_key_pem=private_pem, sub="alice", subjects=[], ttl_s=300, kid=kid)


VERIFIER = TokenVerifier(algorithms=["RS256", "ES256", "EdDSA"], issuer=None, audience=None)


def state(c: JwksCache) -> tuple[str | None, int]:
    return c.last_error, c.keys_loaded


async def test_start_loads_keys_and_tokens_verify(server: JwksServer, cache: JwksCache) -> None:
    assert (server.hits, cache.keys_loaded, cache.last_error) == (1, 1, None)
    key = cache.find("a")
    assert key is not None and key.algorithms == {
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
    }
    assert VERIFIER.verify(token(KEY_A[0], "a"), key).sub == "alice"
    assert cache.find("b") is None
    assert server.hits == 1


async def test_rotation_unknown_kid_triggers_one_refetch(
    server: JwksServer, cache: JwksCache
) -> None:
    server.document = jwks(("b", KEY_B[1]))
    new_token = token(KEY_B[0], "b")
    _, kid = VERIFIER.header(new_token)
    assert cache.find(kid) is None
    key = await cache.find_or_refetch(kid)
    assert key is not None and key.algorithms == {"ES256"}
    assert server.hits == 2
    assert VERIFIER.verify(new_token, key).sub == "alice"
    assert cache.find("a") is None  # the rotated-out key is gone
    assert await cache.find_or_refetch("b") is key
    assert server.hits == 2  # known kid: no fetch


async def test_concurrent_unknown_kids_share_one_fetch(
    server: JwksServer, cache: JwksCache
) -> None:
    server.document = jwks(("a", KEY_A[1]), ("c", KEY_C[1]))
    server.delay_s = 0.1
    results = await asyncio.gather(*(cache.find_or_refetch("c") for _ in range(20)))
    assert server.hits == 2
    assert all(r is results[0] and r is not None for r in results)


async def test_refetch_is_rate_limited(
    server: JwksServer, cache: JwksCache, clock: FakeClock
) -> None:
    assert await cache.find_or_refetch("x1") is None
    assert server.hits == 2
    for kid in ("x2", "x3", "x4"):
        assert await cache.find_or_refetch(kid) is None
    assert server.hits == 2
    clock.now += 29.9
    assert await cache.find_or_refetch("x5") is None
    assert server.hits == 2
    server.document = jwks(("x6", KEY_C[1]))
    clock.now += 0.1
    assert await cache.find_or_refetch("x6") is not None
    assert server.hits == 3
    assert await cache.find_or_refetch("x7") is None
    assert server.hits == 3


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(
    server: JwksServer, cache: JwksCache
) -> None:
    server.document = jwks(("c", KEY_C[1]))
    server.delay_s = 0.2
    caller = asyncio.create_task(cache.find_or_refetch("c"))
    await async_wait_for(lambda: server.hits == 2, what="server.hits == 2")
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await async_wait_for(lambda: cache.find("c") is not None, what="key c in the cache")
    assert server.hits == 2


@pytest.mark.parametrize(
    ("raw", "chunked", "status", "error"),
    [
        (b"x" * (MAX_JWKS_BYTES + 1), False, 200, "response too large (1048577 bytes)"),
        (b"x" * (MAX_JWKS_BYTES + 1), True, 200, "response too large (over 1048576 bytes)"),
        (b"<html>not json</html>", False, 200, "response is not JSON"),
        (b"[1, 2]", False, 200, "response is not a JSON object"),
        (b'{"jwks": []}', False, 200, "JWKS has no 'keys' list"),
        (
            b'{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}',
            False,
            200,
            "no usable signature key: kid 's': unsupported kty 'oct'",
        ),
        (b'{"keys": []}', False, 200, "no usable signature key: empty"),
        (b"oops", False, 500, "HTTP status 500"),
    ],
)
async def test_bad_responses_keep_the_old_keys(
    server: JwksServer,
    cache: JwksCache,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
    raw: bytes,
    chunked: bool,
    status: int,
    error: str,
) -> None:
    server.raw, server.chunked, server.status = raw, chunked, status
    with caplog.at_level(logging.WARNING, logger="fanout.jwks"):
        assert await cache.find_or_refetch("new") is None
    assert server.hits == 2
    assert state(cache) == (error, 1)
    assert cache.find("a") is not None
    records = [r for r in caplog.records if r.name == "fanout.jwks"]
    assert [(r.levelno, r.__dict__["code"], r.__dict__["reason"]) for r in records] == [
        (logging.WARNING, "XYW005", error)
    ]
    # Recovery: a good document again replaces the error.
    server.raw, server.status = None, 200
    server.document = jwks(("a", KEY_A[1]), ("new", KEY_C[1]))
    clock.now += 30  # past the refetch interval
    assert await cache.find_or_refetch("new") is not None
    assert state(cache) == (None, 2)


async def test_timeout_is_an_error_not_a_hang(server: JwksServer) -> None:
    server.delay_s = 3.0
    c = JwksCache(server.url, timeout_s=0.2)
    try:
        await asyncio.wait_for(c.start(), 2.0)
        assert c.last_error == "timed out after 0.2 s"
        assert (c.keys_loaded, c.find("a")) == (0, None)
    finally:
        await c.close()


async def test_unreachable_at_start_then_keys_arrive_via_background_retry() -> None:
    port = free_port()
    c = JwksCache(f"http://127.0.0.1:{port}/jwks.json", refetch_interval_s=0.05, timeout_s=1)
    srv = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", srv.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    try:
        await c.start()
        assert c.keys_loaded == 0
        assert c.last_error is not None and "127.0.0.1" in c.last_error
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await async_wait_for(lambda: c.keys_loaded == 1, what="c.keys_loaded == 1")
        assert c.find("a") is not None and c.last_error is None
    finally:
        await c.close()
        await runner.cleanup()


async def test_periodic_refresh_picks_up_new_keys(server: JwksServer) -> None:
    c = JwksCache(server.url, refresh_s=0.05, timeout_s=1)
    try:
        await c.start()
        server.document = jwks(("b", KEY_B[1]))
        await async_wait_for(lambda: c.find("b") is not None, what="key b in the cache")
        assert c.find("a") is None
    finally:
        await c.close()


async def test_close_stops_background_fetches(server: JwksServer) -> None:
    c = JwksCache(server.url, refresh_s=0.02, timeout_s=1)
    await c.start()
    await async_wait_for(lambda: server.hits >= 3, what="server.hits >= 3")
    await c.close()
    hits = server.hits
    await asyncio.sleep(0.1)  # waits on: five refresh periods in which no fetch may happen
    assert server.hits == hits


def rsa_jwk(kid: str, **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = jwks((kid, KEY_A[1]))["keys"][0]
    entry.update(over)
    return entry


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (
            json.dumps({"keys": [rsa_jwk("a", alg=["RS256"])]}).encode(),
            "no usable signature key: kid 'a': alg ['RS256'] is not a string",
        ),
        (b'{"keys":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "response is nested too deeply"),
    ],
)
async def test_a_malformed_document_is_a_failed_fetch_and_refresh_recovers(
    server: JwksServer, raw: bytes, error: str
) -> None:
    """A TypeError or RecursionError while parsing used to end the refresh task for good."""
    failures: list[str] = []
    c = JwksCache(
        server.url,
        refetch_interval_s=0.02,
        refresh_s=0.05,
        timeout_s=1,
        on_failure=failures.append,
    )
    try:
        await c.start()
        assert c.find("a") is not None
        server.raw = raw
        await async_wait_for(lambda: len(failures) >= 2, what="two failed fetches")
        assert c.last_error == error and failures[0] == error
        assert c.find("a") is not None  # the previous keys stay
        assert await c.find_or_refetch("b") is None  # an unknown kid gets an answer
        server.raw = None
        server.document = jwks(("a", KEY_A[1]), ("b", KEY_B[1]))
        await async_wait_for(lambda: c.find("b") is not None, what="key b after recovery")
        assert c.last_error is None
    finally:
        await c.close()


def test_failed_fetches_back_off_up_to_the_refresh_period() -> None:
    assert [retry_delay_s(n, 30, 300) for n in range(6)] == [300, 30, 60, 120, 240, 300]
    assert retry_delay_s(10_000, 0.5, 300) == 300
    assert retry_delay_s(1, 30, 10) == 10  # never slower than the normal refresh
