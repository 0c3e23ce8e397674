"""fanout.service without NATS: the chain, the request object, the built-in interceptors."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import msgspec
import pytest

from fanout.core import metadata as md
from fanout.core.interceptors import BreakerState
from fanout.devtoken import generate_keypair, make_token
from fanout.service import (
    CircuitBreaker,
    JwtAuth,
    Next,
    RateLimit,
    Reply,
    Request,
    RequestContext,
    ServiceError,
    rate_identity,
)
from fanout.service.builder import _compose, _encode_result


def make_request(
    raw: bytes = b"{}",
    headers: Mapping[str, str] | None = None,
    endpoint: str = "svc.orders.get",
) -> Request:
    headers = dict(headers or {})
    return Request(endpoint, endpoint, raw, headers, md.from_headers(headers), RequestContext())


def meta_headers(**kw: Any) -> dict[str, str]:
    meta = md.MessageMetadata(
        message_id=md.new_ulid(), timestamp=md.iso_timestamp(1_700_000_000), **kw
    )
    return md.to_headers(meta)


async def echo(req: Request) -> Any:
    return {"got": req.data}


# -- the chain ------------------------------------------------------------------------------------
async def test_interceptors_run_in_the_order_added() -> None:
    log: list[str] = []

    def tag(name: str) -> Any:
        async def interceptor(req: Request, call_next: Next) -> Any:
            log.append(f"{name} in")
            result = await call_next(req)
            log.append(f"{name} out")
            return result

        return interceptor

    async def handler(req: Request) -> str:
        log.append("handler")
        return "done"

    chain = _compose([tag("a"), tag("b")], handler)
    assert await chain(make_request()) == "done"
    assert log == ["a in", "b in", "handler", "b out", "a out"]


async def test_an_interceptor_can_short_circuit_and_enrich() -> None:
    called = False

    async def deny(req: Request, call_next: Next) -> Any:
        raise ServiceError("403", "tenant suspended")

    async def handler(req: Request) -> Any:
        nonlocal called
        called = True

    with pytest.raises(ServiceError) as err:
        await _compose([deny], handler)(make_request())
    assert (err.value.code, err.value.message, called) == ("403", "tenant suspended", False)

    async def tenant(req: Request, call_next: Next) -> Any:
        req.context.values["tenant"] = "acme"
        return await call_next(req)

    async def read(req: Request) -> Any:
        return req.context.values["tenant"]

    assert await _compose([tenant], read)(make_request()) == "acme"


def test_results_are_encoded_as_json_or_bytes() -> None:
    assert _encode_result({"a": [1, 2]}) == (b'{"a":[1,2]}', None)
    assert _encode_result(None) == (b"null", None)
    assert _encode_result(b"\x00raw") == (b"\x00raw", None)
    assert _encode_result(Reply({"ok": True}, {"X-Cache": "hit"})) == (
        b'{"ok":true}',
        {"X-Cache": "hit"},
    )
    with pytest.raises(TypeError, match="JSON"):
        _encode_result(object())


def test_request_data_and_decode() -> None:
    assert make_request(b'{"id": 7}').data == {"id": 7}
    assert make_request(b"").data is None
    with pytest.raises(ServiceError) as err:
        _ = make_request(b"{nope").data
    assert err.value.code == "400"

    class Query(msgspec.Struct):
        id: int

    assert make_request(b'{"id": 7}').decode(Query) == Query(7)
    with pytest.raises(ServiceError) as err:
        make_request(b'{"id": "seven"}').decode(Query)
    assert err.value.code == "400" and "$.id" in err.value.message


def test_server_fault() -> None:
    assert ServiceError("500", "x").server_fault
    assert ServiceError("oops", "x").server_fault
    assert not ServiceError("404", "x").server_fault


# -- rate limit -----------------------------------------------------------------------------------
def test_rate_identity_fallbacks() -> None:
    req = make_request(headers=meta_headers(principal="alice", conn="c-1"))
    assert rate_identity(req) == ("principal:alice", "gateway_principal")
    req.context.principal = None
    req = make_request(headers=meta_headers(conn="c-1"))
    assert rate_identity(req) == ("conn:c-1", "gateway_conn")
    assert rate_identity(make_request()) == ("anonymous", "anonymous")


async def test_rate_limit_per_principal_and_recovery() -> None:
    now = [0.0]
    limit = RateLimit(rate=2, burst=2, clock=lambda: now[0])
    alice = make_request(headers=meta_headers(principal="alice"))
    bob = make_request(headers=meta_headers(principal="bob"))
    assert await limit(alice, echo) == {"got": {}}
    assert await limit(alice, echo) == {"got": {}}
    with pytest.raises(ServiceError) as err:
        await limit(alice, echo)
    assert err.value.code == "429" and "500 ms" in err.value.message
    assert await limit(bob, echo) == {"got": {}}
    now[0] = 0.5
    assert await limit(alice, echo) == {"got": {}}


async def test_rate_limit_per_service_shares_one_bucket() -> None:
    limit = RateLimit(rate=1, burst=1, per="service", clock=lambda: 0.0)
    await limit(make_request(headers=meta_headers(principal="alice")), echo)
    with pytest.raises(ServiceError):
        await limit(make_request(headers=meta_headers(principal="bob")), echo)
    with pytest.raises(ValueError):
        RateLimit(rate=1, burst=1, per="tenant")  # type: ignore[arg-type]


# -- circuit breaker ------------------------------------------------------------------------------
async def test_breaker_opens_rejects_and_recovers() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_after=5.0, clock=lambda: now[0])
    calls = 0
    healthy = False

    async def flaky(req: Request) -> Any:
        nonlocal calls
        calls += 1
        if not healthy:
            raise ServiceError("500", "database down")
        return "ok"

    async def bad_input(req: Request) -> Any:
        raise ServiceError("404", "no such order")

    for _ in range(3):  # 4xx is the caller's fault: the breaker stays closed
        with pytest.raises(ServiceError):
            await breaker(make_request(), bad_input)
    for _ in range(2):
        with pytest.raises(ServiceError):
            await breaker(make_request(), flaky)
    assert breaker.board.state("svc.orders.get") == BreakerState.OPEN
    with pytest.raises(ServiceError) as err:
        await breaker(make_request(), flaky)
    assert err.value.code == "503" and "5000 ms" in err.value.message
    assert calls == 2
    now[0] = 5.0
    healthy = True
    assert await breaker(make_request(), flaky) == "ok"
    assert breaker.board.state("svc.orders.get") == BreakerState.CLOSED
    other = make_request(endpoint="svc.orders.list")
    assert breaker.board.state(other.endpoint) == BreakerState.CLOSED


async def test_breaker_counts_handler_timeouts() -> None:
    breaker = CircuitBreaker(failures=1, reset_after=60.0, timeout=0.01)

    async def slow(req: Request) -> Any:
        await asyncio.sleep(1)  # waits on: a handler slower than the breaker's timeout

    with pytest.raises(ServiceError) as err:
        await breaker(make_request(), slow)
    assert err.value.code == "504"
    assert breaker.board.state("svc.orders.get") == BreakerState.OPEN

    async def own_timeout(req: Request) -> Any:
        raise TimeoutError("from the handler itself")

    with pytest.raises(TimeoutError):
        await CircuitBreaker(timeout=5.0)(make_request(), own_timeout)


# -- message-level JWT ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return generate_keypair("ec")


async def test_jwt_auth(keys: tuple[bytes, bytes]) -> None:
    private, public = keys
    auth = JwtAuth(public_key=public.decode(), audience="orders")
    good = make_token(
        private_key_pem=private, sub="alice", subjects=[], ttl_s=60, audience="orders"
    )
    req = make_request(headers=meta_headers(authentication=md.JwtAuthentication(good)))

    async def who(r: Request) -> Any:
        return r.context.principal.sub if r.context.principal else None

    assert await auth(req, who) == "alice"

    wrong_aud = make_token(private_key_pem=private, sub="alice", subjects=[], ttl_s=60)
    other_key = make_token(
        private_key_pem=generate_keypair("ec")[0],
        sub="alice",
        subjects=[],
        ttl_s=60,
        audience="orders",
    )
    for token, reason in ((wrong_aud, "wrong audience"), (other_key, "invalid signature")):
        bad = make_request(headers=meta_headers(authentication=md.JwtAuthentication(token)))
        with pytest.raises(ServiceError) as err:
            await auth(bad, who)
        assert (err.value.code, err.value.message) == ("401", reason)
        assert token not in err.value.message

    with pytest.raises(ServiceError) as err:
        await auth(make_request(headers=meta_headers()), who)
    assert (err.value.code, err.value.message) == ("401", "a bearer token is required")
    optional = JwtAuth(public_key=public.decode(), audience="orders", required=False)
    assert await optional(make_request(headers=meta_headers()), who) is None

    bare = make_request(headers={"Authorization": f"Bearer {good}"})  # no fanout metadata
    assert bare.metadata is None
    assert await auth(bare, who) == "alice"
    with pytest.raises(ServiceError):
        await auth(make_request(headers={"Authorization": "Basic x"}), who)


def test_jwt_auth_needs_one_key_source(keys: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError):
        JwtAuth()
    with pytest.raises(ValueError):
        JwtAuth(public_key=keys[1].decode(), jwks_url="http://127.0.0.1:1/jwks")
