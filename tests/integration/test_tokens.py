"""Tokens on live connections: expires_at, the expiring notice, 4005, the auth op, revocation.

Real gateway, real nats-server, real clocks: token lifetimes are a few seconds
so the sweep (once a second) is what the tests observe.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, launch_gateway
from tests.helpers import async_wait_for
from tests.integration.test_gateway_core import refused
from tests.integration.wsclient import ConnectionClosed, WsClient

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("tokens")
    denylist = d / "denylist.txt"
    denylist.write_text("revoked-1\n")
    gateway = launch_gateway(
        d,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_JWT_LEEWAY_S="0",
        FANOUT_JWT_EXPIRING_LEAD_S="3",
        FANOUT_JWT_DENYLIST_PATH=str(denylist),
    )
    yield gateway
    gateway.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


def tok(keypair: tuple[Path, Path], sub: str, ttl: int, subjects: list[str] | None = None) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(),
        sub=sub,
        subjects=subjects or ["xy.md.>"],
        ttl_s=ttl,
    )


def claims(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return data


async def delivered(nc: NatsClient, client: WsClient, subject: str) -> bool:
    """Does a message published now on ``subject`` reach ``client`` (probing for 2 s)?"""
    marker = os.urandom(4).hex()
    try:
        async with asyncio.timeout(2.5):
            while True:
                await nc.publish(subject, json.dumps({"m": marker}).encode())
                try:
                    frame = await client.expect(lambda f: f.get("op") == "msg", timeout=0.2)
                except TimeoutError:
                    continue
                if frame["data"].get("m") == marker:
                    return True
    except TimeoutError:
        return False


async def test_expiring_notice_then_4005(gw: Gateway, keypair: tuple[Path, Path]) -> None:
    token = tok(keypair, "short", ttl=4)
    exp = claims(token)["exp"]
    client = await WsClient.connect(gw.ws, token)
    try:
        welcome = await client.recv()
        assert welcome["expires_at"] == exp
        notice = await client.expect(lambda f: f.get("op") == "expiring", timeout=10)
        assert notice == {"op": "expiring", "expires_at": exp}
        assert await client.closed_code(timeout=15) == 4005
        assert time.time() >= exp  # not before the token's own expiry (leeway 0)
    finally:
        await client.close()


async def test_auth_renews_and_reapplies_the_acl(
    gw: Gateway, keypair: tuple[Path, Path], nc: NatsClient
) -> None:
    client = await WsClient.connect(gw.ws, tok(keypair, "renew", ttl=3))
    try:
        await client.recv()
        assert await client.subscribe("xy.md.keep.x", 1) == {"op": "ack", "id": 1}
        assert await client.subscribe("xy.md.lose.x", 2) == {"op": "ack", "id": 2}
        fresh = tok(keypair, "renew", ttl=600, subjects=["xy.md.keep.>"])
        await client.send({"op": "auth", "id": 3, "token": fresh})
        lost = await client.expect(lambda f: f.get("op") == "unsubscribed")
        assert lost == {"op": "unsubscribed", "subject": "xy.md.lose.x", "code": "XYW002"}
        ack = await client.expect(lambda f: f.get("id") == 3)
        assert ack == {"op": "ack", "id": 3, "expires_at": claims(fresh)["exp"]}
        await asyncio.sleep(3.5)  # waits on: past the first token's expiry, the new one rules
        assert (await client.op({"op": "ping", "id": 4}))["op"] == "pong"
        assert await delivered(nc, client, "xy.md.keep.x")
        assert not await delivered(nc, client, "xy.md.lose.x")
        denied = await client.op({"op": "sub", "id": 5, "subject": "xy.md.lose.y"})
        assert denied["code"] == "XYW002"
    finally:
        await client.close()


async def test_renewal_inside_the_lead_time_is_not_nagged_every_second(
    gw: Gateway, keypair: tuple[Path, Path]
) -> None:
    """A fresh token that itself expires within the lead time gets no new `expiring` storm."""
    client = await WsClient.connect(gw.ws, tok(keypair, "nag", ttl=2))
    try:
        await client.recv()
        await client.expect(lambda f: f.get("op") == "expiring", timeout=10)
        await client.send({"op": "auth", "id": 1, "token": tok(keypair, "nag", ttl=3)})
        assert (await client.expect(lambda f: f.get("id") == 1))["op"] == "ack"
        frames = []
        with pytest.raises(ConnectionClosed) as closed:  # read everything until the 4005
            for _ in range(1_000):
                frames.append(await client.recv(timeout=15))
        assert closed.value.code == 4005
        assert [f for f in frames if f.get("op") == "expiring"] == []
    finally:
        await client.close()


@pytest.mark.parametrize(
    "case",
    ["different sub", "expired token", "revoked jti", "garbage"],
)
async def test_refused_auth_keeps_the_old_token(
    case: str, gw: Gateway, keypair: tuple[Path, Path]
) -> None:
    client = await WsClient.connect(gw.ws, tok(keypair, "alice", ttl=600))
    try:
        await client.recv()
        new = {
            "different sub": tok(keypair, "mallory", ttl=600),
            "expired token": make_token(
                private_key_pem=keypair[0].read_bytes(),
                sub="alice",
                subjects=["xy.md.>"],
                ttl_s=60,
                now=time.time() - 600,
            ),
            "revoked jti": _with_jti(keypair, "revoked-1"),
            "garbage": "not-a-token",
        }[case]
        reply = await client.op({"op": "auth", "id": 9, "token": new})
        assert (reply["op"], reply["code"], reply["id"]) == ("error", "XYW005", 9)
        assert (await client.op({"op": "ping", "id": 10}))["op"] == "pong"
        assert (await client.subscribe("xy.md.still", 11))["op"] == "ack"
    finally:
        await client.close()


def _with_jti(keypair: tuple[Path, Path], jti: str) -> str:
    import jwt as pyjwt

    now = int(time.time())
    return pyjwt.encode(
        {"sub": "alice", "subjects": ["xy.md.>"], "iat": now, "exp": now + 600, "jti": jti},
        keypair[0].read_bytes(),
        "RS256",
    )


async def test_revoked_jti_refused_at_the_handshake(
    gw: Gateway, keypair: tuple[Path, Path]
) -> None:
    status, body = await asyncio.to_thread(refused, gw.port, token=_with_jti(keypair, "revoked-1"))
    assert (status, body) == (401, {"code": "XYW005", "message": "token revoked"})


async def test_leeway_accepts_then_closes_at_exp_plus_leeway(
    tmp_path: Path, nats_module: EmbeddedNats, keypair: tuple[Path, Path]
) -> None:
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_JWT_LEEWAY_S="4",
    )
    try:
        token = make_token(
            private_key_pem=keypair[0].read_bytes(),
            sub="skewed",
            subjects=["xy.md.>"],
            ttl_s=60,
            now=time.time() - 61,
        )
        exp = claims(token)["exp"]
        assert isinstance(exp, int) and exp < time.time()
        client = await WsClient.connect(gateway.ws, token)
        try:
            assert (await client.recv())["expires_at"] == exp
            assert await client.closed_code(timeout=15) == 4005
            assert time.time() >= exp + 4
        finally:
            await client.close()
        status, body = refused(
            gateway.port,
            token=make_token(
                private_key_pem=keypair[0].read_bytes(),
                sub="late",
                subjects=[],
                ttl_s=60,
                now=time.time() - 65,
            ),
        )
        assert (status, body["code"]) == (401, "XYW005")
    finally:
        gateway.stop()


async def test_anonymous_may_authenticate_once(
    tmp_path: Path, nats_module: EmbeddedNats, keypair: tuple[Path, Path]
) -> None:
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_WS_AUTH_REQUIRED="false",
    )
    try:
        client = await WsClient.connect(gateway.ws)
        try:
            assert (await client.recv())["expires_at"] is None
            first = tok(keypair, "carol", ttl=600)
            ack = await client.op({"op": "auth", "id": 1, "token": first})
            assert ack == {"op": "ack", "id": 1, "expires_at": claims(first)["exp"]}
            other = await client.op({"op": "auth", "id": 2, "token": tok(keypair, "dave", ttl=600)})
            assert (other["code"], other["id"]) == ("XYW005", 2)
            again = tok(keypair, "carol", ttl=900)
            assert (await client.op({"op": "auth", "id": 3, "token": again}))[
                "expires_at"
            ] == claims(again)["exp"]
        finally:
            await client.close()
    finally:
        gateway.stop()


async def test_sighup_reloads_the_denylist(
    tmp_path: Path, nats_module: EmbeddedNats, keypair: tuple[Path, Path]
) -> None:
    denylist = tmp_path / "denylist.txt"
    denylist.write_text("")
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_JWT_DENYLIST_PATH=str(denylist),
    )
    try:
        token = _with_jti(keypair, "stolen-42")
        client = await WsClient.connect(gateway.ws, token)
        try:
            await client.recv()
            denylist.write_text("# incident 7\nstolen-42\n")
            assert gateway.proc is not None
            os.kill(gateway.proc.pid, signal.SIGHUP)
            assert await client.closed_code(timeout=15) == 1012
        finally:
            await client.close()
        status, body = await async_wait_for(
            lambda: a if (a := refused(gateway.port, token=token))[0] != 503 else None,
            20,
            "the reloaded worker to answer",
            interval=0.2,
        )
        assert (status, body) == (401, {"code": "XYW005", "message": "token revoked"})
    finally:
        gateway.stop()
