"""Overload: load shedding (new handshakes 503, /readyz 503, existing clients stay) and a
worker that runs out of file descriptors (503 while full, never a crash on EMFILE).

Each test needs its own gateway configuration, so each starts its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get
from tests.helpers import async_wait_for, wait_for
from tests.security.hostile import (
    Neighbour,
    Signer,
    connect_raw,
    handshake,
    start_gateway,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def shedding_gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    """RSS over a 1-byte threshold from the first sample on; that sample comes 3 s after start."""
    gw = start_gateway(
        tmp_path_factory.mktemp("shed"),
        nats_module.url,
        keypair[1],
        FANOUT_SERVER_SHED_RSS_BYTES="1",
        FANOUT_SERVER_HEARTBEAT_INTERVAL_S="3",
    )
    yield gw
    gw.stop()


async def test_load_shedding_refuses_new_handshakes_and_keeps_clients(
    shedding_gw: Gateway, nc: NatsClient, signer: Signer
) -> None:
    early = Neighbour(nc, "xy.md.shed.feed")
    await early.start(shedding_gw.port, signer.token(sub="early"))
    try:
        await async_wait_for(
            lambda: http_get(shedding_gw.http + "/readyz")[0] == 503, 30, "shedding", interval=0.2
        )
        status, body, _ = http_get(shedding_gw.http + "/readyz")
        assert status == 503
        assert json.loads(body) == {
            "ready": False,
            "code": "XYW007",
            "message": "overloaded: shedding new connections",
        }
        reply = await handshake(shedding_gw.port, token=signer.token())
        reply.close()
        assert reply.status == 503
        assert reply.json() == {"code": "XYW007", "message": "gateway is overloaded"}
        assert reply.headers["retry-after"] == "5"
        await early.check(count=20)
        _, metrics, _ = http_get(shedding_gw.admin + "/metrics")
        text = metrics.decode()
        assert re.search(r"^fanout_load_shedding 1\.0$", text, re.M)
        assert re.search(r'^fanout_limit_refusals_total\{limit="shedding"\} [1-9]', text, re.M)
        assert '"shedding new handshakes"' in shedding_gw.logs()
    finally:
        await early.stop()


NOFILE = 200
HEADROOM = 64


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@pytest.fixture(scope="module")
def fd_starved_gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("fds"),
        nats_module.url,
        keypair[1],
        start=False,
        FANOUT_SERVER_FD_HEADROOM=str(HEADROOM),
        FANOUT_SERVER_HANDSHAKE_RATE_PER_IP="0",
        FANOUT_SERVER_MAX_CONNECTIONS_PER_IP="0",
    )
    assert gw.log_path is not None
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", *gw.args],
        env=gw.env,
        stdout=gw.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_low_nofile,
    )
    proc = gw.proc

    def ready() -> bool:
        assert proc.poll() is None, gw.logs()
        return _ready(gw)

    wait_for(ready, 30, "the fd-starved gateway to be ready")
    yield gw
    gw.stop()


def _ready(gw: Gateway) -> bool:
    try:
        return http_get(gw.http + "/readyz", 1.0)[0] == 200
    except OSError:
        return False


async def test_fd_limit_caps_connections_and_emfile_never_crashes(
    fd_starved_gw: Gateway, signer: Signer
) -> None:
    gw = fd_starved_gw
    cap = NOFILE - HEADROOM
    assert '"server.max_connections clamped below the file-descriptor limit"' in gw.logs()
    _, body, _ = http_get(gw.admin + "/healthz")
    pid = json.loads(body)["workers"][0]["pid"]
    held = []
    try:
        for _ in range(cap):
            held.append(await handshake(gw.port, token=signer.token()))
        assert [r.status for r in held] == [101] * cap
        full = await handshake(gw.port, token=signer.token())
        full.close()
        assert (full.status, full.json()["code"]) == (503, "XYW007")
        assert full.json()["message"] == "worker is full"
        # Now exhaust the worker's descriptors with sockets that never say a word.
        idle = [await connect_raw(gw.port) for _ in range(HEADROOM + 40)]
        await async_wait_for(  # accept() hits EMFILE
            lambda: len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE - 2, 20, "the fds exhausted"
        )
        for _, writer in idle:
            writer.transport.abort()
        for r in held[:10]:
            r.close()

        async def accepted_again() -> bool:
            try:
                fresh = await handshake(gw.port, token=signer.token())
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                return False
            fresh.close()
            return fresh.status == 101

        await async_wait_for(accepted_again, 30, "a handshake accepted again", interval=0.2)
    finally:
        for r in held:
            r.close()
    _, body, _ = http_get(gw.admin + "/healthz")
    assert json.loads(body)["workers"][0]["pid"] == pid  # the same worker: it never crashed
    _, metrics, _ = http_get(gw.admin + "/metrics")
    assert re.search(rf"^fanout_connection_cap {cap}\.0$", metrics.decode(), re.M)
    assert not re.search(r"^fanout_worker_restarts_total\{[^}]*\} [1-9]", metrics.decode(), re.M)
