"""The supervisor with real workers: kill -9, SIGTERM drain, SIGHUP rolling restart, titles."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import pytest

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get, launch_gateway
from tests.integration.wsclient import WsClient

MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def worker_pids(gw: Gateway, wait_for: int = 0) -> dict[int, int]:
    """index -> pid, from /healthz (waiting up to 10 s until ``wait_for`` workers are up)."""
    deadline = time.monotonic() + 10
    while True:
        _, body, _ = http_get(gw.admin + "/healthz")
        pids = {w["index"]: w["pid"] for w in json.loads(body)["workers"]}
        if len(pids) >= wait_for or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


@pytest.fixture
def nats_srv() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="w", subjects=["xy.md.>"], ttl_s=600
    )


async def connect_many(gw: Gateway, token: str, n: int) -> list[tuple[WsClient, int]]:
    """n subscribed clients, each tagged with the pid of the worker that holds it."""
    out = []
    for _ in range(n):
        c = await WsClient.connect(gw.ws, token)
        welcome = await c.recv()
        await c.send({"op": "sub", "id": 1, "subject": "xy.md.w"})
        out.append((c, int(welcome["conn"].split("-")[0], 16)))
    for c, _ in out:
        await c.expect(lambda f: f.get("op") == "ack")
    return out


async def test_kill_9_worker_under_200_clients(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], token: str, tmp_path: Path
) -> None:
    gw = launch_gateway(
        tmp_path, "--workers", "2", NATS_URLS=nats_srv.url, JWT_PUBLIC_KEY=str(keypair[1])
    )
    worker_pids(gw, wait_for=2)
    clients = await connect_many(gw, token, 200)
    nc = await nats.connect(nats_srv.url)
    try:
        pids = {pid for _, pid in clients}
        assert len(pids) == 2
        victim = min(pids)
        survivors = [c for c, pid in clients if pid != victim]
        killed = [c for c, pid in clients if pid == victim]
        await asyncio.sleep(0.3)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for i in range(30):
            await nc.publish("xy.md.w", json.dumps({"i": i}).encode())
            await asyncio.sleep(0.01)
        for c in survivors:  # no gap on the other worker
            got = [(await c.expect(lambda f: f.get("op") == "msg"))["data"]["i"] for _ in range(30)]
            assert got == list(range(30))
        for c in killed:
            with pytest.raises(Exception):  # noqa: B017 - the connection just ends (1006)
                await c.recv(timeout=5)
        # reconnect: served by the survivor or the replacement within 2 s of the kill
        async with asyncio.timeout(10):
            while True:
                current = worker_pids(gw)
                if len(current) == 2 and victim not in current.values():
                    break
                await asyncio.sleep(0.05)
        replaced_in = time.monotonic() - killed_at
        assert replaced_in < 2.0, replaced_in
        again = await connect_many(gw, token, 10)
        assert victim not in {pid for _, pid in again}
        for c, _ in again:
            await c.close()
        # counters reach Prometheus once per sweep (1 s): poll until they add up
        async with asyncio.timeout(5):
            while True:
                _, body, _ = http_get(gw.admin + "/metrics")
                text = body.decode()
                found = re.search(r"^xy_ws_messages_forwarded_total (\S+)$", text, re.M)
                if found and float(found.group(1)) >= 30 * len(survivors):
                    break
                await asyncio.sleep(0.2)
        assert re.search(r'^fanout_worker_restarts_total\{reason="signal"\} 1\.0$', text, re.M)
        assert re.search(r"^fanout_workers 2\.0$", text, re.M)
    finally:
        await nc.close()
        for c, _ in clients:
            await c.close()
        gw.stop()


async def test_sigterm_drains_with_1001_and_leaves_no_orphans(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], token: str, tmp_path: Path
) -> None:
    gw = launch_gateway(
        tmp_path,
        "--workers",
        "2",
        NATS_URLS=nats_srv.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_SERVER_GRACEFUL_TIMEOUT_S="3",
    )
    clients = await connect_many(gw, token, 20)
    assert gw.proc is not None
    tree = descendants(gw.proc.pid)
    assert tree
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(c.closed_code(timeout=5) for c, _ in clients))
    assert set(codes) == {1001}
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0
    assert time.monotonic() - started < 3 + 1
    await asyncio.sleep(0.2)
    assert [p for p in tree if Path(f"/proc/{p}").exists() and "fanout" in cmdline(p)] == []
    for c, _ in clients:
        await c.close()


async def test_process_titles(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    gw = launch_gateway(
        tmp_path, "--workers", "2", NATS_URLS=nats_srv.url, JWT_PUBLIC_KEY=str(keypair[1])
    )
    try:
        assert gw.proc is not None
        assert cmdline(gw.proc.pid) == f"fanout supervisor :{gw.port}"
        titles = sorted(cmdline(pid) for pid in worker_pids(gw, wait_for=2).values())
        assert titles == [
            f"fanout worker 1 :{gw.port} [0 clients]",
            f"fanout worker 2 :{gw.port} [0 clients]",
        ]
        assert not any("BEGIN" in t or "eyJ" in t for t in titles)
    finally:
        gw.stop()


async def test_sighup_rolling_restart_refuses_no_handshake(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], token: str, tmp_path: Path
) -> None:
    if MIGRATE.exists() and MIGRATE.read_text().strip() != "1":
        try:
            MIGRATE.write_text("1")
        except OSError:
            pytest.skip("net.ipv4.tcp_migrate_req=1 is needed and cannot be set here")
    gw = launch_gateway(
        tmp_path, "--workers", "2", NATS_URLS=nats_srv.url, JWT_PUBLIC_KEY=str(keypair[1])
    )
    clients = await connect_many(gw, token, 10)
    old = set(worker_pids(gw, wait_for=2).values())
    failures: list[str] = []
    successes = 0
    stop = asyncio.Event()

    async def reconnect_loop() -> None:
        nonlocal successes
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    async with session.ws_connect(gw.ws, protocols=("bearer", token)) as ws:
                        msg = await ws.receive(timeout=5)
                        if msg.type != aiohttp.WSMsgType.TEXT or '"welcome"' not in msg.data:
                            if ws.close_code != 1012:
                                failures.append(f"first frame {msg.type} {ws.close_code}")
                        else:
                            successes += 1
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    failures.append(repr(exc))

    not_ready: list[int] = []

    async def readiness_loop() -> None:
        while not stop.is_set():
            status, _, _ = await asyncio.to_thread(http_get, gw.http + "/readyz")
            if status != 200:
                not_ready.append(status)
            await asyncio.sleep(0.05)

    loops = [asyncio.create_task(reconnect_loop()) for _ in range(3)]
    loops.append(asyncio.create_task(readiness_loop()))
    try:
        await asyncio.sleep(0.3)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        codes = await asyncio.gather(*(c.closed_code(timeout=20) for c, _ in clients))
        assert set(codes) == {1012}
        async with asyncio.timeout(20):
            while set(worker_pids(gw).values()) & old or len(worker_pids(gw)) != 2:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*loops)
        for c, _ in clients:
            await c.close()
        gw.stop()
    assert failures == []
    assert successes > 10
    assert not_ready == []  # draining workers are leaving; the gateway stays ready


async def test_worker_killed_right_after_it_served_is_replaced_not_a_boot_failure(
    nats_srv: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    """The supervisor may not have read the state file yet: serving once counts as booted."""
    gw = launch_gateway(
        tmp_path, "--workers", "1", NATS_URLS=nats_srv.url, JWT_PUBLIC_KEY=str(keypair[1])
    )
    try:
        first = worker_pids(gw)[1]
        os.kill(first, signal.SIGKILL)
        async with asyncio.timeout(10):
            while True:
                try:
                    current = worker_pids(gw).get(1)
                except OSError:
                    current = None
                if current not in (None, first):
                    break
                assert gw.proc is not None and gw.proc.poll() is None, gw.logs()
                await asyncio.sleep(0.05)
    finally:
        gw.stop()
