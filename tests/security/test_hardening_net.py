"""Hardening, round 2 (issue 14: the worker and network items).

Each case attacks a real `fanout serve` and then checks that a well-behaved
neighbour on the same worker still receives every message, in order. Most
cases need a gateway configured for them alone, so each starts its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from fanout import runtime
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get
from tests.security.hostile import (
    Neighbour,
    Signer,
    connect_raw,
    start_gateway,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


def worker_pid(gw: Gateway) -> int:
    _, body, _ = http_get(gw.http + "/healthz")
    pid: int = json.loads(body)["workers"][0]["pid"]
    return pid


def metrics_text(gw: Gateway) -> str:
    return http_get(gw.http + "/metrics")[1].decode()


def metric_value(text: str, series: str) -> float:
    """The value of one exact series line (``name{labels}``), 0 when absent."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def launch_with_nofile(gw: Gateway, nofile: int) -> None:
    """Start ``gw`` with RLIMIT_NOFILE = ``nofile`` (soft and hard) for the whole tree."""

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    assert gw.log_path is not None
    gw.proc = subprocess.Popen(
        [sys.executable, "-m", "fanout.cli", "serve", *gw.args],
        env=gw.env,
        stdout=gw.log_path.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=low_nofile,
    )
    deadline = time.monotonic() + 20
    while True:
        assert gw.proc.poll() is None and time.monotonic() < deadline, gw.logs()
        try:
            if http_get(gw.http + "/readyz", 1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)


async def wait_for(what: str, predicate: object, timeout: float = 15.0) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` after ``timeout``."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


# -- 1. fd exhaustion must not stop the worker's periodic task ---------------------------------
NOFILE = 200
HEARTBEAT_S = 0.5


@pytest.fixture(scope="module")
def fd_gw(
    nats_mod: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Gateway, Path]]:
    """A 200-fd gateway whose state directory we can read (TMPDIR), silent sockets kept 60 s."""
    base = tmp_path_factory.mktemp("fd-exhaust")
    tmpdir = base / "run"
    tmpdir.mkdir()
    gw = start_gateway(
        base,
        nats_mod.url,
        keypair[1],
        start=False,
        TMPDIR=str(tmpdir),
        FANOUT_SERVER_FD_HEADROOM="64",
        FANOUT_SERVER_HANDSHAKE_RATE_PER_IP="0",
        FANOUT_SERVER_MAX_CONNECTIONS_PER_IP="0",
        FANOUT_SERVER_HANDSHAKE_TIMEOUT_S="60",
        FANOUT_SERVER_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_S),
        FANOUT_SERVER_WORKER_TIMEOUT_S="5",
    )
    launch_with_nofile(gw, NOFILE)
    (state_dir,) = tmpdir.glob("fanout-*")
    yield gw, state_dir
    gw.stop()


def heartbeat_at(state_dir: Path, pid: int) -> float:
    state = runtime.read_state(state_dir, pid)
    return state.heartbeat_at if state is not None else 0.0


async def test_fd_exhaustion_keeps_the_worker_beating_and_serving(
    fd_gw: tuple[Gateway, Path], nc: NatsClient, signer: Signer
) -> None:
    gw, state_dir = fd_gw
    pid = worker_pid(gw)
    neighbour = Neighbour(nc, "xy.md.fd.neighbour")
    await neighbour.start(gw.port, signer.token(sub="fd-neighbour"))
    silent = []
    try:
        for _ in range(NOFILE + 50):
            silent.append(await connect_raw(gw.port))
            if len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE - 1:
                break
        # more than fit: accept() hits EMFILE, so not one descriptor is left over
        silent += [await connect_raw(gw.port) for _ in range(20)]
        await wait_for("a full fd table", lambda: len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE)
        full_since = heartbeat_at(state_dir, pid)
        # three heartbeats while the table stays full: the heartbeat needs no new fd
        await wait_for(
            "heartbeats with the fd table full",
            lambda: heartbeat_at(state_dir, pid) >= full_since + 3 * HEARTBEAT_S,
        )
        assert len(os.listdir(f"/proc/{pid}/fd")) >= NOFILE
    finally:
        for _, writer in silent:
            writer.transport.abort()
    released = heartbeat_at(state_dir, pid)
    await wait_for("a heartbeat after release", lambda: heartbeat_at(state_dir, pid) > released)
    await wait_for("/healthz 200", lambda: http_get(gw.http + "/healthz")[0] == 200)
    assert worker_pid(gw) == pid
    await neighbour.check(count=20)
    await neighbour.stop()
    text = metrics_text(gw)
    assert not re.search(r"^fanout_worker_restarts_total\{[^}]*\} [1-9]", text, re.M)
    assert "worker heartbeat stopped" not in gw.logs()
