"""The gateway verifying tokens against a JWKS endpoint, with key rotation by kid."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from tests.conftest import launch_gateway
from tests.integration.test_gateway_core import refused
from tests.integration.wsclient import WsClient


def jwk(public_pem: bytes, kid: str) -> dict[str, object]:
    key = serialization.load_pem_public_key(public_pem)
    data = json.loads(RSAAlgorithm.to_jwk(key))  # type: ignore[arg-type]
    data.update(kid=kid, use="sig", alg="RS256")
    return data


class JwksServer:
    """A real JWKS endpoint on loopback, in its own thread and loop (the test loop blocks)."""

    def __init__(self, keys: list[dict[str, object]]) -> None:
        self.served: dict[str, object] = {"keys": keys}
        self.hits = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    async def _start(self) -> None:
        async def jwks(request: web.Request) -> web.Response:
            self.hits += 1
            return web.json_response(self.served)

        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self) -> JwksServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.runner is not None
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def test_jwks_rotation_by_kid(tmp_path: Path, nats_server: EmbeddedNats) -> None:
    priv_a, pub_a = generate_keypair("rsa")
    priv_b, pub_b = generate_keypair("rsa")
    with JwksServer([jwk(pub_a, "a")]) as server:
        await rotation(tmp_path, nats_server, server, priv_a, pub_a, priv_b, pub_b)


async def rotation(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    server: JwksServer,
    priv_a: bytes,
    pub_a: bytes,
    priv_b: bytes,
    pub_b: bytes,
) -> None:
    port = server.port
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_server.url,
        JWT_JWKS_URL=f"http://127.0.0.1:{port}/jwks.json",
        FANOUT_JWT_JWKS_REFETCH_INTERVAL_S="0.5",
    )
    try:
        token_a = make_token(
            private_key_pem=priv_a, sub="a", subjects=["xy.md.>"], ttl_s=300, kid="a"
        )
        client = await WsClient.connect(gateway.ws, token_a)
        assert (await client.recv())["op"] == "welcome"
        await client.close()

        server.served["keys"] = [jwk(pub_a, "a"), jwk(pub_b, "b")]
        token_b = make_token(
            private_key_pem=priv_b, sub="b", subjects=["xy.md.>"], ttl_s=300, kid="b"
        )
        before = server.hits
        client = await WsClient.connect(gateway.ws, token_b)
        assert (await client.recv())["op"] == "welcome"
        await client.close()
        assert server.hits == before + 1  # the unknown kid caused exactly one refetch

        forged = make_token(
            private_key_pem=priv_b, sub="x", subjects=["xy.md.>"], ttl_s=300, kid="a"
        )
        status, body = refused(gateway.port, token=forged)
        assert (status, body["code"]) == (401, "XYW005")
        unknown = make_token(private_key_pem=priv_b, sub="x", subjects=[], ttl_s=300, kid="zzz")
        status, body = refused(gateway.port, token=unknown)
        assert (status, body["code"]) == (401, "XYW005")
    finally:
        gateway.stop()
