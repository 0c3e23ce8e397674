"""The supervisor with real workers: kill -9, SIGTERM drain, SIGHUP rolling restart, titles."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import nats
import pytest

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats
from tests.conftest import Gateway, http_get, worker_pids
from tests.helpers import async_wait_for, wait_for
from tests.integration.wsclient import Frame, WsClient, wait_for_interest

pytestmark = pytest.mark.slow


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


def all_workers(gw: Gateway, count: int) -> dict[int, int]:
    """index -> pid once ``count`` workers are up."""
    return wait_for(
        lambda: p if len(p := worker_pids(gw)) >= count else None, 20, f"{count} workers"
    )


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="w", subjects=["xy.md.>"], ttl_s=600
    )


def is_numbered(frame: Frame) -> bool:
    """A test message (not a probe of :func:`wait_for_interest`)."""
    return frame.get("op") == "msg" and "i" in frame["data"]


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
    nats_server: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway("--workers", "2", NATS_URLS=nats_server.url, JWT_PUBLIC_KEY=str(keypair[1]))
    all_workers(gw, 2)
    clients = await connect_many(gw, token, 200)
    nc = await nats.connect(nats_server.url)
    try:
        pids = {pid for _, pid in clients}
        assert len(pids) == 2
        victim = min(pids)
        survivors = [c for c, pid in clients if pid != victim]
        killed = [c for c, pid in clients if pid == victim]
        for pid in pids:  # each worker's NATS subscription is in place
            await wait_for_interest(nc, next(c for c, p in clients if p == pid), "xy.md.w")
        os.kill(victim, signal.SIGKILL)
        for i in range(30):
            await nc.publish("xy.md.w", json.dumps({"i": i}).encode())
        for c in survivors:  # no gap on the other worker
            got = [(await c.expect(is_numbered))["data"]["i"] for _ in range(30)]
            assert got == list(range(30))
        for c in killed:  # past the probes they got, the connection just ends (1006)
            with pytest.raises(Exception):  # noqa: B017
                for _ in range(1_000):
                    await c.recv(timeout=10)
            assert not [f for f in c.frames if is_numbered(f)]
        # reconnect: served by the survivor or the replacement
        await async_wait_for(
            lambda: len(c := worker_pids(gw)) == 2 and victim not in c.values(),
            20,
            "the killed worker replaced",
        )
        again = await connect_many(gw, token, 10)
        assert victim not in {pid for _, pid in again}
        for c, _ in again:
            await c.close()

        # counters reach Prometheus once per sweep (1 s): poll until they add up
        def forwarded() -> str | None:
            text = http_get(gw.admin + "/metrics")[1].decode()
            found = re.search(r"^xy_ws_messages_forwarded_total (\S+)$", text, re.M)
            return text if found and float(found.group(1)) >= 30 * len(survivors) else None

        text = await async_wait_for(forwarded, 20, "the forwarded counter", interval=0.2)
        assert re.search(r'^fanout_worker_restarts_total\{reason="signal"\} 1\.0$', text, re.M)
        assert re.search(r"^fanout_workers 2\.0$", text, re.M)
    finally:
        await nc.close()
        for c, _ in clients:
            await c.close()


async def test_sigterm_drains_with_1001_and_leaves_no_orphans(
    nats_server: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway(
        "--workers",
        "2",
        NATS_URLS=nats_server.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_SERVER_GRACEFUL_TIMEOUT_S="3",
    )
    clients = await connect_many(gw, token, 20)
    assert gw.proc is not None
    tree = descendants(gw.proc.pid)
    assert tree
    gw.proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(c.closed_code(timeout=10) for c, _ in clients))
    assert set(codes) == {1001}
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    await async_wait_for(
        lambda: [p for p in tree if Path(f"/proc/{p}").exists() and "fanout" in cmdline(p)] == [],
        10,
        "no orphan left",
    )
    for c, _ in clients:
        await c.close()


async def test_process_titles(
    nats_server: EmbeddedNats, keypair: tuple[Path, Path], make_gateway: Callable[..., Gateway]
) -> None:
    gw = make_gateway("--workers", "2", NATS_URLS=nats_server.url, JWT_PUBLIC_KEY=str(keypair[1]))
    assert gw.proc is not None
    assert cmdline(gw.proc.pid) == f"fanout supervisor :{gw.port}"
    titles = sorted(cmdline(pid) for pid in all_workers(gw, 2).values())
    assert titles == [
        f"fanout worker 1 :{gw.port} [0 clients]",
        f"fanout worker 2 :{gw.port} [0 clients]",
    ]
    assert not any("BEGIN" in t or "eyJ" in t for t in titles)


@pytest.mark.usefixtures("tcp_migrate_req")
async def test_sighup_rolling_restart_refuses_no_handshake(
    nats_server: EmbeddedNats,
    keypair: tuple[Path, Path],
    token: str,
    make_gateway: Callable[..., Gateway],
) -> None:
    gw = make_gateway("--workers", "2", NATS_URLS=nats_server.url, JWT_PUBLIC_KEY=str(keypair[1]))
    clients = await connect_many(gw, token, 10)
    old = set(all_workers(gw, 2).values())
    failures: list[str] = []
    successes = 0
    stop = asyncio.Event()

    async def reconnect_loop() -> None:
        nonlocal successes
        async with aiohttp.ClientSession() as session:
            for _ in range(10_000):  # bounded; the test sets ``stop`` when the roll is over
                if stop.is_set():
                    break
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
        for _ in range(10_000):  # bounded; polls /readyz until the roll is over
            if stop.is_set():
                break
            status, _, _ = await asyncio.to_thread(http_get, gw.http + "/readyz")
            if status != 200:
                not_ready.append(status)
            await asyncio.sleep(0.05)  # poll interval of the readiness probe

    loops = [asyncio.create_task(reconnect_loop()) for _ in range(3)]
    loops.append(asyncio.create_task(readiness_loop()))
    try:
        # the reconnect loops are connecting before the roll starts
        await async_wait_for(lambda: successes >= 3, 20, "handshakes before the roll")
        before_roll = successes
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        codes = await asyncio.gather(*(c.closed_code(timeout=20) for c, _ in clients))
        assert set(codes) == {1012}
        await async_wait_for(
            lambda: len(p := worker_pids(gw)) == 2 and not set(p.values()) & old,
            30,
            "two new workers",
        )
        during_roll = successes
        # and keep connecting after it, to the new workers
        await async_wait_for(lambda: successes >= during_roll + 3, 20, "handshakes after it")
    finally:
        stop.set()
        await asyncio.gather(*loops)
        for c, _ in clients:
            await c.close()
    assert failures == []
    assert successes > before_roll
    assert not_ready == []  # draining workers are leaving; the gateway stays ready


async def test_worker_killed_right_after_it_served_is_replaced_not_a_boot_failure(
    nats_server: EmbeddedNats, keypair: tuple[Path, Path], make_gateway: Callable[..., Gateway]
) -> None:
    """The supervisor may not have read the state file yet: serving once counts as booted."""
    gw = make_gateway("--workers", "1", NATS_URLS=nats_server.url, JWT_PUBLIC_KEY=str(keypair[1]))
    first = worker_pids(gw)[1]
    os.kill(first, signal.SIGKILL)

    def replaced() -> bool:
        assert gw.proc is not None and gw.proc.poll() is None, gw.logs()
        try:
            current = worker_pids(gw).get(1)
        except OSError:
            current = None
        return current not in (None, first)

    await async_wait_for(replaced, 20, "worker 1 replaced")
