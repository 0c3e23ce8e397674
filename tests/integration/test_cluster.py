"""Two gateway workers against a real 3-node NATS cluster: fan-out and failover."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import pytest

from fanout.devtoken import make_token
from fanout.embedded_nats import EmbeddedNats, free_port
from tests.conftest import Gateway, http_get
from tests.helpers import async_wait_for
from tests.integration.wsclient import Frame, WsClient, wait_for_interest

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster() -> Iterator[list[EmbeddedNats]]:
    route_ports = [free_port() for _ in range(3)]
    nodes = []
    for i, rp in enumerate(route_ports):
        routes = ", ".join(
            f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i
        )
        conf = f"cluster {{ name: fanout-test, listen: 127.0.0.1:{rp}, routes: [{routes}] }}\n"
        nodes.append(EmbeddedNats(config_text=conf))
    for node in nodes:
        node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def numbered(frame: Frame) -> bool:
    """A test message (not a probe of :func:`wait_for_interest`)."""
    return frame.get("op") == "msg" and "n" in frame["data"]


async def routed_everywhere(nodes: list[EmbeddedNats], clients: list[WsClient]) -> None:
    """Every node routes the subject to every given client (SUBs and cluster routes are async)."""
    for node in nodes:
        nc = await nats.connect(node.url)
        try:
            for c in clients:
                await wait_for_interest(nc, c, "xy.md.cluster")
        finally:
            await nc.close()


async def test_fanout_and_failover_across_a_cluster(
    cluster: list[EmbeddedNats],
    keypair: tuple[Path, Path],
    make_gateway: Callable[..., Gateway],
) -> None:
    private, public = keypair
    urls = ",".join(n.url for n in cluster)
    gw = make_gateway("--workers", "2", NATS_URLS=urls, JWT_PUBLIC_KEY=str(public))
    token = make_token(
        private_key_pem=private.read_bytes(), sub="c", subjects=["xy.md.>"], ttl_s=600
    )
    clients: list[WsClient] = []
    try:
        by_worker: dict[str, list[WsClient]] = {}
        for _ in range(40):
            c = await WsClient.connect(gw.ws, token)
            welcome = await c.recv()
            clients.append(c)
            by_worker.setdefault(welcome["conn"].split("-")[0], []).append(c)
            if len(by_worker) == 2 and min(len(v) for v in by_worker.values()) >= 2:
                break
        assert len(by_worker) == 2, "SO_REUSEPORT spread 40 connections over one worker only"
        for c in clients:
            assert (await c.subscribe("xy.md.cluster"))["op"] == "ack"
        await routed_everywhere(cluster, [group[0] for group in by_worker.values()])
        # publish on every node in turn: every client on both workers gets every message
        for i, node in enumerate(cluster):
            nc = await nats.connect(node.url)
            await nc.publish("xy.md.cluster", json.dumps({"n": i}).encode())
            await nc.flush()
            await nc.close()
        for c in clients:
            got = [(await c.expect(numbered))["data"]["n"] for _ in range(3)]
            assert got == [0, 1, 2]

        _, body, _ = http_get(gw.admin + "/healthz")
        workers = json.loads(body)["workers"]
        assert len(workers) == 2 and all(w["natsConnected"] for w in workers)
        victim_url = workers[0]["natsUrl"]
        victim_pid = f"{workers[0]['pid']:x}"
        victim = next(n for n in cluster if n.url == victim_url)
        survivors = [n for n in cluster if n is not victim]
        victim.kill()
        affected = by_worker[victim_pid]
        for c in affected:
            down = await c.expect(lambda f: f.get("op") == "status", timeout=10)
            assert down == {"op": "status", "nats": "down", "code": "XYW004"}
            up = await c.expect(lambda f: f.get("op") == "status", timeout=15)
            assert up["nats"] == "up"
        await routed_everywhere(survivors[:1], [group[0] for group in by_worker.values()])
        nc = await nats.connect(survivors[0].url)
        await nc.publish("xy.md.cluster", b'{"n":99}')
        await nc.flush()
        await nc.close()
        for c in clients:  # nobody was disconnected, everyone still receives
            frame = await c.expect(lambda f: numbered(f) and f["data"]["n"] == 99, timeout=10)
            assert frame["subject"] == "xy.md.cluster"
        _, body, _ = http_get(gw.admin + "/metrics")
        assert re.search(r"^xy_nats_reconnects_total [1-9]", body.decode(), re.M)
    finally:
        for c in clients:
            await c.close()


def nats_failures(gw: Gateway) -> int:
    """How many failed NATS attempts the gateway logged."""
    lines = [json.loads(ln) for ln in gw.logs().splitlines() if ln.startswith("{")]
    return len([ln for ln in lines if ln.get("msg") in ("NATS error", "NATS connect failed")])


async def test_nats_unreachable_at_start(
    keypair: tuple[Path, Path], make_gateway: Callable[..., Gateway]
) -> None:
    _, public = keypair
    dead = f"nats://127.0.0.1:{free_port()}"
    gw = make_gateway(
        "--workers", "1", wait_ready=False, NATS_URLS=dead, JWT_PUBLIC_KEY=str(public)
    )
    status, body, _ = http_get(gw.http + "/readyz")
    assert status == 503 and json.loads(body)["code"] == "XYW004"
    status, body, _ = http_get(gw.http + "/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["natsConnected"] is False and health["lastErrorCode"] == "XYW004"
    await async_wait_for(lambda: nats_failures(gw) >= 1, 20, "a failed NATS attempt logged")
    # still retrying, not crashed: once a nats-server appears on that URL the gateway is ready
    late = EmbeddedNats(port=int(dead.rsplit(":", 1)[1]))
    late.start()
    try:
        await async_wait_for(lambda: http_get(gw.http + "/readyz")[0] == 200, 30, "ready")
        assert gw.proc is not None and gw.proc.poll() is None
    finally:
        late.stop()
