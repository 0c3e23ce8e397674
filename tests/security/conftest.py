"""One gateway, one NATS server and one well-behaved neighbour per test module.

A module may set ``GATEWAY_ENV`` (a dict of extra settings) for its gateway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get
from tests.helpers import wait_for
from tests.security.hostile import Neighbour, Signer, start_gateway


@pytest.fixture(autouse=True)
def leaves_the_gateway_ready(request: pytest.FixtureRequest) -> Iterator[None]:
    """A case that overloads the module's shared gateway (a stalled loop sheds new
    handshakes) must not fail the next case, whichever it is: after each test, the
    gateway is ready again (or the test that left it overloaded errors in teardown)."""
    yield
    if "gw" in request.fixturenames:
        gateway: Gateway = request.getfixturevalue("gw")
        wait_for(
            lambda: http_get(gateway.http + "/readyz")[0] == 200,
            30,
            "the shared gateway to be ready again",
        )


@pytest.fixture(scope="session")
def signer(keypair: tuple[Path, Path]) -> Signer:
    private, public = keypair
    return Signer(private.read_bytes(), public.read_bytes())


@pytest.fixture(scope="module")
def gw(
    request: pytest.FixtureRequest,
    nats_module: EmbeddedNats,
    keypair: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    env = getattr(request.module, "GATEWAY_ENV", {})
    gateway = start_gateway(tmp_path_factory.mktemp("gw"), nats_module.url, keypair[1], **env)
    yield gateway
    gateway.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nc(nats_module: EmbeddedNats) -> AsyncIterator[NatsClient]:
    client = await nats.connect(nats_module.url)
    yield client
    await client.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def neighbour(gw: Gateway, nc: NatsClient, signer: Signer) -> AsyncIterator[Neighbour]:
    n = Neighbour(nc, "xy.md.neighbour.feed")
    await n.start(gw.port, signer.token(sub="neighbour", jti="neighbour-jti"))
    await n.check()
    yield n
    await n.check()
    await n.stop()
