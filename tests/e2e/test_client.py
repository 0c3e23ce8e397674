"""fanout.js in real headless Chromium against real gateways and a real nats-server.

The demo page under a 10 000 msgs/s flood, the client's API used standalone
from a test page, and the token cases: a bad token backs off instead of
hammering, an expired one ends in 4005 + ``authfailed``, and ``expiring`` is
answered with an ``auth`` round trip on the same connection.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import jwt
import nats
import pytest
import pytest_asyncio
from playwright.async_api import Page, Route

from fanout.devtoken import generate_keypair, make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import ROOT, Gateway, launch_gateway
from tests.e2e.helpers import COUNT_SOCKETS, RECORD_EVENTS, counter, demo_view

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

FLOOD_RATE = 10_000  # messages per second
FLOOD_S = 3.0
FLOOD_SYMBOLS = 20
BURST_MS = 50  # the publisher sends in bursts of 500: more than one outbox holds
OUTBOX = 200  # small per-client outbox, so a flood makes the gateway drop (and say so)

#: A page of the gateway's origin that only loads the client module as ``window.fanout``.
TEST_PAGE = "/e2e-client.html"
TEST_HTML = """<!doctype html><meta charset="utf-8"><title>fanout.js e2e</title>
<script type="module">
import * as fanout from "/fanout.js";
window.fanout = fanout;
</script>"""


@pytest.fixture(scope="module")
def nats_srv() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture(scope="module")
def anon_gw(nats_srv: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("anon"),
        "--workers",
        "1",
        NATS_URLS=nats_srv.url,
        FANOUT_WS_AUTH_REQUIRED="false",
        FANOUT_OUTBOX_MAX_MESSAGES=str(OUTBOX),
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def auth_gw(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = launch_gateway(
        tmp_path_factory.mktemp("auth"),
        "--workers",
        "1",
        NATS_URLS=nats_srv.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_JWT_EXPIRING_LEAD_S="3600",
        FANOUT_JWT_LEEWAY_S="0",
    )
    yield gw
    gw.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def nc(nats_srv: EmbeddedNats) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(nats_srv.url)
    yield client
    await client.close()


def token_for(keypair: tuple[Path, Path], ttl_s: int) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="e2e", subjects=["xy.md.>"], ttl_s=ttl_s
    )


def exp_of(token: str) -> int:
    exp: int = jwt.decode(token, options={"verify_signature": False})["exp"]
    return exp


async def open_test_page(page: Page, gw: Gateway) -> None:
    async def serve(route: Route) -> None:
        await route.fulfill(status=200, content_type="text/html", body=TEST_HTML)

    await page.route(gw.http + TEST_PAGE, serve)
    await page.goto(gw.http + TEST_PAGE)
    await page.wait_for_function("() => window.fanout !== undefined", timeout=5_000)


async def until_received(
    nc: nats.aio.client.Client, page: Page, subject: str, seen: str, timeout_s: float = 5.0
) -> None:
    """Publish probes until the page's ``seen`` expression is true (the gateway's SUB is async)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await nc.publish(subject, b'{"probe":true}')
        await nc.flush()
        try:
            await page.wait_for_function(seen, timeout=200)
            return
        except TimeoutError:
            continue
    raise AssertionError(f"no probe on {subject} reached the page in {timeout_s} s")


