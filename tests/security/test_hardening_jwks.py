"""A hostile JWKS endpoint (issue 14 item 6): malformed documents never stop key refresh.

The gateway verifies tokens against a JWKS URL served from this process. A
document with a wrong-typed field (``"alg": ["RS256"]``, a TypeError while
parsing) or nested 100 000 levels deep (a RecursionError) used to end the
background refresh for good, and a handshake with an unknown ``kid`` then
never got an answer. Now each is a failed fetch: logged, counted, retried with
backoff, the previous keys stay; the handshake gets 401 ``XYW005``; a good
document again is picked up by the refresh.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

from fanout.embedded_nats import free_port
from tests.conftest import Gateway, metric
from tests.helpers import async_wait_for
from tests.security.hostile import Neighbour, Signer, handshake

pytestmark = pytest.mark.asyncio(loop_scope="module")

JWKS_PORT = free_port()
GATEWAY_ENV = {
    "JWT_PUBLIC_KEY": "",
    "JWT_JWKS_URL": f"http://127.0.0.1:{JWKS_PORT}/jwks.json",
    "FANOUT_JWT_JWKS_REFETCH_INTERVAL_S": "0.2",
    "FANOUT_JWT_JWKS_REFRESH_S": "1",
}


class JwksServer:
    """A JWKS endpoint on loopback in its own thread (the gateway is another process)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.body = b""
        self.hits = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _start(self) -> None:
        async def serve(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(body=self.body, content_type="application/json")

        app = web.Application()
        app.router.add_get("/jwks.json", serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def jwk(public_pem: bytes, kid: str, **over: Any) -> dict[str, Any]:
    key = serialization.load_pem_public_key(public_pem)
    entry: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key))  # type: ignore[arg-type]
    entry.update({"kid": kid, "use": "sig", "alg": "RS256", **over})
    return entry


def document(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


@pytest.fixture(scope="module", autouse=True)
def jwks_server(keypair: tuple[Path, Path]) -> Iterator[JwksServer]:
    """Started before the module's gateway (autouse), serving the signer's key as ``k1``."""
    server = JwksServer(JWKS_PORT)
    server.body = document(jwk(keypair[1].read_bytes(), "k1"))
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("wrong_type", id="alg-as-a-list"),
        pytest.param("deep", id="nested-100000-levels"),
    ],
)
async def test_malformed_jwks_is_a_failed_fetch_and_handshakes_still_get_answers(
    gw: Gateway,
    neighbour: Neighbour,
    jwks_server: JwksServer,
    signer: Signer,
    bad: str,
) -> None:
    public = signer.public_pem
    good = jwks_server.body
    failures = await asyncio.to_thread(metric, gw, "fanout_jwks_fetch_failures_total")
    if bad == "wrong_type":
        jwks_server.body = document(jwk(public, "k1", alg=["RS256"]))
    else:
        jwks_server.body = b'{"keys":' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def failed_twice_more() -> bool:
        return metric(gw, "fanout_jwks_fetch_failures_total") >= failures + 2

    # the background refresh fetches the bad document, and keeps fetching: each a counted failure
    await async_wait_for(
        lambda: asyncio.to_thread(failed_twice_more), what="two more failed fetches"
    )

    new_kid = f"new-{bad}"  # a kid no earlier case has served
    unknown_kid = signer.token(headers={"kid": new_kid})
    reply = await handshake(gw.port, token=unknown_kid)  # answered within 5 s, never hangs
    reply.close()
    assert reply.status == 401, (reply.status, reply.body)
    assert reply.json()["code"] == "XYW005"
    known = await handshake(gw.port, token=signer.token(headers={"kid": "k1"}))
    known.close()
    assert known.status == 101  # the previous keys stay in use

    jwks_server.body = document(jwk(public, "k1"), jwk(public, new_kid))

    async def new_kid_accepted() -> bool:
        again = await handshake(gw.port, token=signer.token(headers={"kid": new_kid}))
        again.close()
        return again.status == 101

    # the refresh recovers (backoff capped at refresh_s = 1 s); each poll is one handshake
    await async_wait_for(new_kid_accepted, 20, "the new kid accepted", interval=0.3)
    jwks_server.body = good
    await neighbour.check()
