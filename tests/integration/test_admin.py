"""The admin listener (issue 16 item 1) and the live view behind ``fanout top`` (item 2).

Real ``fanout serve`` with two workers, a real nats-server, real sockets: the
public port answers only what browsers may see, the admin port answers for the
whole gateway from whichever worker the kernel picks.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from fanout.worker.app import PUBLIC_HEALTH_FIELDS
from tests.conftest import Gateway, http_get, launch_gateway
from tests.integration.test_workers import descendants
from tests.integration.wsclient import WsClient

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def nats_module() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture(scope="module")
def gw(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = launch_gateway(
        tmp_path_factory.mktemp("admin"),
        "--workers",
        "2",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
    )
    yield gateway
    gateway.stop()


@pytest.fixture
def token(keypair: tuple[Path, Path]) -> str:
    return make_token(
        private_key_pem=keypair[0].read_bytes(), sub="ops", subjects=["xy.md.>"], ttl_s=600
    )


def get_json(url: str) -> tuple[int, dict[str, object]]:
    status, body, _ = http_get(url)
    return status, json.loads(body)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # waits on: the condition (poll)


def listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on: its socket inodes matched against /proc/net/tcp{,6}."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def worker_listeners(gw: Gateway) -> dict[int, set[int]]:
    """pid -> listening ports, for every process of the tree that listens on the public port."""
    assert gw.proc is not None
    found = {pid: listening_ports(pid) for pid in descendants(gw.proc.pid)}
    return {pid: ports for pid, ports in found.items() if gw.port in ports}


def test_public_port_serves_only_what_browsers_may_see(gw: Gateway) -> None:
    status, health = get_json(gw.http + "/healthz")
    assert status == 200
    assert sorted(health) == sorted(PUBLIC_HEALTH_FIELDS)
    assert health["natsConnected"] is True
    for path in ("/metrics", "/admin", "/admin/state.json", "/", "/demo.js"):
        assert http_get(gw.http + path)[0] == 404, path
    assert http_get(gw.http + "/readyz")[0] == 200
    status, _, headers = http_get(gw.http + "/fanout.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")


def test_admin_port_serves_metrics_detailed_health_and_the_page(gw: Gateway) -> None:
    status, body, headers = http_get(gw.admin + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"\nxy_ws_active_connections " in body
    status, health = get_json(gw.admin + "/healthz")
    assert status == 200 and health["ready"] is True
    assert isinstance(health["workers"], list) and len(health["workers"]) == 2
    assert http_get(gw.admin + "/readyz")[0] == 200
    status, body, headers = http_get(gw.admin + "/admin")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/admin/admin.js"' in body
    assert http_get(gw.admin + "/admin/admin.js")[0] == 200
    assert http_get(gw.admin + "/ws")[0] == 404  # no WebSocket clients on the admin port


def test_every_worker_listens_on_the_admin_port(gw: Gateway) -> None:
    admin_port = int(gw.env["FANOUT_ADMIN_PORT"])
    listeners = worker_listeners(gw)
    assert len(listeners) == 2
    assert all(ports == {gw.port, admin_port} for ports in listeners.values()), listeners
    assert gw.proc is not None and listening_ports(gw.proc.pid) == set()  # not the supervisor


async def test_admin_answers_reflect_both_workers(gw: Gateway, token: str) -> None:
    """Whichever worker the kernel hands a request, it answers for the whole gateway."""
    pids = {w["pid"] for w in json.loads(http_get(gw.admin + "/healthz")[1])["workers"]}
    assert len(pids) == 2
    clients = [await WsClient.connect(gw.ws, token) for _ in range(6)]
    try:
        for n, client in enumerate(clients):
            await client.subscribe(f"xy.md.admin.{n}", n + 1)

        subscribed_at = time.time()

        def settled() -> bool:
            """Every row of one answer comes from a heartbeat written after the subs."""
            view = json.loads(http_get(gw.admin + "/admin/state.json")[1])
            assert {w["pid"] for w in view["workers"]} == pids
            beats = [view["at"] - w["heartbeatAgeSeconds"] for w in view["workers"]]
            return min(beats) > subscribed_at and view["totals"]["clients"] == 6

        # a worker's own figures are fresh, the other's are from its last heartbeat (1 s):
        # wait until both have written theirs since the subs (five answers in a row could
        # all come from the worker holding the clients), then every answer must agree
        def agreed() -> bool:
            return all(settled() for _ in range(5))

        await asyncio.to_thread(wait_until, "6 clients in every worker's answer", agreed)
        for _ in range(20):  # new connection each time: SO_REUSEPORT spreads them over workers
            view = json.loads(http_get(gw.admin + "/admin/state.json")[1])
            assert {w["pid"] for w in view["workers"]} == pids
            assert sum(w["clients"] for w in view["workers"]) == view["totals"]["clients"] == 6, (
                view
            )
        _, health = get_json(gw.admin + "/healthz")
        assert health["clients"] == 6
    finally:
        for client in clients:
            await client.close()


async def test_live_view_counts_deliveries(
    gw: Gateway, token: str, nats_module: EmbeddedNats
) -> None:
    """Every message a client received shows in its worker's ``deliveredTotal``."""

    def delivered() -> int:
        view = json.loads(http_get(gw.admin + "/admin/state.json")[1])
        return sum(int(w["deliveredTotal"]) for w in view["workers"])

    before = delivered()
    client = await WsClient.connect(gw.ws, token)
    nc = await nats.connect(nats_module.url)
    received = 0
    try:
        ack = await client.subscribe("xy.md.admin.count.*", 1)
        assert ack.get("op") == "ack", ack
        async with asyncio.timeout(10):  # probes until the gateway's NATS SUB is in place
            while True:
                await nc.publish("xy.md.admin.count.probe", b'{"probe":true}')
                try:
                    await client.expect(lambda f: f.get("op") == "msg", timeout=0.2)
                except TimeoutError:
                    continue
                received += 1
                break
        for n in range(50):
            await nc.publish("xy.md.admin.count.n", json.dumps({"n": n}).encode())
        while True:
            frame = await client.expect(lambda f: f.get("op") == "msg")
            received += 1
            if frame["data"] == {"n": 49}:
                break
        await asyncio.to_thread(
            wait_until,
            f"{received} deliveries in the live view",
            lambda: delivered() - before == received,
        )
    finally:
        await nc.close()
        await client.close()


def run_top(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fanout.cli", "top", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=ROOT,
    )


def test_fanout_top_once_json(gw: Gateway) -> None:
    out = run_top("--once", "--json", "--url", gw.admin)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    assert view["status"] == "ok" and view["workersWanted"] == 2
    assert len(view["workers"]) == 2 and view["totals"]["workers"] == 2
    assert view["totals"]["natsConnected"] == 2
    for row in view["workers"]:
        assert set(row) >= {
            "pid",
            "clients",
            "subscriptions",
            "deliveriesPerSecond",
            "dropsPerSecond",
            "outboxMax",
            "loopLagSeconds",
            "rssBytes",
            "openFds",
            "nats",
        }
        assert row["nats"] == "connected" and row["rssBytes"] > 0 and row["openFds"] > 0


def test_fanout_top_finds_the_admin_port_from_the_environment(gw: Gateway) -> None:
    out = run_top("--once", env=gw.env)
    assert out.returncode == 0, out.stderr
    pids = [str(w["pid"]) for w in json.loads(http_get(gw.admin + "/healthz")[1])["workers"]]
    lines = out.stdout.splitlines()
    assert "workers 2/2" in lines[0] and "WORKER" in lines[2]
    assert all(any(pid in line for line in lines[3:5]) for pid in pids)
    assert lines[5].split()[0] == "all"


def test_fanout_top_without_a_gateway_exits_1() -> None:
    out = run_top("--once", "--url", f"http://127.0.0.1:{free_port()}")
    assert out.returncode == 1
    assert out.stderr.startswith("fanout top: cannot read the admin listener: http://127.0.0.1:")


def test_admin_port_0_turns_the_listener_off(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_ADMIN_PORT="0",
    )
    try:
        (ports,) = worker_listeners(gateway).values()
        assert ports == {gateway.port}
        assert http_get(gateway.http + "/metrics")[0] == 404
        out = run_top("--once", env=gateway.env)
        assert out.returncode == 2
        assert "admin.port is 0" in out.stderr
    finally:
        assert gateway.stop() == 0


def test_admin_port_taken_by_another_gateway_is_refused(
    gw: Gateway, nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    """SO_REUSEPORT would let a second gateway share the admin port and answer half its scrapes."""
    second = launch_gateway(
        tmp_path,
        start=False,
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
        FANOUT_ADMIN_PORT=gw.env["FANOUT_ADMIN_PORT"],
    )
    out = subprocess.run(
        [sys.executable, "-m", "fanout.cli", "serve"],
        env=second.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert f"admin.port: port {gw.env['FANOUT_ADMIN_PORT']} on 127.0.0.1" in out.stderr


def test_admin_flag_sets_the_port(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    """``--admin-port`` wins over ``FANOUT_ADMIN_PORT`` (the command line comes last)."""
    admin_port = free_port()
    gateway = launch_gateway(
        tmp_path,
        "--workers",
        "1",
        "--admin-port",
        str(admin_port),
        start=False,
        NATS_URLS=nats_module.url,
        JWT_PUBLIC_KEY=str(keypair[1]),
    )
    try:
        gateway.start(wait_ready=False)
        wait_until("/readyz 200", lambda: http_get(gateway.http + "/readyz")[0] == 200)
        (ports,) = worker_listeners(gateway).values()
        assert ports == {gateway.port, admin_port}
        assert http_get(f"http://127.0.0.1:{admin_port}/metrics")[0] == 200
    finally:
        assert gateway.stop() == 0


def test_admin_port_held_by_another_program_stops_the_boot_naming_it(
    nats_module: EmbeddedNats, keypair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Prometheus's default port is 9090 too: a taken admin port is a boot error, not a hang."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        gateway = launch_gateway(
            tmp_path,
            start=False,
            NATS_URLS=nats_module.url,
            JWT_PUBLIC_KEY=str(keypair[1]),
            FANOUT_ADMIN_PORT=str(taken),
        )
        out = subprocess.run(
            [sys.executable, "-m", "fanout.cli", "serve", "--workers", "1"],
            env=gateway.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        squatter.close()
    assert out.returncode == 2, out.stderr
    assert (
        f"admin listener: cannot listen on 127.0.0.1:{taken}: Address already in use"
        " (admin.port; 0 turns it off)" in out.stderr
    )
